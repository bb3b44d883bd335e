"""Fine-tune a diffusion model: ``python -m rl4diffusion.train [algo=…] [reward=…] [model=…] [key=value …]``.

Examples::

    python -m rl4diffusion.train                                   # defaults: the embedded world
    python -m rl4diffusion.train algo=ddpo reward=jpeg_compressibility epochs=20
    python -m rl4diffusion.train reward=my_pkg.my_rewards:sharpness model=path:/models/sd15
    python -m rl4diffusion.train algo=my_pkg.my_algos:MyAlgo 'hydra.searchpath=[pkg://my_pkg.conf]'  # your algorithm
    python -m rl4diffusion.train -m algo=ddpo,nabla_gfn seed=0,1    # a Hydra sweep
    torchrun --nproc_per_node 2 -m rl4diffusion.train              # data-parallel (CPU: gloo)
    accelerate launch --config_file my.yaml -m rl4diffusion.train  # DDP / FSDP / DeepSpeed
    python -m rl4diffusion.train algo=ddpo resume=runs/2025-01-01/12-00-00_ddpo  # continue that run in place

Every field of conf/train.yaml and of the algo/reward/model groups is overridable. Exit codes: 0 finished,
1 a failure of ours (or training aborted), 2 bad input (one paragraph; nothing already written is touched),
3 interrupted by SIGINT/SIGTERM after a checkpoint (resume it). ``<run>/run_state.json`` records the same.

A run directory known before Hydra starts (``hydra.run.dir=``, ``resume=``, or Hydra's dated default,
worked out here: ``rundir.claim_default_run_dir``) is locked here, before Hydra writes into it; a resume
makes the resumed directory Hydra's own, so no other directory appears and its train.log grows.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from rl4diffusion.cli.overrides import CONF_DIR, check_config, rewrite_overrides
from rl4diffusion.errors import ConfigError
from rl4diffusion.training import rundir

NOT_A_RUN = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
             "--version"}
"""Hydra flags that print something instead of training."""
SWEEP = {"-m", "--multirun"}


def _hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from rl4diffusion.training.trainer import TrainingAborted, run  # torch: imported where Ctrl-C is caught

    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def entry(cfg: DictConfig) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            summary = run(cfg, run_dir)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(rundir.EXIT_BAD_INPUT)
        except TrainingAborted as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(rundir.EXIT_FAILED)
        except KeyboardInterrupt as e:  # a second SIGINT/SIGTERM, or one in start-up: stopped at once
            message = str(e) or ("interrupted before the epoch's checkpoint; continue from the last one with "
                                 f"resume={run_dir}")
            if holds_start_up_files_only(run_dir):  # main removes it when this start created it
                message = "interrupted while starting, before training began; nothing to continue from"
            print(message, file=sys.stderr)
            sys.exit(rundir.EXIT_INTERRUPTED)
        except Exception as e:  # a bug, not bad input: keep the traceback in the run directory
            import traceback

            logged = rundir.write_error_log(run_dir, traceback.format_exc())  # never raises (a full disk)
            where = f"is in {logged}" if logged else "could not be written to the run directory"
            print(f"error: training failed with {type(e).__name__}: {e}. The full traceback {where}; please "
                  "include it when reporting the problem.", file=sys.stderr)
            sys.exit(rundir.EXIT_FAILED)
        if not summary:
            print(f"interrupted: checkpointed; continue with resume={run_dir}", file=sys.stderr)
            sys.exit(rundir.EXIT_INTERRUPTED)

    entry()


def _override_values(args: list[str], keys: tuple[str, ...]) -> dict:
    """The values ``args`` give to ``keys`` (the last one wins; a sweep's or a deletion's are left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in args if not a.startswith("-") and a.partition("=")[0].lstrip("+~") in keys]
    values = {}
    for override in OverridesParser.create().parse_overrides(plain):
        if not override.is_sweep_override() and not override.is_delete():
            values[override.key_or_group] = override.value()
    return values


