"""Diffusion models as policies over denoising steps: conditioning, CFG, the stochastic step with its
log-probability, the reference model, LoRA and decoding. ``base.py`` holds the shared class;
``sdxl.py`` and ``flow.py`` change only the denoiser call and the step; ``steps.py`` is the pure step math."""

from rl4diffusion.policies.base import DiffusionPolicy, PolicyConfig

__all__ = ["DiffusionPolicy", "PolicyConfig"]
