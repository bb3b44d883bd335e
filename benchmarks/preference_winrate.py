"""Paired win rate of the preference methods against the base model on held-out seeds.

For each training seed, each method trains with ``python -m rl4diffusion.train``'s ``run`` on the
embedded world (``model=tiny reward=shape_alignment``) from that seed's AI-feedback pairs
(generated once from the base model and cached). Then the fine-tuned model and the base model
sample the same prompts with the *same noise* (seed ``eval_seed + training seed``: used neither
for the pairs nor for the run's evaluation, and different per training seed so that the pooled
comparisons are independent), and each comparison is won by the image with the higher reward
(ties count ½). The win rate, per seed and pooled over seeds, comes with a 95 % confidence
interval (the Wilson interval of ``rl4diffusion.metrics.winrate``). DMPO and Diffusion-DPO are
also compared head to head on the same noise.

    PYTHONPATH=. python benchmarks/preference_winrate.py --jobs 2            # all methods, 3 seeds (~45 min)
    PYTHONPATH=. python benchmarks/preference_winrate.py --methods diffusion_dpo dmpo --epochs 10 --seeds 0

Writes ``benchmarks/results/preference_winrate.md`` (and a .json of the raw numbers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("diffusion_dpo", "dmpo", "dpo_cm", "sdpo", "sft")


def paired_win_rate(a: torch.Tensor, b: torch.Tensor) -> dict:
    """P(a beats b) over paired comparisons (ties ½) with the shared 95 % Wilson interval."""
    from rl4diffusion.metrics.winrate import win_rate

    w = win_rate(a, b)
    return {"win_rate": w.rate, "ci_low": w.low, "ci_high": w.high, "n": w.n, "wins": w.wins, "ties": w.ties}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rl4diffusion.cli.overrides import CONF_DIR, rewrite_overrides

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=rewrite_overrides(overrides))


def train(method: str, seed: int, run_dir: Path, args) -> dict:
    from rl4diffusion.training.trainer import run

    overrides = [
        f"algo={method}", f"model={args.model}", "reward=shape_alignment", f"epochs={args.epochs}", "eval.every=0",
        "eval.prompt_sets=[train,heldout]", "eval.samples_per_prompt=2", "eval.metrics=false", "progress=false",
        "threads=1",
        "save_lora=false", "checkpoint.every=0", f"seed={seed}", f"algo.num_pairs={args.num_pairs}",
        f"algo.cache_dir={args.cache_dir}", *args.override,
    ]
    return run(compose(overrides), run_dir)


@torch.no_grad()
def rewards_on_seeds(policy, reward, prompts: list[str], *, samples: int, seed: int, base: bool) -> torch.Tensor:
    from rl4diffusion.training.evaluation import sample_fixed

    if base:
        with policy.reference():
            images, flat, _ = sample_fixed(policy, prompts, samples_per_prompt=samples, seed=seed)
    else:
        images, flat, _ = sample_fixed(policy, prompts, samples_per_prompt=samples, seed=seed)
    return reward(images, flat).float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--model", default="tiny", help="model= of every run (e.g. path:/some/snapshot)")
    parser.add_argument("--epochs", type=int, default=200, help="~the shapes suite's 180 CPU-s per run")
    parser.add_argument("--num-pairs", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds (also the AI-feedback pairs' seeds); results are pooled over them")
    parser.add_argument("--eval-seed", type=int, default=777,
                        help="the paired comparison of training seed s samples with noise seed eval_seed + s")
    parser.add_argument("--samples", type=int, default=24, help="samples per prompt in the comparison")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "rl4d_pref_bench_cache"))
    parser.add_argument("--jobs", type=int, default=1, help="training runs side by side (one thread each)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "preference_winrate.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from rl4diffusion.data.prompts import resolve_prompts
    from rl4diffusion.policies.base import DiffusionPolicy
    from rl4diffusion.rewards import build_reward
    from rl4diffusion.training.checkpoint import latest_checkpoint, load_trainable_state

    reward = build_reward("shape_alignment")
    # the sampler settings of the runs (conf/model/tiny.yaml and any model.* overrides), so base and fine-tuned
    # models are compared exactly as trained
    model_options = OmegaConf.to_container(compose([f"model={args.model}", *args.override]).model, resolve=True)
    policy = DiffusionPolicy.from_pretrained(**model_options)
    prompt_sets = {name: resolve_prompts(name) for name in ("train", "heldout")}
    work = Path(tempfile.mkdtemp(prefix="rl4d_pref_bench_"))
    results = {method: {"seeds": {}} for method in args.methods}
    rewards: dict[str, dict[str, list[torch.Tensor]]] = {m: {n: [] for n in prompt_sets} for m in ["base", *args.methods]}
    # train every (method, seed) first, --jobs at a time; then compare, one run after another
    runs = [(method, seed) for seed in args.seeds for method in args.methods]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {run: pool.submit(train, run[0], run[1], work / f"{run[0]}_s{run[1]}", args) for run in runs}
        summaries = {run: job.result() for run, job in jobs.items()}
    for seed in args.seeds:
        eval_seed = args.eval_seed + seed
        for name, prompts in prompt_sets.items():
            rewards["base"][name].append(rewards_on_seeds(policy, reward, prompts, samples=args.samples,
                                                          seed=eval_seed, base=True))
        for method in args.methods:
            summary = summaries[(method, seed)]
            state = load_file(str(latest_checkpoint(work / f"{method}_s{seed}") / "accelerate" / "trainable.safetensors"))
            load_trainable_state(policy, state)
            for name, prompts in prompt_sets.items():
                rewards[method][name].append(rewards_on_seeds(policy, reward, prompts, samples=args.samples,
                                                              seed=eval_seed, base=False))
            results[method]["seeds"][seed] = {
                "train_wall_s": summary["train_wall_s"],
                **{name: paired_win_rate(rewards[method][name][-1], rewards["base"][name][-1]) for name in prompt_sets},
            }
            print(method, seed, json.dumps(results[method]["seeds"][seed], default=float), flush=True)
    pooled = {m: {n: torch.cat(v) for n, v in sets.items()} for m, sets in rewards.items()}
    for method in args.methods:
        results[method].update({name: {"vs_base": paired_win_rate(pooled[method][name], pooled["base"][name]),
                                       "reward_base": pooled["base"][name].mean().item(),
                                       "reward_final": pooled[method][name].mean().item()} for name in prompt_sets})
    head_to_head = {}
    if "dmpo" in pooled and "diffusion_dpo" in pooled:
        head_to_head = {name: paired_win_rate(pooled["dmpo"][name], pooled["diffusion_dpo"][name])
                        for name in prompt_sets}
    write_report(Path(args.out), args, results, head_to_head, {k: len(v) for k, v in prompt_sets.items()})


def write_report(path: Path, args, results: dict, head_to_head: dict, set_sizes: dict) -> None:
    def fmt(w: dict) -> str:
        return f"{100 * w['win_rate']:.1f} % [{100 * w['ci_low']:.1f}, {100 * w['ci_high']:.1f}]"

    lines = [
        "# Preference methods: paired win rate against the base model",
        "",
        f"Generated by `benchmarks/preference_winrate.py` (model={args.model}, reward=shape_alignment, {args.epochs} epochs, "
        f"{args.num_pairs} AI-feedback pairs from the base model per training seed, training seeds "
        f"{', '.join(map(str, args.seeds))}; extra overrides: "
        f"{' '.join(args.override) or 'none'}; each method's conf/algo defaults otherwise).",
        f"Comparison: per training seed s, {args.samples} samples per prompt on held-out noise seed "
        f"{args.eval_seed} + s — {set_sizes['train']} train prompts ({set_sizes['train'] * args.samples} pairs of "
        f"images per seed) and {set_sizes['heldout']} held-out prompts ({set_sizes['heldout'] * args.samples}); "
        "fine-tuned and base model sample with the same noise, the higher shape_alignment wins, ties ½. Pooled over "
        "seeds, 95 % Wilson interval; per seed in the last columns.",
        "",
        "| method | win rate vs base, train prompts | win rate vs base, held-out prompts | reward base → final (train) "
        "| reward base → final (held-out) | per seed, train prompts | per seed, held-out prompts | train s per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        per_seed = {name: " / ".join(f"{100 * s[name]['win_rate']:.0f} %" for s in r["seeds"].values())
                    for name in ("train", "heldout")}
        wall = sum(s["train_wall_s"] for s in r["seeds"].values()) / len(r["seeds"])
        lines.append(
            f"| {method} | {fmt(r['train']['vs_base'])} | {fmt(r['heldout']['vs_base'])} | "
            f"{r['train']['reward_base']:.4f} → {r['train']['reward_final']:.4f} | "
            f"{r['heldout']['reward_base']:.4f} → {r['heldout']['reward_final']:.4f} | {per_seed['train']} | "
            f"{per_seed['heldout']} | {wall:.0f} |")
    if head_to_head:
        lines += ["", "## DMPO vs Diffusion-DPO, head to head (same noise, pooled over seeds)", "",
                  "| prompt set | DMPO win rate vs Diffusion-DPO |", "|---|---|"]
        lines += [f"| {name} | {fmt(w)} |" for name, w in head_to_head.items()]
    lines += ["", "DPO-C&M and SDPO are experimental (the authors' v2 flags an error in their main theorem).", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps({"results": results, "head_to_head": head_to_head}, indent=1,
                                                    default=float))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
