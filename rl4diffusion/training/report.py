"""The benchmark report: a table (mean ± std over seeds at the final evaluation) and PNG plots (the mean over
seeds with a 95 % Student-t band, one colour and marker per algorithm), regenerated from ``evals.jsonl``
alone — ``python benchmarks/report.py benchmarks/results/shapes``."""

from __future__ import annotations

import json
import math
import zlib
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


# ---------------------------------------------------------------------------------------------- plots
# Twelve colours a reader tells apart (matplotlib's tab10, a navy and black) and twelve markers, so that every
# built-in algorithm has its own pair, also in print and for colour-blind readers.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#000000", "#8c6d31")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p", "d")


def algorithm_style(name: str) -> tuple[str, str]:
    """(colour, marker) of an algorithm, the same in every plot: each built-in algorithm (in the order of
    ``rl4diffusion.algorithms.ALGORITHMS``) has its own pair; any other name gets a pair picked by its CRC32,
    stable from one run to the next."""
    from rl4diffusion.algorithms import ALGORITHMS

    index = list(ALGORITHMS).index(name) if name in ALGORITHMS else len(COLOURS)
    if index < len(COLOURS):
        return COLOURS[index], MARKERS[index]
    digest = zlib.crc32(name.encode())
    return COLOURS[digest % len(COLOURS)], MARKERS[digest // len(COLOURS) % len(MARKERS)]


def is_preference_method(name: str) -> bool:
    """Whether the algorithm ``name`` learns from a fixed set of preference pairs (its config extends
    ``PreferenceConfig``: SFT, Diffusion-DPO, DMPO, DPO-C&M, SDPO) instead of querying the reward as it trains.

    Its reward queries (the AI-feedback pairs) are all spent before the first update, so reward against
    reward queries would stack its whole curve on one vertical line: it is drawn against epochs instead."""
    from rl4diffusion.algorithms import algorithm_classes
    from rl4diffusion.algorithms.diffusion_dpo import PreferenceConfig

    try:
        return issubclass(algorithm_classes(name)[1], PreferenceConfig)
    except (ConfigError, ImportError):  # an algorithm this process cannot import: drawn with the online ones
        return False


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds with its Student-t confidence interval (n − 1 degrees of freedom).

    A t interval rather than a bootstrap: with the 3–5 seeds of a typical comparison a bootstrap resamples
    too few values to be trusted. One value gives a zero-width interval; none gives NaNs."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return math.nan, math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, mean, mean
    from scipy.stats import t

    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    half = float(t.ppf(0.5 + confidence / 2, len(values) - 1)) * sd / len(values) ** 0.5
    return mean, mean - half, mean + half


def by_evaluation(runs: list[list[dict]], x_key: str, y_key: str) -> list[tuple[float, float, float, float, int]]:
    """(x mean, y mean, y low, y high, seeds) at every evaluation index over the seeds' runs.

    Runs are aligned by the k-th evaluation rather than by step: budgets in CPU time end seeds at
    different epochs, so their steps need not coincide."""
    points = defaultdict(list)
    for records in runs:
        for index, r in enumerate(r for r in records if r.get(y_key) is not None):
            points[index].append((r.get(x_key) or 0, r[y_key]))
    out = []
    for _, pairs in sorted(points.items()):
        mean, low, high = mean_interval([y for _, y in pairs])
        out.append((sum(x for x, _ in pairs) / len(pairs), mean, low, high, len(pairs)))
    return out


def _direction(ax, *, x_better: str | None, y_better: str | None) -> None:
    """Write which way is better on the axes: "better →" under the x axis's end, "↑ better" / "↓ better"."""
    style = {"transform": ax.transAxes, "fontsize": 8, "color": "0.35"}
    if x_better:
        ax.text(0.99, 0.02, "better →" if x_better == "up" else "← better", ha="right", va="bottom", **style)
    if y_better:
        ax.text(0.01, 0.98 if y_better == "up" else 0.02, "↑ better" if y_better == "up" else "↓ better",
                ha="left", va="top" if y_better == "up" else "bottom", **style)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def band_panel(ax, series: dict[str, list[list[dict]]], x_key: str, y_key: str, styles) -> None:
    """One line per series (the mean over seeds at each evaluation) with a shaded 95 % t band over seeds."""
    for label, runs in sorted(series.items()):
        points = by_evaluation(runs, x_key, y_key)
        if not points:
            continue
        colour, marker = styles[label]
        xs, means, lows, highs = ([p[i] for p in points] for i in range(4))
        ax.plot(xs, means, color=colour, marker=marker, markersize=4, linewidth=1.2,
                label=f"{label} ({max(p[4] for p in points)} seeds)")
        ax.fill_between(xs, lows, highs, color=colour, alpha=0.1, linewidth=0)
    ax.grid(alpha=0.3)


def final_scatter_panel(ax, series: dict[str, list[list[dict]]], x_key: str, y_key: str, styles) -> None:
    """Each series' final evaluation: the mean over seeds with 95 % t error bars in x and y, its path from the
    base model as a faint line, and the base model (a black star)."""
    bases = set()
    for label, runs in sorted(series.items()):
        runs = [[r for r in records if r.get(x_key) is not None and r.get(y_key) is not None] for records in runs]
        runs = [records for records in runs if records]
        if not runs:
            continue
        colour, marker = styles[label]
        path = by_evaluation(runs, x_key, y_key)
        ax.plot([p[0] for p in path], [p[1] for p in path], color=colour, alpha=0.3, linewidth=1)
        (mx, lx, hx), (my, ly, hy) = (mean_interval([records[-1][k] for records in runs]) for k in (x_key, y_key))
        ax.errorbar(mx, my, xerr=[[mx - lx], [hx - mx]], yerr=[[my - ly], [hy - my]], fmt=marker, color=colour,
                    markersize=6, capsize=3, elinewidth=1, alpha=0.85, label=f"{label} ({len(runs)} seeds)")
        bases |= {(round(records[0][x_key], 6), round(records[0][y_key], 6)) for records in runs
                  if records[0].get("step") == 0}
    for i, (bx, by) in enumerate(sorted(bases)):
        ax.plot(bx, by, marker="*", color="black", markersize=12, linestyle="none", zorder=5,
                markeredgecolor="white", label="base model" if i == 0 else None)
    ax.grid(alpha=0.3)


# (x key, y key, x label, y label, file name, kind, higher y is better): kind "band" draws the mean over seeds
# with its band along training, "final" the final evaluation with error bars (x is then the reward)
REPORT_PLOTS = [
    ("reward_queries", "reward_mean", "reward queries", "reward", "reward_vs_queries.png", "band", True),
    ("wall_s", "reward_mean", "wall-clock seconds (training + evaluations)", "reward", "reward_vs_wallclock.png",
     "band", True),
    ("train_cpu_s", "reward_mean", "training CPU seconds", "reward", "reward_vs_cpu.png", "band", True),
    ("reward_mean", "diversity", "reward", "diversity", "diversity_vs_reward.png", "final", True),
    ("reward_mean", "fid_dataset", "reward", "FID vs data", "fid_vs_reward.png", "final", False),
    ("reward_mean", "fid_base", "reward", "FID vs the base model's samples", "fid_base_vs_reward.png", "final",
     False),
]


def draw_plots(series: dict[str, list[list[dict]]], out_dir: Path, prompt_set: str, *, styles: dict,
               preference: set[str], specs=REPORT_PLOTS) -> list[str]:
    """Write the ``specs`` plots of ``series`` (label → every seed's evaluations on ``prompt_set``, in training
    order) to ``out_dir``; return the file names written.

    Against reward queries, the ``preference`` series (which spend their queries before training) get a panel
    of their own, against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for x_key, y_key, x_label, y_label, name, kind, higher_is_better in specs:
        present = {label: runs for label, runs in series.items()
                   if any(r.get(y_key) is not None for records in runs for r in records)}
        if not present:
            continue
        panels = [(present, x_key, x_label, None)]
        if x_key == "reward_queries" and kind == "band" and preference & set(present):
            online = {k: v for k, v in present.items() if k not in preference}
            offline = {k: v for k, v in present.items() if k in preference}
            panels = [(online, x_key, x_label, "online: the reward is queried while training"),
                      (offline, "step", "epoch", "preference pairs: every reward query made before training")]
            panels = [p for p in panels if p[0]]
        fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), dpi=110, squeeze=False)
        for ax, (panel, px, p_label, title) in zip(axes[0], panels):
            if kind == "band":
                band_panel(ax, panel, px, y_key, styles)
                _direction(ax, x_better=None, y_better="up" if higher_is_better else "down")
            else:
                final_scatter_panel(ax, panel, x_key, y_key, styles)
                _direction(ax, x_better="up", y_better="up" if higher_is_better else "down")
            ax.set_xlabel(p_label)
            ax.set_ylabel(f"{y_label} ({prompt_set} prompts)")
            if title:
                ax.set_title(title, fontsize=9)
            _legend(ax)
        fig.savefig(out_dir / name, bbox_inches="tight")
        plt.close(fig)
        made.append(name)
    return made


def plots(rows: list[dict], out_dir: Path, prompt_set: str) -> list[str]:
    """The report's plots: one series per algorithm (mean and 95 % t band over its seeds)."""
    series = defaultdict(list)
    for (algo, _), records in sorted(run_curves(rows, prompt_set).items()):
        series[algo].append(records)
    return draw_plots(dict(series), out_dir, prompt_set, styles={a: algorithm_style(a) for a in series},
                      preference={a for a in series if is_preference_method(a)})


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
