"""Throughput and memory of every algorithm on the embedded world, plus the rollout overhead.

    python benchmarks/throughput.py [--algos ddpo,grpo] [--epochs 3]

Each algorithm runs in a fresh subprocess (so peak memory is its own): build the policy and the
algorithm, warm up one epoch, then time ``collect`` + ``update`` over ``--epochs`` epochs.
Reported: images per CPU-second (chains or pairs consumed per CPU-second of collect + update; CPU
time because this machine is shared and wall-clock is noisy — with one thread the two agree on a
quiet machine), the same relative to DDPO, wall-clock seconds per epoch, and the process's peak
resident memory. Results go to benchmarks/results/throughput.md, with the
rollout-overhead ratio from benchmarks/rollout_overhead.py appended when present.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def measure_one(algo: str, epochs: int, threads: int) -> dict:
    import torch

    from rl4diffusion.algorithms import build_algorithm
    from rl4diffusion.cli.overrides import CONF_DIR
    from rl4diffusion.data.prompts import resolve_prompts
    from rl4diffusion.envs import DenoisingEnv
    from rl4diffusion.policies.base import DiffusionPolicy
    from rl4diffusion.rewards import build_reward

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "algo" / f"{algo}.yaml"))
    options.pop("name")
    model = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    model.pop("name")
    policy = DiffusionPolicy.from_pretrained(**{k: v for k, v in model.items() if k != "pretrained"}, pretrained="tiny")
    reward = build_reward("shape_alignment")
    algorithm = build_algorithm(algo, options, policy, reward, seed=0)
    env = DenoisingEnv(policy, reward, resolve_prompts("train"), batch_size=int(getattr(algorithm.config, "batch_size", 8)))
    env.set_seed(0)
    algorithm.update(algorithm.collect(env))  # warm-up (and any one-off setup such as pair generation)
    images, seconds, cpu_seconds = 0, 0.0, 0.0
    for _ in range(epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        batch = algorithm.collect(env)
        algorithm.update(batch)
        seconds += time.perf_counter() - t0
        cpu_seconds += time.process_time() - c0
        images += batch.shape[0]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"algo": algo, "images_per_cpu_s": images / cpu_seconds, "cpu_s_per_epoch": cpu_seconds / epochs,
            "wall_s_per_epoch": seconds / epochs, "batch": int(batch.shape[0]), "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", default=None, help="comma-separated; default: every registered algorithm")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.epochs, args.threads)))
        return
    from rl4diffusion.algorithms import ALGORITHMS

    algos = args.algos.split(",") if args.algos else sorted(ALGORITHMS)
    rows = []
    for algo in algos:
        proc = subprocess.run([sys.executable, __file__, "--one", algo, "--epochs", str(args.epochs),
                               "--threads", str(args.threads)], capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"algo": algo, "error": proc.stderr.strip().splitlines()[-1][:200]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["# Throughput and memory per algorithm", "",
             f"Embedded world (model=tiny, reward=shape_alignment, each algorithm's conf/algo defaults), "
             f"{args.threads} CPU thread(s), {args.epochs} timed epochs after one warm-up epoch, one fresh process "
             "per algorithm. *images / CPU-s* counts the chains (or preference pairs) consumed per CPU-second of "
             "collect + update (CPU time: robust to other jobs on a shared machine); *vs DDPO* is that rate "
             "over DDPO's; wall-clock seconds per epoch are as measured (noisy); peak memory is the process's "
             "maximum resident set.", "",
             "| algorithm | batch | CPU-s / epoch | images / CPU-s | vs DDPO | wall s / epoch | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    ddpo = next((r["images_per_cpu_s"] for r in rows if r["algo"] == "ddpo" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['algo']} | – | – | – | – | – | failed: {r['error']} |")
        else:
            ratio = f"{r['images_per_cpu_s'] / ddpo:.2f}×" if ddpo else "–"
            lines.append(f"| {r['algo']} | {r['batch']} | {r['cpu_s_per_epoch']:.2f} | {r['images_per_cpu_s']:.2f} | "
                         f"{ratio} | {r['wall_s_per_epoch']:.2f} | {r['peak_rss_mb']:.0f} |")
    overhead = RESULTS / "rollout_overhead.md"
    if overhead.exists():
        lines += ["", overhead.read_text().replace("# Rollout overhead", "## Rollout overhead")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
