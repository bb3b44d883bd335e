"""Compare any set of runs, Hydra sweeps included: ``python -m rl4diffusion.compare <run dirs or a sweep dir> [out=<dir>]``

    python -m rl4diffusion.train -m algo=ddpo,grpo seed=0,1,2      # a sweep: runs/multirun/<date>_<time>/
    python -m rl4diffusion.compare runs/multirun/<date>_<time>      # table and plots in runs/multirun/<date>_<time>/compare
    python -m rl4diffusion.compare runs/2026-01-01 benchmarks/results/shapes/runs out=my_comparison

Every run directory (``config.yaml`` and ``metrics.jsonl``, as ``python -m rl4diffusion.train`` and
``python -m rl4diffusion.bench`` write them) under the given paths is found, recursively. Runs whose configs
differ only in the seed, or in settings that do not change what is trained (threads, progress, logging,
checkpoints, resume), form a group, named by its algorithm and the settings that set it apart from the
other groups. Per group and evaluation prompt set the table gives the number of seeds, the final reward's
mean over seeds with a 95 % Student-t interval, the improvement over the base model, the win rate against
the base model, diversity, FID (where measured), reward queries and training CPU seconds. Plots: reward
against reward queries (preference methods against epochs, in a panel of their own), against epochs and
against training CPU seconds, one line per group with a 95 % band over seeds; diversity and FID against
reward at the final evaluation, with error bars over seeds.

Written to ``out`` (default: ``compare/`` in the directory that holds the runs): ``compare.md`` (tables and
plots), ``compare.csv``, ``compare.json`` and the PNG files; the tables are printed too. A run without
``summary.json`` (unfinished, or still running) is left out, with a note.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rl4diffusion.errors import ConfigError

# top-level config keys that do not change what a run trains, so runs differing in them share a group
NOT_PART_OF_THE_EXPERIMENT = ("seed", "hydra", "threads", "progress", "log_with", "save_lora", "resume",
                              "resume_restart", "checkpoint", "reward_async")
# the table's metric columns: (evaluation record key, column title, interval shown in the table?)
METRICS = [("win_rate", "win rate vs base [95 % CI]", True), ("diversity", "diversity", False),
           ("fid_dataset", "FID vs data", False), ("fid_base", "FID vs base", False),
           ("reward_queries", "reward queries", False), ("train_cpu_s", "train CPU s", False)]
# (x key, y key, x label, y label, file name, kind, higher y is better): see training.report.draw_plots
PLOTS = [
    ("reward_queries", "reward_mean", "reward queries", "reward", "reward_vs_queries.png", "band", True),
    ("step", "reward_mean", "epoch", "reward", "reward_vs_epoch.png", "band", True),
    ("train_cpu_s", "reward_mean", "training CPU seconds", "reward", "reward_vs_cpu.png", "band", True),
    ("reward_mean", "diversity", "reward", "diversity", "diversity_vs_reward.png", "final", True),
    ("reward_mean", "fid_dataset", "reward", "FID vs data", "fid_vs_reward.png", "final", False),
    ("reward_mean", "fid_base", "reward", "FID vs the base model's samples", "fid_base_vs_reward.png", "final",
     False),
]


@dataclass
class Run:
    path: Path
    experiment: dict[str, str]  # flattened config (dotted key → JSON value), without NOT_PART_OF_THE_EXPERIMENT
    seed: int
    algo: str
    evals: dict[str, list[dict]]  # prompt set → its evaluation records in training order


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"algo": {"lr": 0.001}} → {"algo.lr": "0.001"}: dotted keys (the override syntax), JSON values."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
    return flat


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Every directory holding ``metrics.jsonl`` at or under ``paths`` (each path: a run or a folder of runs)."""
    found = {}
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path} does not exist: give run directories (each holds config.yaml and "
                              "metrics.jsonl) or a directory that holds runs, such as a Hydra sweep's "
                              "runs/multirun/<date>_<time>.")
        metrics = [path / "metrics.jsonl"] if (path / "metrics.jsonl").is_file() else path.rglob("metrics.jsonl")
        for m in metrics:
            found.setdefault(m.parent.resolve(), m.parent)
    if not found:
        raise ConfigError(f"no run found under {', '.join(map(str, paths))}: a run directory holds config.yaml "
                          "and metrics.jsonl, as `python -m rl4diffusion.train` (runs/<date>/…, a sweep's "
                          "runs/multirun/<date>_<time>/…) and `python -m rl4diffusion.bench` (<suite>/runs/…) "
                          "write them.")
    return sorted(found.values())


