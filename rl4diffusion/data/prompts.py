"""Prompt sets: a name, an inline list, or a text file with one prompt per line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from rl4diffusion.errors import ConfigError

# DDPO's "simple animals" flavour, for real models (Black et al. 2023, App. C uses ImageNet animals).
ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
           "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark",
           "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee",
           "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo"]

NAMED_SETS = ("train", "heldout", "all", "animals")
SHAPES_SETS = ("train", "heldout", "all")


def resolve_prompts(spec: str | Sequence[str], *, key: str = "prompts") -> list[str]:
    """Turn a prompt-set spec into a list of prompts (``key``: where the spec was given, for messages).

    ``train`` / ``heldout`` / ``all``: the embedded shapes world's splits; ``animals``: DDPO's
    animal names; a path to a ``.txt`` file: one prompt per line; a list: used as it is.
    """
    if not isinstance(spec, str):
        prompts = [str(p) for p in spec]
        blank = [i for i, p in enumerate(prompts) if not p.strip()]
        if blank:  # an empty prompt conditions on nothing: the unconditional branch of guidance
            raise ConfigError(f"{key}: a prompt list holds an empty prompt (position {blank[0]} of {len(prompts)}): "
                              "every prompt must say something. Remove it, or write the prompt, e.g. "
                              "prompts='[a red circle]'.")
    elif spec in ("train", "heldout", "all"):
        from rl4diffusion.zoo.shapes import prompt_set

        prompts = prompt_set(spec)
    elif spec == "animals":
        prompts = list(ANIMALS)
    elif spec.endswith(".txt"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt file {spec!r} does not exist (expected a .txt file with one prompt per line)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt file {spec!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                              f"{e.start}): is it a binary file, or text in another encoding such as Latin-1? "
                              f"Save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {spec} > prompts_utf8.txt.") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"prompt file {spec!r} holds no prompt (it is empty or only blank lines): write one "
                              "prompt per line.")
    else:
        raise ConfigError(
            f"unknown prompt set {spec!r}: use one of {', '.join(NAMED_SETS)}, a path to a .txt file, "
            "or a list such as prompts='[a red circle, a blue square]'"
        )
    if not prompts:
        raise ConfigError(f"prompt set {spec!r} is empty")
    return prompts


def default_eval_sets(prompts: str | Sequence[str]) -> list | dict:
    """What ``eval.prompt_sets=auto`` stands for, given the training ``prompts`` spec.

    The shapes world's ``train`` and ``heldout`` splits when the training prompts are one of its sets;
    otherwise the training prompts themselves, as one set: named after their .txt file or set name, or
    ``prompts`` for a list.
    """
    if isinstance(prompts, str):
        return ["train", "heldout"] if prompts in SHAPES_SETS else [prompts]
    return {"prompts": [str(p) for p in prompts]}


def named_prompt_sets(prompt_sets: str | Sequence | Mapping) -> dict:
    """``eval.prompt_sets`` as {name: spec} (None: no set); a mapping names its sets; in a list (or a single spec) a set
    name or a .txt file's stem names each, and an inline list of prompts is ``set<i>``."""
    if prompt_sets is None:  # eval.prompt_sets=null: no evaluation, asked for explicitly
        return {}
    if isinstance(prompt_sets, Mapping):
        named = {str(name): spec for name, spec in prompt_sets.items()}
    elif isinstance(prompt_sets, (str, Sequence)):
        named = {}
        for i, spec in enumerate([prompt_sets] if isinstance(prompt_sets, str) else prompt_sets):
            name = f"set{i}" if not isinstance(spec, str) else Path(spec).stem if spec.endswith(".txt") else spec
            if name in named:
                raise ConfigError(f"eval.prompt_sets names two sets {name!r}; name them with a mapping, e.g. "
                                  f"eval.prompt_sets={{first: a/{name}.txt, second: b/{name}.txt}}")
            named[name] = spec
    else:  # a number, say: refused below
        named = {"": prompt_sets}
    for spec in named.values():
        if not isinstance(spec, (str, Sequence)):
            raise ConfigError(f"eval.prompt_sets={prompt_sets!r}: each set must be a set name, a .txt file or a "
                              "list of prompts, e.g. eval.prompt_sets=[train,heldout] or eval.prompt_sets=auto.")
    return named
