"""The reward API: a reward is ``fn(images, prompts) -> Tensor[B]`` plus a name and a
``differentiable`` flag.

``images`` is a float tensor [B, 3, H, W] in [0, 1]; ``prompts`` a list of B strings. A
differentiable reward lets gradients flow from its output to ``images``.

Register a reward by name so that ``reward=<name>`` works on the command line::

    @register_reward("brightness", differentiable=True)
    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

A registered *class* is instantiated with the config's keyword arguments (useful for rewards
that load weights); a registered *function* is used as it is. Code outside this package is
named with ``reward=my_pkg.my_module:my_fn`` and needs no registration.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rl4diffusion.errors import ConfigError


class RewardError(ConfigError):
    """A reward function raised while scoring a batch (reported with its name and the batch's prompts)."""


RewardFn = Callable[[torch.Tensor, list], torch.Tensor]


@dataclass
class _Entry:
    obj: Any
    differentiable: bool
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_reward(name: str, *, differentiable: bool, description: str = ""):
    """Decorator: register a reward function or class under ``name``."""

    def deco(obj):
        if name in _REGISTRY and _REGISTRY[name].obj is not obj:
            raise ValueError(f"a reward named {name!r} is already registered")
        doc = description or (inspect.getdoc(obj) or "").split("\n")[0]
        _REGISTRY[name] = _Entry(obj, differentiable, doc)
        obj.differentiable = differentiable
        return obj

    return deco


class Reward:
    """A callable reward with its metadata. Counts how many images it has scored."""

    def __init__(self, name: str, fn: RewardFn, differentiable: bool):
        self.name = name
        self.fn = fn
        self.differentiable = differentiable
        self.queries = 0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"reward {self.name!r} expects images [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        try:
            out = self.fn(images, list(prompts))
        except Exception as e:
            shown = ", ".join(repr(p) for p in list(prompts)[:4]) + (", …" if len(prompts) > 4 else "")
            raise RewardError(
                f"reward {self.name!r} raised {type(e).__name__}: {e} — on a batch of {len(prompts)} images with "
                f"prompts [{shown}]. Fix the reward function (or its options in conf/reward/) and rerun."
            ) from e
        if not isinstance(out, torch.Tensor) or out.shape != (images.shape[0],):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"reward {self.name!r} must return a tensor of shape [B]=[{images.shape[0]}], got {shape}")
        self.queries += images.shape[0]
        return out

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, differentiable={self.differentiable})"


class WeightedSum:
    """r = Σ_k w_k · r_k — differentiable only when every term is."""

    def __init__(self, terms: Mapping[str, float], device: str | torch.device = "cpu"):
        if not terms:
            raise ConfigError("reward=weighted needs at least one term, e.g. reward.terms={shape_alignment: 1.0}")
        self.parts = [(build_reward(n, device=device), float(w)) for n, w in terms.items()]

    def __call__(self, images, prompts):
        return sum(w * r(images, prompts) for r, w in self.parts)


def available_rewards() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def describe_rewards() -> dict[str, tuple[bool, str]]:
    _import_builtins()
    return {n: (e.differentiable, e.description) for n, e in sorted(_REGISTRY.items())}


def _import_builtins() -> None:
    # Importing the package registers the built-in rewards.
    import rl4diffusion.rewards  # noqa: F401


def _load_target(target: str):
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or any error raised while importing user code
        raise ConfigError(
            f"reward={target}: could not import module {module_name!r} ({type(e).__name__}: {e}). "
            "Check that the module is on PYTHONPATH (e.g. run from its parent directory) and imports cleanly."
        ) from None
    if not hasattr(module, attr):
        raise ConfigError(f"reward={target}: module {module_name!r} has no attribute {attr!r}.")
    return getattr(module, attr)


def build_reward(name: str, *, device: str | torch.device = "cpu", **kwargs) -> Reward:
    """Build the reward called ``name`` (a registered name or ``pkg.module:attr``).

    ``kwargs`` go to a registered class's constructor (a ``device`` argument is passed when
    the constructor accepts one). Raises ConfigError listing the valid names if unknown.
    """
    _import_builtins()
    if name == "weighted":
        terms = kwargs.pop("terms", {})
        obj = WeightedSum(terms, device=device)
        return Reward("weighted(" + ",".join(terms) + ")", obj, all(r.differentiable for r, _ in obj.parts))
    if ":" in name:
        obj = _load_target(name)
        differentiable = bool(kwargs.pop("differentiable", getattr(obj, "differentiable", False)))
    elif name in _REGISTRY:
        obj, differentiable = _REGISTRY[name].obj, _REGISTRY[name].differentiable
    else:
        raise ConfigError(
            f"unknown reward {name!r}. Valid names: {', '.join(available_rewards())}, "
            "'weighted' (a sum of those), or your own function as reward=my_pkg.my_module:my_fn."
        )
    if inspect.isclass(obj):
        params = inspect.signature(obj).parameters
        if "device" in params:
            kwargs["device"] = device
        try:
            fn = obj(**kwargs)
        except TypeError as e:
            raise ConfigError(f"reward {name!r} could not be built with options {kwargs}: {e}") from None
    else:
        if kwargs:
            raise ConfigError(f"reward {name!r} is a plain function and takes no options, got {sorted(kwargs)}")
        fn = obj
    if not callable(fn):
        raise ConfigError(f"reward {name!r} is not callable")
    return Reward(name.split(":")[-1], fn, differentiable)
