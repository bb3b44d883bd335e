"""Runs that cannot be lost or corrupted: resume from the newest valid checkpoint, never delete history,
one run per directory, and a state file and exit code a scheduler can use.

Most cases damage a copy of one finished 4-epoch run the way a kill, a full disk or a careless hand would,
resume it in-process and compare its metrics.jsonl with the undamaged run's (wall-clock fields aside).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl4diffusion.errors import ConfigError
from rl4diffusion.training.checkpoint import checkpoint_problem
from rl4diffusion.training.rundir import EXIT_BAD_INPUT, EXIT_FINISHED, EXIT_INTERRUPTED, read_run_state
from rl4diffusion.training.trainer import run
from tests.conftest import compose_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = {"wall_s", "train_wall_s", "train_cpu_s"}


def overrides(pipeline_dir, *extra):
    return ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{pipeline_dir}", "model.num_steps=3",
            "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
            "eval.samples_per_prompt=2", "eval.every=2", "eval.metrics=false", "epochs=4",
            "algo.batch_size=4", "algo.minibatch_size=4", "checkpoint.every=1", "checkpoint.keep_last=3",
            "threads=1", "progress=false", "log_with=[]", *extra]


def metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in lines]


def history(run_dir, upto):
    """metrics.jsonl's lines up to step ``upto`` as written, wall-clock fields included: a run that continues
    keeps them; one that started over would have rewritten them."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [line for line in lines if json.loads(line)["step"] <= upto]


def snapshot(run_dir):
    """Every file's bytes, except the lock file (a refused resume takes the lock, writing its pid there)."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def resume(pipeline_dir, run_dir, *extra):
    return run(compose_config(overrides(pipeline_dir, f"resume={run_dir}", *extra)), run_dir)


def train_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "rl4diffusion.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def finished(random_pipeline_dir, tmp_path_factory):
    """An uninterrupted 4-epoch run with checkpoints 2, 3 and 4: the reference, and what each test damages."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(compose_config(overrides(random_pipeline_dir)), run_dir)
    return run_dir


