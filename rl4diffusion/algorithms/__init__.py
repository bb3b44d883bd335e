"""One file per algorithm. ``ALGORITHMS`` maps a name (``algo=<name>``) to "module:Class:ConfigClass"."""

from __future__ import annotations

import importlib

from rl4diffusion.algorithms.base import Algorithm, build_config
from rl4diffusion.errors import ConfigError

ALGORITHMS: dict[str, str] = {
    "ddpo": "rl4diffusion.algorithms.ddpo:DDPO:DDPOConfig",
    "dpok": "rl4diffusion.algorithms.dpok:DPOK:DPOKConfig",
    "grpo": "rl4diffusion.algorithms.grpo:GRPO:GRPOConfig",
    "refl": "rl4diffusion.algorithms.refl:ReFL:ReFLConfig",
    "draft": "rl4diffusion.algorithms.draft:DRaFT:DRaFTConfig",
    "alignprop": "rl4diffusion.algorithms.alignprop:AlignProp:AlignPropConfig",
    "diffusion_dpo": "rl4diffusion.algorithms.diffusion_dpo:DiffusionDPO:DiffusionDPOConfig",
    "sft": "rl4diffusion.algorithms.diffusion_dpo:SFT:PreferenceConfig",
    "dmpo": "rl4diffusion.algorithms.dmpo:DMPO:DMPOConfig",
    "dpo_cm": "rl4diffusion.algorithms.sdpo:DPOCM:SDPOConfig",
    "sdpo": "rl4diffusion.algorithms.sdpo:SDPO:SDPOConfig",
    "nabla_gfn": "rl4diffusion.algorithms.nabla_gfn:NablaGFN:NablaGFNConfig",
}


def algorithm_classes(name: str):
    """(Algorithm class, config dataclass) for ``name``; ConfigError listing valid names if unknown."""
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}. Valid names: {', '.join(sorted(ALGORITHMS))}.")
    module, cls, cfg_cls = ALGORITHMS[name].split(":")
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, cfg_cls)


def build_algorithm(name: str, options: dict, policy, reward, *, seed: int = 0) -> Algorithm:
    cls, cfg_cls = algorithm_classes(name)
    return cls(build_config(cfg_cls, options, name), policy, reward, seed=seed)


__all__ = ["ALGORITHMS", "Algorithm", "algorithm_classes", "build_algorithm"]
