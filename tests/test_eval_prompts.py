"""Evaluation follows the user's prompts (``eval.prompt_sets=auto``); prompts are checked against the reward at start-up."""

import json

import pytest
from omegaconf import OmegaConf

from rl4diffusion.data.prompts import default_eval_sets, named_prompt_sets
from rl4diffusion.errors import ConfigError
from rl4diffusion.rewards import build_reward
from rl4diffusion.training.trainer import run
from tests.conftest import compose_config
from tests.mistakes import assert_user_error, run_cases


def test_auto_stands_for_the_shapes_splits_or_the_training_prompts_themselves():
    assert default_eval_sets("train") == default_eval_sets("all") == ["train", "heldout"]
    assert default_eval_sets("animals") == ["animals"]
    assert default_eval_sets("data/my_prompts.txt") == ["data/my_prompts.txt"]
    assert default_eval_sets(["a cat", "a dog"]) == {"prompts": ["a cat", "a dog"]}
    assert compose_config([]).eval.prompt_sets == "auto"


def test_prompt_sets_are_named_by_set_name_file_stem_position_or_mapping_key():
    assert list(named_prompt_sets(["train", "x/my_prompts.txt", ["a cat"]])) == ["train", "my_prompts", "set2"]
    assert named_prompt_sets("heldout") == {"heldout": "heldout"}
    assert named_prompt_sets({"mine": ["a cat"]}) == {"mine": ["a cat"]}
    with pytest.raises(ConfigError, match="names two sets 'p'"):
        named_prompt_sets(["a/p.txt", "b/p.txt"])
    with pytest.raises(ConfigError, match="each set must be"):
        named_prompt_sets([3])


def test_shape_alignment_names_the_prompts_it_cannot_score_and_what_it_accepts():
    reward = build_reward("shape_alignment")
    assert reward.check_prompts(["a red circle", "A  Blue square"]) == []
    problems = reward.check_prompts(["a red circle", "a pink circle", "a cat", "a cat", "x", "y", "z"])
    assert len(problems) == 1
    assert "'a pink circle', 'a cat', 'x' and 2 more are not in the shapes world" in problems[0]
    assert "colour in red, green" in problems[0] and "\n" not in problems[0]
    weighted = build_reward("weighted", terms={"colorfulness": 1.0, "shape_alignment": 1.0})
    assert weighted.check_prompts(["a cat"]) and not weighted.check_prompts(["a red circle"])
    assert build_reward("colorfulness").check_prompts(["a cat"]) == []  # it ignores prompts


def overrides(pipeline_dir, *extra):
    return ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{pipeline_dir}", "model.num_steps=2",
            "eval.samples_per_prompt=2", "eval.every=0", "eval.metrics=false", "algo.batch_size=2",
            "algo.minibatch_size=2", "threads=1", "progress=false", *extra]


def test_evaluation_uses_the_prompt_file_and_config_yaml_records_it(random_pipeline_dir, tmp_path):
    prompt_file = tmp_path / "my_prompts.txt"
    prompt_file.write_text("a red circle\na green star\n")
    summary = run(compose_config(overrides(random_pipeline_dir, f"prompts={prompt_file}", "epochs=1")),
                  tmp_path / "run")
    assert list(summary["final"]) == list(summary["base"]) == ["my_prompts"]
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["prompt_set"] for r in evals if r["phase"] == "eval"} == {"my_prompts"}
    assert len(evals[0]["sample_rewards"]) == 2 * 2  # both prompts of the file, two samples each
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert list(saved.eval.prompt_sets) == [str(prompt_file)]


def test_a_run_with_explicit_sets_resumes_under_auto_when_they_are_what_auto_stands_for(random_pipeline_dir,
                                                                                       tmp_path):
    prompts = "prompts=[a red circle,a blue square]"
    explicit = "eval.prompt_sets={prompts: [a red circle,a blue square]}"
    run(compose_config(overrides(random_pipeline_dir, prompts, explicit, "epochs=1")), tmp_path / "run")
    summary = run(compose_config(overrides(random_pipeline_dir, prompts, "epochs=2", f"resume={tmp_path / 'run'}")),
                  tmp_path / "run")
    assert summary["epochs"] == 2 and list(summary["final"]) == ["prompts"]


def test_prompts_the_reward_cannot_score_exit_2_at_start_up(random_pipeline_dir, tmp_path):
    common = overrides(random_pipeline_dir, "reward=shape_alignment", "epochs=1")
    outcomes = run_cases([
        ("train", [*common, "prompts=[a red circle,a pink circle]", f"hydra.run.dir={tmp_path / 'train'}"]),
        ("train", [*common, "prompts=[a red circle]", "eval.prompt_sets=[heldout,[a cat]]",
                   f"hydra.run.dir={tmp_path / 'eval'}"]),
    ], tmp_path / "cases")
    assert_user_error(outcomes[0], "reward 'shape_alignment' cannot score the training prompts: 'a pink circle' is "
                      "not in the shapes world", "colour in red, green")
    assert_user_error(outcomes[1], "cannot score the evaluation set 'set1' prompts: 'a cat' is not")
    for outcome in outcomes:  # found before any sampling: no evaluation ran
        assert "base eval" not in outcome.text
