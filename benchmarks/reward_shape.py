"""Which methods depend on the reward's shape? The same methods, tuned settings, seeds and evaluation noise,
trained on two forms of the alignment reward: the judge's log-probability of the prompted colour and shape
(suite ``shapes_4k``) and its probability, bounded in [0, 1] (suite ``shapes_4k_bounded``).

The two rewards are in different units, so neither is the yardstick: both suites are scored by the held-out
evaluator, which neither trains on. For every method and prompt set the table gives its final evaluator
log-probability under each reward and the difference, bounded − log-probability, with a 95 % interval from
the benchmark report's hierarchical bootstrap (training seeds with replacement, then each drawn seed's images).
The difference is paired: seed s of both suites starts from the same base model and is evaluated on the same
noise, so image i of one suite's final evaluation and image i of the other's come from the same starting noise
(the script checks this: both suites' base evaluations of seed s must agree image for image, to 1e-3 plus 1e-4
of the value). The evaluator's accuracy (colour and shape both right) is given beside it.

A method depends on the reward's shape where the interval of the log-probability difference excludes 0, on at
least 3 shared seeds (the report's rule for a verdict); otherwise this scale cannot tell.

    PYTHONPATH=. python benchmarks/reward_shape.py --out benchmarks/results/shapes_4k_bounded/reward_shape.md

The table goes to standard output and, with ``--out``, to that file too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rl4diffusion.training.report import (
    EVALUATOR_ACCURACY,
    EVALUATOR_LOGPROB,
    MIN_SEEDS,
    Estimate,
    Measure,
    Run,
    bootstrap,
    load_evals,
    runs_by_algorithm,
)
from rl4diffusion.training.rundir import write_text_atomically

BETTER_BOUNDED, BETTER_LOGPROB, NO_DIFFERENCE = ("better with the bounded reward", "better with the log-probability",
                                                 "cannot tell at this scale")


def paired_difference(bounded: list[Run], logprob: list[Run], measure: Measure, key: str) -> Estimate | None:
    """The mean over shared seeds of (bounded − log-prob) of the final per-image ``measure``, bootstrapped over
    seeds and, inside each, the per-image differences."""
    by_seed = {r.seed: r for r in logprob}
    per_seed = []
    for run in bounded:
        other = by_seed.get(run.seed)
        a, b = run.final.get(measure.sample_key), other.final.get(measure.sample_key) if other else None
        if a and b and len(a) == len(b):
            per_seed.append((np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).tolist())
    return bootstrap(per_seed, key) if per_seed else None


def check_same_base(bounded: list[Run], logprob: list[Run], algo: str, prompt_set: str) -> None:
    """Refuse to pair runs that did not start from the same model on the same noise."""
    by_seed = {r.seed: r for r in logprob}
    for run in bounded:
        other = by_seed.get(run.seed)
        if other is None or run.base is None or other.base is None:
            continue
        a, b = run.base.get(EVALUATOR_LOGPROB.sample_key), other.base.get(EVALUATOR_LOGPROB.sample_key)
        # to 1e-3 + 1e-4 of the value: the same images scored in different processes differ in float rounding
        # (up to ~2e-4 seen, and 1.0e-3 on an image at -14.6: relative 7e-5); other noise or another model
        # differs by the spread of the log-probabilities, about 1
        if a is None or b is None or len(a) != len(b) or not np.allclose(a, b, rtol=1e-4, atol=1e-3):
            raise SystemExit(f"error: {algo} seed {run.seed} on the {prompt_set} prompts: the two suites' base "
                             "evaluations differ, so their runs were not evaluated on the same noise from the same "
                             "model and cannot be paired. Run both suites with the same model and eval_seed.")


def verdict(difference: Estimate | None) -> str:
    if difference is None or difference.seeds < MIN_SEEDS:
        return NO_DIFFERENCE
    if difference.low > 0:
        return BETTER_BOUNDED
    if difference.high < 0:
        return BETTER_LOGPROB
    return NO_DIFFERENCE


def final_mean(runs: list[Run], seeds: set[int], measure: Measure) -> str:
    values = [r.final[measure.mean_key] for r in runs if r.seed in seeds and r.final.get(measure.mean_key) is not None]
    return f"{np.mean(values):.3f}" if values else "—"


def shape_table(logprob_rows: list[dict], bounded_rows: list[dict]) -> list[str]:
    lines = ["| method | prompts | seeds | evaluator log-prob, log-prob reward | evaluator log-prob, bounded reward | "
             "bounded − log-prob [95 % interval] | evaluator accuracy: bounded − log-prob | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    prompt_sets = sorted({r["prompt_set"] for r in bounded_rows}, key=lambda p: (p != "train", p))
    for prompt_set in prompt_sets:
        logprob_runs = runs_by_algorithm(logprob_rows, prompt_set)
        for algo, runs in runs_by_algorithm(bounded_rows, prompt_set).items():
            if runs[0].baseline or algo not in logprob_runs:
                continue
            others = logprob_runs[algo]
            check_same_base(runs, others, algo, prompt_set)
            seeds = {r.seed for r in runs} & {r.seed for r in others}
            runs = [r for r in runs if r.seed in seeds]
            diff = paired_difference(runs, others, EVALUATOR_LOGPROB, f"{algo}/{prompt_set}/shape logprob")
            acc = paired_difference(runs, others, EVALUATOR_ACCURACY, f"{algo}/{prompt_set}/shape accuracy")
            lines.append(f"| {algo} | {prompt_set} | {', '.join(map(str, sorted(seeds)))} | "
                         f"{final_mean(others, seeds, EVALUATOR_LOGPROB)} | {final_mean(runs, seeds, EVALUATOR_LOGPROB)} | "
                         f"{diff.text() if diff else '—'} | {acc.text() if acc else '—'} | {verdict(diff)} |")
    return lines


def failed_runs(out_dir: Path) -> list[dict]:
    """A suite's failed runs (``failed.jsonl`` beside ``evals.jsonl``): they have no final evaluation."""
    path = out_dir / "failed.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logprob", default="benchmarks/results/shapes_4k", help="the log-probability suite's results")
    parser.add_argument("--bounded", default="benchmarks/results/shapes_4k_bounded",
                        help="the bounded suite's results")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    logprob, bounded = Path(args.logprob), Path(args.bounded)
    for path in (logprob, bounded):
        if not (path / "evals.jsonl").exists():
            raise SystemExit(f"error: {path}/evals.jsonl is not there: run the suite's final stage first "
                             "(python -m rl4diffusion.bench suite=<name>).")
    logprob_rows, bounded_rows = load_evals(logprob / "evals.jsonl"), load_evals(bounded / "evals.jsonl")
    failed = {"the log-probability reward": failed_runs(logprob), "the bounded reward": failed_runs(bounded)}
    algos = {r["algo"] for r in bounded_rows + failed["the bounded reward"] if not r.get("baseline")}
    text = ["# The reward's shape: log-probability against its bounded form", "",
            f"Written by `benchmarks/reward_shape.py` from `{logprob}/evals.jsonl` (reward: the judge's "
            f"log-probability) and `{bounded}/evals.jsonl` (reward: the judge's probability), at the same tuned "
            "settings, seeds and evaluation noise. Scored by the held-out evaluator, final evaluation, mean over "
            "the shared seeds; the difference is paired by seed and image, with a 95 % interval from a "
            f"hierarchical bootstrap over seeds and images. A verdict needs {MIN_SEEDS} or more shared seeds.", "",
            *shape_table(logprob_rows, bounded_rows), ""]
    failed_lines = [f"- {r['algo']} seed {r['seed']} failed under {reward}: {r['error']}"
                    for reward, runs in failed.items() for r in runs if r["algo"] in algos]
    if failed_lines:
        text += ["Failed runs (not in the table):", "", *failed_lines, ""]
    output = "\n".join(text)
    print(output, end="")
    if args.out:
        write_text_atomically(Path(args.out), output)


if __name__ == "__main__":
    main()
