"""Crash-safe checkpoints: written to a temporary directory, renamed into place, then the
``latest`` pointer is replaced — so a kill at any moment leaves the last complete checkpoint
loadable. accelerate's ``save_state`` writes the optimisers and RNG states (a save hook keeps the
policy's trainable weights only, in safetensors); the rest of the state (the algorithm's counters
and generators, the loop) goes to a ``state.pt`` read back with ``torch.load(weights_only=True)``.

Layout::

    <run>/checkpoints/step_000010/accelerate/              accelerator.save_state: optimisers, RNG states of
                                                           every process, the algorithm's own modules, and
        accelerate/trainable.safetensors                   the policy's trainable weights by parameter name
    <run>/checkpoints/step_000010/state.pt                 algorithm + environment RNG + loop state
    <run>/checkpoints/step_000010/lora/                    the adapter in diffusers format
    <run>/checkpoints/latest                               "step_000010"
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rl4diffusion.errors import ConfigError


def trainable_state(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in policy.unet.named_parameters() if p.requires_grad}


def load_trainable_state(policy, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(policy.unet.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise ConfigError(f"the checkpoint does not match this model: {len(missing)} trainable weights are missing "
                          f"(e.g. {missing[0]}). Was it written with another model or LoRA config?")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))


def save_trainable(policy, directory: str | Path) -> None:
    """The trainable weights by parameter name, as ``trainable.safetensors`` in ``directory``."""
    save_file(trainable_state(policy), str(Path(directory) / "trainable.safetensors"))


def load_trainable(policy, directory: str | Path) -> None:
    try:
        tensors = load_file(str(Path(directory) / "trainable.safetensors"))
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"could not read the trainable weights in {directory}: {e}") from None
    load_trainable_state(policy, tensors)


def save_checkpoint(run_dir: str | Path, step: int, state: dict, policy, accelerator, *, keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``.

    Every process calls this (accelerate's ``save_state`` is collective: each process writes its RNG
    state, and sharded models their shards); the main process renames and moves the pointer.
    """
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".tmp_{name}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))  # optimisers, RNGs, other modules; trainable weights by hook
    accelerator.wait_for_everyone()
    if main:
        torch.save(state, tmp / "state.pt")
        policy.save_pretrained_lora(tmp / "lora")
        _fsync_dir(tmp)
        if final.exists():  # re-writing the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer_tmp = root / f".latest_{os.getpid()}"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, root / "latest")  # the pointer moves last
        _fsync_dir(root)
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep_last] if keep_last > 0 else []:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_state(path: str | Path) -> dict:
    """The saved algorithm / environment / loop state of a checkpoint (weights come through accelerate)."""
    path = Path(path)
    try:
        return torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"could not read checkpoint {path}: {e}") from None


def load_checkpoint(path: str | Path, policy) -> dict:
    """Restore the trainable weights into ``policy`` and return the saved state (for tools outside a run)."""
    load_trainable(policy, Path(path) / "accelerate")
    return load_state(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
