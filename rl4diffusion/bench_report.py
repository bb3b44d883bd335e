"""The benchmark report: a table (mean ± std over seeds at the final evaluation) and PNG plots,
regenerated from ``evals.jsonl`` alone — ``python benchmarks/report.py benchmarks/results/shapes``."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

COLUMNS = [  # (record key, column title, higher is better?)
    ("reward_mean", "reward", True),
    ("diversity", "diversity", True),
    ("fid_dataset", "FID vs data", False),
    ("fid_base", "FID vs base", False),
    ("win_rate", "win rate vs base", True),
]


def load_evals(path: Path) -> list[dict]:
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
    head = "| algorithm | prompts | seeds | " + " | ".join(t for _, t, _ in present) + " | reward queries | wall s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for pset, records in sorted(base.items()):
        cells = [_mean_std([r.get(k) for r in records]) if k not in ("fid_base", "win_rate") else "–" for k, _, _ in present]
        lines.append(f"| *base model* | {pset} | {len(records)} | " + " | ".join(cells) + " | 0 | – |")
    for (algo, pset), records in sorted(grouped.items()):
        cells = [_mean_std([r.get(k) for r in records]) for k, _, _ in present]
        queries = _mean_std([r.get("reward_queries") for r in records]).split(" ±")[0]
        wall = _mean_std([r.get("wall_s") for r in records]).split(" ±")[0]
        lines.append(f"| {algo} | {pset} | {len(records)} | " + " | ".join(cells) + f" | {queries} | {wall} |")
    return "\n".join(lines)


def _curves(rows, x_key, y_key, prompt_set):
    """algo → (xs, ys) averaged over seeds by evaluation index."""
    by_algo = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("prompt_set", "eval") == prompt_set and y_key in r and r.get(y_key) is not None:
            by_algo[r["algo"]][r["step"]].append((r.get(x_key, 0) or 0, r[y_key]))
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
             ("wall_s", "reward_mean", "wall-clock seconds", "reward", "reward_vs_wallclock.png"),
             ("reward_mean", "diversity", "reward", "diversity", "diversity_vs_reward.png"),
             ("reward_mean", "fid_dataset", "reward", "FID vs data", "fid_vs_reward.png")]
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
    text += [f"![{img}]({img})" for img in images]
    path = out_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path