def _quote(path: Path) -> str:
    """``path`` as a Hydra override value (quoted unless plain)."""
    text = str(path)
    if re.fullmatch(r"[\w./:+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand_home(args: list[str]) -> list[str]:
    """``key=~/…`` (``resume=``, ``hydra.run.dir=``, ``prompts=``, any path) with ``~`` expanded: Hydra's override
    grammar has no ``~`` at the start of a value. A deletion (``~key=…``) is left as it is."""
    def expand(match: re.Match) -> str:
        return match[1] + _quote(Path(match[2]).expanduser())

    return [re.sub(r"^(\+{0,2}[\w.@/-]+=)(~[^,\[\]{}'\"]*)$", expand, arg) for arg in args]


def run_in_place(args: list[str]) -> tuple[list[str], Path | None, bool]:
    """Point Hydra at the directory this command writes to; return the arguments, that directory when it is
    known before Hydra starts, and whether it is a resume.

    ``resume=<dir>`` continues the run in ``<dir>``: it becomes ``hydra.run.dir``, so Hydra creates no
    directory of its own and appends to ``<dir>/train.log``, and the ``.hydra/`` files of this resume go to
    ``.hydra/resume_<time>/``, beside the original ones. Otherwise the directory is an explicit
    ``hydra.run.dir``, or unknown (Hydra's dated default, which ``main`` then works out, or a ``-m`` sweep's,
    which the trainer locks).
    """
    if SWEEP & set(args):
        return args, None, False
    values = _override_values(args, ("resume", "hydra.run.dir", "hydra.output_subdir"))
    run_dir = Path(str(values["hydra.run.dir"])) if values.get("hydra.run.dir") is not None else None
    if values.get("resume") is None:
        return args, run_dir, False
    resumed = Path(str(values["resume"]))
    if run_dir is not None and run_dir.resolve() != resumed.resolve():
        raise ConfigError(f"resume={resumed} continues that run in its own directory, but "
                          f"hydra.run.dir={run_dir} names another. Drop hydra.run.dir (or give the same "
                          "directory).")
    if run_dir is None:
        args = [*args, f"hydra.run.dir={_quote(resumed)}"]
    if "hydra.output_subdir" not in values:
        args = [*args, time.strftime("hydra.output_subdir=.hydra/resume_%Y-%m-%d_%H-%M-%S")]
    return args, resumed, True


START_UP_FILES = {".hydra", "train.log", rundir.LOCK_FILE, rundir.STATE_FILE, "config.yaml"}
"""What a run writes before it trains: Hydra's ``.hydra/`` and ``train.log``, the lock, the state file and the
resolved config."""


def holds_start_up_files_only(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds what a run writes before it trains and nothing else (``START_UP_FILES``)."""
    try:
        return not {p.name for p in run_dir.iterdir()} - START_UP_FILES
    except OSError:
        return False


def remove_failed_start(lock: rundir.RunLock) -> None:
    """A failed start leaves nothing behind: remove the directories that taking ``lock`` created (the run's and
    its new parents, e.g. ``runs/<date>/``) when the run's holds start-up files only (``START_UP_FILES``).
    A directory that existed before, or holds anything else, is kept as it is."""
    if not lock.created or not holds_start_up_files_only(lock.created[0]):
        return
    run_dir, *parents = lock.created
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in parents:  # the deepest first; rmdir refuses one that is not empty
        try:
            parent.rmdir()
        except OSError:
            break


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    locked = None
    rundir.interrupt_on_sigterm()  # a SIGTERM while starting stops like Ctrl-C: exit code 3 and one line
    try:
        args = rewrite_overrides(expand_home(args))
        if not NOT_A_RUN & set(args):
            check_config(args)
            args, run_dir, resuming = run_in_place(args)
            if run_dir is None and rundir.is_main_process():  # Hydra's dated default: locked before Hydra writes
                locked = rundir.claim_default_run_dir(args)
                if locked is not None:  # None for a -m sweep, whose job directories the trainer locks
                    args = [*args, f"hydra.run.dir={_quote(locked.path)}"]
            elif run_dir is not None and rundir.is_main_process():
                if not resuming:
                    rundir.refuse_used_dir(run_dir)  # before the lock: a refused run touches nothing
                locked = rundir.lock_run_dir(run_dir)  # held until the run ends; the trainer takes it again
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(rundir.EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted while starting, before training began; nothing to continue from", file=sys.stderr)
        sys.exit(rundir.EXIT_INTERRUPTED)
    sys.argv = [sys.argv[0], *args]
    code = None
    try:
        _hydra_main()
    except SystemExit as e:
        code = e.code
        raise
    except KeyboardInterrupt:  # in Hydra's own start-up, before the run began
        code = rundir.EXIT_INTERRUPTED
        print("interrupted while starting, before training began; nothing to continue from", file=sys.stderr)
        sys.exit(rundir.EXIT_INTERRUPTED)
    finally:
        if locked is not None:
            rundir.unlock_run_dir(locked.path)
            if code in (rundir.EXIT_BAD_INPUT, rundir.EXIT_INTERRUPTED):
                remove_failed_start(locked)


if __name__ == "__main__":
    main()
