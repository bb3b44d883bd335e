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

Every call is checked (``Reward.__call__``): the output must be a floating torch tensor of shape [B] (on any
device), and a reward declared differentiable must keep its graph to the images. A wrong output, an
exception or a ``sys.exit`` inside the reward is a ``RewardError`` (a ``ConfigError``: exit code 2) naming the
reward; ``Ctrl-C`` passes through as ``KeyboardInterrupt``. ``+reward.timeout=<seconds>`` bounds each call
(``signal.setitimer`` on the main thread).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rl4diffusion.errors import ConfigError


class RewardError(ConfigError):
    """A reward misbehaved: it raised, exited, timed out or returned something other than scores [B]."""


class RewardTimeout(BaseException):
    """Raised inside a reward call by the ``reward.timeout`` alarm (not an Exception: a reward's own
    ``except Exception`` retry loop must not swallow it)."""


RewardFn = Callable[[torch.Tensor, list], torch.Tensor]


@dataclass
class _Entry:
    obj: Any
    differentiable: bool
    description: str


_REGISTRY: dict[str, _Entry] = {}
_calls_in_progress = 0  # reward calls on the main thread's stack (a weighted sum nests them)


def in_reward_call() -> bool:
    """Whether a reward is scoring on the main thread right now: a signal handler then stops the run at once,
    as a hanging reward would otherwise keep it alive (``StopRequest`` in ``training/trainer.py``). Calls on
    the asynchronous scorer's worker thread do not count: the main thread is sampling, and finishes the
    update and checkpoints as usual."""
    return _calls_in_progress > 0


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


def _describe(value) -> str:
    """What a reward returned, for a message: the type, and a tensor's or array's shape and dtype."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)} and dtype {value.dtype}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy and friends
        return f"a {type(value).__module__}.{type(value).__name__} of shape {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__} ({value!r:.40})"


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise RewardTimeout in the reward's frame after ``seconds`` (main thread only: SIGALRM's handler runs
    there; elsewhere, or when another alarm is set, the call runs unbounded)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or \
            signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        yield
        return

    def alarm(signum, frame):
        raise RewardTimeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Reward:
    """A callable reward with its metadata. Counts how many images it has scored.

    ``timeout`` (seconds, None = none) bounds each call; a call that takes longer is a RewardError.
    """

    def __init__(self, name: str, fn: RewardFn, differentiable: bool, timeout: float | None = None):
        self.name = name
        self.fn = fn
        self.differentiable = differentiable
        self.timeout = timeout
        self.queries = 0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        global _calls_in_progress
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"reward {self.name!r} expects images [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        shown = ", ".join(repr(p) for p in list(prompts)[:4]) + (", …" if len(prompts) > 4 else "")
        batch = f"on a batch of {len(prompts)} images with prompts [{shown}]"
        start = time.perf_counter()
        on_main = threading.current_thread() is threading.main_thread()
        _calls_in_progress += on_main
        try:
            with _time_limit(self.timeout if _calls_in_progress == 1 else None):
                out = self.fn(images, list(prompts))
        except RewardTimeout:
            raise RewardError(
                f"reward {self.name!r} took longer than reward.timeout={self.timeout} s (stopped after "
                f"{time.perf_counter() - start:.1f} s) {batch}. Make the reward faster, raise the limit with "
                "+reward.timeout=<seconds>, or check what it waits for (a server, a lock, a download)."
            ) from None
        except SystemExit as e:  # sys.exit() inside a reward would end the run without a word
            raise RewardError(
                f"reward {self.name!r} called sys.exit({e.code!r}) {batch}. A reward must return scores or "
                "raise an exception that says what is wrong; fix the reward function and rerun."
            ) from None
        except RewardError:  # a term of a weighted sum: already names itself
            raise
        except Exception as e:
            raise RewardError(
                f"reward {self.name!r} raised {type(e).__name__}: {e} — {batch}. Fix the reward function (or "
                "its options in conf/reward/) and rerun."
            ) from e
        finally:
            _calls_in_progress -= on_main
        self._check_output(out, images)
        self.queries += images.shape[0]
        return out

    def _check_output(self, out, images: torch.Tensor) -> None:
        """Scores [B] as a floating tensor, and a graph back to the images when declared differentiable."""
        batch = images.shape[0]
        expected = (f"expected a floating torch tensor of shape [B] = [{batch}], one score per image (e.g. "
                    "images.mean(dim=(1, 2, 3)))")
        if not isinstance(out, torch.Tensor) or out.shape != (batch,) or not out.is_floating_point():
            raise RewardError(f"reward {self.name!r} returned {_describe(out)}; {expected}. Fix the reward "
                              "function's return value (squeeze a trailing dimension, convert with "
                              "torch.as_tensor(…, dtype=torch.float32), or reduce per-image).")
        if self.differentiable and images.requires_grad and torch.is_grad_enabled() and not out.requires_grad:
            raise RewardError(f"reward {self.name!r} is declared differentiable but its output has no gradient "
                              "(it was detached, or computed through numpy / .item() / torch.no_grad()): "
                              "training through it would update nothing. Keep the computation in torch with "
                              "the graph intact, or drop reward.differentiable and use an algorithm that only "
                              "needs scores (ddpo, grpo, nabla_gfn, …).")

    def check_prompts(self, prompts: list[str]) -> list[str]:
        """Problems the reward foresees with ``prompts`` before any image (its function's optional
        ``check_prompts(prompts) -> list[str]``, each a sentence naming the prompts); [] when it has none."""
        check = getattr(self.fn, "check_prompts", None)
        return list(check(list(prompts))) if check is not None else []

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, differentiable={self.differentiable})"


class WeightedSum:
    """r = Σ_k w_k · r_k — differentiable only when every term is."""

    def __init__(self, terms: Mapping[str, float], device: str | torch.device = "cpu"):
        if not terms:
            raise ConfigError("reward=weighted needs at least one term, e.g. reward.terms={shape_alignment: 1.0}")
        weights = {}
        for name, weight in terms.items():
            try:
                weights[name] = float(weight)
            except (TypeError, ValueError):
                weights[name] = math.nan
            if not math.isfinite(weights[name]):
                raise ConfigError(f"reward=weighted: the weight of term {name!r} must be a finite number, got "
                                  f"{weight!r}; e.g. reward.terms={{{name}: 1.0}}.")
        self.parts = [(build_reward(n, device=device), w) for n, w in weights.items()]

    def __call__(self, images, prompts):
        return sum(w * r(images, prompts) for r, w in self.parts)

    def check_prompts(self, prompts):
        return [problem for r, _ in self.parts for problem in r.check_prompts(prompts)]


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
    the constructor accepts one), except ``timeout`` (seconds per call, see ``Reward``). Raises ConfigError
    listing the valid names if unknown.
    """
    _import_builtins()
    timeout = kwargs.pop("timeout", None)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < float("inf")):
        raise ConfigError(f"reward.timeout={timeout!r}: give the seconds a reward call may take, a number > 0 "
                          "(e.g. +reward.timeout=60), or leave it out for no limit.")
    if name == "weighted":
        terms = kwargs.pop("terms", {})
        obj = WeightedSum(terms, device=device)
        return Reward("weighted(" + ",".join(terms) + ")", obj, all(r.differentiable for r, _ in obj.parts),
                      timeout)
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
    return Reward(name.split(":")[-1], fn, differentiable, timeout)
