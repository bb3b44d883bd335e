"""Crash-safe checkpoints: written to a temporary directory, renamed into place, then the
``latest`` pointer is replaced — so a kill at any moment leaves the last complete checkpoint
loadable. Weights go to safetensors; the rest of the state (optimisers, RNGs, counters) to a
``state.pt`` read back with ``torch.load(weights_only=True)``.

Layout::

    <run>/checkpoints/step_000010/trainable.safetensors   trainable weights by parameter name
    <run>/checkpoints/step_000010/state.pt                 algorithm + RNG + loop state
    <run>/checkpoints/step_000010/lora/                    the adapter in diffusers format
    <run>/checkpoints/latest                               "step_000010"
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rl4diffusion.errors import ConfigError


def rng_state() -> dict:
    """The global RNG states (torch, CUDA, numpy, python) as tensors/lists torch.load(weights_only) accepts."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _python_state_to_tensor(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_tensor_to_python_state(state["python"]))


def _python_state_to_tensor(state):
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _tensor_to_python_state(state):
    return state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"]


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


def save_checkpoint(run_dir: str | Path, step: int, state: dict, policy, *, keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".tmp_{name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(policy), str(tmp / "trainable.safetensors"))
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
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(path: str | Path, policy) -> dict:
    """Restore the trainable weights into ``policy`` and return the saved state dict."""
    path = Path(path)
    try:
        load_trainable_state(policy, load_file(str(path / "trainable.safetensors")))
        return torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"could not read checkpoint {path}: {e}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
