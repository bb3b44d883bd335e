"""Preference methods end to end: training on AI-feedback pairs through ``train.run`` raises the eval reward,
and a resumed run continues exactly (dataset, replay-buffer sampler, optimiser, generators)."""

import json

import pytest

from rl4diffusion.training.trainer import run
from tests.conftest import compose_config


def random_world(pipeline_dir, cache_dir, algo="diffusion_dpo"):
    return [f"algo={algo}", "reward=jpeg_compressibility", f"model=path:{pipeline_dir}", "model.num_steps=4",
            "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
            "eval.samples_per_prompt=2", "eval.every=0", "algo.num_pairs=24", "algo.batch_size=8",
            "algo.minibatch_size=4", "algo.lr=1e-2", "algo.caption_dropout=0.25", f"algo.cache_dir={cache_dir}",
            "checkpoint.every=1", "threads=1", "progress=false"]


def train_records(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("wall_s", "train_wall_s", "train_cpu_s")} for r in lines if r["phase"] == "train"]


@pytest.mark.parametrize("algo", ["diffusion_dpo", pytest.param("sdpo", marks=pytest.mark.slow)])
def test_resume_continues_exactly(random_pipeline_dir, tmp_path, algo):
    cache = tmp_path / "cache"
    # generate and encode the pairs first: every run below then reads the same cached latents (VAE-encoding in
    # the process shifts later float results at the 1e-7 level through memory alignment, which lr amplifies)
    run(compose_config([*random_world(random_pipeline_dir, cache, algo), "epochs=1"]), tmp_path / "warm")
    whole = train_records_after(run(compose_config([*random_world(random_pipeline_dir, cache, algo), "epochs=4"]),
                                    tmp_path / "whole"), tmp_path / "whole")
    run(compose_config([*random_world(random_pipeline_dir, cache, algo), "epochs=2"]), tmp_path / "split")
    run(compose_config([*random_world(random_pipeline_dir, cache, algo), "epochs=4", f"resume={tmp_path / 'split'}"]),
        tmp_path / "unused")
    split = train_records(tmp_path / "split")
    assert len(whole) == len(split) == 4
    assert split == whole  # the same pairs, timesteps and noise: identical losses, accuracies, grad norms, queries
    assert whole[0]["reward_queries"] >= 2 * 24  # the AI-feedback pairs cost their queries once
    assert whole[-1]["reward_queries"] == whole[0]["reward_queries"]  # and nothing after: the env is not stepped


def train_records_after(summary, run_dir):
    assert summary["final"] and summary["reward_queries"] >= 48
    return train_records(run_dir)


def tiny_world(cache_dir, algo="diffusion_dpo", epochs=16):
    return [f"algo={algo}", "model=tiny", "reward=shape_alignment", f"epochs={epochs}", "eval.prompt_sets=[train]",
            "eval.every=0", "eval.samples_per_prompt=2", "eval.metrics=false", f"algo.cache_dir={cache_dir}", "checkpoint.every=0",
            "save_lora=false", "threads=1", "progress=false"]


@pytest.mark.slow  # ~3 min on 2 busy cores: 256 AI-feedback pairs from the tiny model, training, two evaluations
def test_diffusion_dpo_on_ai_feedback_pairs_raises_the_eval_reward_of_the_tiny_model(tmp_path):
    # 16 epochs need a larger step than the default 3e-4, which is tuned for the 200-epoch benchmark
    summary = run(compose_config([*tiny_world(tmp_path / "cache"), "algo.lr=3e-3"]), tmp_path / "run")
    base, final = summary["base"]["train"]["reward_mean"], summary["final"]["train"]["reward_mean"]
    assert final > base + 0.02, (base, final)
    records = train_records(tmp_path / "run")
    # implicit accuracy is logged every epoch; on 8×8×4 latents it hovers near 0.5 (measured mean 0.50 over 16
    # epochs) even while the eval reward rises, so it is recorded, not asserted above chance
    assert all(0.0 <= r["diag/implicit_accuracy"] <= 1.0 for r in records) and len(records) == 16
