"""The held-out evaluator: independent of the training judge, accurate, seeded, and in every evaluation record."""

import json
import math

import torch

from rl4diffusion.training.trainer import run
from tests.conftest import compose_config


def test_the_evaluator_and_the_training_judge_are_different_networks_with_different_weights():
    from rl4diffusion.rewards import available_rewards
    from rl4diffusion.zoo.evaluator import Evaluator, load_evaluator
    from rl4diffusion.zoo.judge import Judge, load_judge
    from rl4diffusion.zoo.shapes import sample_shapes

    judge, evaluator = load_judge(), load_evaluator()
    assert not isinstance(evaluator, Judge) and not isinstance(judge, Evaluator)
    judge_shapes = {name: tuple(p.shape) for name, p in judge.state_dict().items()}
    evaluator_shapes = {name: tuple(p.shape) for name, p in evaluator.state_dict().items()}
    assert judge_shapes != evaluator_shapes
    # no tensor of one network appears in the other, whatever its name
    for theirs in judge.state_dict().values():
        assert not any(ours.shape == theirs.shape and torch.equal(ours, theirs)
                       for ours in evaluator.state_dict().values() if ours.numel() > 8)
    images = sample_shapes(8, torch.Generator().manual_seed(3))[0]
    assert judge.features(images).shape[1] != evaluator.features(images).shape[1]
    # the evaluator is never a training reward
    assert not any("evaluator" in name for name in available_rewards())


def test_the_evaluator_names_colour_and_shape_of_clean_held_out_images():
    from rl4diffusion.zoo.evaluator import evaluator_scores, load_evaluator
    from rl4diffusion.zoo.shapes import sample_shapes

    batch = sample_shapes(512, torch.Generator().manual_seed(31_337))  # a seed neither network trained on
    correct, logprob = evaluator_scores(load_evaluator(), batch.images, batch.captions)
    assert correct.float().mean() >= 0.9
    assert (logprob <= 0).all() and logprob.mean() > -0.5


def test_train_evaluator_is_seeded():
    from rl4diffusion.zoo.train_evaluator import train_evaluator

    first, again, other = (train_evaluator(steps=2, batch_size=8, lr=3e-3, seed=seed).state_dict()
                           for seed in (5, 5, 6))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_evaluation_records_carry_the_evaluator_numbers(random_pipeline_dir, tmp_path):
    overrides = ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{random_pipeline_dir}", "model.num_steps=2",
                 "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
                 "eval.samples_per_prompt=2", "eval.every=0", "eval.feature_space=judge", "epochs=1",
                 "algo.batch_size=4", "algo.minibatch_size=4", "threads=1", "progress=false", "save_lora=false"]
    summary = run(compose_config(overrides), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1]
    for record in evals:
        for key in ("evaluator_accuracy", "evaluator_logprob", "evaluator_diversity", "evaluator_fid_base",
                    "evaluator_fid_dataset"):
            assert math.isfinite(record[key]), (key, record[key])
        assert 0 <= record["evaluator_accuracy"] <= 1 and record["evaluator_logprob"] <= 0
        assert record["fid_space"] == "judge" and math.isfinite(record["diversity"])  # the judge's stay beside
        assert set(record["sample_evaluator_correct"]) <= {0, 1} and len(record["sample_evaluator_correct"]) == 4
        assert record["evaluator_accuracy"] == sum(record["sample_evaluator_correct"]) / 4
        # per-sample rewards at full precision: rounding to a few decimals made false ties
        assert any(r != round(r, 5) for r in record["sample_rewards"])
    (final,) = summary["final"].values()
    assert "evaluator_accuracy" in final and "sample_evaluator_correct" not in final  # lists stay in metrics.jsonl


def test_the_evaluator_stays_out_of_prompt_sets_it_cannot_read():
    from rl4diffusion.training.evaluation import EvalMetrics

    metrics = EvalMetrics("cpu", feature_space="judge")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([0, 0, 1, 1])
    rewards = torch.zeros(4)
    shapes = metrics("shapes", images, groups, rewards, prompts=["a red circle"] * 2 + ["a blue star"] * 2)
    others = metrics("others", images, groups, rewards, prompts=["a photo of a cat"] * 2 + ["a red circle"] * 2)
    assert "evaluator_accuracy" in shapes and "diversity" in others
    assert not any(key.startswith(("evaluator_", "sample_")) for key in others)
