"""Diversity and distance from the base model of several algorithms *at equal reward*.

The ∇-GFlowNet claim (Liu et al. 2025) is that it keeps diversity closer to the base model than
reward backpropagation (ReFL, DRaFT) does at the same reward. Final checkpoints sit at different
rewards, so for each seed this reads every other algorithm's evaluation curve (mean reward
against reward queries) at the first point where it reaches the reference algorithm's final
reward, interpolating diversity and FID vs base linearly between the two evaluations around
that crossing. Everything comes from a suite's ``evals.jsonl``.

    PYTHONPATH=. python benchmarks/equal_reward.py benchmarks/results/shapes --reference nabla_gfn \\
        --others refl draft alignprop
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rl4diffusion.bench_report import load_evals, run_curves

KEYS = ("diversity", "fid_base")


def at_reward(curve: list[dict], target: float) -> dict | None:
    """Diversity and FID vs base where ``curve`` (evaluations in training order) first reaches ``target``."""
    if curve and curve[0]["reward_mean"] >= target:  # the base model already had this reward
        return {"queries": 0.0, **{k: curve[0][k] for k in KEYS}}
    for before, after in zip(curve, curve[1:]):
        if after["reward_mean"] >= target:  # before < target ≤ after: interpolate between them
            w = (target - before["reward_mean"]) / (after["reward_mean"] - before["reward_mean"])
            return {"queries": before["reward_queries"] + w * (after["reward_queries"] - before["reward_queries"]),
                    **{k: before[k] + w * (after[k] - before[k]) for k in KEYS}}
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a suite's results directory (with evals.jsonl)")
    parser.add_argument("--reference", default="nabla_gfn")
    parser.add_argument("--others", nargs="+", default=["refl", "draft", "alignprop"])
    parser.add_argument("--prompt-set", default="train")
    args = parser.parse_args()
    curves = run_curves(load_evals(Path(args.results) / "evals.jsonl"), args.prompt_set)
    seeds = sorted(s for a, s in curves if a == args.reference)
    print(f"At {args.reference}'s final mean reward ({args.prompt_set} prompts), per seed; base diversity "
          f"{curves[(args.reference, seeds[0])][0]['diversity']:.3f}.\n")
    print("| seed | algorithm | reward | queries | diversity | FID vs base |")
    print("|---|---|---|---|---|---|")
    for seed in seeds:
        final = curves[(args.reference, seed)][-1]
        print(f"| {seed} | {args.reference} (final) | {final['reward_mean']:.2f} | {final['reward_queries']} | "
              f"{final['diversity']:.3f} | {final['fid_base']:.1f} |")
        for other in args.others:
            point = at_reward(curves.get((other, seed), []), final["reward_mean"])
            if point is None:
                print(f"| {seed} | {other} | not reached | – | – | – |")
            else:
                print(f"| {seed} | {other} | {final['reward_mean']:.2f} | {point['queries']:.0f} | "
                      f"{point['diversity']:.3f} | {point['fid_base']:.1f} |")


if __name__ == "__main__":
    main()
