"""Faults end cleanly: misbehaving rewards, unwritable, read-only and full disks, a locked run, the bench's
and make_pairs' arguments, and signals during start-up or inside a hanging reward.

The table's cases run in one subprocess (``tests.mistakes.run_cases``). Each asserts its exit code, that no
traceback was printed, a message naming the offending reward, key or file, and that a finished reference run
hashes identically after the cases (``tree_hash`` before and after the whole table: equal after all of them,
so after each). Signals and resource limits need a process of their own (``run_alone`` / ``Popen``).
"""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl4diffusion.errors import ConfigError
from rl4diffusion.training import rundir
from rl4diffusion.training.checkpoint import latest_checkpoint, load_state
from rl4diffusion.training.trainer import run
from tests.conftest import compose_config
from tests.mistakes import assert_user_error, cli_env, run_alone, run_cases, tree_hash

REWARDS = '''
import os, signal, sys, time
import numpy as np
import torch

def wide(images, prompts):
    return images.mean(dim=(2, 3))

def column(images, prompts):
    return images.mean(dim=(1, 2, 3))[:, None]

def scalar(images, prompts):
    return images.mean()

def as_list(images, prompts):
    return [0.5] * images.shape[0]

def as_ndarray(images, prompts):
    return np.zeros(images.shape[0], dtype=np.float32)

def short(images, prompts):
    return images.mean(dim=(1, 2, 3))[:-1]

def integer(images, prompts):
    return torch.ones(images.shape[0], dtype=torch.long)

def detached(images, prompts):
    return images.mean(dim=(1, 2, 3)).detach()
detached.differentiable = True

def exits(images, prompts):
    sys.exit("judge quit")

def ctrl_c(images, prompts):
    raise KeyboardInterrupt

def slow(images, prompts):
    time.sleep(60)
    return images.mean(dim=(1, 2, 3))

def stopped_while_hanging(images, prompts, calls=[0]):
    """Scores the base evaluation and epoch 1; in epoch 2 it hangs, and SIGTERM arrives."""
    calls[0] += 1
    if calls[0] > 2:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(600)
    return images.mean(dim=(1, 2, 3))

CALLS = [0]

def hangs_later(images, prompts):
    """Scores HANG_AFTER calls, then touches HANG_FLAG and hangs."""
    CALLS[0] += 1
    if CALLS[0] > int(os.environ["HANG_AFTER"]):
        open(os.environ["HANG_FLAG"], "w").close()
        time.sleep(600)
    return images.mean(dim=(1, 2, 3))
'''

SLOW_IMPORT = '''
import os, time
open(os.environ["LOAD_FLAG"], "w").close()  # the run is loading its reward: start-up, before the model loads
time.sleep(60)

def score(images, prompts):
    return images.mean(dim=(1, 2, 3))
'''

SIGNAL_ON_IMPORT = '''
import os, signal, time
os.kill(os.getpid(), signal.{signal})  # the run is loading its reward: start-up, before the model loads
time.sleep(60)

def score(images, prompts):
    return images.mean(dim=(1, 2, 3))
'''


def tiny(pipeline_dir, *extra):
    return ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{pipeline_dir}", "model.num_steps=2",
            "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
            "eval.samples_per_prompt=2", "eval.every=0", "eval.metrics=false", "epochs=2", "algo.batch_size=4",
            "algo.minibatch_size=4", "checkpoint.every=1", "checkpoint.keep_last=3", "threads=1",
            "progress=false", "log_with=[]", *extra]


@pytest.fixture(scope="module")
def reference(random_pipeline_dir, tmp_path_factory):
    """A finished 2-epoch run with checkpoints 1 and 2: the bystander every case must leave untouched."""
    run_dir = tmp_path_factory.mktemp("faults_reference") / "run"
    run(compose_config(tiny(random_pipeline_dir)), run_dir)
    return run_dir


