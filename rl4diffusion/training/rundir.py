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

* **Disk faults.** Before anything is written, the run directory must take a small file that is written,
  synced and deleted (``check_writable``): an unwritable, read-only or full directory is bad input. A write
  that fails later (``write_failure``: a full disk, a file-size limit, a read-only or failing disk) ends
  the run with exit code 1, naming the last good checkpoint; ``write_error_log`` never raises.
* **Hydra's dated default directory** (``runs/<date>/<time>_<algo>``) is worked out and locked by the
  command line before Hydra writes into it (``claim_default_run_dir``); when two runs start in the same
  second, the second takes ``<time>_<algo>_1``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import resource
import signal
import socket
import threading
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
SAME_ON_RESUME = ("algo", "model", "reward", "prompts", "seed", "optim", "sample_chunks")
"""Keys a resume must not change: they define what is trained."""
EVAL_PROTOCOL = ("samples_per_prompt", "seed", "prompt_sets", "metrics", "feature_space", "reference_size",
                 "num_steps", "guidance_scale")
"""``eval.*`` keys a resume must not change: evaluations of another protocol are not comparable."""
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints")
"""What a run has written once it started training: a new run refuses a directory holding any of them."""

PROBE_BYTES = 64 * 1024
"""The size of the file written and synced in a directory to show that it takes writes."""
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
"""Errors of a failed write that no retry fixes."""

log = logging.getLogger("rl4diffusion.train")


class RunDirInUse(ConfigError):
    """Another process holds the run directory's lock."""


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
    created: tuple[Path, ...] = ()
    """The directories taking the lock created (the run's, then its new parents): a failed start removes them."""


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
    created = not run_dir.exists()
    new_dirs = tuple(d for d in (run_dir.absolute(), *run_dir.absolute().parents) if not d.exists())
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # O_CREAT leaves an existing file as it is: a refused run does not touch the holder's directory
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _unwritable(run_dir, e) from None
    holder = _holder(fd)
    if holder is not None:
        os.close(fd)
        raise _in_use(run_dir, holder)
    try:
        for stale in run_dir.glob(".write_probe_*"):  # a killed run's probe: only a lock holder probes here
            stale.unlink(missing_ok=True)
        check_writable(run_dir)  # under the lock: a full disk is refused before anything is written
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)  # then cut what a longer old pid left: a reader always finds a pid first
        os.ftruncate(fd, len(pid))
    except BaseException as e:
        os.close(fd)
        if created:  # leave no empty directory behind a refusal
            with contextlib.suppress(OSError):
                (run_dir / LOCK_FILE).unlink()
                run_dir.rmdir()
        if isinstance(e, OSError):
            raise _unwritable(run_dir, e) from None
        raise
    lock = _HELD[key] = RunLock(run_dir, fd, started_at=_now(), created=new_dirs)
    return lock


def _unwritable(run_dir: Path, error: OSError) -> ConfigError:
    return ConfigError(f"cannot write to the run directory {run_dir}: {why_unwritable(error)}. Choose a writable "
                       "location with hydra.run.dir=/some/dir (or free some space there).")


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
    """Lock ``fd``; if another process holds the lock, its pid (the file's first line) instead.

    A new holder writes its pid once it has checked the directory is writable (a fresh lock file is empty until
    then), so an empty file is read again for up to five seconds before the pid is called unknown."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        deadline = time.monotonic() + 5.0
        while not (pid := os.pread(fd, 64, 0).decode(errors="replace").split()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return pid[0] if pid else "unknown"


def _in_use(run_dir: Path, holder: str) -> ConfigError:
    return RunDirInUse(f"{run_dir} is in use by another run (pid {holder}). Wait for it to end, stop it "
                       "(on SIGTERM it checkpoints and exits), or choose another hydra.run.dir. Nothing was "
                       "changed.")


def claim_default_run_dir(args: list[str]) -> RunLock | None:
    """Lock the directory Hydra would create for ``args`` (``hydra.run.dir``'s dated default) before Hydra
    writes into it, so that the lock covers Hydra's own files too; the caller passes it on as
    ``hydra.run.dir``. A directory that holds a run or is locked (two runs started in the same second) is
    passed over for ``<dir>_1``, ``<dir>_2``, … For a ``-m`` sweep, whose job directories Hydra names as it
    runs them, the sweep directory is only checked to take writes, and None is returned.

    Raises:
        ConfigError: the directory cannot be written (not writable, read-only, full).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from rl4diffusion.cli.overrides import CONF_DIR

    sweep = bool({"-m", "--multirun"} & set(args))
    plain = [a for a in args if not a.startswith("-")]
    overrides = [a for a, o in zip(plain, OverridesParser.create().parse_overrides(plain))
                 if not o.is_sweep_override()]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:…} in the directory's pattern reads it
    if sweep:
        check_writable(Path(str(cfg.hydra.sweep.dir)), what="the sweep directory", key="hydra.sweep.dir")
        return None
    base = Path(str(cfg.hydra.run.dir))
    for n in range(1000):
        candidate = base.with_name(f"{base.name}_{n}") if n else base
        if any((candidate / name).exists() for name in (*RUN_FILES, ".hydra")):
            continue
        try:
            lock = lock_run_dir(candidate)
        except RunDirInUse:
            continue
        if (candidate / ".hydra").exists():  # a run came and went in between
            unlock_run_dir(candidate)
            continue
        return lock
    raise ConfigError(f"{base} and 999 variants of it are all in use; give hydra.run.dir=/some/new/dir.")


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