@pytest.fixture
def damaged(finished, tmp_path):
    """A copy of the finished run, as if killed after logging epoch 4 but before its checkpoint was done."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    (run_dir / "summary.json").unlink()
    return run_dir


def test_a_finished_run_records_its_state_in_strict_json(finished):
    state = read_run_state(finished)
    assert state["state"] == "finished" and state["exit_code"] == EXIT_FINISHED
    assert state["epoch"] == 4 and state["checkpoint"] == "step_000004" and state["pid"] == os.getpid()


@pytest.mark.parametrize("pointer", ["missing", "dangling"])
def test_resume_without_a_usable_latest_pointer_continues_from_the_newest_checkpoint(
        pointer, random_pipeline_dir, finished, damaged):
    latest = damaged / "checkpoints" / "latest"
    latest.unlink() if pointer == "missing" else latest.write_text("step_000009")
    (damaged / "checkpoints" / ".tmp_step_000005").mkdir()  # what a killed checkpoint leaves behind
    (damaged / "checkpoints" / ".latest_123").write_text("step_000005")
    kept = history(damaged, 3)
    resume(random_pipeline_dir, damaged)
    assert history(damaged, 3) == kept and metrics(damaged) == metrics(finished)
    assert sorted(p.name for p in (damaged / "checkpoints").iterdir()) == [
        "latest", "step_000002", "step_000003", "step_000004"]  # the stale temporary files are gone


@pytest.mark.parametrize("broken", ["accelerate/trainable.safetensors", "state.pt"])
def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(broken, random_pipeline_dir, finished, damaged,
                                                             caplog):
    newest = damaged / "checkpoints" / "step_000003"
    data = (newest / broken).read_bytes()
    (newest / broken).write_bytes(data[: len(data) // 2] if broken.endswith("safetensors") else b"")
    kept = history(damaged, 2)
    resume(random_pipeline_dir, damaged)
    assert f"skipping checkpoint {newest}" in caplog.text and broken in caplog.text
    assert history(damaged, 2) == kept and metrics(damaged) == metrics(finished)  # continued from step 2
    assert checkpoint_problem(newest) is None  # step 3 was written again


def test_a_torn_last_line_of_metrics_is_dropped(random_pipeline_dir, finished, damaged, caplog):
    log = damaged / "metrics.jsonl"
    text = log.read_text()
    kept = history(damaged, 3)
    log.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # half the last line, no newline
    resume(random_pipeline_dir, damaged)
    assert "dropping its last line" in caplog.text
    assert history(damaged, 3) == kept and metrics(damaged) == metrics(finished)


def test_latest_pointing_outside_the_run_is_refused(random_pipeline_dir, finished, damaged):
    (damaged / "checkpoints" / "latest").write_text(str(finished / "checkpoints" / "step_000004"))
    before = snapshot(damaged)
    with pytest.raises(ConfigError, match="points outside this run's checkpoints"):
        resume(random_pipeline_dir, damaged)
    assert snapshot(damaged) == before


def test_no_valid_checkpoint_is_refused_unless_asked_to_start_over(random_pipeline_dir, finished, damaged):
    for step in ("step_000002", "step_000003"):
        (damaged / "checkpoints" / step / "state.pt").write_bytes(b"")
    before = snapshot(damaged)
    with pytest.raises(ConfigError, match="no valid checkpoint.*resume_restart=true"):
        resume(random_pipeline_dir, damaged)
    assert snapshot(damaged) == before  # nothing deleted, nothing written

    resume(random_pipeline_dir, damaged, "resume_restart=true")
    assert metrics(damaged) == metrics(finished)  # started over from epoch 0
    aside = next(damaged.glob("before_restart_*"))
    assert (aside / "metrics.jsonl").read_bytes() == before[Path("metrics.jsonl")]
    assert (aside / "checkpoints" / "step_000003").is_dir()
    assert read_run_state(damaged)["state"] == "finished"


@pytest.mark.parametrize("change", ["eval.samples_per_prompt=3", "eval.seed=7", "eval.metrics=true"])
def test_an_evaluation_protocol_change_on_resume_is_refused(change, random_pipeline_dir, damaged):
    before = snapshot(damaged)
    with pytest.raises(ConfigError, match=f"differs in '{change.split('=')[0]}'"):
        resume(random_pipeline_dir, damaged, change)
    assert snapshot(damaged) == before


def test_nan_rewards_leave_strict_json(random_pipeline_dir, tmp_path, monkeypatch):
    (tmp_path / "nan_reward.py").write_text(
        "import torch\ndef nan(images, prompts):\n    return torch.full((images.shape[0],), float('nan'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    args = [a for a in overrides(random_pipeline_dir) if not a.startswith("reward=")]
    run(compose_config([*args, "reward=nan_reward:nan", "epochs=1", "max_skipped_updates=5"]), run_dir)

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    for name in ("summary.json", "run_state.json"):
        json.loads((run_dir / name).read_text(), parse_constant=refuse)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def test_a_second_run_on_a_locked_directory_exits_2_naming_the_holder(random_pipeline_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [*overrides(random_pipeline_dir), "epochs=200", f"hydra.run.dir={run_dir}"]
    procs = {seed: train_cli(*args, f"seed={seed}", cwd=tmp_path) for seed in (1, 2)}  # both at once
    deadline = time.time() + 120
    while time.time() < deadline and all(p.poll() is None for p in procs.values()):
        time.sleep(0.05)
    loser_seed = next(seed for seed, p in procs.items() if p.poll() is not None)
    winner_seed = 3 - loser_seed
    loser, winner = procs[loser_seed], procs[winner_seed]
    stderr = loser.communicate()[1]
    assert loser.returncode == EXIT_BAD_INPUT and f"pid {winner.pid}" in stderr, stderr[-2000:]
    while time.time() < deadline and not (run_dir / "checkpoints" / "latest").exists():
        time.sleep(0.05)
    winner.send_signal(signal.SIGTERM)
    winner.communicate(timeout=120)
    # one run's files: the winner's config and command line, one metrics line per step
    assert f"seed: {winner_seed}" in (run_dir / "config.yaml").read_text()
    assert f"seed={winner_seed}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert f"seed={loser_seed}" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    train = [r["step"] for r in metrics(run_dir) if r["phase"] == "train"]
    assert train == list(range(1, len(train) + 1))


def test_a_run_refused_before_the_holder_has_written_its_pid_still_names_it(tmp_path):
    """The holder locks first and writes its pid a moment later (under load, a long moment): a run refused in
    between waits for the pid rather than naming no one."""
    from rl4diffusion.training import rundir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(0.5)\n"
        "os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0)\n"
        "time.sleep(600)\n"), str(run_dir / rundir.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            rundir.lock_run_dir(run_dir)
    finally:
        holder.kill()
        holder.wait()


def test_sigterm_exits_3_and_a_resume_continues_in_place(random_pipeline_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = train_cli(*overrides(random_pipeline_dir), "epochs=200", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    deadline = time.time() + 120
    latest = run_dir / "checkpoints" / "latest"
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    state = read_run_state(run_dir)
    assert state["state"] == "interrupted" and state["exit_code"] == EXIT_INTERRUPTED
    assert state["checkpoint"] == f"step_{state['epoch']:06d}" and not (run_dir / "summary.json").exists()

    # resume with no hydra.run.dir: the run continues in its own directory, and no other appears
    proc = train_cli(*overrides(random_pipeline_dir), f"epochs={state['epoch'] + 1}", f"resume={run_dir}",
                     cwd=tmp_path)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == EXIT_FINISHED, stderr[-2000:]
    assert not (tmp_path / "runs").exists()
    assert read_run_state(run_dir)["state"] == "finished" and (run_dir / "summary.json").exists()
    log = (run_dir / "train.log").read_text()
    assert "base eval" in log and f"resumed {run_dir} from {state['checkpoint']}" in log  # appended to
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and list((run_dir / ".hydra").glob("resume_*"))
