"""The command users learn the toolkit by: `python -m rl4diffusion.train` with its defaults.

The full default run (algorithm, reward, model and epochs as shipped) is measured by
benchmarks/embedded_world.py and the README; here the same defaults run for fewer epochs and
must still raise the eval reward above the base model's on the same seeds.
"""

import json

from rl4diffusion.training.trainer import run
from tests.conftest import compose_config


def test_defaults_are_the_embedded_world():
    cfg = compose_config([])
    assert (cfg.algo.name, cfg.reward.name, cfg.model.name) == ("nabla_gfn", "shape_alignment", "tiny")


def test_a_shorter_default_run_raises_shape_alignment_above_base(tmp_path):
    cfg = compose_config(["epochs=4", "eval.every=0", "eval.prompt_sets=[train]", "progress=false"])
    summary = run(cfg, tmp_path / "run")
    base, final = summary["base"]["train"], summary["final"]["train"]
    assert final["reward_mean"] > base["reward_mean"], (base, final)
    assert summary["eval_seed"] == cfg.eval.seed
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in evals} == {"train", "eval"}
