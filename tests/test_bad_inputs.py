"""Table-driven bad input: each case stops with its clear message, and no existing run is modified."""

import pytest

from rl4diffusion.cli.overrides import check_config, rewrite_overrides
from rl4diffusion.errors import ConfigError
from rl4diffusion.training.trainer import TrainingAborted, run
from tests.conftest import compose_config

BASE = ["algo=ddpo", "reward=jpeg_compressibility", "prompts=[a red circle,a blue square]",
        "eval.prompt_sets=[[a red circle,a blue square]]", "eval.samples_per_prompt=1", "eval.metrics=false", "epochs=1",
        "algo.batch_size=4", "algo.minibatch_size=4", "model.num_steps=2", "progress=false", "threads=1"]

CASES = [  # (overrides, expected message fragment)
    (["epochs=0"], "epochs (the number of collect"),
    (["epochs=abc"], "must be an integer"),
    (["model.num_steps=0"], "model.num_steps"),
    (["model.guidance_scale=-1"], "guidance"),
    (["eval.samples_per_prompt=0"], "samples_per_prompt"),
    (["eval.metrics=true"], "leaves no pairs for the diversity metric"),
    (["checkpoint.keep_last=0"], "keep_last"),
    (["device=tpu"], "device must be"),
    (["algo.minibatch_size=3"], "must be ≥ 1 and divide"),
    (["algo.timestep_fraction=1.5"], "timestep_fraction"),
    (["algo.lr=-1"], "algo.lr"),
    (["algo.no_such_key=1"], "bad override"),
    (["model.no_such_key=1"], "bad override"),
    (["no_such_top_level=1"], "bad override"),
    (["algo=no_such_algo"], "unknown algo"),
    (["reward=no_such_reward"], "unknown reward"),
    (["model=no_such_model"], "unknown model"),
    (["model=path:/no/such/dir"], "does not exist"),
    (["model=sd15"], "huggingface-cli download"),
    (["reward=no_such_module_xyz:fn"], "could not import module"),
    (["reward=rl4diffusion.rewards.jpeg:no_such_fn"], "has no attribute"),
    (["prompts=/no/such/prompts.txt"], "prompt file"),
    (["prompts=no_such_set"], "unknown prompt set"),
    (["resume=/no/such/run"], "no config.yaml"),
    (["budget.reward_queries=0"], "budget.reward_queries"),
]


def _run(overrides, run_dir, pipeline_dir):
    own_model = any(o.startswith("model=") for o in overrides)
    args = [*([] if own_model else [f"model=path:{pipeline_dir}"]), *BASE, *overrides]
    check_config(rewrite_overrides(args))
    return run(compose_config(args), run_dir)


@pytest.fixture(scope="module")
def finished_run(random_pipeline_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    _run([], run_dir, random_pipeline_dir)
    return run_dir


def _snapshot(run_dir):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("overrides, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_refused_clearly(overrides, message, random_pipeline_dir, finished_run, tmp_path):
    before = _snapshot(finished_run)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        _run(overrides, tmp_path / "run", random_pipeline_dir)
    assert "\n" not in str(err.value)  # one paragraph
    assert _snapshot(finished_run) == before


def test_used_run_dir_incompatible_resume_and_unwritable_dir(random_pipeline_dir, finished_run, tmp_path):
    before = _snapshot(finished_run)
    with pytest.raises(ConfigError, match="already holds a run"):
        _run([], finished_run, random_pipeline_dir)
    with pytest.raises(ConfigError, match="differs from this one in 'seed'"):
        _run(["seed=5", f"resume={finished_run}"], finished_run, random_pipeline_dir)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write to the run directory"):
        _run([], blocker / "run", random_pipeline_dir)
    not_a_pipeline = tmp_path / "empty_model"
    not_a_pipeline.mkdir()
    with pytest.raises(ConfigError, match="not a diffusers pipeline directory"):
        _run([f"model=path:{not_a_pipeline}"], tmp_path / "run2", random_pipeline_dir)
    assert _snapshot(finished_run) == before


def test_raising_and_nan_rewards(random_pipeline_dir, tmp_path, monkeypatch):
    (tmp_path / "bad_rewards.py").write_text(
        "import torch\n"
        "def boom(images, prompts):\n    raise RuntimeError('judge exploded')\n"
        "def nan(images, prompts):\n    return torch.full((images.shape[0],), float('nan'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"reward 'boom' raised RuntimeError: judge exploded .*'a red circle'"):
        _run(["reward=bad_rewards:boom"], tmp_path / "boom", random_pipeline_dir)
    # the evaluation of the base model scores NaN without training; training then skips, then aborts
    with pytest.raises(TrainingAborted, match="non-finite"):
        _run(["reward=bad_rewards:nan", "max_skipped_updates=0"], tmp_path / "nan", random_pipeline_dir)
    summary = _run(["reward=bad_rewards:nan", "max_skipped_updates=5", "epochs=2"], tmp_path / "nan2",
                   random_pipeline_dir)
    assert summary["skipped_updates"] == 2


def test_corrupt_preference_files_are_refused(random_pipeline_dir, finished_run, tmp_path):
    before = _snapshot(finished_run)
    garbage = tmp_path / "pairs.parquet"
    garbage.write_bytes(b"this is not parquet")
    with pytest.raises(ConfigError, match="not a readable parquet file") as err:
        _run(["algo=diffusion_dpo", f"algo.dataset={garbage}"], tmp_path / "run", random_pipeline_dir)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist|no such|not found"):
        _run(["algo=diffusion_dpo", f"algo.dataset={tmp_path / 'missing.parquet'}"], tmp_path / "run2",
             random_pipeline_dir)
    assert _snapshot(finished_run) == before
