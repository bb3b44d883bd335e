"""A run directory that cannot be lost or corrupted: one run at a time, a state file for schedulers, and
the start-up checks that keep a resume from mixing or deleting anything.

* **The lock.** ``fcntl.flock`` on ``<run>/.lock``, held for the run's life and holding the holder's pid.
  The operating system releases it when the process dies, so ``kill -9`` never leaves a stale lock. Only
  the main process (rank 0) takes it. The command line takes it before Hydra writes into the directory,
  then the trainer takes it again; the lock is re-entrant within one process.
* **The state file.** ``<run>/run_state.json`` records ``running``, ``interrupted``, ``finished`` or
  ``failed``, with the pid, the last completed epoch, the newest checkpoint, timestamps and the exit code.
  It is replaced atomically. Only a run that got past its start-up checks writes it, so a refused start
  leaves the previous state as it was.
* **Exit codes** of ``python -m rl4diffusion.train``:

    ===  ===========  ==========================================================================
    0    finished     ``summary.json`` is written
    1    failed       a failure of ours, or training aborted (the message and ``error.log`` say why)
    2    bad input    refused with one paragraph; nothing already written was touched
    3    interrupted  SIGINT / SIGTERM: checkpointed; continue with ``resume=<run dir>``
    ===  ===========  ==========================================================================
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from omegaconf import DictConfig, OmegaConf

from rl4diffusion.errors import ConfigError

EXIT_FINISHED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3
State = Literal["running", "interrupted", "finished", "failed"]

LOCK_FILE = ".lock"
STATE_FILE = "run_state.json"
SAME_ON_RESUME = ("algo", "model", "reward", "prompts", "seed")
"""Keys a resume must not change: they define what is trained."""
EVAL_PROTOCOL = ("samples_per_prompt", "seed", "prompt_sets", "metrics", "feature_space", "reference_size")
"""``eval.*`` keys a resume must not change: evaluations of another protocol are not comparable."""
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints")
"""What a run has written once it started training: a new run refuses a directory holding any of them."""

log = logging.getLogger("rl4diffusion.train")


def is_main_process() -> bool:
    """Whether this is rank 0, known before accelerate starts: torchrun and ``accelerate launch`` set RANK."""
    return os.environ.get("RANK", "0") == "0"


# ---------------------------------------------------------------- the lock
@dataclass
class RunLock:
    """This process's ``flock`` on ``<run>/.lock`` (see the module docstring)."""

    path: Path
    fd: int
    count: int = 1
    started_at: str = ""
    state_written: bool = False


_HELD: dict[str, RunLock] = {}  # by real path: the command line and the trainer both take the same lock


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take the run directory's lock, creating the directory if needed; re-entrant within this process.

    Raises:
        ConfigError: another process holds it (its pid is named), or the directory is not writable.
    """
    key = os.path.realpath(run_dir)
    if key in _HELD:
        _HELD[key].count += 1
        return _HELD[key]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # O_CREAT leaves an existing file as it is: a refused run does not touch the holder's directory
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write to the run directory {run_dir} ({e.strerror}). Choose a writable "
                          "location with hydra.run.dir=/some/dir.") from None
    holder = _holder(fd)
    if holder is not None:
        os.close(fd)
        raise _in_use(run_dir, holder)
    pid = f"{os.getpid()}\n".encode()
    os.pwrite(fd, pid, 0)  # then cut what a longer old pid left: a reader always finds a pid first
    os.ftruncate(fd, len(pid))
    lock = _HELD[key] = RunLock(run_dir, fd, started_at=_now())
    return lock


def lock_holder(run_dir: Path) -> str | None:
    """The pid of the process holding ``run_dir``'s lock, or None when no one does (this reads only)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = _holder(fd)
        if holder is None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return holder
    finally:
        os.close(fd)


