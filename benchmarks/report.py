"""Regenerate a benchmark report (report.md, its plots, claims.md and claims.json) from its committed
evals.jsonl, byte for byte:

    python benchmarks/report.py benchmarks/results/shapes
    python benchmarks/report.py <dir> --allow-unequal-seeds   # algorithms run on different seeds, stated in the header

Bad input (no evals.jsonl, rows of several suites, unequal seed sets without the flag) exits 2 with one message."""

import argparse
import sys

from rl4diffusion.errors import ConfigError
from rl4diffusion.training.report import write_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default="benchmarks/results/shapes",
                        help="a suite's results directory, holding evals.jsonl")
    parser.add_argument("--allow-unequal-seeds", action="store_true",
                        help="report algorithms trained on different seeds (the header lists each one's seeds)")
    args = parser.parse_args()
    try:
        print(write_report(args.directory, allow_unequal_seeds=args.allow_unequal_seeds))
    except ConfigError as e:  # bad input: one message, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
