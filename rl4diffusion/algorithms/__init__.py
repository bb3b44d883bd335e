"""One file per algorithm: a config dataclass, a pure loss, and a class registered by name.

``@register_algorithm("ddpo", config=DDPOConfig)`` above a class makes it ``algo=ddpo`` and stores
its config dataclass in Hydra's ConfigStore as ``algo/ddpo_schema``, which ``conf/algo/ddpo.yaml``
extends. ``ALGORITHMS`` maps every registered name to ``"module:Class"``: the built-ins are listed
here and imported on first use, so importing this package stays cheap; a user's own package
registers its algorithms when it is imported (``algo=my_pkg.my_module:MyAlgo`` on the command line
does that, see the README's "Add your own algorithm").

**Config defaults.** A dataclass default is the value ``python -m rl4diffusion.train`` runs: the
embedded world's (the tiny model on a laptop CPU). Where a paper (SD1.5, SD3) used another value,
the field's docstring names it and says why this one differs. A YAML line only overrides a default
for a reason written beside it — another model (``conf/model/sd15.yaml``), or an algorithm that
shares its dataclass with another (``conf/algo/sdpo.yaml``'s β).
"""

from __future__ import annotations

import importlib
from typing import Any

from rl4diffusion.errors import ConfigError

ALGORITHMS: dict[str, str] = {  # name → "module:Class"; @register_algorithm adds more
    "ddpo": "rl4diffusion.algorithms.ddpo:DDPO",
    "dpok": "rl4diffusion.algorithms.dpok:DPOK",
    "grpo": "rl4diffusion.algorithms.grpo:GRPO",
    "refl": "rl4diffusion.algorithms.refl:ReFL",
    "draft": "rl4diffusion.algorithms.draft:DRaFT",
    "alignprop": "rl4diffusion.algorithms.alignprop:AlignProp",
    "diffusion_dpo": "rl4diffusion.algorithms.diffusion_dpo:DiffusionDPO",
    "sft": "rl4diffusion.algorithms.diffusion_dpo:SFT",
    "dmpo": "rl4diffusion.algorithms.dmpo:DMPO",
    "dpo_cm": "rl4diffusion.algorithms.sdpo:DPOCM",
    "sdpo": "rl4diffusion.algorithms.sdpo:SDPO",
    "nabla_gfn": "rl4diffusion.algorithms.nabla_gfn:NablaGFN",
    "nft": "rl4diffusion.algorithms.nft:NFT",
}
_LOADED: dict[str, tuple[type, type]] = {}  # name → (class, config dataclass), filled by @register_algorithm


def _add_algorithm(name: str, cls: type, config_cls: type) -> None:
    """What ``@register_algorithm`` does: record the class and store its config's schema in Hydra's ConfigStore."""
    from rl4diffusion.training.config import store_algorithm_schema

    path = f"{cls.__module__}:{cls.__qualname__}"
    if ALGORITHMS.get(name, path) != path:
        raise ConfigError(f"algorithm name {name!r} is already registered by {ALGORITHMS[name]}; "
                          f"register {path} under another name.")
    store_algorithm_schema(name, config_cls)
    ALGORITHMS[name] = path
    _LOADED[name] = (cls, config_cls)


def algorithm_classes(name: str) -> tuple[type, type]:
    """(Algorithm class, config dataclass) for ``name``; ConfigError listing valid names if unknown."""
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}. Valid names: {', '.join(sorted(ALGORITHMS))}.")
    if name not in _LOADED:
        importlib.import_module(ALGORITHMS[name].partition(":")[0])  # its @register_algorithm fills _LOADED
    if name not in _LOADED:
        raise ConfigError(f"{ALGORITHMS[name]} does not register {name!r}: decorate the class with "
                          f"@register_algorithm({name!r}, config=...).")
    return _LOADED[name]


def build_algorithm(name: str, options: dict, policy, reward, *, seed: int = 0):
    """The algorithm ``name`` with its config built from ``options`` (checked; defaults fill the rest)."""
    from rl4diffusion.algorithms.base import build_config

    cls, cfg_cls = algorithm_classes(name)
    return cls(build_config(cfg_cls, options, name), policy, reward, seed=seed)


def __getattr__(attr: str) -> Any:  # Algorithm, build_config, register_algorithm: imported on first use (torch)
    if attr in ("Algorithm", "build_config", "register_algorithm"):
        from rl4diffusion.algorithms import base

        return getattr(base, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["ALGORITHMS", "Algorithm", "algorithm_classes", "build_algorithm", "build_config", "register_algorithm"]
