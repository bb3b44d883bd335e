"""Regenerate a benchmark report from its committed evals.jsonl: python benchmarks/report.py benchmarks/results/shapes"""

import sys

from rl4diffusion.errors import ConfigError
from rl4diffusion.training.report import write_report

if __name__ == "__main__":
    try:
        print(write_report(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/shapes"))
    except ConfigError as e:  # bad input: one message, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
