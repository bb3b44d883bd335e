"""Two CPU processes (torchrun, gloo) train like one process with the same global batch, in every family.

Each case is set up so that one process and two processes do the same arithmetic: the global
batch is one minibatch and every timestep is trained, so splitting the batch over processes
changes only the order of floating-point sums (the DDP all-reduce averages the two halves'
gradients). Sampling noise is drawn for the global batch on every process and sliced, so the
same chains are sampled either way.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = ["model.num_steps=3", "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
          "eval.samples_per_prompt=2", "eval.every=0", "eval.metrics=false", "threads=1", "progress=false",
          "checkpoint.every=1", "save_lora=false"]
FAMILIES = {  # family: (overrides, epochs)
    "policy_gradient": (["algo=ddpo", "reward=jpeg_compressibility", "algo.batch_size=8", "algo.minibatch_size=8",
                         "algo.lr=1e-2"], 1),
    "group_relative": (["algo=grpo", "reward=jpeg_compressibility", "algo.batch_size=8", "algo.group_size=4",
                        "algo.minibatch_size=8", "algo.lr=1e-2", "algo.beta=0.1"], 1),
    "preference": (["algo=diffusion_dpo", "reward=shape_alignment", "algo.batch_size=8", "algo.minibatch_size=8",
                    "algo.num_pairs=16", "algo.generation_batch_size=16", "algo.lr=1e-2"], 1),
    "reward_backprop": (["algo=refl", "reward=shape_alignment", "algo.batch_size=4", "algo.minibatch_size=4",
                         "algo.lr=1e-2"], 1),
    "gflownet": (["algo=nabla_gfn", "reward=shape_alignment", "algo.batch_size=4", "algo.minibatch_size=4",
                  "algo.timestep_fraction=1.0", "algo.use_previous_batch=false", "algo.lr=1e-2"], 1),
}


def _run(overrides, run_dir, processes: int, port: int):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    proc = subprocess.run([*launcher, "-m", "rl4diffusion.train", *overrides, f"hydra.run.dir={run_dir}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _train_records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"phase": "train"' in x]


def _weights(run_dir, epoch):
    return load_file(str(run_dir / "checkpoints" / f"step_{epoch:06d}" / "accelerate" / "trainable.safetensors"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_processes_match_one_process_with_the_same_global_batch(family, random_pipeline_dir, tmp_path):
    overrides, epochs = FAMILIES[family]
    overrides = [*overrides, *COMMON, f"model=path:{random_pipeline_dir}", f"epochs={epochs}"]
    if family == "preference":  # AI-feedback pairs generated once, read by both runs
        overrides.append(f"algo.cache_dir={tmp_path / 'cache'}")
    single, double = tmp_path / "single", tmp_path / "double"
    _run(overrides, single, 1, 0)
    _run(overrides, double, 2, 29517 + sorted(FAMILIES).index(family))
    one, two = _train_records(single), _train_records(double)
    assert len(one) == len(two) == epochs  # only the main process wrote the log
    for a, b in zip(one, two):
        assert a["reward_queries"] == b["reward_queries"] > 0  # every process's queries are counted
        for key in ("reward_mean", "train/reward_mean"):  # the same chains, their rewards gathered
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5)
        for key in a:
            if key.startswith("loss/"):  # losses: the two halves' means average to the whole batch's
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
    # gradients reduced across processes give the same Adam step, up to float noise on near-zero gradients
    a, b = _weights(single, epochs), _weights(double, epochs)
    before = {k: v for k, v in a.items()}
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.mean() < 1e-5 and (diffs > 1e-4).float().mean() < 0.01
    assert any(v.abs().sum() > 0 for v in before.values())
