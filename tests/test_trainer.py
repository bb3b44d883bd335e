"""The accelerate-native trainer: trackers, what a checkpoint holds, mixed precision."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rl4diffusion.errors import ConfigError
from rl4diffusion.training.trainer import run
from tests.conftest import compose_config


def _overrides(pipeline_dir, *extra):
    return ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{pipeline_dir}", "model.num_steps=3",
            "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
            "eval.samples_per_prompt=2", "eval.every=0", "eval.metrics=false", "epochs=1", "algo.batch_size=4",
            "algo.minibatch_size=4", "threads=1", "progress=false", "save_lora=false", *extra]


def test_tensorboard_tracker_and_a_checkpoint_of_the_trainable_weights_only(random_pipeline_dir, tmp_path):
    from rl4diffusion.policies.base import DiffusionPolicy

    run(compose_config(_overrides(random_pipeline_dir, "log_with=[tensorboard]")), tmp_path / "tb_run")
    events = list((tmp_path / "tb_run" / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0  # accelerate's TensorBoard tracker wrote the scalars
    state_dir = tmp_path / "tb_run" / "checkpoints" / "step_000001" / "accelerate"
    saved = load_file(str(state_dir / "trainable.safetensors"))
    policy = DiffusionPolicy.from_pretrained(random_pipeline_dir)
    trainable = {n for n, p in policy.unet.named_parameters() if p.requires_grad}
    assert set(saved) == trainable  # the LoRA weights, not the whole network
    assert (state_dir / "optimizer.bin").is_file() and (state_dir / "random_states_0.pkl").is_file()
    assert not (state_dir / "model.safetensors").exists()

    run(compose_config(_overrides(random_pipeline_dir, "log_with=[]")), tmp_path / "quiet")
    assert not (tmp_path / "quiet" / "tb").exists()


def test_bf16_autocast_on_cpu_trains(random_pipeline_dir, tmp_path):
    summary = run(compose_config(_overrides(random_pipeline_dir, "mixed_precision=bf16", "algo.lr=1e-2")),
                  tmp_path / "bf16")
    record = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()
              if '"phase": "train"' in x][0]
    assert summary["skipped_updates"] == 0 and record["diag/grad_norm"] > 0
    saved = load_file(str(tmp_path / "bf16" / "checkpoints" / "step_000001" / "accelerate" / "trainable.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())  # trainable weights stay float32


def test_fp16_on_a_cpu_is_refused(random_pipeline_dir, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        run(compose_config(_overrides(random_pipeline_dir, "mixed_precision=fp16")), tmp_path / "fp16")
