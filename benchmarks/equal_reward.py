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

from rl4diffusion.errors import ConfigError
from rl4diffusion.training.report import at_reward, load_evals, run_curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a suite's results directory (with evals.jsonl)")
    parser.add_argument("--reference", default="nabla_gfn")
    parser.add_argument("--others", nargs="+", default=["refl", "draft", "alignprop"])
    parser.add_argument("--prompt-set", default="train")
    args = parser.parse_args()
    try:
        curves = run_curves(load_evals(Path(args.results) / "evals.jsonl"), args.prompt_set)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    seeds = sorted(s for a, s in curves if a == args.reference)
    others = [o for o in args.others if any(a == o for a, _ in curves)]
    if not seeds or not others:
        raise SystemExit(f"{args.results} has no runs of {args.reference} or of any of {args.others}.")
    print(f"At {args.reference}'s final mean reward ({args.prompt_set} prompts), per seed. abs Δ diversity is "
          "the distance from the base model's diversity on the same noise.\n")
    print("| seed | algorithm | reward | queries | diversity (base) | abs Δ diversity | FID vs base |")
    print("|---|---|---|---|---|---|---|")
    for seed in seeds:
        base, final = curves[(args.reference, seed)][0], curves[(args.reference, seed)][-1]
        rows = [(f"{args.reference} (final)", final)]
        rows += [(other, at_reward(curves.get((other, seed), []), final["reward_mean"])) for other in others]
        for name, point in rows:
            if point is None:
                print(f"| {seed} | {name} | not reached | – | – | – | – |")
                continue
            print(f"| {seed} | {name} | {final['reward_mean']:.2f} | {point['reward_queries']:.0f} | "
                  f"{point['diversity']:.4f} ({base['diversity']:.4f}) | "
                  f"{abs(point['diversity'] - base['diversity']):.4f} | {point['fid_base']:.1f} |")


if __name__ == "__main__":
    main()