def make_read_only(path: Path, request) -> None:
    """Make directory ``path`` refuse new files, also for root (``chattr +i``); undone after the test."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        request.addfinalizer(lambda: path.chmod(0o755))
    else:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(path)], capture_output=True))
    with pytest.raises(OSError):
        (path / "probe").write_text("")


@pytest.fixture(scope="module")
def table(reference, random_pipeline_dir, tmp_path_factory, request):
    """Run every case of CASES in one process; the outcomes and the reference's hash before and after."""
    work = tmp_path_factory.mktemp("faults")
    (work / "faulty_rewards.py").write_text(REWARDS)
    for name in ("SIGTERM", "SIGINT"):
        (work / f"{name.lower()}_on_import.py").write_text(SIGNAL_ON_IMPORT.format(signal=name))
    read_only = work / "read_only"
    read_only.mkdir()
    read_only_run = work / "read_only_run"  # a finished run on a disk that no longer takes writes
    shutil.copytree(reference, read_only_run)
    locked_run = work / "locked_run"  # a finished run that another process holds
    shutil.copytree(reference, locked_run)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.pwrite(fd, b'%d\\n' % os.getpid(), 0)\n"
        "print('locked', flush=True)\ntime.sleep(600)\n"), str(locked_run / rundir.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    request.addfinalizer(holder.kill)
    assert holder.stdout.readline().strip() == "locked"
    existing = work / "existing.parquet"
    existing.write_bytes(b"earlier pairs")
    a_file = work / "a_file"
    a_file.write_text("not a directory")
    make_read_only(read_only, request)
    make_read_only(read_only_run, request)
    places = {"pipe": random_pipeline_dir, "work": work, "ref": reference, "ro": read_only,
              "ro_run": read_only_run, "locked_run": locked_run, "existing": existing, "a_file": a_file,
              "holder": holder.pid}
    protected = (reference, read_only_run, locked_run, existing)
    before = [tree_hash(p) if p.is_dir() else p.read_bytes() for p in protected]
    jobs = []
    for case_id, entry, argv, *_ in CASES:
        argv = [a.format(**places) for a in argv]
        if entry == "train" and not any(a.startswith(("resume=", "hydra.run.dir=")) for a in argv):
            argv.append(f"hydra.run.dir={work / 'runs' / case_id}")
        jobs.append((entry, [*tiny(random_pipeline_dir), *argv] if entry == "train" else argv))
    outcomes = run_cases(jobs, work / "outcomes", cwd=work, env=cli_env([work]))
    after = [tree_hash(p) if p.is_dir() else p.read_bytes() for p in protected]
    return {case[0]: outcome for case, outcome in zip(CASES, outcomes)}, before, after, places


MAKE_PAIRS = ["model=path:{pipe}", "reward=jpeg_compressibility", "n=2", "model.num_steps=2"]
CASES = [  # (id, entry point, arguments, exit code, fragments of the message)
    # rewards: the output is checked at the first call, naming the reward and what it returned
    ("reward_b3", "train", ["reward=faulty_rewards:wide"], 2, ["reward 'wide'", "shape [4, 3]", "shape [B]"]),
    ("reward_b1", "train", ["reward=faulty_rewards:column"], 2, ["reward 'column'", "shape [4, 1]"]),
    ("reward_scalar", "train", ["reward=faulty_rewards:scalar"], 2, ["reward 'scalar'", "shape []"]),
    ("reward_list", "train", ["reward=faulty_rewards:as_list"], 2, ["reward 'as_list'", "a list of 4 items"]),
    ("reward_ndarray", "train", ["reward=faulty_rewards:as_ndarray"], 2, ["reward 'as_ndarray'", "numpy.ndarray"]),
    ("reward_short", "train", ["reward=faulty_rewards:short"], 2, ["reward 'short'", "shape [3]", "[B] = [4]"]),
    ("reward_integer", "train", ["reward=faulty_rewards:integer"], 2, ["reward 'integer'", "torch.int64"]),
    ("reward_detached", "train", ["reward=faulty_rewards:detached", "algo=draft"], 2,
     ["reward 'detached'", "declared differentiable", "no gradient"]),
    ("reward_sys_exit", "train", ["reward=faulty_rewards:exits"], 2, ["reward 'exits'", "sys.exit('judge quit')"]),
    ("reward_ctrl_c", "train", ["reward=faulty_rewards:ctrl_c"], 3, ["interrupted while starting"]),
    # signals (sent by the run to itself, as from outside): in start-up, and while a reward hangs in epoch 2
    ("sigterm_in_start_up", "train", ["reward=sigterm_on_import:score"], 3, ["interrupted while starting"]),
    ("sigint_in_start_up", "train", ["reward=sigint_on_import:score"], 3, ["interrupted while starting"]),
    ("sigterm_in_a_hanging_reward", "train", ["reward=faulty_rewards:stopped_while_hanging", "epochs=3"], 3,
     ["interrupted; continue from its last checkpoint (step_000001) with resume={work}/runs/"]),
    ("reward_timeout", "train", ["reward=faulty_rewards:slow", "+reward.timeout=0.5"], 2,
     ["reward 'slow'", "reward.timeout=0.5"]),
    ("reward_timeout_negative", "train", ["+reward.timeout=-1"], 2, ["reward.timeout=-1", "> 0"]),
    ("reward_timeout_word", "train", ["+reward.timeout=soon"], 2, ["reward.timeout='soon'"]),
    # disks: refused at start, before anything is written
    ("run_dir_read_only", "train", ["hydra.run.dir={ro}/run"], 2, ["cannot write to the run directory", "read_only"]),
    ("run_dir_in_proc", "train", ["hydra.run.dir=/proc/self/rl4d_run"], 2,
     ["cannot write to the run directory /proc/self/rl4d_run"]),
    ("resume_read_only", "train", ["resume={ro_run}", "epochs=3"], 2,
     ["cannot write to the run directory", "read_only_run"]),
    # concurrency: a resume of a run that another process holds
    ("resume_locked", "train", ["resume={locked_run}", "epochs=3"], 2, ["in use by another run", "pid {holder}"]),
    # the bench: lists parsed as Hydra lists, seeds checked, out_dir checked before any run
    ("bench_one_algo", "bench", ["suite=shapes_smoke", "algos=nope", "out_dir={work}/bench"], 2,
     ["unknown algorithm(s) ['nope']"]),
    ("bench_comma_algos", "bench", ["suite=shapes_smoke", "algos=ddpo,nope", "out_dir={work}/bench"], 2,
     ["unknown algorithm(s) ['nope']"]),
    ("bench_seeds_word", "bench", ["suite=shapes_smoke", "seeds=three", "out_dir={work}/bench"], 2,
     ["seeds='three'"]),
    ("bench_seeds_zero", "bench", ["suite=shapes_smoke", "seeds=0", "out_dir={work}/bench"], 2, ["seeds=0"]),
    ("bench_seeds_repeated", "bench", ["suite=shapes_smoke", "seeds=[1,1]", "out_dir={work}/bench"], 2,
     ["seeds=[1, 1]", "distinct"]),
    ("bench_out_dir_read_only", "bench", ["suite=shapes_smoke", "seeds=1", "out_dir={ro}/bench"], 2,
     ["the bench's out_dir", "out_dir="]),
    ("bench_out_dir_a_file", "bench", ["suite=shapes_smoke", "seeds=1", "out_dir={a_file}"], 2,
     ["the bench's out_dir", "a_file"]),
    ("bench_stage_word", "bench", ["suite=shapes_smoke", "stage=later", "out_dir={work}/bench"], 2,
     ["stage=later", "final", "tune", "baselines"]),
    ("bench_tune_untuned_suite", "bench", ["suite=shapes_smoke", "stage=tune", "tuning_dir={work}/tuning"], 2,
     ["suite shapes_smoke has no tuning section"]),
    ("bench_final_before_tuning", "bench", ["suite=shapes_smoke_tuned", "tuning_dir={work}/tuning",
                                            "out_dir={work}/bench"], 2,
     ["no tuned setting yet: ddpo (0/2 trials done)", "stage=tune first"]),
    ("bench_baselines_without_section", "bench", ["suite=shapes_smoke", "stage=baselines", "out_dir={work}/bench"], 2,
     ["suite shapes_smoke declares no baselines"]),
    # make_pairs: out checked before sampling; an existing file is kept unless overwrite=true
    ("pairs_existing", "make_pairs", [*MAKE_PAIRS, "out={existing}"], 2, ["already exists", "overwrite=true"]),
    ("pairs_in_proc", "make_pairs", [*MAKE_PAIRS, "out=/proc/self/rl4d/pairs.parquet"], 2,
     ["out='/proc/self/rl4d/pairs.parquet'"]),
    ("pairs_read_only", "make_pairs", [*MAKE_PAIRS, "out={ro}/pairs.parquet"], 2, ["read_only/pairs.parquet"]),
    ("pairs_under_a_file", "make_pairs", [*MAKE_PAIRS, "out={a_file}/pairs.parquet"], 2, ["a_file/pairs.parquet"]),
    ("pairs_overwrite_word", "make_pairs", [*MAKE_PAIRS, "out={work}/p.parquet", "overwrite=maybe"], 2,
     ["overwrite='maybe'", "true or false"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_fault_is_a_clean_error(case, table):
    outcomes, before, after, places = table
    case_id, _, _, code, fragments = case
    assert_user_error(outcomes[case_id], *[f.format(**places) for f in fragments], code=code)
    last_line = outcomes[case_id].err.strip().splitlines()[-1]
    assert last_line.startswith(("error: ", "interrupted")), last_line  # the message is one paragraph, last
    assert after == before  # the reference run, the read-only and locked copies, the existing parquet


def test_disk_errors_are_named_and_the_error_log_never_raises(tmp_path):
    import errno

    assert "disk is full" in rundir.why_unwritable(OSError(errno.ENOSPC, "No space left on device"))
    assert "read-only" in rundir.why_unwritable(OSError(errno.EROFS, "Read-only file system"))
    assert "file-size limit" in rundir.why_unwritable(OSError(errno.EFBIG, "File too large"))
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "disk is full" in rundir.write_failure(wrapped)
    assert rundir.write_failure(ValueError("a bug")) is None
    (tmp_path / "error.log").mkdir()  # error.log cannot be written: the handler reports the first error
    assert rundir.write_error_log(tmp_path, "Traceback …") is None
    assert rundir.write_error_log(tmp_path / "ok", "Traceback …") == tmp_path / "ok" / "error.log"
    torn = tmp_path / "metrics.jsonl"
    torn.write_text('{"step": 1}\n{"step": 2, "rew')
    rundir.drop_torn_line(torn)
    assert torn.read_text() == '{"step": 1}\n'


def test_shared_bench_files_are_replaced_whole_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    """evals.jsonl, report.md and the tuning tables are rewritten by every lane of a suite: a reader sees the
    old file or the new one, and a write that fails leaves the old one and no temporary behind."""
    report = tmp_path / "report.md"
    rundir.write_text_atomically(report, "old\n")
    assert rundir.write_text_atomically(report, "new\n") == report and report.read_text() == "new\n"

    def full_disk(self, text):
        self.open("w").write(text[:2])  # half the text, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        rundir.write_text_atomically(report, "newer\n")
    monkeypatch.undo()
    assert report.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_the_default_run_directory_is_locked_before_hydra_and_never_shared(tmp_path, monkeypatch):
    """Hydra's dated directory is worked out before Hydra writes into it; one that another process holds, or
    that holds a run (two runs started in the same second), is passed over for ``<dir>_1``, ``<dir>_2``."""
    monkeypatch.chdir(tmp_path)
    lock = rundir.claim_default_run_dir(["algo=ddpo"])
    rundir.unlock_run_dir(lock.path)
    assert lock.path.parent.parent == Path("runs") and lock.path.name.endswith("_ddpo")  # runs/<date>/<time>_ddpo
    same_second = tmp_path / "runs" / "same_second"
    (tmp_path / "runs" / "same_second_1" / ".hydra").mkdir(parents=True)  # a run that started in that second
    same_second.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n"),
        str(same_second / rundir.LOCK_FILE)], stdout=subprocess.PIPE, text=True)  # a run starting there
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = rundir.claim_default_run_dir(["algo=ddpo", "hydra.run.dir=runs/same_second"])
        rundir.unlock_run_dir(lock.path)
        assert lock.path == Path("runs/same_second_2")
    finally:
        holder.kill()
        holder.wait()


def _ignore_sigxfsz_and_limit(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return preexec


def test_a_full_disk_at_start_is_bad_input(random_pipeline_dir, reference, tmp_path):
    before = tree_hash(reference)
    outcome = run_alone("train", [*tiny(random_pipeline_dir), f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                        preexec_fn=_ignore_sigxfsz_and_limit(rundir.PROBE_BYTES // 2))
    assert_user_error(outcome, "cannot write to the run directory", "file-size limit")
    assert not (tmp_path / "run").exists()  # the refusal took back the directory it made
    assert tree_hash(reference) == before


def test_a_full_disk_mid_run_ends_cleanly_with_the_last_checkpoint_loadable(random_pipeline_dir, reference,
                                                                             tmp_path):
    """A file-size limit (what ``ulimit -f`` sets) between the largest checkpoint file and all the others: the
    resumed run's step 3 checkpoint cannot be written, as on a full disk."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    optimiser = (run_dir / "checkpoints" / "step_000002" / "accelerate" / "optimizer.bin").stat().st_size
    others = max(p.stat().st_size for p in run_dir.rglob("*") if p.is_file() and p.name != "optimizer.bin")
    limit = optimiser - 1  # the optimiser's state no longer fits; every other file does
    assert others < limit and rundir.PROBE_BYTES < limit
    outcome = run_alone("train", [*tiny(random_pipeline_dir), "epochs=4", f"resume={run_dir}"], cwd=tmp_path,
                        preexec_fn=_ignore_sigxfsz_and_limit(limit))
    assert_user_error(outcome, "could not write checkpoint step_000003", "file-size limit",
                      "The last good checkpoint is step_000002", code=rundir.EXIT_FAILED)
    assert "please include" not in outcome.err  # a disk fault, not a bug
    checkpoints = run_dir / "checkpoints"
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]  # nothing half-written
    newest = latest_checkpoint(run_dir)
    assert newest.name == "step_000002" and load_state(newest)["loop"]
    state = rundir.read_run_state(run_dir)
    assert state["state"] == "failed" and state["exit_code"] == rundir.EXIT_FAILED
    assert (run_dir / "metrics.jsonl").read_text().endswith("\n")


def _start(args, cwd, **env):
    return subprocess.Popen([sys.executable, "-m", "rl4diffusion.train", *args], cwd=cwd,
                            env=cli_env([cwd], **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, seconds=120):
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), proc.communicate()[1][-3000:]


@pytest.mark.slow  # the table's sigterm_in_start_up / sigint_in_start_up cases cover it in-process
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_exits_3_with_one_line(signum, random_pipeline_dir, tmp_path):
    (tmp_path / "slow_to_load.py").write_text(SLOW_IMPORT)
    flag = tmp_path / "loading"
    proc = _start([*tiny(random_pipeline_dir), "reward=slow_to_load:score", f"hydra.run.dir={tmp_path / 'run'}"],
                  tmp_path, LOAD_FLAG=str(flag))
    _wait_for(flag, proc)
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == rundir.EXIT_INTERRUPTED and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted while starting"), err[-3000:]


def test_sigterm_stops_a_run_stuck_in_a_reward(random_pipeline_dir, tmp_path):
    """The reward hangs in epoch 2, after checkpoint 1: the first SIGTERM stops it at once (exit 3, one line),
    and the run continues from checkpoint 1."""
    (tmp_path / "faulty_rewards.py").write_text(REWARDS)
    flag = tmp_path / "hanging"
    run_dir = tmp_path / "run"
    # calls: the base evaluation's, then epoch 1's collection; epoch 2's hangs
    proc = _start([*tiny(random_pipeline_dir), "reward=faulty_rewards:hangs_later", "epochs=3",
                   f"hydra.run.dir={run_dir}"], tmp_path, HANG_AFTER="2", HANG_FLAG=str(flag))
    _wait_for(flag, proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == rundir.EXIT_INTERRUPTED and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"interrupted; continue from its last checkpoint (step_000001) with "
                                           f"resume={run_dir}"), err[-3000:]
    state = rundir.read_run_state(run_dir)
    assert state["state"] == "interrupted" and state["checkpoint"] == "step_000001"
    assert latest_checkpoint(run_dir).name == "step_000001"


def test_reward_timeout_is_checked_when_the_reward_is_built():
    from rl4diffusion.rewards import build_reward

    assert build_reward("jpeg_compressibility", timeout=2.5).timeout == 2.5
    for bad in (0, -1, float("nan"), "soon", True):
        with pytest.raises(ConfigError, match="reward.timeout"):
            build_reward("jpeg_compressibility", timeout=bad)