def replace_atomically(path: Path, write) -> Path:
    """Make ``path`` by ``write(tmp)`` into a temporary file of this process, then a rename: a reader, or
    another process writing the same file (two bench lanes of one suite), sees the old file or the new, never
    half; a write that fails leaves the old file and no temporary."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill signal's KeyboardInterrupt: no half-written temporary is left
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    """``path.write_text(text)`` through ``replace_atomically``."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text))


def write_json_atomically(path: Path, payload: dict, *, indent: int | None = 2) -> None:
    """Write ``path`` (flushed to disk) through ``replace_atomically``, so a crash never leaves half a file."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(json.dumps(strict_json(payload), indent=indent, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    replace_atomically(path, write)


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
        if key in old and old[key] != new.get(key):  # "in": a run from before a key existed resumes
            raise ConfigError(f"resume={resumed}: its config differs from this one in '{key}' "
                              f"({old.get(key)!r} vs {new.get(key)!r}). Resume with the same "
                              "algo/model/reward/prompts/seed/optim/sample_chunks (only epochs may grow).")
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


# ---------------------------------------------------------------- disk faults
def why_unwritable(error: OSError) -> str:
    """A failed write's cause in words."""
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({error.strerror})"
    if code == errno.EFBIG:
        return f"a file-size limit (ulimit -f) stopped the write ({error.strerror})"
    if code == errno.EROFS:
        return "it is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied ({error.strerror})"
    if code == errno.EIO:
        return "an input/output error (EIO): the disk may be failing"
    return error.strerror or str(error)


def check_writable(directory: Path, *, what: str = "the run directory", key: str = "hydra.run.dir",
                   example: str = "/some/dir") -> None:
    """Create ``directory`` if needed and write, sync and delete a ``PROBE_BYTES`` file there, so that an
    unwritable, read-only or full location is refused before anything else is written.

    Raises:
        ConfigError: naming ``what``, the directory, the cause and ``key`` (the option that chooses it, shown
            with the value ``example``).
    """
    directory = Path(directory)
    probe = directory / f".write_probe_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = memoryview(bytes(PROBE_BYTES))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise ConfigError(f"cannot write to {what} {directory}: {why_unwritable(e)}. Choose a writable "
                          f"location with {key}={example} (or free some space there).") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


TORN_WRITE_MARKERS = ("inline_container", "PytorchStreamWriter", "iostream error", "file write failed")
"""How ``torch.save`` reports a write the operating system refused, without its error number."""


def write_failure(error: BaseException, directory: Path | None = None) -> str | None:
    """Why a write failed, when ``error`` (or an exception that led to it) is a failed write that no retry
    fixes — a full disk, a file-size limit, a read-only or failing disk — else None.

    ``torch.save`` loses the error number ("unexpected pos …"); such an error is explained by the state of
    ``directory``'s disk when it is given: a file-size limit in force, or the space left.
    """
    chain, seen = [], error
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for seen in chain:
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return why_unwritable(seen) + (f" writing {seen.filename}" if seen.filename else "")
        number = re.search(r"os error (\d+)", str(seen))  # safetensors (Rust) reports the errno in its text
        if number and int(number[1]) in WRITE_ERRNOS:
            return why_unwritable(OSError(int(number[1]), os.strerror(int(number[1]))))
    if directory is None or not any(marker in str(e) for e in chain for marker in TORN_WRITE_MARKERS):
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"a write failed under a file-size limit (ulimit -f) of {limit} bytes"
    try:
        disk = os.statvfs(directory)
        left = f"{disk.f_bavail * disk.f_frsize / 2**20:.1f} MiB left on its disk"
    except OSError:
        left = "its disk could not be inspected"
    return f"a write failed ({str(error).splitlines()[0][:100]}), most likely a full disk: {left}"


def drop_torn_line(path: Path) -> None:
    """Cut what follows the last newline of a JSON-lines file (a line a failed write left half-written);
    truncating needs no free space. Never raises."""
    with contextlib.suppress(OSError), open(path, "rb+") as f:
        start = max(0, f.seek(0, os.SEEK_END) - (1 << 16))  # a line is far shorter than 64 KiB
        f.seek(start)
        tail = f.read()
        if tail and not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n")
            if cut >= 0 or start == 0:
                f.truncate(start + cut + 1)


def write_error_log(run_dir: Path, text: str) -> Path | None:
    """Write ``<run>/error.log`` (a failure's traceback); None when it cannot be written (a full disk): the
    error handler that calls this must report the first error, not raise another."""
    path = Path(run_dir) / "error.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    except Exception:  # OSError, a path that is a directory, …: the caller reports the first error
        with contextlib.suppress(OSError):
            path.unlink()  # not half of it either
        return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM raises KeyboardInterrupt, as SIGINT does, so that a run stopped while it starts
    (loading a model, say) exits with code 3 and one line instead of dying silently; the training loop's
    own handler (``StopRequest``) takes over while it runs. Main thread only (elsewhere: nothing is done)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def sigterm_interrupts():
    """``interrupt_on_sigterm`` inside this block only."""
    previous = signal.getsignal(signal.SIGTERM)
    interrupt_on_sigterm()
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
