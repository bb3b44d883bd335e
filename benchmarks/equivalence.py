"""Before/after check of a restructuring: every algorithm's metrics on fixed seeds.

    python benchmarks/equivalence.py --out before.json              # on the old code
    python benchmarks/equivalence.py --out after.json               # on the new code
    python benchmarks/equivalence.py --compare before.json after.json > benchmarks/results/equivalence.md

Each algorithm trains ``--epochs`` epochs on the embedded world through the command line (seed 0,
one thread, no mid-run evaluation), so the script runs unchanged against any version of the
package that keeps ``python -m rl4diffusion.train``. Recorded per algorithm: the training
reward and every ``loss/…`` value of each epoch, and the final evaluation reward on the
training prompts. ``--compare`` prints a markdown table with the largest absolute difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ALGOS = ["ddpo", "dpok", "grpo", "refl", "draft", "alignprop", "nabla_gfn",
         "diffusion_dpo", "sft", "dmpo", "sdpo", "dpo_cm"]
PREFERENCE = {"diffusion_dpo", "sft", "dmpo", "sdpo", "dpo_cm"}


def run_one(algo: str, epochs: int, root: Path, cache: Path) -> dict:
    run_dir = root / algo
    args = [f"algo={algo}", f"epochs={epochs}", "seed=0", "threads=1", "progress=false", "eval.every=0",
            "eval.metrics=false", "eval.samples_per_prompt=2", "eval.prompt_sets=[train]", "checkpoint.every=0",
            "save_lora=false", f"hydra.run.dir={run_dir}"]
    if algo in PREFERENCE:
        args += ["algo.num_pairs=64", f"algo.cache_dir={cache}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rl4diffusion.train", *args], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [{k: v for k, v in r.items() if k == "reward_mean" or k.startswith("loss/")}
             for r in records if r["phase"] == "train"]
    final = [r for r in records if r["phase"] == "eval"][-1]
    return {"train": train, "final_eval_reward": final["reward_mean"]}


def compare(before: dict, after: dict) -> str:
    lines = ["| algorithm | train reward per epoch (before) | (after) | final eval reward before → after | "
             "max abs diff over all recorded values |", "|---|---|---|---|---|"]
    for algo in [a for a in before if a in after]:
        a, b = before[algo], after[algo]
        if "error" in a or "error" in b:
            lines.append(f"| {algo} | {'failed' if 'error' in a else ''} | {'failed' if 'error' in b else ''} | | |")
            continue
        diffs = [abs(a["final_eval_reward"] - b["final_eval_reward"])]
        for ra, rb in zip(a["train"], b["train"]):
            diffs += [abs(ra[k] - rb[k]) for k in ra if k in rb and ra[k] == ra[k] and rb[k] == rb[k]]

        def rewards(x):
            return " / ".join(f"{r['reward_mean']:.4f}" for r in x["train"] if "reward_mean" in r) or "–"

        lines.append(f"| {algo} | {rewards(a)} | {rewards(b)} | {a['final_eval_reward']:.4f} → "
                     f"{b['final_eval_reward']:.4f} | {max(diffs):.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        print(compare(*(json.loads(p.read_text()) for p in args.compare)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos.split(","):
            results[algo] = run_one(algo, args.epochs, Path(tmp) / "runs", Path(tmp) / "cache")
            print(algo, json.dumps(results[algo])[:300], flush=True)
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
