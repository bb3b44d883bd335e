"""The benchmark harness end to end on a two-algorithm, one-seed, tiny-budget suite; resumable."""

import json

from hydra import compose, initialize_config_dir

from rl4diffusion.bench import CONF_DIR, run_suite
from rl4diffusion.bench_report import write_report


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
    for png in ("reward_vs_queries.png", "reward_vs_wallclock.png", "diversity_vs_reward.png", "fid_vs_reward.png"):
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
