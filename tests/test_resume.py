"""Exact resume: a run killed with SIGKILL and resumed writes the same metrics as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rl4diffusion.errors import ConfigError
from rl4diffusion.training.checkpoint import latest_checkpoint
from rl4diffusion.training.trainer import run
from tests.conftest import compose_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = {"wall_s", "train_wall_s", "train_cpu_s"}


def overrides(pipeline_dir):
    return ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{pipeline_dir}", "model.num_steps=4",
            "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
            "eval.samples_per_prompt=2", "eval.every=2", "epochs=5", "algo.batch_size=8", "algo.minibatch_size=4",
            "algo.lr=1e-2", "checkpoint.every=1", "checkpoint.keep_last=2", "threads=1", "progress=false"]


def metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in lines]


def test_sigkill_then_resume_reproduces_the_uninterrupted_metrics(random_pipeline_dir, tmp_path):
    reference = tmp_path / "reference"
    run(compose_config(overrides(random_pipeline_dir)), reference)

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "rl4diffusion.train", *overrides(random_pipeline_dir),
                             f"hydra.run.dir={killed}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once epoch 3 is logged (a checkpoint may be half-written)
        log = killed / "metrics.jsonl"
        if log.exists() and any(json.loads(x)["step"] >= 3 and json.loads(x)["phase"] == "train"
                                for x in log.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(killed) is not None and not (killed / "summary.json").exists()

    summary = run(compose_config([*overrides(random_pipeline_dir), f"resume={killed}"]), killed)
    assert metrics(killed) == metrics(reference)
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert summary["final"] == ref_summary["final"] and summary["reward_queries"] == ref_summary["reward_queries"]
    kept = sorted(p.name for p in (killed / "checkpoints").glob("step_*"))
    assert kept == ["step_000004", "step_000005"]


def test_resume_refuses_an_incompatible_config_and_a_used_directory(random_pipeline_dir, tmp_path):
    done = tmp_path / "done"
    cfg = compose_config([*overrides(random_pipeline_dir), "epochs=1", "eval.every=0"])
    run(cfg, done)
    before = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run"):
        run(cfg, done)
    with pytest.raises(ConfigError, match="differs from this one in 'algo'"):
        run(compose_config([*overrides(random_pipeline_dir), "epochs=1", "algo.lr=0.5", f"resume={done}"]), done)
    after = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}
    assert before == after  # nothing already written was touched


def test_sigterm_finishes_the_update_checkpoints_and_exits_cleanly(random_pipeline_dir, tmp_path):
    run_dir = tmp_path / "terminated"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    args = [a for a in overrides(random_pipeline_dir) if not a.startswith(("epochs=", "checkpoint.every="))]
    proc = subprocess.Popen([sys.executable, "-m", "rl4diffusion.train", *args, "epochs=50", "checkpoint.every=0",
                             f"hydra.run.dir={run_dir}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.05)
    while time.time() < deadline and '"phase": "train"' not in (run_dir / "metrics.jsonl").read_text():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr.decode()[-2000:]  # 3: interrupted and checkpointed, resume me
    checkpoint = latest_checkpoint(run_dir)
    last_logged = max(json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert checkpoint is not None and checkpoint.name == f"step_{last_logged:06d}"
    assert not (run_dir / "summary.json").exists()  # not finished: resume=... continues it