def _holder(fd: int) -> str | None:
    """Lock ``fd``; if another process holds the lock, its pid (the file's first line) instead."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return (os.pread(fd, 64, 0).decode(errors="replace").split() or ["unknown"])[0]


def _in_use(run_dir: Path, holder: str) -> ConfigError:
    return ConfigError(f"{run_dir} is in use by another run (pid {holder}). Wait for it to end, stop it "
                       "(on SIGTERM it checkpoints and exits), or choose another hydra.run.dir. Nothing was "
                       "changed.")


def unlock_run_dir(run_dir: Path) -> None:
    """Give back one hold of the lock; the last one releases it (the file stays: none race to create it)."""
    key = os.path.realpath(run_dir)
    lock = _HELD.get(key)
    if lock is None:
        return
    lock.count -= 1
    if lock.count == 0:
        del _HELD[key]
        os.close(lock.fd)  # closing the only descriptor releases the flock


# ---------------------------------------------------------------- the state file
def strict_json(value):
    """``value`` with every NaN and ±Infinity float replaced by None, so that ``json.dumps(allow_nan=False)``
    writes standard JSON that every parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json_atomically(path: Path, payload: dict, *, indent: int | None = 2) -> None:
    """Write ``path`` through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(strict_json(payload), indent=indent, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class RunDir:
    """A run directory opened by ``prepare_run_dir``: where it is, the checkpoint to resume from, and (on the
    main process) its lock."""

    path: Path
    resume_from: Path | None = None
    lock: RunLock | None = None
    checkpoint: str | None = field(default=None, init=False)

    def __post_init__(self):
        self.checkpoint = self.resume_from.name if self.resume_from is not None else None

    def record(self, state: State, *, epoch: int, exit_code: int | None = None) -> None:
        """Write ``run_state.json`` (main process only; after a refused start, nothing is written)."""
        if self.lock is None or (state != "running" and not self.lock.state_written):
            return
        write_json_atomically(self.path / STATE_FILE, {
            "state": state, "exit_code": exit_code, "pid": os.getpid(), "host": socket.gethostname(),
            "epoch": int(epoch), "checkpoint": self.checkpoint, "started_at": self.lock.started_at,
            "updated_at": _now()})
        self.lock.state_written = True

    def close(self) -> None:
        if self.lock is not None:
            unlock_run_dir(self.path)
            self.lock = None


def read_run_state(run_dir: Path) -> dict | None:
    """``<run>/run_state.json``, or None when the run never got past its start-up checks."""
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- start-up checks (read-only)
def refuse_used_dir(run_dir: Path) -> None:
    """A new run never writes over another: refuse a directory that holds a run's files, or a running one."""
    # only the main process locks: on the others, the main one's lock is no other run's
    mine = not is_main_process() or os.path.realpath(run_dir) in _HELD
    holder = None if mine else lock_holder(run_dir)
    if holder is not None:
        raise _in_use(run_dir, holder)
    used = [name for name in RUN_FILES if (run_dir / name).exists()]
    if used:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(used)}); choose another hydra.run.dir, "
                          f"or continue it with resume={run_dir}. Nothing was overwritten.")


def check_resume_config(cfg: DictConfig, resumed: Path) -> None:
    """A resume continues the same run: same algorithm, model, reward, prompts and seed, same evaluation."""
    saved = resumed / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume={resumed}: no config.yaml there — is it a run directory of "
                          "rl4diffusion.train?")
    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True)
    for key in SAME_ON_RESUME:
        if old.get(key) != new.get(key):
            raise ConfigError(f"resume={resumed}: its config differs from this one in '{key}' "
                              f"({old.get(key)!r} vs {new.get(key)!r}). Resume with the same "
                              "algo/model/reward/prompts/seed (only epochs may grow).")
    old_eval, new_eval = old.get("eval") or {}, new.get("eval") or {}
    for key in EVAL_PROTOCOL:
        if key in old_eval and old_eval[key] != new_eval.get(key):
            raise ConfigError(f"resume={resumed}: its evaluation protocol differs in 'eval.{key}' "
                              f"({old_eval[key]!r} vs {new_eval.get(key)!r}); its metrics.jsonl would mix "
                              "evaluations that cannot be compared. Resume with "
                              f"eval.{key}={old_eval[key]!r}, or start a new run.")


def set_aside(run_dir: Path) -> Path | None:
    """Move a run's history out of the way of a restart, into ``<run>/before_restart_<time>/``."""
    present = [run_dir / name for name in (*RUN_FILES, "images", "lora") if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("before_restart_%Y-%m-%d_%H-%M-%S")
    aside, n = run_dir / stamp, 1
    while aside.exists():  # two restarts within a second
        aside, n = run_dir / f"{stamp}_{n}", n + 1
    aside.mkdir()
    for path in present:
        os.replace(path, aside / path.name)
    return aside