def load_run(path: Path) -> tuple[Run | None, str | None]:
    """The run in ``path``, or None and the reason it is left out of the comparison."""
    from omegaconf import OmegaConf

    if not (path / "summary.json").is_file():
        return None, f"{path}: unfinished (no summary.json yet)"
    if not (path / "config.yaml").is_file():
        return None, f"{path}: no config.yaml"
    try:
        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False)
        lines = (path / "metrics.jsonl").read_text().splitlines()
    except Exception as e:  # a damaged or unreadable file: this run is left out, the others compared
        return None, f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    evals = defaultdict(list)
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            if number == len(lines):  # a torn last line (the run was killed mid-write): the lines before count
                continue
            return None, f"{path}: metrics.jsonl line {number} is not JSON"
        if record.get("phase") == "eval":
            evals[record.get("prompt_set", "eval")].append(record)
    if not evals:
        return None, f"{path}: no evaluation in metrics.jsonl"
    experiment = {k: v for k, v in flatten(config).items() if k.split(".")[0] not in NOT_PART_OF_THE_EXPERIMENT}
    algo = config.get("algo", {}).get("name") if isinstance(config.get("algo"), dict) else config.get("algo")
    return Run(path, experiment, int(config.get("seed", 0)), str(algo), dict(evals)), None


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """label → the runs of one experiment (same config but the seed), labelled by their algorithm and the
    settings in which it differs from another group of the same algorithm (groups of different algorithms
    are told apart by the name; DDPO has no ``algo.group_size`` to differ in). The rest of a group's config
    is in the ``config.yaml`` of its runs, which compare.json lists."""
    groups = defaultdict(list)
    for run in runs:
        groups[tuple(sorted(run.experiment.items()))].append(run)
    experiments = [dict(key) for key in groups]
    labelled = {}
    for key, experiment in zip(groups, experiments):
        algo = groups[key][0].algo
        differing = []
        for name, value in sorted(experiment.items()):
            peers = [e for e in experiments if e.get("algo.name") == experiment.get("algo.name")]
            if name != "algo.name" and any(e.get(name) != value for e in peers):
                shown = json.loads(value)
                differing.append(f"{name}={shown if isinstance(shown, str) else value}")
        labelled[" ".join([algo, *differing])] = sorted(groups[key], key=lambda r: (r.seed, str(r.path)))
    return dict(sorted(labelled.items()))


def summarise(groups: dict[str, list[Run]]) -> list[dict]:
    """One row per (group, prompt set): seeds, final reward and its improvement over the base model (mean and
    95 % t interval over seeds), the metrics of ``METRICS``, and the runs behind it."""
    from rl4diffusion.training.report import mean_interval

    rows = []
    for label, runs in groups.items():
        for prompt_set in sorted({s for run in runs for s in run.evals}):
            seeded = [(run, run.evals[prompt_set]) for run in runs if prompt_set in run.evals]
            finals = [records[-1] for _, records in seeded]
            bases = [next((r for r in records if r.get("step") == 0), None) for _, records in seeded]
            row = {"group": label, "algo": runs[0].algo, "prompt_set": prompt_set, "seeds": len(seeded),
                   "seed_list": [run.seed for run, _ in seeded], "runs": [str(run.path) for run, _ in seeded],
                   "reward_per_seed": [r["reward_mean"] for r in finals]}
            row["reward"], row["reward_low"], row["reward_high"] = mean_interval(row["reward_per_seed"])
            gains = [f["reward_mean"] - b["reward_mean"] for f, b in zip(finals, bases) if b is not None]
            row["base_reward"] = mean_interval([b["reward_mean"] for b in bases if b is not None])[0]
            row["improvement"], row["improvement_low"], row["improvement_high"] = mean_interval(gains)
            for key, _, _ in METRICS:
                row[key], row[f"{key}_low"], row[f"{key}_high"] = mean_interval([f.get(key) for f in finals])
            rows.append(row)
    return rows


