"""Prompt sets: a name, an inline list, or a text file with one prompt per line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rl4diffusion.errors import ConfigError

# DDPO's "simple animals" flavour, for real models (Black et al. 2023, App. C uses ImageNet animals).
ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
           "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark",
           "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee",
           "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo"]

NAMED_SETS = ("train", "heldout", "all", "animals")


def resolve_prompts(spec: str | Sequence[str]) -> list[str]:
    """Turn a prompt-set spec into a list of prompts.

    ``train`` / ``heldout`` / ``all``: the embedded shapes world's splits; ``animals``: DDPO's
    animal names; a path to a ``.txt`` file: one prompt per line; a list: used as it is.
    """
    if not isinstance(spec, str):
        prompts = [str(p) for p in spec]
    elif spec in ("train", "heldout", "all"):
        from rl4diffusion.zoo.shapes import prompt_set

        prompts = prompt_set(spec)
    elif spec == "animals":
        prompts = list(ANIMALS)
    elif spec.endswith(".txt"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt file {spec!r} does not exist (expected a .txt file with one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ConfigError(
            f"unknown prompt set {spec!r}: use one of {', '.join(NAMED_SETS)}, a path to a .txt file, "
            "or a list such as prompts='[a red circle, a blue square]'"
        )
    if not prompts:
        raise ConfigError(f"prompt set {spec!r} is empty")
    return prompts
