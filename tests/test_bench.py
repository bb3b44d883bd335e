"""The benchmark harness end to end on a two-algorithm, one-seed, tiny-budget suite; resumable."""

import json
import shutil

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from rl4diffusion.cli.bench import CONF_DIR, run_suite
from rl4diffusion.training.report import write_report


def test_smoke_suite_runs_resumes_and_reports(tmp_path):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["suite=shapes_smoke", "seeds=1", f"out_dir={tmp_path}"])
    report = run_suite(cfg)
    rows = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert {r["algo"] for r in rows} == {"ddpo", "refl"}
    for algo in ("ddpo", "refl"):
        steps = [r for r in rows if r["algo"] == algo]
        assert steps[0]["step"] == 0 and steps[-1]["reward_queries"] <= 64 + 8
        assert {"diversity", "fid_dataset", "fid_base", "win_rate", "fid_space"} <= set(steps[-1])
    text = report.read_text()
    assert "| ddpo | train | 1 |" in text and "| refl | train | 1 |" in text
    assert "## Head to head" in text and "| row beats column (train prompts) | ddpo | refl |" in text
    assert all(r["win_n"] == len(r["sample_rewards"]) for r in rows)
    for png in ("reward_vs_queries.png", "reward_vs_wallclock.png", "reward_vs_cpu.png", "diversity_vs_reward.png",
                "fid_vs_reward.png", "fid_base_vs_reward.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # a finished (algo, seed) is not re-run
    stamp = (tmp_path / "runs" / "ddpo_s0" / "summary.json").stat().st_mtime_ns
    run_suite(cfg)
    assert (tmp_path / "runs" / "ddpo_s0" / "summary.json").stat().st_mtime_ns == stamp
    # the report regenerates from the JSONL alone
    (tmp_path / "report.md").unlink()
    assert write_report(tmp_path).read_text() == text


def test_bench_command_line_refuses_bad_input_clearly():
    import subprocess
    import sys

    for args, message in ((["suite=no_such_suite"], "Could not find 'suite/no_such_suite'"),
                          (["algos=[no_such_algo]"], "Valid names: alignprop")):
        proc = subprocess.run([sys.executable, "-m", "rl4diffusion.bench", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cpu_budget_stops_the_run_and_evaluations_follow_reward_queries(tmp_path):
    from rl4diffusion.cli.overrides import rewrite_overrides
    from rl4diffusion.training.trainer import run

    overrides = ["algo=refl", "model.num_steps=6", "algo.batch_size=8", "epochs=200", "threads=1", "progress=false",
                 "save_lora=false", "checkpoint.every=0", "budget.train_cpu_seconds=4", "eval.every=0",
                 "eval.every_queries=16", "eval.prompt_sets=[train]", "eval.samples_per_prompt=2", "eval.metrics=false"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=rewrite_overrides(overrides))
    summary = run(cfg, tmp_path)
    assert 2 <= summary["epochs"] < 200 and summary["train_cpu_s"] >= 4
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["phase"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == summary["epochs"]
    # one evaluation each time the training queries pass a multiple of 16 (8 per epoch: every second epoch)
    middle = [r["reward_queries"] for r in evals[1:-1]]
    assert middle == [16 * k for k in range(1, len(middle) + 1)] and len(middle) >= summary["epochs"] // 2 - 1
    # the CPU clock is training only: it grows by epoch and excludes the evaluations
    cpu = [r["train_cpu_s"] for r in rows if r["phase"] == "train"]
    assert all(b > a for a, b in zip(cpu, cpu[1:]))


def test_report_pools_seeds_and_compares_final_checkpoints_head_to_head():
    from rl4diffusion.metrics.winrate import win_rate
    from rl4diffusion.training.report import head_to_head, pooled_win_rate, table

    def record(algo, seed, step, rewards, win):
        return {"algo": algo, "seed": seed, "step": step, "phase": "eval", "prompt_set": "train", "reward_mean": 0.0,
                "win_rate": win, "win_n": len(rewards), "sample_rewards": rewards}

    rows = []
    for seed in (0, 1):
        rows += [record("a", seed, 0, [0.0] * 4, 0.5), record("a", seed, 5, [1.0, 2.0, 3.0, 0.0], 0.75),
                 record("b", seed, 0, [0.0] * 4, 0.5), record("b", seed, 9, [0.5, 2.0, 4.0, -1.0], 0.25)]
    # a beats b on pairs 1 and 4, ties pair 2, loses pair 3, in both seeds: (2 + 0.5) / 4 per seed
    matrix = head_to_head(rows, "train")
    expected = win_rate(torch.tensor([1.0, 2.0, 3.0, 0.0] * 2), torch.tensor([0.5, 2.0, 4.0, -1.0] * 2))
    assert f"| a | – | {expected.rate:.2f} [{expected.low:.2f}, {expected.high:.2f}] |" in matrix
    assert f"| b | {1 - expected.rate:.2f}" in matrix
    # pooled over seeds: 8 comparisons at 0.75 → the same interval as one 8-pair comparison at 0.75
    finals = [r for r in rows if r["algo"] == "a" and r["step"] == 5]
    eight = win_rate(torch.tensor([1.0] * 6 + [-1.0] * 2), torch.zeros(8))
    assert pooled_win_rate(finals) == f"0.750 [{eight.low:.3f}, {eight.high:.3f}]"
    assert "win rate, seeds pooled" in table(rows)


def test_report_counts_the_queries_one_algorithm_needs_to_reach_anothers_final_reward():
    from rl4diffusion.training.report import queries_to_reach

    def record(algo, seed, queries, reward):
        return {"algo": algo, "seed": seed, "step": queries, "phase": "eval", "prompt_set": "train",
                "reward_mean": reward, "reward_queries": queries}

    rows = [record("fast", 0, q, r) for q, r in [(0, -2.0), (100, -1.0), (200, 0.0)]]
    rows += [record("slow", 0, q, r) for q, r in [(0, -2.0), (300, -1.5), (600, -0.5)]]
    rows += [record("fast", 1, q, r) for q, r in [(0, -2.0), (100, -1.9)]]  # seed 1: never reaches slow's final
    rows += [record("slow", 1, q, r) for q, r in [(0, -2.0), (300, -1.0)]]
    lines = queries_to_reach(rows, "train").splitlines()
    # fast reaches slow's final (-0.5, then -1.0) at 200 queries on seed 0 and never on seed 1;
    # slow reaches fast's final (0.0, then -1.9) never on seed 0 and at 300 on seed 1
    assert lines[2] == "| fast | – | 200 / – |"
    assert lines[3] == "| slow | – / 300 | – |"
    assert lines[4] == "| *column's final queries* | 200 / 100 | 600 / 300 |"


def test_queries_to_reach_takes_the_last_evaluation_when_queries_tie():
    from rl4diffusion.training.report import queries_to_reach

    def record(algo, step, queries, reward):
        return {"algo": algo, "seed": 0, "step": step, "phase": "eval", "prompt_set": "train",
                "reward_mean": reward, "reward_queries": queries}

    # a preference run: every evaluation after the pairs were generated is at the same 512 queries
    rows = [record("pref", 0, 0, -2.0), record("pref", 32, 512, 0.0), record("pref", 64, 512, -1.5)]
    rows += [record("online", 0, 0, -2.0), record("online", 8, 256, -1.0)]
    lines = queries_to_reach(rows, "train").splitlines()
    assert lines[2] == "| online | – | 256 |"  # pref's final is -1.5 (step 64), not its best 0.0


def test_at_reward_interpolates_diversity_where_a_curve_first_reaches_a_reward():
    from rl4diffusion.training.report import at_reward

    def point(queries, reward, diversity, fid_base):
        return {"reward_queries": queries, "reward_mean": reward, "diversity": diversity, "fid_base": fid_base}

    curve = [point(0, -2.0, 0.08, 0.0), point(100, -1.5, 0.07, 10.0), point(200, -0.5, 0.05, 30.0),
             point(300, -1.8, 0.06, 40.0)]
    # -1.0 lies halfway between the evaluations at 100 and 200 queries: interpolate everything there
    hit = at_reward(curve, -1.0)
    assert hit["reward_queries"] == 150 and abs(hit["diversity"] - 0.06) < 1e-12 and hit["fid_base"] == 20.0
    assert at_reward(curve, -2.5) == {"reward_queries": 0.0, "diversity": 0.08, "fid_base": 0.0}  # the base had it
    assert at_reward(curve, -0.4) is None  # never reached, even though the curve ends lower
    assert at_reward([], -1.0) is None


def test_an_interrupted_run_stops_the_suite(tmp_path, monkeypatch):
    import rl4diffusion.training.trainer

    started = []

    def interrupted_run(cfg, run_dir):  # what run() returns after SIGINT/SIGTERM: {} and no summary.json
        started.append(run_dir.name)
        return {}

    monkeypatch.setattr(rl4diffusion.training.trainer, "run", interrupted_run)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["suite=shapes_smoke", "seeds=2", f"out_dir={tmp_path}"])
    run_suite(cfg)
    assert started == ["ddpo_s0"]  # not refl_s0 nor seed 1: Ctrl-C on the bench stops the bench


def test_a_report_of_a_directory_without_evals_says_what_to_give(tmp_path):
    import pytest

    from rl4diffusion.errors import ConfigError

    with pytest.raises(ConfigError, match="evals.jsonl"):
        write_report(tmp_path)


def _bench_cfg(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("bench", overrides=list(overrides))


def test_the_committed_grid_is_the_lowest_seeds_whatever_order_the_seeds_ran_in(tmp_path, monkeypatch):
    import rl4diffusion.training.report
    import rl4diffusion.training.trainer

    def fake_run(cfg, run_dir):  # a finished run whose final grid names its seed
        (run_dir / "images").mkdir(parents=True, exist_ok=True)
        (run_dir / "images" / "eval_00002_train_p1.png").write_text(f"seed {cfg.seed}")
        (run_dir / "summary.json").write_text("{}")
        return True

    monkeypatch.setattr(rl4diffusion.training.trainer, "run", fake_run)
    monkeypatch.setattr(rl4diffusion.training.report, "write_report", lambda out_dir, **kw: out_dir / "report.md")
    grid = tmp_path / "grids" / "refl_train.png"
    for seeds, expected in [("[2]", "seed 2"), ("[0]", "seed 0"), ("[1,3]", "seed 0")]:  # e.g. two lanes, resumed
        run_suite(_bench_cfg("suite=shapes_smoke", f"seeds={seeds}", "algos=[refl]", f"out_dir={tmp_path}"))
        assert grid.read_text() == expected


def test_tuning_stage_chooses_the_best_trial_and_the_final_stage_runs_it(tmp_path):
    import pytest

    from rl4diffusion.cli.bench import run_tuning
    from rl4diffusion.errors import ConfigError

    tune_dir, final_dir = tmp_path / "tuning", tmp_path / "final"
    common = ["suite=shapes_smoke_tuned", "algos=[refl]", f"tuning_dir={tune_dir}", f"out_dir={final_dir}"]
    with pytest.raises(ConfigError, match="no tuned setting yet: refl"):  # the final stage before tuning
        run_suite(_bench_cfg(*common))
    run_tuning(_bench_cfg(*common, "stage=tune"))
    trials = [json.loads(x) for x in (tune_dir / "trials.jsonl").read_text().splitlines()]
    refl = [t for t in trials if t["algo"] == "refl"]
    assert [t["status"] for t in refl] == ["done", "done"]
    assert {t["status"] for t in trials if t["algo"] == "ddpo"} == {"pending"}  # not asked for: shown pending
    best = max(refl, key=lambda t: t["score"])
    tuning_config = OmegaConf.load(tune_dir / "runs" / "refl_t0_s100" / "config.yaml")
    assert (tuning_config.seed, tuning_config.eval.seed) == (100, 600 + 100)  # tuning seed, tuning noise
    assert "| refl |" in (tune_dir / "tuning.md").read_text()
    run_suite(_bench_cfg(*common))
    final_config = OmegaConf.load(final_dir / "runs" / "refl_s0" / "config.yaml")
    chosen_lr = float(best["setting"][0].split("=")[1])
    assert (final_config.algo.lr, final_config.eval.seed) == (chosen_lr, 500 + 0)  # chosen lr, the seed's noise
    assert (final_dir / "grids" / "refl_train.png").stat().st_size > 1000  # the committed base-vs-final grid


def test_tuning_refuses_unequal_effort_and_records_a_failed_trial(tmp_path, monkeypatch):
    import pytest

    import rl4diffusion.cli.bench
    import rl4diffusion.training.trainer
    from rl4diffusion.cli.bench import run_tuning, write_tuning
    from rl4diffusion.errors import ConfigError
    from rl4diffusion.training.trainer import TrainingAborted

    with pytest.raises(ConfigError, match="different numbers of trials"):
        run_tuning(_bench_cfg("suite=shapes_smoke_tuned", "stage=tune", "suite.tuning.grid.refl={algo.lr: [1.0e-3]}",
                              f"tuning_dir={tmp_path}"))

    def diverging_run(cfg, run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        raise TrainingAborted("3 updates were skipped for non-finite losses")

    monkeypatch.setattr(rl4diffusion.training.trainer, "run", diverging_run)
    cfg = _bench_cfg("suite=shapes_smoke_tuned", "stage=tune", "algos=[ddpo]", f"tuning_dir={tmp_path}")
    run_tuning(cfg)  # every trial fails: recorded, and the stage finishes
    records = write_tuning(cfg.suite, tmp_path)
    assert [r["status"] for r in records if r["algo"] == "ddpo"] == ["failed", "failed"]
    assert "non-finite" in (tmp_path / "runs" / "ddpo_t0_s100" / "failed.txt").read_text()
    retried, rewrites = [], []
    monkeypatch.setattr(rl4diffusion.training.trainer, "run", lambda cfg, run_dir: retried.append(run_dir))
    monkeypatch.setattr(rl4diffusion.cli.bench, "write_tuning", lambda *a: rewrites.append(a))
    run_tuning(cfg)  # resumed: a failed trial is a result, not retried, and tuning.md is written once, at the end
    assert (retried, len(rewrites)) == ([], 1)
    with pytest.raises(ConfigError, match="ddpo .2/2 trials done, all failed"):
        run_suite(_bench_cfg("suite=shapes_smoke_tuned", "algos=[ddpo]", f"tuning_dir={tmp_path}",
                             f"out_dir={tmp_path / 'final'}"))


def test_baselines_stage_evaluates_the_best_guidance_and_best_of_n_without_training(tmp_path):
    from rl4diffusion.cli.bench import run_baselines

    cfg = _bench_cfg("suite=shapes_smoke_tuned", "stage=baselines", f"tuning_dir={tmp_path / 't'}",
                     f"out_dir={tmp_path / 'f'}")
    with open_dict(cfg.suite.train):  # a suite that fixes its runs' evaluation guidance, as the flow suite does
        cfg.suite.train["eval.guidance_scale"] = 2
    run_baselines(cfg)
    runs = {g: tmp_path / "t" / "runs" / f"base_g{g}_s100" for g in (1, 2)}
    scores = {g: json.loads((r / "metrics.jsonl").read_text().splitlines()[0])["evaluator_logprob"]
              for g, r in runs.items()}
    # the sweep evaluates at each of its scales, whatever the suite's evaluation guidance
    assert [json.loads((r / "summary.json").read_text())["guidance_scale"] for r in runs.values()] == [1.0, 2.0]
    assert scores[1] != scores[2]
    best = max(scores, key=scores.get)
    rows = [json.loads(x) for x in (tmp_path / "f" / "evals.jsonl").read_text().splitlines()]
    assert {r["algo"] for r in rows} == {f"base_g{best}", "best_of_2"} and all(r["baseline"] for r in rows)
    base, chosen = [r for r in rows if r["algo"] == "best_of_2"]
    images = len(base["sample_rewards"])
    assert (base["reward_queries"], chosen["reward_queries"]) == (0, 2 * images)
    # each chosen image is the better of two candidates, the first being the base model's on the same noise
    assert all(c >= b for c, b in zip(chosen["sample_rewards"], base["sample_rewards"]))
    assert chosen["reward_mean"] > base["reward_mean"]
    # a baseline killed between its prompt sets (metrics written, no summary) is evaluated again, files kept
    killed = tmp_path / "f" / "runs" / "best_of_2_s0"
    (killed / "summary.json").unlink()
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text(lines[0] + "\n")
    run_baselines(cfg)
    assert (killed / "metrics.jsonl").read_text().splitlines() == lines
    assert (next(killed.glob("before_restart_*")) / "metrics.jsonl").read_text() == lines[0] + "\n"
    # the choice is written into the tuning directory, under the name of the suite that owns it
    assert (tmp_path / "t" / "baselines.md").read_text().startswith("# No-training baselines: suite shapes_smoke_tuned\n")
    run_baselines(_bench_cfg("suite=shapes_smoke_tuned", "+suite.tuned_by=shapes_smoke", "stage=baselines",
                             f"tuning_dir={tmp_path / 't'}", f"out_dir={tmp_path / 'f'}"))  # everything is there
    assert (tmp_path / "t" / "baselines.md").read_text().startswith("# No-training baselines: suite shapes_smoke\n")


def test_a_suite_variant_is_an_algorithm_with_options_under_its_own_name(tmp_path):
    import pytest

    from rl4diffusion.cli.bench import checked_algos, run_overrides
    from rl4diffusion.errors import ConfigError

    cfg = _bench_cfg("suite=flow")
    assert "grpo_fast" in checked_algos(cfg)
    overrides = run_overrides(cfg.suite, "grpo_fast", 3, tmp_path / "grpo_fast_s3")
    assert overrides[0] == "algo=grpo" and "algo.window_size=2" in overrides and "eval.seed=30003" in overrides
    with pytest.raises(ConfigError, match="broken .a variant of no_such_algo."):
        checked_algos(_bench_cfg("suite=flow", "+suite.variants.broken={algo: no_such_algo, overrides: []}"))


def test_a_failed_run_is_listed_in_the_report_as_a_failure(tmp_path):
    from rl4diffusion.cli.bench import merge_evals

    run_dir = tmp_path / "runs" / "ddpo_s3"
    run_dir.mkdir(parents=True)
    (run_dir / "failed.txt").write_text("3 updates were skipped for non-finite losses\n")
    merge_evals(tmp_path, "shapes_smoke")
    text = write_report(tmp_path, suite_name="shapes_smoke").read_text()
    assert "## Failed runs" in text and "| ddpo | 3 | 3 updates were skipped for non-finite losses |" in text


def test_a_run_killed_before_its_first_checkpoint_starts_over_and_the_suite_goes_on(tmp_path):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["suite=shapes_smoke", "seeds=1", "algos=[refl]", f"out_dir={tmp_path}"])
    run_suite(cfg)
    run_dir = tmp_path / "runs" / "refl_s0"
    # what a SIGKILL during the first epoch leaves: the config, a partial metrics file, no checkpoint
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "checkpoints")
    partial = (run_dir / "metrics.jsonl").read_text().splitlines()[0]
    (run_dir / "metrics.jsonl").write_text(partial + "\n")
    run_suite(cfg)
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2
    aside = next(run_dir.glob("before_restart_*"))  # nothing written is lost
    assert (aside / "metrics.jsonl").read_text() == partial + "\n"


def test_a_resumed_suite_skips_finished_runs_without_rewriting_the_report_for_each(tmp_path, monkeypatch):
    import rl4diffusion.training.report
    import rl4diffusion.training.trainer

    for algo in ("refl", "draft"):  # finished before this invocation
        (tmp_path / "runs" / f"{algo}_s0").mkdir(parents=True)
        (tmp_path / "runs" / f"{algo}_s0" / "summary.json").write_text("{}")
    trained, reports = [], []

    def fake_run(cfg, run_dir):
        trained.append(run_dir.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text("{}")
        return True

    def counting_write_report(out_dir, **kwargs):
        reports.append(out_dir)
        return out_dir / "report.md"

    monkeypatch.setattr(rl4diffusion.training.trainer, "run", fake_run)
    monkeypatch.setattr(rl4diffusion.training.report, "write_report", counting_write_report)
    run_suite(_bench_cfg("suite=shapes_smoke", "seeds=1", "algos=[refl,draft,ddpo]", f"out_dir={tmp_path}"))
    assert trained == ["ddpo_s0"]
    assert len(reports) == 2  # after the one run trained, and once at the end: not after each skipped run
