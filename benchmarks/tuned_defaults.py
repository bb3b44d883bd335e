"""Should a package default change? The tuning trials against the seed-to-seed noise of the final runs.

A tuned suite chooses each algorithm's setting from single-seed trials; the chosen setting becomes the
suite's, not the package's. A package default changes only where its own trial was worse than the chosen
one by more than the noise of one run could explain. This script reads the tuning trials
(``trials.jsonl``), finds each algorithm's trial at its package defaults, and compares the gap with the
across-seed standard deviation SD of the same score in the suite's final runs (the last evaluation's
metric on the tuning prompt set, one value per seed): a default is worse only where

    score(chosen) − score(default) > 1.96 · √2 · SD

(two independent runs differ by more than that with about 5 % probability when they are equally good).
The final runs are at four times the tuning budget, so SD is a stand-in for the trials' own noise.
The rule compares settings at the same number of reward queries; the last column, the chosen trial's training
CPU-seconds per reward query over the default trial's, says what the chosen setting costs in compute beside it.
Variants (an algorithm under options, e.g. ``sdpo_mean``) are left out: they do not have package defaults
of their own.

    PYTHONPATH=. python benchmarks/tuned_defaults.py shapes_4k --out benchmarks/results/tuning/shapes_4k/defaults.md

The table goes to standard output and, with ``--out``, to that file too.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from rl4diffusion.cli.bench import run_overrides, train_config
from rl4diffusion.cli.overrides import CONF_DIR
from rl4diffusion.errors import ConfigError
from rl4diffusion.training.report import final_records, load_evals


def option_values(setting: list[str]) -> dict[str, object]:
    """``["algo.lr=0.001", "algo.k=null"]`` as ``{"lr": 0.001, "k": None}`` (values read as YAML, as Hydra does)."""
    values = {}
    for item in setting:
        key, _, value = item.partition("=")
        values[key.removeprefix("algo.")] = yaml.safe_load(value)
    return values


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def cpu_per_query(tuning: Path, record: dict) -> float | None:
    """A trial's training CPU-seconds per reward query, averaged over its tuning seeds (None where its runs'
    summaries are not there)."""
    summaries = sorted((tuning / "runs").glob(f"{record['algo']}_t{record['trial']}_s*/summary.json"))
    costs = [s["train_cpu_s"] / s["reward_queries"] for s in (json.loads(p.read_text()) for p in summaries)
             if s.get("reward_queries")]
    return statistics.mean(costs) if costs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="a tuned suite's name (conf/suite/<name>.yaml)")
    parser.add_argument("--results", default=None, help="its final results (default benchmarks/results/<suite>)")
    parser.add_argument("--tuning", default=None, help="its tuning results (default benchmarks/results/tuning/<suite>)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    suite = OmegaConf.load(CONF_DIR / "suite" / f"{args.suite}.yaml")
    results = Path(args.results or Path("benchmarks") / "results" / args.suite)
    tuning = Path(args.tuning or Path("benchmarks") / "results" / "tuning" / args.suite)
    if suite.get("tuning") is None or not (tuning / "trials.jsonl").exists() or not (results / "evals.jsonl").exists():
        raise SystemExit(f"error: {args.suite} needs a tuning section, {tuning}/trials.jsonl and "
                         f"{results}/evals.jsonl: run its tuning and final stages first.")
    trials = [json.loads(line) for line in (tuning / "trials.jsonl").read_text().splitlines()]
    finals = final_records(load_evals(results / "evals.jsonl"))
    t = suite.tuning
    variants = set((suite.get("variants") or {}).keys())
    lines = [f"# Package defaults against the {args.suite} tuning trials\n",
             f"Written by `benchmarks/tuned_defaults.py {args.suite}`. Tuning score = last `{t.metric}` on the "
             f"`{t.prompt_set}` prompts; SD = across-seed standard deviation of the same score in the final runs. "
             "A default is worse where chosen − default > 1.96·√2·SD.\n",
             "| algorithm | default | default score | chosen | chosen score | gap | final seeds | SD | threshold | "
             "verdict | CPU-s per query, chosen ÷ default |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for algo in dict.fromkeys(r["algo"] for r in trials):
        if algo in variants:
            continue
        mine = [r for r in trials if r["algo"] == algo and r["status"] == "done"]
        defaults = train_config(run_overrides(suite, algo, 0, Path("/nonexistent"))).algo
        keys = list(option_values(mine[0]["setting"]))
        default_setting = " ".join(f"{k}={defaults[k]}" for k in keys)
        at_default = [r for r in mine if all(same(v, defaults[k]) for k, v in option_values(r["setting"]).items())]
        chosen = max(mine, key=lambda r: r["score"])
        scores = [r[t.metric] for r in finals.get((algo, t.prompt_set), []) if t.metric in r]  # one per seed
        sd = statistics.stdev(scores) if len(scores) >= 2 else None
        chosen_text = " ".join(s.removeprefix("algo.") for s in chosen["setting"])
        if not at_default:
            verdict, default_score, gap, threshold, cost = "default not in the grid", "—", "—", "—", "—"
        else:
            d = at_default[0]
            gap_value = chosen["score"] - d["score"]
            default_score, gap = f"{d['score']:.3f}", f"{gap_value:.3f}"
            if d is chosen:
                verdict, threshold = "keep (the default was chosen)", "—"
            elif sd is None:
                verdict, threshold = "cannot tell (fewer than 2 final seeds)", "—"
            else:
                limit = 1.96 * math.sqrt(2) * sd
                threshold = f"{limit:.3f}"
                verdict = "change" if gap_value > limit else "keep (within noise)"
            costs = cpu_per_query(tuning, chosen), cpu_per_query(tuning, d)
            cost = "—" if None in costs else f"{costs[0] / costs[1]:.2f}"
        lines.append(f"| {algo} | `{default_setting}` | {default_score} | `{chosen_text}` | {chosen['score']:.3f} | "
                     f"{gap} | {len(scores)} | {'—' if sd is None else f'{sd:.3f}'} | {threshold} | {verdict} | {cost} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
