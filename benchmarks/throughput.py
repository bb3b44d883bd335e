"""Throughput and memory of every algorithm on the embedded world, vs a plain DDPO loop and an older commit.

    python benchmarks/throughput.py                                # every algorithm; DDPO vs the plain loop
    python benchmarks/throughput.py --algos ddpo,grpo --no-plain   # some algorithms only
    python benchmarks/throughput.py --epochs 3 --baseline 65f861c  # and every algorithm at 65f861c too

Everything is measured in CPU-seconds of one torch thread (``time.process_time``): the machine is shared
and wall-clock is noisy; on a quiet machine the two agree.

1. **Per algorithm**, one fresh subprocess each (so peak memory is its own): build the tiny policy and
   the algorithm with its conf/algo defaults, run one warm-up epoch (which also does one-off set-up such
   as generating AI-feedback pairs), then time ``collect`` + the update over ``--epochs`` epochs. The
   update is the trainer's (``Updater(algorithm)``, accelerate), or ``algorithm.update`` in a checkout
   from before the trainer owned the optimisation step.
2. **DDPO vs a plain loop** (unless ``--no-plain``): rl4diffusion's DDPO epoch and the same epoch written
   with torch + diffusers + peft only (benchmarks/plain_loop.py), in one process, each warmed up, then
   ``--plain-epochs`` epochs each, alternating which runs first; the ratio of the medians
   rl4diffusion / plain (target ≤ 1.05).
3. **Against an earlier commit** (``--baseline REF``): measurement 1 on a git worktree of REF as well
   (created at ``--baseline-dir`` when absent; its subprocesses import it through PYTHONPATH), the two
   trees interleaved algorithm by algorithm; the ratio new / old of CPU-seconds per epoch (target ≈ 1).
4. **The size of a collected batch**: ``Σ numel · element_size`` over the TensorDict's leaves, and the
   part held by keys named ``prompt_embeds`` (the per-step copies of the prompt's embedding).

Results go to benchmarks/results/throughput.md, with the command that made them and, when present, the
rollout-overhead table of benchmarks/rollout_overhead.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
log = logging.getLogger("benchmarks.throughput")


# ------------------------------------------------------------------------ inside a measuring subprocess
def conf_values(conf_dir: Path, group: str, name: str) -> dict:
    """The options a conf/<group>/<name>.yaml sets, without Hydra's keys. In the old layout the YAML holds
    every option; in the new one only overrides of the config dataclass's defaults."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(conf_dir / group / f"{name}.yaml"))
    return {k: v for k, v in values.items() if k not in ("name", "defaults", "pretrained")}


def build(algo: str):
    """(algorithm, env, update) for ``algo`` on the tiny model with the shape-alignment reward, in whichever
    layout of rl4diffusion is imported: the current one, or the one before policies/, training/, cli/."""
    import rl4diffusion
    from rl4diffusion.algorithms import build_algorithm
    from rl4diffusion.envs import DenoisingEnv
    from rl4diffusion.rewards import build_reward

    package = Path(rl4diffusion.__file__).parent
    # decided by the files, not by find_spec: for a checkout without cli/, the editable install's finder
    # would find the current tree's
    new_layout = (package / "cli").is_dir()
    if new_layout:
        from rl4diffusion.data.prompts import resolve_prompts
        from rl4diffusion.policies.base import DiffusionPolicy
    else:
        from rl4diffusion.policy import DiffusionPolicy
        from rl4diffusion.prompts import resolve_prompts
    conf_dir = package / "conf"  # both layouts' CONF_DIR

    policy = DiffusionPolicy.from_pretrained("tiny", **conf_values(conf_dir, "model", "tiny"))
    reward = build_reward("shape_alignment")
    algorithm = build_algorithm(algo, conf_values(conf_dir, "algo", algo), policy, reward, seed=0)
    batch_size = int(getattr(algorithm.config, "batch_size", 8))
    env = DenoisingEnv(policy, reward, resolve_prompts("train"), batch_size=batch_size)
    env.set_seed(0)
    if new_layout:
        from rl4diffusion.training.optimisation import Updater

        return algorithm, env, Updater(algorithm)
    return algorithm, env, algorithm.update


