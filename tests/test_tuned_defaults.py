"""benchmarks/tuned_defaults.py: a package default is judged worse only beyond the final runs' seed noise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _verdicts(tmp_path, final_ddpo_scores):
    tuning, results = tmp_path / "tuning", tmp_path / "results"
    tuning.mkdir(), results.mkdir()
    trials = [  # ddpo's package defaults are lr 3e-3, clip_range 1e-4; sdpo_mean is a variant
        {"algo": "ddpo", "trial": 0, "setting": ["algo.lr=0.003", "algo.clip_range=0.0001"], "status": "done",
         "score": -1.5},
        {"algo": "ddpo", "trial": 1, "setting": ["algo.lr=0.001", "algo.clip_range=0.0001"], "status": "done",
         "score": -1.0},
        {"algo": "ddpo", "trial": 2, "setting": ["algo.lr=0.01", "algo.clip_range=0.0001"], "status": "failed",
         "score": None},
        {"algo": "sdpo_mean", "trial": 0, "setting": ["algo.lr=0.001", "algo.beta=400.0"], "status": "done",
         "score": -1.0},
    ]
    (tuning / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    for trial, cpu_s in [(0, 100.0), (1, 150.0)]:  # the chosen trial cost 1.5 times the default's per query
        (tuning / "runs" / f"ddpo_t{trial}_s1000").mkdir(parents=True)
        (tuning / "runs" / f"ddpo_t{trial}_s1000" / "summary.json").write_text(
            json.dumps({"train_cpu_s": cpu_s, "reward_queries": 1024}))
    evals = [{"algo": "ddpo", "seed": seed, "step": step, "prompt_set": "train",
              "evaluator_logprob": score if step else -3.0}
             for seed, score in enumerate(final_ddpo_scores) for step in (0, 128)]
    (results / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    proc = subprocess.run([sys.executable, "benchmarks/tuned_defaults.py", "shapes_4k", "--results", str(results),
                           "--tuning", str(tuning), "--out", str(tmp_path / "defaults.md")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "defaults.md").read_text() == proc.stdout  # --out writes what it prints
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


@pytest.mark.parametrize("scores, verdict", [([-1.1, -1.0, -0.9], "change"),  # SD 0.1: limit 0.277 < gap 0.5
                                             ([-1.5, -1.0, -0.5], "keep (within noise)")])  # SD 0.5: limit 1.39
def test_a_default_changes_only_beyond_the_seed_noise(tmp_path, scores, verdict):
    rows = _verdicts(tmp_path, scores)
    assert set(rows) == {"ddpo"}  # the variant has no package defaults of its own
    algo, default, default_score, chosen, chosen_score, gap, seeds, sd, limit, found, cost = rows["ddpo"]
    assert default == "`lr=0.003 clip_range=0.0001`" and chosen == "`lr=0.001 clip_range=0.0001`"
    assert (float(default_score), float(chosen_score), float(gap), int(seeds)) == (-1.5, -1.0, 0.5, 3)
    assert float(limit) == pytest.approx(1.96 * 2 ** 0.5 * float(sd), abs=2e-3)
    assert found == verdict
    assert cost == "1.50"


def test_one_final_seed_cannot_tell(tmp_path):
    assert _verdicts(tmp_path, [-1.0])["ddpo"][-2] == "cannot tell (fewer than 2 final seeds)"
