"""The benchmark report: a table (mean ± std over seeds at the final evaluation) and PNG plots,
regenerated from ``evals.jsonl`` alone — ``python benchmarks/report.py benchmarks/results/shapes``."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from rl4diffusion.errors import ConfigError

COLUMNS = [  # (record key, column title, higher is better?)
    ("reward_mean", "reward", True),
    ("diversity", "diversity", True),
    ("fid_dataset", "FID vs data", False),
    ("fid_base", "FID vs base", False),
    ("win_rate", "win rate vs base", True),
]


def load_evals(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: give the results directory of a suite run by "
                          "`python -m rl4diffusion.bench` (e.g. benchmarks/results/shapes), which holds evals.jsonl.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def final_records(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(algo, prompt_set) → the last evaluation of every seed."""
    last: dict[tuple[str, int, str], dict] = {}
    for r in rows:
        key = (r["algo"], r["seed"], r.get("prompt_set", "eval"))
        if key not in last or r["step"] >= last[key]["step"]:
            last[key] = r
    grouped = defaultdict(list)
    for (algo, _, pset), r in sorted(last.items()):
        grouped[(algo, pset)].append(r)
    return grouped


def table(rows: list[dict]) -> str:
    grouped = final_records(rows)
    base = {}
    for r in rows:
        if r["step"] == 0:
            base.setdefault(r.get("prompt_set", "eval"), []).append(r)
    present = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    pooled = any("win_n" in r for r in rows)
    head = ("| algorithm | prompts | seeds | " + " | ".join(t for _, t, _ in present)
            + (" | win rate, seeds pooled [95 % CI]" if pooled else "") + " | reward queries | train CPU s | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for pset, records in sorted(base.items()):
        cells = [_mean_std([r.get(k) for r in records]) if k not in ("fid_base", "win_rate") else "–" for k, _, _ in present]
        lines.append(f"| *base model* | {pset} | {len(records)} | " + " | ".join(cells)
                     + (" | –" if pooled else "") + " | 0 | – | – |")
    for (algo, pset), records in sorted(grouped.items()):
        cells = [_mean_std([r.get(k) for r in records]) for k, _, _ in present]
        if pooled:
            cells.append(pooled_win_rate(records))
        queries = _mean_std([r.get("reward_queries") for r in records]).split(" ±")[0]
        cpu = _mean_std([r.get("train_cpu_s") for r in records]).split(" ±")[0]
        wall = _mean_std([r.get("wall_s") for r in records]).split(" ±")[0]
        lines.append(f"| {algo} | {pset} | {len(records)} | " + " | ".join(cells) + f" | {queries} | {cpu} | {wall} |")
    return "\n".join(lines)


def pooled_win_rate(records: list[dict]) -> str:
    """The win rate vs base over every seed's comparisons together, with its Wilson interval.

    The seeds share the evaluation prompts and noise, so their comparisons are not fully
    independent: read the interval as a guide, and the per-seed spread in the column beside it."""
    from rl4diffusion.metrics.winrate import wilson_interval

    records = [r for r in records if r.get("win_n") and r.get("win_rate") is not None]
    if not records:
        return "–"
    n = sum(r["win_n"] for r in records)
    p = sum(r["win_rate"] * r["win_n"] for r in records) / n
    low, high = wilson_interval(p, n)
    return f"{p:.3f} [{low:.3f}, {high:.3f}]"


def head_to_head(rows: list[dict], prompt_set: str) -> str:
    """P(row beats column) between final checkpoints, same prompts and noise, seeds pooled.

    Only runs whose evaluation records carry per-sample rewards (``sample_rewards``) take part;
    seed s of one algorithm is paired with seed s of the other."""
    from rl4diffusion.metrics.winrate import wilson_interval

    finals = {}
    for (algo, pset), records in final_records(rows).items():
        if pset == prompt_set:
            for r in records:
                if r.get("sample_rewards"):
                    finals[(algo, r["seed"])] = r["sample_rewards"]
    algos = sorted({a for a, _ in finals})
    if len(algos) < 2:
        return ""
    lines = [f"| row beats column ({prompt_set} prompts) | " + " | ".join(algos) + " |",
             "|---|" + "---|" * len(algos)]
    for a in algos:
        cells = []
        for b in algos:
            seeds = sorted(s for (x, s) in finals if x == a and (b, s) in finals)
            if a == b or not seeds:
                cells.append("–")
                continue
            score = n = 0
            for s in seeds:
                for ra, rb in zip(finals[(a, s)], finals[(b, s)]):
                    score += 1.0 if ra > rb else 0.5 if ra == rb else 0.0
                    n += 1
            low, high = wilson_interval(score / n, n)
            cells.append(f"{score / n:.2f} [{low:.2f}, {high:.2f}]")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_curves(rows: list[dict], prompt_set: str) -> dict[tuple[str, int], list[dict]]:
    """(algo, seed) → that run's evaluations on ``prompt_set``, in training order."""
    curves = defaultdict(list)
    for r in rows:
        if r.get("prompt_set", "eval") == prompt_set:
            curves[(r["algo"], r["seed"])].append(r)
    return {run: sorted(records, key=lambda r: r["step"]) for run, records in curves.items()}


def queries_to_reach(rows: list[dict], prompt_set: str) -> str:
    """Reward queries the row algorithm needed to reach the column algorithm's final mean reward.

    Per seed (seed s against seed s): the queries at the row's first evaluation whose mean reward
    is at least the column's final one ("–": never within the budget; 0: the base model already
    had it). The last row gives each column's own final queries, the other side of the claim
    "reaches X's final reward with fewer queries"."""
    curves = run_curves(rows, prompt_set)
    algos = sorted({a for a, _ in curves})
    if len(algos) < 2:
        return ""

    def seeds_of(a, b):
        return sorted(s for (x, s) in curves if x == a and (b, s) in curves)

    lines = [f"| row reaches column's final reward ({prompt_set} prompts), queries per seed | "
             + " | ".join(algos) + " |", "|---|" + "---|" * len(algos)]
    for a in algos:
        cells = []
        for b in algos:
            seeds = seeds_of(a, b) if a != b else []
            per_seed = []
            for s in seeds:
                target = curves[(b, s)][-1]["reward_mean"]
                hit = next((r["reward_queries"] for r in curves[(a, s)] if r["reward_mean"] >= target), None)
                per_seed.append("–" if hit is None else str(hit))
            cells.append(" / ".join(per_seed) or "–")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    finals = [" / ".join(str(curves[(b, s)][-1]["reward_queries"]) for s in seeds_of(b, b)) for b in algos]
    lines.append("| *column's final queries* | " + " | ".join(finals) + " |")
    return "\n".join(lines)


def at_reward(curve: list[dict], target: float, keys=("diversity", "fid_base")) -> dict | None:
    """Reward queries and ``keys`` (diversity, FID vs base) where ``curve`` — one run's evaluations in
    training order — first reaches the mean reward ``target``, linearly interpolated between the two
    evaluations around the crossing; None if it never does."""
    if curve and curve[0]["reward_mean"] >= target:  # the base model already had this reward
        return {"reward_queries": 0.0, **{k: curve[0][k] for k in keys}}
    for before, after in zip(curve, curve[1:]):
        if after["reward_mean"] >= target:  # before < target ≤ after: interpolate between them
            w = (target - before["reward_mean"]) / (after["reward_mean"] - before["reward_mean"])
            return {"reward_queries": before["reward_queries"] + w * (after["reward_queries"] - before["reward_queries"]),
                    **{k: before[k] + w * (after[k] - before[k]) for k in keys}}
    return None


def _curves(rows, x_key, y_key, prompt_set):
    """algo → (xs, ys) averaged over seeds by evaluation index (the k-th evaluation of every seed:
    budgets in CPU time end seeds at different epochs, so steps need not coincide)."""
    by_algo = defaultdict(lambda: defaultdict(list))
    for (algo, _), records in run_curves(rows, prompt_set).items():
        for index, r in enumerate(r for r in records if r.get(y_key) is not None):
            by_algo[algo][index].append((r.get(x_key, 0) or 0, r[y_key]))
    out = {}
    for algo, steps in by_algo.items():
        pts = [(sum(x for x, _ in v) / len(v), sum(y for _, y in v) / len(v)) for _, v in sorted(steps.items())]
        out[algo] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def plots(rows: list[dict], out_dir: Path, prompt_set: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    specs = [("reward_queries", "reward_mean", "reward queries", "reward", "reward_vs_queries.png"),
             ("wall_s", "reward_mean", "wall-clock seconds (training + evaluations)", "reward", "reward_vs_wallclock.png"),
             ("train_cpu_s", "reward_mean", "training CPU seconds", "reward", "reward_vs_cpu.png"),
             ("reward_mean", "diversity", "reward", "diversity", "diversity_vs_reward.png"),
             ("reward_mean", "fid_dataset", "reward", "FID vs data", "fid_vs_reward.png"),
             ("reward_mean", "fid_base", "reward", "FID vs the base model's samples", "fid_base_vs_reward.png")]
    for x_key, y_key, x_label, y_label, name in specs:
        curves = _curves(rows, x_key, y_key, prompt_set)
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for algo, (xs, ys) in sorted(curves.items()):
            ax.plot(xs, ys, marker="o", markersize=3, label=algo)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{y_label} ({prompt_set} prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        made.append(name)
    return made


def write_report(out_dir: str | Path, *, suite_name: str | None = None) -> Path:
    out_dir = Path(out_dir)
    rows = load_evals(out_dir / "evals.jsonl")
    name = suite_name or next((r["suite"] for r in rows if "suite" in r), out_dir.name)
    prompt_sets = sorted({r.get("prompt_set", "eval") for r in rows}) or ["eval"]
    main_set = "train" if "train" in prompt_sets else prompt_sets[0]
    images = plots(rows, out_dir, main_set) if rows else []
    spaces = sorted({r.get(k) for r in rows for k in ("diversity_space", "fid_space") if r.get(k)})
    text = [f"# Benchmark: {name}", "",
            f"{len({(r['algo'], r['seed']) for r in rows})} runs ({len({r['algo'] for r in rows})} algorithms). "
            "Each cell is the mean ± std over seeds at the final evaluation; the evaluation noise is fixed, so the "
            "base model and every checkpoint are compared on the same seeds.",
            f"Feature spaces for diversity / FID: {', '.join(spaces) if spaces else 'not recorded'}.", "",
            table(rows) if rows else "(no finished runs yet)", ""]
    matches = [m for m in (head_to_head(rows, pset) for pset in prompt_sets) if m]
    if matches:
        text += ["## Head to head", "",
                 "Final checkpoints compared on the same prompts and evaluation noise (seed s against seed s, "
                 "seeds pooled; ties ½): the fraction of comparisons the row's model wins, with a 95 % Wilson "
                 "interval.", ""]
        for m in matches:
            text += [m, ""]
    reach = queries_to_reach(rows, main_set) if rows else ""
    if reach:
        text += ["## Reward queries to reach another algorithm's final reward", "",
                 "Seed s against seed s, mean reward at the evaluation points (the curves below); read with the "
                 "per-seed spread in mind.", "", reach, ""]
    text += [f"![{img}]({img})" for img in images]
    path = out_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path
