"""Feature spaces for the sample metrics: a small registry of image → feature-vector maps.

A *feature space* is any object with a ``name: str`` and ``__call__(images [B, 3, H, W] in [0, 1])
-> Tensor[B, D]``, computed without gradients. Diversity (``diversity.py``) and FID (``fid.py``)
work on features, so they do not care which network produced them.

Registered here, both available offline: ``"judge"`` — the embedded judge's 128-d penultimate
features — and ``"evaluator"`` — the held-out evaluator's 192-d features (``rl4diffusion.zoo.evaluator``).
Heavier spaces (``"dreamsim"``, ``"inception"``) register themselves from their own modules with the
same decorator::

    @register_feature_space("dreamsim")
    class DreamSimFeatures:
        name = "dreamsim"
        def __init__(self, device="cpu"): ...       # may raise when the weights are absent
        def __call__(self, images): ...              # [B, 3, H, W] in [0, 1] → [B, D]

``build_feature_space(name)`` imports ``rl4diffusion.metrics.<name>`` on first use when no such
name is registered yet, so a module named after its space needs no other wiring.

``build_feature_space("auto", kind=...)`` picks the best space that loads: ``dreamsim`` then
``judge`` for diversity, ``inception`` then ``judge`` for FID. Any exception from the heavy one
(absent weights, missing package) falls back to the judge with one short INFO line (the full reason is
logged at DEBUG; ``auto_feature_space`` + ``fallback_note`` let a caller say it once for several kinds). The chosen
space's ``.name`` says which one was used — record it next to the number (the run report
does), because distances in two feature spaces are not comparable.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)


@runtime_checkable
class FeatureSpace(Protocol):
    """An image → feature map: ``name`` and ``__call__(images [B,3,H,W] in [0,1]) -> Tensor[B, D]``."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


FeatureSpaceFactory = Callable[..., FeatureSpace]
"""A class or function called as ``factory(device=device)`` that returns a FeatureSpace."""

_REGISTRY: dict[str, FeatureSpaceFactory] = {}

_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "diversity": ("dreamsim", "judge"),  # DreamSim: the perceptual distance the literature reports
    "fid": ("inception", "judge"),  # Inception-v3 pool features: the standard FID
}


def register_feature_space(name: str):
    """Decorator: register a feature-space factory (a class or a function taking ``device``) under ``name``."""

    def deco(factory: FeatureSpaceFactory) -> FeatureSpaceFactory:
        if name == "auto":
            raise ValueError("'auto' is reserved for build_feature_space's automatic choice")
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"a feature space named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_feature_spaces() -> list[str]:
    """Names registered so far (spaces in modules not yet imported are not listed)."""
    return sorted(_REGISTRY)


def _import_conventional_module(name: str) -> None:
    """Import rl4diffusion.metrics.<name> if it exists, so that it can register itself."""
    module = f"{__package__}.{name}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the module exists but one of its imports is missing: say so
            raise


def build_feature_space(
    name: str,
    device: str | torch.device = "cpu",
    *,
    kind: Literal["diversity", "fid"] | None = None,
) -> FeatureSpace:
    """Build the feature space ``name`` on ``device``; ``"auto"`` chooses by ``kind`` (see the module docstring).

    Raises ValueError for an unknown name (listing the registered ones) or for ``"auto"`` without
    ``kind``. With ``"auto"``, the chosen space's ``.name`` records which one was used.
    """
    if name == "auto":
        space, skipped = auto_feature_space(kind, device)
        note = fallback_note({kind: (space, skipped)})
        if note:
            log.info(note)
        return space
    if name not in _REGISTRY:
        _import_conventional_module(name)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown feature space {name!r}. Registered: {', '.join(available_feature_spaces())}, or 'auto'. "
            "A new space registers itself with @register_feature_space(name) in a module that is imported "
            "(rl4diffusion/metrics/<name>.py is imported automatically)."
        )
    space = _REGISTRY[name](device=device)
    if not isinstance(getattr(space, "name", None), str):
        raise TypeError(f"feature space {name!r} returned {type(space).__name__} without a string attribute .name")
    return space


