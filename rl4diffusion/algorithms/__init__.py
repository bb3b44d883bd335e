"""One file per algorithm. ``ALGORITHMS`` maps a name (``algo=<name>``) to "module:Class:ConfigClass"."""

from __future__ import annotations

import importlib

from rl4diffusion.algorithms.base import Algorithm, build_config
from rl4diffusion.errors import ConfigError

ALGORITHMS: dict[str, str] = {
    "ddpo": "rl4diffusion.algorithms.ddpo:DDPO:DDPOConfig",
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