def batch_bytes(batch) -> dict[str, int]:
    """Σ numel · element_size over a TensorDict's tensors, and the part under keys named prompt_embeds."""
    total = embeds = 0
    for key, value in batch.items(include_nested=True, leaves_only=True):
        size = value.numel() * value.element_size()
        total += size
        if (key[-1] if isinstance(key, tuple) else key) == "prompt_embeds":
            embeds += size
    return {"batch_bytes": total, "prompt_embeds_bytes": embeds}


def timed_epoch(collect, update) -> tuple[float, float, float, object]:
    """One epoch: (collect CPU-s, update CPU-s, wall-clock s, the batch)."""
    t0, c0 = time.perf_counter(), time.process_time()
    batch = collect()
    c1 = time.process_time()
    update(batch)
    c2 = time.process_time()
    return c1 - c0, c2 - c1, time.perf_counter() - t0, batch


def as_json(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def measure_one(algo: str, epochs: int, threads: int) -> dict:
    """Measurements 1 and 4 for one algorithm, in this process."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    algorithm, env, update = build(algo)
    update(algorithm.collect(env))  # warm-up (and any one-off set-up such as pair generation)
    collect_s, update_s, wall_s = [], [], []
    for _ in range(epochs):
        collect, train, wall, batch = timed_epoch(lambda: algorithm.collect(env), update)
        collect_s.append(collect)
        update_s.append(train)
        wall_s.append(wall)
    epoch_s = [c + u for c, u in zip(collect_s, update_s)]
    return {
        "algo": algo,
        "package": str(Path(sys.modules["rl4diffusion"].__file__).parent),  # which tree was measured
        "batch": int(batch.shape[0]),
        "images_per_cpu_s": epochs * batch.shape[0] / sum(epoch_s),
        "epoch_cpu_s": epoch_s,
        "cpu_s_per_epoch": statistics.mean(epoch_s),
        "collect_s_per_epoch": statistics.mean(collect_s),
        "update_s_per_epoch": statistics.mean(update_s),
        "wall_s_per_epoch": statistics.mean(wall_s),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **batch_bytes(batch),
        "config": as_json(algorithm.config),
        "policy_config": as_json(algorithm.policy.config),
    }


def measure_plain(epochs: int, threads: int) -> dict:
    """Measurement 2, in this process: rl4diffusion's DDPO and the plain loop, their epochs alternating.
    Returns their CPU-seconds per epoch: {"rl4diffusion" | "plain": {"collect": [...], "update": [...]}}."""
    import torch
    from plain_loop import PlainDDPO  # benchmarks/, this script's directory, is on sys.path

    from rl4diffusion.data.prompts import resolve_prompts

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    algorithm, env, update = build("ddpo")
    cfg, model = algorithm.config, algorithm.policy.config
    if cfg.timestep_fraction != 1 or cfg.num_inner_epochs != 1 or model.log_prob_reduction != "mean":
        raise SystemExit("the plain loop trains every timestep once with mean-reduced log-probabilities, "
                         "and DDPO's defaults no longer do: update benchmarks/plain_loop.py")
    plain = PlainDDPO(resolve_prompts("train"), num_chains=cfg.batch_size, num_steps=model.num_steps,
                      guidance=model.guidance_scale, eta=model.eta, minibatch=cfg.minibatch_size,
                      lr=cfg.lr, weight_decay=cfg.weight_decay, clip_range=cfg.clip_range,
                      adv_clip_max=cfg.adv_clip_max, max_grad_norm=cfg.max_grad_norm,
                      lora_rank=model.lora_rank)
    loops = {"rl4diffusion": (lambda: algorithm.collect(env), update), "plain": (plain.collect, plain.update)}
    for collect, train in loops.values():
        timed_epoch(collect, train)  # warm-up
    times = {name: {"collect": [], "update": []} for name in loops}
    for epoch in range(epochs):
        order = list(loops) if epoch % 2 == 0 else list(loops)[::-1]  # alternating: a drift hits both alike
        for name in order:
            collect_s, update_s, _, _ = timed_epoch(*loops[name])
            times[name]["collect"].append(collect_s)
            times[name]["update"].append(update_s)
    return times


# ------------------------------------------------------------------------ the driver
def git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True)
    return proc.stdout.strip()


def describe_tree(directory: Path) -> str:
    """``abc1234`` or ``abc1234 + uncommitted changes``."""
    head = git("-C", str(directory), "rev-parse", "--short", "HEAD")
    dirty = git("-C", str(directory), "status", "--porcelain", "--untracked-files=no")
    return f"{head} + uncommitted changes" if dirty else head


def baseline_checkout(ref: str, directory: Path) -> Path:
    """A git worktree of ``ref`` at ``directory``, created when absent (the current tree is left alone)."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if not directory.exists():
        log.info("creating a worktree of %s at %s", ref, directory)
        git("worktree", "add", "--detach", str(directory), commit)
    head = git("-C", str(directory), "rev-parse", "HEAD")
    if head != commit:
        raise SystemExit(f"{directory} holds {head[:7]}, not {ref} ({commit[:7]}): pass another "
                         f"--baseline-dir, or remove it with `git worktree remove {directory}`")
    return directory


def run_child(args: list[str], tree: Path | None) -> dict:
    """This script with ``args`` in a fresh process, importing the current tree (None) or ``tree``; returns
    the JSON of its last line of output.

    A failure is retried once after a minute: others edit the current tree while this runs, and a file
    caught half-written must not cost a row."""
    env, cwd = dict(os.environ), REPO
    if tree is not None:  # its rl4diffusion shadows the editable install of the current tree
        env["PYTHONPATH"], cwd = str(tree), tree
    for attempt in (1, 2):
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=cwd, env=env,
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        if attempt == 1:
            log.warning("%s failed (%s); retrying in 60 s", " ".join(args), error)
            time.sleep(60)
    return {"error": error}


# ------------------------------------------------------------------------ the report
def per_algorithm_table(args, rows: dict[str, dict]) -> list[str]:
    lines = [f"Embedded world (model=tiny, reward=shape_alignment, each algorithm's conf/algo defaults), "
             f"{args.threads} CPU thread(s), {args.epochs} timed epochs after one warm-up epoch, one fresh "
             "process per algorithm. *images / CPU-s* counts the chains (or preference pairs) consumed per "
             "CPU-second of collect + update (CPU time: robust to other jobs on a shared machine); *vs DDPO* "
             "is that rate over DDPO's; wall-clock seconds per epoch are as measured (noisy); *batch (KB)* "
             "is Σ numel · element_size over the collected TensorDict; peak memory is the process's maximum "
             "resident set.", "",
             "| algorithm | batch | CPU-s / epoch (collect + update) | images / CPU-s | vs DDPO "
             "| wall s / epoch | batch (KB) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    ddpo = rows.get("ddpo", {}).get("images_per_cpu_s")
    for algo, r in rows.items():
        if "error" in r:
            lines.append(f"| {algo} | – | – | – | – | – | – | failed: {r['error']} |")
            continue
        vs_ddpo = f"{r['images_per_cpu_s'] / ddpo:.2f}×" if ddpo else "–"
        lines.append(f"| {algo} | {r['batch']} | {r['cpu_s_per_epoch']:.2f} "
                     f"({r['collect_s_per_epoch']:.2f} + {r['update_s_per_epoch']:.2f}) | "
                     f"{r['images_per_cpu_s']:.2f} | {vs_ddpo} | {r['wall_s_per_epoch']:.2f} | "
                     f"{r['batch_bytes'] / 1024:.0f} | {r['peak_rss_mb']:.0f} |")
    return lines


def plain_section(plain: dict) -> list[str]:
    lines = ["## DDPO vs a plain PyTorch + diffusers loop", ""]
    if "error" in plain:
        return lines + [f"Failed: {plain['error']}"]
    median = {name: {part: statistics.median(values) for part, values in parts.items()}
              for name, parts in plain.items()}
    for parts in median.values():
        parts["epoch"] = parts["collect"] + parts["update"]
    count = len(plain["plain"]["collect"])
    lines += ["One DDPO epoch (32 chains × 20 DDIM steps, guidance 2, LoRA rank 4 on the attention "
              "projections, PPO-clip over minibatches of 8 chains × all 20 timesteps, one AdamW step per "
              "minibatch) through rl4diffusion (`algorithm.collect(env)`, then `Updater(algorithm)`) and "
              "through benchmarks/plain_loop.py (the same arithmetic with torch + diffusers + peft only), in "
              f"one process: each warmed up, then {count} epochs each, alternating which runs first. "
              "Medians of CPU-seconds per epoch (*epoch* = the two medians' sum):", "",
              "| loop | collect | update | epoch |", "|---|---|---|---|"]
    for name, parts in median.items():
        lines.append(f"| {name} | {parts['collect']:.2f} | {parts['update']:.2f} | {parts['epoch']:.2f} |")
    ratio = {part: median["rl4diffusion"][part] / median["plain"][part] for part in median["plain"]}
    return lines + ["", f"**ratio rl4diffusion / plain = {ratio['epoch']:.3f}** (target ≤ 1.05; collect "
                        f"{ratio['collect']:.3f}, update {ratio['update']:.3f})."]


def relative_error(row: dict) -> float:
    """The standard error of a row's mean epoch time, relative to it (the noise between epochs only)."""
    values = row["epoch_cpu_s"]
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) / math.sqrt(len(values)) / statistics.mean(values)


def config_differences(new: dict, old: dict) -> list[str]:
    """Options whose values differ between the two trees: where a default changed, code is not all the
    ratio measures."""
    out = []
    for part in ("config", "policy_config"):
        for key in sorted(set(new[part]) & set(old[part]) - {"name"}):
            if new[part][key] != old[part][key]:
                out.append(f"{key} {old[part][key]} → {new[part][key]}")
    return out


def baseline_section(args, trees: dict[str, str], rows: dict[str, dict]) -> list[str]:
    lines = [f"## Against {args.baseline} (the code before the restructuring)", "",
             f"The same measurement on a worktree of {trees['old']}, the two trees interleaved algorithm by "
             "algorithm (alternating which runs first). *new / old* is the ratio of mean CPU-seconds per "
             "epoch; ± is its standard error from the spread between epochs (the noise between processes is "
             "left out); *config* lists options whose defaults differ between the trees.", "",
             "| algorithm | CPU-s / epoch now | at baseline | new / old | collect new / old "
             "| update new / old | peak RSS now / old (MB) | config |",
             "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for algo, new in rows["new"].items():
        old = rows["old"].get(algo, {"error": "not run"})
        if "error" in new or "error" in old:
            error = new.get("error") or old.get("error")
            lines.append(f"| {algo} | – | – | – | – | – | – | failed: {error} |")
            continue
        ratio = new["cpu_s_per_epoch"] / old["cpu_s_per_epoch"]
        ratios.append(ratio)
        noise = ratio * math.hypot(relative_error(new), relative_error(old))
        collect = new["collect_s_per_epoch"] / old["collect_s_per_epoch"]
        update = new["update_s_per_epoch"] / old["update_s_per_epoch"]
        lines.append(f"| {algo} | {new['cpu_s_per_epoch']:.2f} | {old['cpu_s_per_epoch']:.2f} | "
                     f"{ratio:.3f} ± {noise:.3f} | {collect:.3f} | {update:.3f} | "
                     f"{new['peak_rss_mb']:.0f} / {old['peak_rss_mb']:.0f} | "
                     f"{'; '.join(config_differences(new, old)) or 'same'} |")
    if ratios:
        geomean = math.exp(statistics.mean(math.log(r) for r in ratios))
        lines += ["", f"**geometric mean of new / old = {geomean:.3f}** over {len(ratios)} algorithms "
                      "(target ≤ ~1.0 within noise)."]
    return lines


def batch_size_section(trees: dict[str, str], rows: dict[str, dict]) -> list[str]:
    lines = ["## Size of a DDPO trajectory batch", "",
             "The TensorDict DDPO's `collect` returns (32 chains × 20 steps): Σ numel · element_size over "
             "its leaves, and the part under keys named `prompt_embeds` (a copy of the prompt's [L, D] "
             "embedding per step, in the state and under \"next\").", "",
             "| tree | batch bytes | prompt_embeds bytes | share |", "|---|---|---|---|"]
    for version, label in (("new", "current"), ("old", "baseline")):
        r = rows.get(version, {}).get("ddpo")
        if r and "error" not in r:
            share = r["prompt_embeds_bytes"] / r["batch_bytes"]
            lines.append(f"| {label} ({trees[version]}) | {r['batch_bytes']:,} | "
                         f"{r['prompt_embeds_bytes']:,} | {share:.0%} |")
    return lines


def report(args, command: str, trees: dict[str, str], rows: dict[str, dict], plain: dict | None) -> str:
    """The markdown of benchmarks/results/throughput.md."""
    baseline = f"; baseline {trees['old']}" if "old" in trees else ""
    title = ["# Throughput and memory per algorithm", "",
             f"`{command}` (current tree {trees['new']}{baseline})"]
    sections = [title, per_algorithm_table(args, rows["new"])]
    if plain is not None:
        sections.append(plain_section(plain))
    if "old" in rows:
        sections.append(baseline_section(args, trees, rows))
    sections.append(batch_size_section(trees, rows))
    overhead = RESULTS / "rollout_overhead.md"
    if overhead.exists():
        sections.append([overhead.read_text().strip().replace("# Rollout overhead", "## Rollout overhead")])
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", default=None, help="comma-separated; default: every registered algorithm")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per algorithm, after one warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="time DDPO against benchmarks/plain_loop.py")
    parser.add_argument("--plain-epochs", type=int, default=6, help="timed epochs of each, DDPO vs plain")
    parser.add_argument("--baseline", default=None, metavar="REF", help="a git ref to measure side by side")
    parser.add_argument("--baseline-dir", type=Path, default=Path("/tmp/rl4d_baseline"),
                        help="where the baseline's worktree is (created when absent)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plain-one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.epochs, args.threads)))
        return
    if args.plain_one:
        print(json.dumps(measure_plain(args.plain_epochs, args.threads)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python benchmarks/throughput.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    from rl4diffusion.algorithms import ALGORITHMS

    algos = args.algos.split(",") if args.algos else sorted(ALGORITHMS)
    sources, trees = {"new": None}, {"new": describe_tree(REPO)}
    if args.baseline:
        sources["old"] = baseline_checkout(args.baseline, args.baseline_dir)
        trees["old"] = describe_tree(sources["old"])

    plain = None
    if args.plain:
        plain_args = ["--plain-one", "--plain-epochs", str(args.plain_epochs), "--threads", str(args.threads)]
        plain = run_child(plain_args, None)
        log.info("ddpo vs plain: %s", plain)
    rows = {version: {} for version in sources}
    for index, algo in enumerate(algos):
        for version in list(sources) if index % 2 == 0 else list(sources)[::-1]:
            row = run_child(["--one", algo, "--epochs", str(args.epochs), "--threads", str(args.threads)],
                            sources[version])
            rows[version][algo] = row
            log.info("%s %s: %s", version, algo, {k: v for k, v in row.items() if "config" not in k})
    rows = {version: dict(sorted(measured.items())) for version, measured in rows.items()}

    text = report(args, command, trees, rows, plain)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
