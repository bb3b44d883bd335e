"""Two CPU processes (torchrun, gloo) train like one process with the same global batch."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overrides(pipeline_dir, run_dir):
    return ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{pipeline_dir}", "model.num_steps=4",
            "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
            "eval.samples_per_prompt=2", "eval.every=0", "epochs=1", "algo.batch_size=8", "algo.minibatch_size=8",
            "algo.lr=1e-2", "threads=1", "progress=false", "checkpoint.every=1", f"hydra.run.dir={run_dir}"]


def test_two_processes_match_one_process_with_the_same_global_batch(random_pipeline_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "single", tmp_path / "double"
    subprocess.run([sys.executable, "-m", "rl4diffusion.train", *_overrides(random_pipeline_dir, single)],
                   env=env, check=True, capture_output=True, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    proc = subprocess.run([*torchrun, "-m", "rl4diffusion.train", *_overrides(random_pipeline_dir, double)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def train_record(run_dir):
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in lines if r["phase"] == "train")

    one, two = train_record(single), train_record(double)
    # the same 8 chains were sampled (each process ran its half), and all 8 rewards were gathered
    assert abs(one["reward_mean"] - two["reward_mean"]) < 1e-5 and two["reward_queries"] == one["reward_queries"] == 8
    # averaged gradients give the same Adam step, up to float noise on near-zero gradients
    a = load_file(str(single / "checkpoints" / "step_000001" / "trainable.safetensors"))
    b = load_file(str(double / "checkpoints" / "step_000001" / "trainable.safetensors"))
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.mean() < 1e-5 and (diffs > 1e-4).float().mean() < 0.01
    # only the main process wrote: one metrics file with one line per record
    assert sum(1 for r in (double / "metrics.jsonl").read_text().splitlines() if '"phase": "train"' in r) == 1
