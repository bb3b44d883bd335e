"""Finding pretrained weights on this machine, and saying clearly what to fetch when they are absent.

Real rewards and metrics (LAION aesthetic, PickScore, CLIP score, HPSv2, DreamSim, Inception)
need weights that normally come from the Hugging Face Hub, GitHub releases or the open_clip
URL cache. Our CI machines have no network, so every loader here looks in the *local* caches
first, with plain file-system calls and before importing open_clip / transformers (those imports
take seconds). When a file is missing it raises :class:`MissingWeightsError` at once — it never
lets a library retry the network — with one paragraph that names:

1. each missing file and where it is normally downloaded from,
2. the places that were searched,
3. the config key that points at a local copy (e.g. ``reward.head_path=/path/to/file``),
4. the embedded alternative that runs offline (``reward=shape_alignment model=tiny``).

Caches searched (each honours its usual environment variable):

* Hugging Face cache — ``HF_HUB_CACHE`` / ``HF_HOME`` (``~/.cache/huggingface/hub``), read with
  ``huggingface_hub.try_to_load_from_cache``, which never touches the network;
* open_clip's URL cache — ``~/.cache/clip`` (open_clip ``pretrained.download_pretrained_from_url``);
* torch hub checkpoints — ``TORCH_HOME`` (``~/.cache/torch/hub/checkpoints``);
* this toolkit's own cache — ``RL4DIFFUSION_CACHE`` (``$XDG_CACHE_HOME/rl4diffusion``, by default
  ``~/.cache/rl4diffusion``), where ``download=true`` puts the files that have no other home.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rl4diffusion.errors import ConfigError, MissingWeightsError

#: What runs offline instead of a reward that needs downloaded weights (completes "To run offline now, …").
EMBEDDED_REWARD = "use the embedded world, reward=shape_alignment model=tiny"


@dataclass
class MissingFile:
    """One absent weight file: what it is, where it comes from, where we looked, how to point at a copy."""

    what: str
    """Human name with the file name, e.g. ``the LAION aesthetic head sac+logos+ava1-l14-linearMSE.pth``."""
    source: str
    """Where it is normally downloaded from (URL or Hugging Face repo)."""
    looked_in: list[str]
    """Directories or files that were searched."""
    config_key: str
    """Override that points at a local copy, e.g. ``reward.head_path=/path/to/sac+logos+ava1-l14-linearMSE.pth``."""


def toolkit_cache_dir() -> Path:
    """``$RL4DIFFUSION_CACHE``, else ``$XDG_CACHE_HOME/rl4diffusion``, else ``~/.cache/rl4diffusion``."""
    if os.environ.get("RL4DIFFUSION_CACHE"):
        return Path(os.environ["RL4DIFFUSION_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rl4diffusion"


def torch_hub_checkpoints_dir() -> Path:
    """torch hub's checkpoint directory (``$TORCH_HOME/hub/checkpoints``) — computed without importing torch.hub."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def hf_cache_dir(cache_dir: str | None = None) -> str:
    """The Hugging Face hub cache that ``try_to_load_from_cache`` reads (for messages)."""
    if cache_dir:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def find_in_hf_cache(repo_id: str, filenames: list[str], cache_dir: str | None = None) -> str | None:
    """Path of the first of ``filenames`` present in the local HF cache for ``repo_id``, or None. No network."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        try:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError): nothing cached
            return None
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def find_file(name: str, directories: list[str | Path]) -> str | None:
    """First ``directory/name`` that is a file, or None."""
    for d in directories:
        candidate = Path(d).expanduser() / name
        if candidate.is_file():
            return str(candidate)
    return None


def looks_like_path(value: str) -> bool:
    """True when a weights option names a file or directory rather than a tag or hub id."""
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(value)) or value.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".tar")
    )


def check_download_allowed(owner: str) -> None:
    """``download=true`` needs the network; refuse early when the Hugging Face offline switch is on."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(
            f"{owner}: download=true was asked for, but HF_HUB_OFFLINE is set, so nothing may be fetched. "
            "Unset HF_HUB_OFFLINE on a machine with network access, or copy the weights here and point at them."
        )


def missing_weights_error(owner: str, missing: list[MissingFile], *, alternative: str = EMBEDDED_REWARD,
                          download_key: str | None = None) -> MissingWeightsError:
    """Build the one-paragraph error for ``owner`` (e.g. ``reward 'aesthetic'``) from its missing files."""
    parts = []
    for m in missing:
        looked = ", ".join(str(p) for p in m.looked_in) or "nowhere"
        parts.append(f"{m.what} (normally downloaded from {m.source}; looked in {looked})")
    keys = " and ".join(m.config_key for m in missing)
    fetch = (f" On a machine with network access, {download_key} fetches them into the usual caches."
             if download_key else "")
    return MissingWeightsError(
        f"{owner} cannot be built: its weights are not on this machine. Missing: {'; '.join(parts)}. "
        f"Copy them to this machine and point at the local copies with {keys}.{fetch} "
        f"To run offline now, {alternative}."
    )
