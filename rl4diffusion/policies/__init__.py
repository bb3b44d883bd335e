"""Diffusion models as policies over denoising steps: conditioning, CFG, the stochastic step with its
log-probability, the reference model, LoRA and decoding.

``base.py`` holds ``DiffusionPolicy``, which owns what every model kind shares; its subclasses override
only the denoiser call, the schedule and the step: ``sd.py`` (``StableDiffusionPolicy``, DDIM),
``sdxl.py`` (``SDXLPolicy``, SDXL's pooled and size conditioning) and ``flow.py``
(``FlowMatchingPolicy``, SD3's flow-matching SDE). ``steps.py`` is the pure step math.

Importing this package registers the subclasses, so ``DiffusionPolicy.from_pretrained`` finds them.
"""

from rl4diffusion.policies.base import DiffusionPolicy, PolicyConfig
from rl4diffusion.policies.flow import FlowMatchingPolicy
from rl4diffusion.policies.sd import StableDiffusionPolicy
from rl4diffusion.policies.sdxl import SDXLPolicy

__all__ = ["DiffusionPolicy", "FlowMatchingPolicy", "PolicyConfig", "SDXLPolicy", "StableDiffusionPolicy"]
