"""``python -m rl4diffusion.compare`` on a real Hydra sweep, and the plots' styles and panels."""

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from rl4diffusion.cli.compare import main as compare_main
from rl4diffusion.training.report import (
    REPORT_PLOTS,
    algorithm_style,
    draw_plots,
    is_preference_method,
    mean_interval,
)
from tests.mistakes import ROOT, assert_user_error, cli_env, run_cases

# runs of a couple of seconds: the embedded world with two denoising steps, evaluated on its training prompts
TINY = ["epochs=2", "model.num_steps=2", "algo.batch_size=4", "algo.minibatch_size=4", "eval.samples_per_prompt=2",
        "eval.prompt_sets=[train]", "progress=false", "threads=1", "log_with=[]", "save_lora=false"]
PLOTS = ("reward_vs_queries.png", "reward_vs_epoch.png", "reward_vs_cpu.png", "diversity_vs_reward.png",
         "fid_base_vs_reward.png")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A three-seed nabla_gfn sweep (jobs 0–2) and one DDPO run beside it, compared whole and the sweep
    alone, in one process."""
    work = tmp_path_factory.mktemp("compare")
    sweep_dir = work / "sweep"
    *trainings, whole, one_algorithm = run_cases([
        ("train", ["-m", "seed=0,1,2", *TINY, f"hydra.sweep.dir={sweep_dir}"]),
        ("train", ["algo=ddpo", "seed=0", *TINY, f"hydra.run.dir={sweep_dir / 'ddpo_s0'}"]),
        ("compare", [str(sweep_dir)]),
        ("compare", [*(str(sweep_dir / f"{job}_nabla_gfn") for job in range(3)), f"out={work / 'one'}"]),
    ], work)
    for training in trainings:
        assert training.code == 0, training.text[-3000:]
    return {"dir": sweep_dir, "work": work, "whole": whole, "one": one_algorithm}


def final_reward(run_dir, prompt_set="train"):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["phase"] == "eval" and r["prompt_set"] == prompt_set][-1]["reward_mean"]


def test_three_seeds_of_one_config_make_one_group_with_a_mean_and_an_interval(sweep):
    assert sweep["one"].code == 0, sweep["one"].text[-3000:]
    rows = json.loads((sweep["work"] / "one" / "compare.json").read_text())
    train = [r for r in rows if r["prompt_set"] == "train"]
    assert len(train) == 1 and train[0]["group"] == "nabla_gfn" and train[0]["seeds"] == 3
    row = train[0]
    finals = [final_reward(sweep["dir"] / f"{job}_nabla_gfn") for job in range(3)]
    assert sorted(row["reward_per_seed"]) == sorted(finals)
    assert min(finals) <= row["reward"] <= max(finals)
    assert row["reward"] == pytest.approx(sum(finals) / 3)
    assert row["reward_low"] < row["reward"] < row["reward_high"]
    assert row["improvement_low"] < row["improvement"] < row["improvement_high"]
    assert "| nabla_gfn | 3 | " in sweep["one"].out and "compare.md" in sweep["one"].out
    markdown = (sweep["work"] / "one" / "compare.md").read_text()
    assert "| nabla_gfn | 3 | " in markdown and "Student-t" in markdown
    assert (sweep["work"] / "one" / "compare.csv").read_text().count("\n") == 1 + len(rows)
    for name in PLOTS:
        with Image.open(sweep["work"] / "one" / name) as image:
            assert image.width > 400 and image.height > 300
            assert len(set(image.convert("L").getdata())) > 20, name  # drawn, not a blank canvas
        assert f"![{name}]({name})" in markdown


def test_runs_of_two_algorithms_give_one_row_each_beside_the_runs(sweep):
    assert sweep["whole"].code == 0, sweep["whole"].text[-3000:]
    rows = json.loads((sweep["dir"] / "compare" / "compare.json").read_text())  # the default out: beside the runs
    assert {(r["group"], r["prompt_set"], r["seeds"]) for r in rows} == {("ddpo", "train", 1),
                                                                          ("nabla_gfn", "train", 3)}
    ddpo = next(r for r in rows if r["group"] == "ddpo")  # one seed: its value, and no interval to give
    assert ddpo["reward"] == ddpo["reward_low"] == ddpo["reward_high"] == final_reward(sweep["dir"] / "ddpo_s0")
    assert all((sweep["dir"] / "compare" / name).stat().st_size > 5000 for name in PLOTS)


def test_unfinished_runs_are_left_out_with_a_note_and_alone_exit_2(sweep, tmp_path, capfd):
    unfinished = tmp_path / "sweep" / "0_nabla_gfn"
    shutil.copytree(sweep["dir"] / "0_nabla_gfn", unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(SystemExit) as stop:
        compare_main([str(tmp_path / "sweep"), f"out={tmp_path / 'out'}"])
    err = capfd.readouterr().err
    assert stop.value.code == 2 and "unfinished" in err and "Traceback" not in err and "\n" not in err.strip()
    assert not (tmp_path / "out").exists()

    shutil.copytree(sweep["dir"] / "1_nabla_gfn", tmp_path / "sweep" / "1_nabla_gfn")
    compare_main([str(tmp_path / "sweep"), f"out={tmp_path / 'out'}"])
    out = capfd.readouterr().out
    assert "| nabla_gfn | 1 | " in out and f"{unfinished}: unfinished" in out
    assert f"{unfinished}: unfinished" in (tmp_path / "out" / "compare.md").read_text()


def test_bad_input_exits_2_with_one_paragraph(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "missing")], ["does not exist"]),
             ([str(tmp_path / "empty")], ["no run found", "config.yaml and metrics.jsonl"]),
             ([], ["give run directories"]),
             ([str(tmp_path / "empty"), "colour=red"], ["unknown option 'colour'", "out=<dir>"])]
    outcomes = run_cases([("compare", argv) for argv, _ in cases], tmp_path / "cases")
    for (_, fragments), outcome in zip(cases, outcomes):
        assert_user_error(outcome, *fragments)
        assert outcome.err.strip().count("\n") == 0, outcome.err
    # the documented module, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "rl4diffusion.compare", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_every_built_in_algorithm_has_its_own_colour_and_marker():
    from rl4diffusion.algorithms import ALGORITHMS

    # the built-in ones (another test may have registered a user algorithm in this process)
    built_in = [name for name, target in ALGORITHMS.items() if target.startswith("rl4diffusion.algorithms.")]
    assert len(built_in) >= 13
    styles = [algorithm_style(name) for name in built_in]
    assert len({colour for colour, _ in styles}) == len({marker for _, marker in styles}) == len(built_in)
    assert [algorithm_style(name) for name in built_in] == styles  # the same look in every plot
    assert algorithm_style("my_pkg.algos:Mine") == algorithm_style("my_pkg.algos:Mine")


def test_preference_methods_are_told_apart_and_drawn_against_epochs_in_a_panel_of_their_own(tmp_path):
    from rl4diffusion.algorithms import ALGORITHMS

    preference = {name for name in ALGORITHMS if is_preference_method(name)}
    assert preference == {"sft", "diffusion_dpo", "dmpo", "dpo_cm", "sdpo"}
    assert not is_preference_method("my_pkg.algos:Unknown")

    def run(queries, shift):  # three evaluations of one seed
        return [{"step": 8 * k, "reward_queries": queries[k], "reward_mean": -1.0 + shift * k} for k in range(3)]

    series = {"ddpo": [run([0, 64, 128], 0.1), run([0, 64, 128], 0.2)],
              "dmpo": [run([0, 512, 512], 0.1), run([0, 512, 512], 0.3)]}
    styles = {name: algorithm_style(name) for name in series}
    for preference, out in (({"dmpo"}, tmp_path / "split"), (set(), tmp_path / "one")):
        out.mkdir()
        made = draw_plots(series, out, "train", styles=styles, preference=preference, specs=REPORT_PLOTS[:1])
        assert made == ["reward_vs_queries.png"]
    with Image.open(tmp_path / "split" / "reward_vs_queries.png") as split, \
            Image.open(tmp_path / "one" / "reward_vs_queries.png") as one:
        assert split.width > 1.7 * one.width  # two panels side by side


def test_the_interval_over_seeds_is_students_t():
    from scipy import stats

    values = [-1.2, -0.7, -1.0]
    mean, low, high = mean_interval(values)
    sem = stats.sem(values)
    assert (low, high) == pytest.approx(stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem))
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5)


def test_a_bench_suites_runs_compare_like_its_report(tmp_path, capfd):
    """The committed shapes suite (11 algorithms × 3 seeds, read from runs/): one group per algorithm, whose
    mean final reward is the report's, computed there from evals.jsonl."""
    from rl4diffusion.training.report import final_records, load_evals

    shapes = ROOT / "benchmarks" / "results" / "shapes"
    compare_main([str(shapes / "runs"), f"out={tmp_path}"])
    assert "| refl | 3 | " in capfd.readouterr().out
    rows = json.loads((tmp_path / "compare.json").read_text())
    for (algo, prompt_set), records in final_records(load_evals(shapes / "evals.jsonl")).items():
        row = next(r for r in rows if r["group"] == algo and r["prompt_set"] == prompt_set)
        assert row["seeds"] == len(records) == 3
        assert row["reward"] == pytest.approx(sum(r["reward_mean"] for r in records) / 3)
    assert len(rows) == 2 * 11
    with Image.open(tmp_path / "reward_vs_queries.png") as image:
        assert image.width > 1.7 * image.height  # the preference methods' panel beside the online one
