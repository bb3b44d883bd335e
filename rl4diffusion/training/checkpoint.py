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

A write that fails (a full disk, a file-size limit, a second signal) removes the temporary directory before
the error goes on, so nothing half-written is left; a ``kill -9`` leaves it to ``remove_stale_files``.

A resume takes the newest checkpoint that verifies (``latest_checkpoint``): each ``step_*`` directory,
newest first, must have a ``state.pt`` that ``torch.load(weights_only=True)`` reads, a
``trainable.safetensors`` that safetensors reads, and accelerate's optimiser and RNG files. A broken one is
skipped with a warning that names it. ``latest`` is only a hint, but one that points outside the run's
``checkpoints/`` is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rl4diffusion.errors import ConfigError

STEP_NAME = re.compile(r"step_(\d+)")
log = logging.getLogger("rl4diffusion.train")


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
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise ConfigError(f"could not read the trainable weights in {directory}: {e}") from None
    load_trainable_state(policy, tensors)


def save_checkpoint(run_dir: str | Path, step: int, state: dict, policy, accelerator, *, keep_last: int = 2,
                    lora_weights=contextlib.nullcontext) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``.

    ``lora_weights()`` is a context in which the policy holds the weights its ``lora/`` exports (the EMA's,
    see ``Updater.averaged_weights``); the trainable weights that a resume loads are always the raw ones.

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
    try:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))  # optimisers, RNGs, other modules; trainable weights by hook
        accelerator.wait_for_everyone()
        if main:
            torch.save(state, tmp / "state.pt")
            with lora_weights():
                policy.save_pretrained_lora(tmp / "lora")
            _fsync_tree(tmp)  # contents first: the rename must never publish files still in the page cache
    except BaseException:  # a full disk, a second signal: leave nothing half-written (a kill -9 leaves it to
        if main:  # remove_stale_files at the next start)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        if final.exists():  # re-writing the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer_tmp = root / f".latest_{os.getpid()}"
        try:
            pointer_tmp.write_text(name)
            os.replace(pointer_tmp, root / "latest")  # the pointer moves last
        except BaseException:
            pointer_tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(root)
        # prune among the steps up to this one: a newer step_* is a broken leftover that a resume skipped (it
        # is replaced when training gets there), and counting it would delete a valid one instead
        steps = sorted((p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and int(p.name[5:]) <= step),
                       key=lambda p: int(p.name[5:]))
        for old in steps[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from, or None when it can (every file is read back)."""
    accelerate = path / "accelerate"
    for required in ("optimizer.bin", "random_states_0.pkl"):
        if not (accelerate / required).is_file():
            return f"accelerate/{required} is missing"
    try:
        torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # EOFError, UnpicklingError, …: any of them means the file is unusable
        return f"state.pt is unreadable ({type(e).__name__}: {e})"
    try:
        with safe_open(str(accelerate / "trainable.safetensors"), framework="pt") as f:
            for name in f.keys():  # one tensor at a time: a full fine-tune's weights need not fit twice
                f.get_tensor(name)
    except Exception as e:
        return f"accelerate/trainable.safetensors is unreadable ({type(e).__name__}: {e})"
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies (``checkpoint_problem``), or None.

    Raises:
        ConfigError: ``checkpoints/latest`` or a ``step_*`` entry points outside ``<run_dir>/checkpoints``
            (into another run, say): loading it would continue someone else's training.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    real_root = root.resolve()
    pointer = root / "latest"
    named = None
    if pointer.is_symlink() or pointer.exists():
        named = pointer.read_text().strip() if pointer.is_file() else ""
        target = (root / named).resolve() if named else None
        if pointer.is_symlink() or (target is not None and target.parent != real_root):
            link = ", a symbolic link" if pointer.is_symlink() else ""
            raise ConfigError(f"{pointer} points outside this run's checkpoints ({named!r}{link}); refusing "
                              "to load another run's state. Remove it: the newest valid step_* directory "
                              f"in {root} is used then.")
    try:
        steps = sorted((p for p in root.iterdir() if STEP_NAME.fullmatch(p.name)),
                       key=lambda p: int(p.name[5:]), reverse=True)
    except FileNotFoundError:  # moved aside meanwhile by the main process's resume_restart
        return None
    if named is not None and not any(p.name == named for p in steps):
        log.warning("%s names %r, which is not a checkpoint here; looking for the newest valid one",
                    pointer, named)
    for path in steps:
        if path.resolve().parent != real_root:
            raise ConfigError(f"{path} is a link to {path.resolve()}, outside this run's checkpoints; "
                              "refusing to load another run's state. Remove the link.")
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def remove_stale_files(run_dir: str | Path) -> list[str]:
    """Delete what a killed ``save_checkpoint`` left behind (``.tmp_step_*`` directories, ``.latest_<pid>``
    files). Call it only while holding the run's lock: another run's would be in progress."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((".tmp_step_", ".latest_"))]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return [p.name for p in stale]


def load_state(path: str | Path) -> dict:
    """The saved algorithm / environment / loop state of a checkpoint (weights come through accelerate)."""
    path = Path(path)
    try:
        return torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # EOFError, UnpicklingError, … as well as OSError
        raise ConfigError(f"could not read checkpoint {path}: {e}") from None


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    for directory in [*(p for p in path.rglob("*") if p.is_dir()), path]:
        _fsync_dir(directory)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