def _number(value: float, interval: tuple[float, float] | None = None) -> str:
    if value is None or math.isnan(value):
        return "–"
    text = f"{value:.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:.3f}"
    if interval is not None:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def markdown_tables(rows: list[dict]) -> str:
    """One Markdown table per prompt set."""
    metrics = [m for m in METRICS if any(not math.isnan(row[m[0]]) for row in rows)]
    out = []
    for prompt_set in sorted({row["prompt_set"] for row in rows}, key=lambda s: (s != "train", s)):
        head = ("| group | seeds | final reward [95 % CI] | per seed | vs base [95 % CI] | "
                + " | ".join(title for _, title, _ in metrics) + " |")
        lines = [f"**{prompt_set} prompts**", "", head, "|" + "---|" * (head.count("|") - 1)]
        for row in (r for r in rows if r["prompt_set"] == prompt_set):
            cells = [row["group"], str(row["seeds"]),
                     _number(row["reward"], (row["reward_low"], row["reward_high"])),
                     " / ".join(f"{v:.3f}" for v in row["reward_per_seed"]),
                     _number(row["improvement"], (row["improvement_low"], row["improvement_high"]))]
            cells += [_number(row[k], (row[f"{k}_low"], row[f"{k}_high"]) if with_interval else None)
                      for k, _, with_interval in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def write_comparison(paths: list[Path], out: Path | None = None) -> tuple[Path, str]:
    """Compare the runs under ``paths``; write compare.md/.csv/.json and the plots to ``out``. Returns
    (the Markdown file, the tables)."""
    from rl4diffusion.training import report

    run_dirs = find_run_dirs(paths)
    runs, notes = [], []
    for path in run_dirs:
        run, why_not = load_run(path)
        if run is None:
            notes.append(why_not)
        else:
            runs.append(run)
    if not runs:
        raise ConfigError(f"found {len(run_dirs)} run(s) under {', '.join(map(str, paths))} but none to compare: "
                          + "; ".join(notes) + ". A run is compared once it has finished (summary.json written).")
    groups = group_runs(runs)
    for label, members in groups.items():
        seeds = [run.seed for run in members]
        if len(set(seeds)) < len(seeds):
            notes.append(f"group {label}: a seed appears more than once ({seeds}); each run counts as one seed")
    rows = summarise(groups)
    tables = markdown_tables(rows)

    out = Path(out) if out is not None else Path(os.path.commonpath([p.resolve().parent for p in run_dirs])) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    prompt_sets = sorted({s for run in runs for s in run.evals})
    plot_set = "train" if "train" in prompt_sets else prompt_sets[0]
    algos = [members[0].algo for members in groups.values()]
    if len(set(algos)) == len(algos):  # one group per algorithm: each keeps its look from the bench report
        styles = {label: report.algorithm_style(algo) for label, algo in zip(groups, algos)}
    else:
        styles = {label: (report.COLOURS[i % len(report.COLOURS)], report.MARKERS[i % len(report.MARKERS)])
                  for i, label in enumerate(groups)}
    series = {label: [run.evals[plot_set] for run in members if plot_set in run.evals]
              for label, members in groups.items()}
    images = report.draw_plots({k: v for k, v in series.items() if v}, out, plot_set, styles=styles,
                               preference={label for label, algo in zip(groups, algos)
                                           if report.is_preference_method(algo)}, specs=PLOTS)

    (out / "compare.json").write_text(json.dumps(_json_safe(rows), indent=2, allow_nan=False) + "\n")
    with open(out / "compare.csv", "w", newline="") as f:
        columns = [k for k in rows[0] if k not in ("runs", "seed_list", "reward_per_seed")]
        writer = csv.writer(f)
        writer.writerow([*columns, "reward_per_seed", "seeds_run", "runs"])
        for row in rows:
            writer.writerow([*("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k] for k in columns),
                             " ".join(map(str, row["reward_per_seed"])), " ".join(map(str, row["seed_list"])),
                             " ".join(row["runs"])])
    text = [f"# Comparison of {len(runs)} runs in {len(groups)} groups", "",
            "Each row: the final evaluation of every seed of a group (runs whose configs differ only in the seed). "
            "Reward, improvement over the base model and win rate: mean over seeds with a 95 % Student-t interval "
            "(n − 1 degrees of freedom; one seed has no interval); the other columns: the mean over seeds. "
            f"Plots on the {plot_set} prompts; bands and error bars are the same 95 % t intervals.", "", tables, ""]
    if notes:
        text += ["Left out or to note:", "", *[f"- {n}" for n in notes], ""]
    text += [f"![{img}]({img})" for img in images]
    (out / "compare.md").write_text("\n".join(text) + "\n")
    return out / "compare.md", tables + ("\n\n" + "\n".join(f"note: {n}" for n in notes) if notes else "")


def _json_safe(value):
    """NaN (a metric no run measured) → null, so compare.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def parse_args(args: list[str]) -> tuple[list[Path], Path | None]:
    paths, out = [], None
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key == "out":
            if not value:
                raise ConfigError("out= needs a directory, e.g. out=my_comparison")
            out = Path(value)
        elif sep and not Path(arg).exists() and "/" not in key:
            raise ConfigError(f"unknown option {key!r}: the only option is out=<dir>; every other argument is a "
                              "run directory or a directory of runs.")
        else:
            paths.append(Path(arg))
    if not paths:
        raise ConfigError("give run directories or a directory of runs (e.g. a Hydra sweep's "
                          "runs/multirun/<date>_<time>): python -m rl4diffusion.compare <dirs> [out=<dir>]")
    return paths, out


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(__doc__)
        return
    try:
        report, tables = write_comparison(*parse_args(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(tables)
    print(f"\nwritten: {report} (with compare.csv, compare.json and the plots beside it)")


if __name__ == "__main__":
    main()