@register_feature_space("judge")
class JudgeFeatures:
    """The embedded judge's penultimate features (128-d, globally max-pooled conv features).

    Trained only to name colours and shapes, so it sees differences of colour, shape, size and
    background, and little else: a coarse but offline stand-in for DreamSim and Inception.
    Images of any size are resized to 32×32 first.
    """

    name = "judge"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 256):
        from rl4diffusion.zoo.judge import load_judge

        self.device = torch.device(device)
        self.judge = load_judge(self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from rl4diffusion.zoo.judge import to_judge_resolution

        chunks = [
            self.judge.features(to_judge_resolution(chunk.to(self.device, torch.float32)))
            for chunk in images.split(self.batch_size)
        ]
        return torch.cat(chunks)  # [B, 128]


@register_feature_space("evaluator")
class EvaluatorFeatures:
    """The held-out evaluator's features (192-d: global average and max of its last map; ``rl4diffusion.zoo.evaluator``).

    A second network trained on the shapes world, never a training reward, so its distances are not ones a
    run was optimised to move. Every evaluation of a shapes-world prompt set reports diversity and FID in this
    space beside the others (``evaluator_diversity``, ``evaluator_fid_*``). Images of any size are resized to
    32×32 first.
    """

    name = "evaluator"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 256):
        from rl4diffusion.zoo.evaluator import load_evaluator

        self.device = torch.device(device)
        self.evaluator = load_evaluator(self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from rl4diffusion.zoo.judge import to_judge_resolution

        chunks = [
            self.evaluator.features(to_judge_resolution(chunk.to(self.device, torch.float32)))
            for chunk in images.split(self.batch_size)
        ]
        return torch.cat(chunks)  # [B, 192]


def auto_feature_space(kind: str | None, device: str | torch.device = "cpu"
                       ) -> tuple[FeatureSpace, list[tuple[str, Exception]]]:
    """``build_feature_space("auto", kind=kind)`` without its log line: the best space that loads, and the preferred
    ones that did not, each with its exception (logged at DEBUG), so that a caller building several kinds says it
    in one line (``fallback_note``)."""
    if kind not in _AUTO_ORDER:
        raise ValueError(f"build_feature_space('auto') needs kind='diversity' or kind='fid', got {kind!r}")
    *preferred, fallback = _AUTO_ORDER[kind]
    skipped = []
    for candidate in preferred:
        try:
            return build_feature_space(candidate, device), skipped
        except Exception as e:  # absent weights, missing package, unregistered: all mean "use the fallback"
            log.debug("feature space %r is unavailable for %s (%s: %s)", candidate, kind, type(e).__name__, e)
            skipped.append((candidate, e))
    return build_feature_space(fallback, device), skipped


def fallback_note(choices: dict[str, tuple[FeatureSpace, list[tuple[str, Exception]]]]) -> str | None:
    """One short line for the kinds whose "auto" choice fell back (None when none did), e.g. ``diversity and FID
    in the judge feature space (dreamsim, inception: weights not on this machine; set RL4DIFFUSION_DREAMSIM_DIR,
    RL4DIFFUSION_INCEPTION_WEIGHTS to use them)``. ``choices``: kind → what ``auto_feature_space`` returned."""
    from rl4diffusion.errors import MissingWeightsError

    fell_back = {kind: (space, skipped) for kind, (space, skipped) in choices.items() if skipped}
    if not fell_back:
        return None
    used = "/".join(dict.fromkeys(space.name for space, _ in fell_back.values()))
    skipped = [pair for _, pairs in fell_back.values() for pair in pairs]
    reasons = dict.fromkeys("weights not on this machine" if isinstance(e, MissingWeightsError)
                            else f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                            for _, e in skipped)
    hints = [hint for name, _ in skipped if (hint := getattr(_REGISTRY.get(name), "setup_hint", None))]
    kinds = " and ".join("FID" if kind == "fid" else kind for kind in fell_back)
    note = f"{kinds} in the {used} feature space ({', '.join(n for n, _ in skipped)}: {'; '.join(reasons)}"
    return note + (f"; set {', '.join(hints)} to use them)" if hints else ")")
