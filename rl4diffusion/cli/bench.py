"""Compare algorithms on a benchmark suite at a matched budget:

    python -m rl4diffusion.bench suite=shapes algos=[ddpo,nabla_gfn] seeds=3
    python -m rl4diffusion.bench suite=shapes_smoke              # the CI-sized suite
    python -m rl4diffusion.bench suite=shapes_4k stage=tune      # a tuned suite: its tuning trials first
    python -m rl4diffusion.bench suite=shapes_4k                 # then its final runs, at the chosen settings
    python -m rl4diffusion.bench suite=shapes_4k stage=baselines # and its no-training baselines

``algos`` is one name, a comma list or a ``[list]``; ``seeds`` is a count (seeds 0 … N−1) or a list of
seeds (``seeds=[0,4]``); by default the suite's ``seeds``, else 3.

Each (algorithm, seed) trains through ``rl4diffusion.training.trainer.run`` with the suite's model, reward,
prompts, evaluation protocol and budget (reward queries, training CPU-seconds and/or wall-clock
seconds — the suite says which bind; all three are recorded). Runs live in ``<out_dir>/runs/<algo>_s<seed>``: a finished run
(summary.json present) is skipped, an interrupted one resumes from its checkpoint (one killed before its first
checkpoint starts over, its files moved to ``before_restart_<time>/``), so a suite can be completed over
several sittings. After every run the evaluation records of all runs are merged
into ``<out_dir>/evals.jsonl`` and the report (``report.md`` + PNG plots) is regenerated; while a suite is
under way (or when a run failed) its algorithms have different seeds, which the report's header lists.

A suite with a ``tuning`` section is tuned before it is run, every algorithm with the same number of trials
(``stage=tune``): each trial is one setting of the algorithm's grid, trained on the tuning seeds with the
tuning evaluation noise, which the final runs never use, and scored by the suite's declared rule (the mean
of a metric at the end of the tuning budget). Trials live in ``benchmarks/results/tuning/<suite>/runs``;
``trials.jsonl``, ``tuning.md`` and ``chosen.yaml`` (each algorithm's best setting) are rewritten after every
trial. The final stage (``stage=final``, the default) runs each algorithm at its chosen setting and refuses
an algorithm whose trials are not all done. A run that fails (say, a learning rate that diverges) is
recorded as failed and the suite goes on: a failing setting is a result.

A suite with a ``baselines`` section also evaluates what needs no training (``stage=baselines``,
``rl4diffusion.training.baselines``): the base model at the guidance scale that scores best on the tuning
seeds and noise, and best-of-N sampling; their runs sit beside the trained ones and are marked
``"baseline": true`` in ``evals.jsonl``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from rl4diffusion.cli.overrides import CONF_DIR
from rl4diffusion.errors import ConfigError
from rl4diffusion.training.rundir import set_aside, write_text_atomically

log = logging.getLogger("rl4diffusion.bench")


def as_overrides(mapping) -> list[str]:
    """``{key: value}`` (a suite's ``train`` section) as ``key=value`` command-line overrides."""
    if not mapping:
        return []
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
            for key, value in OmegaConf.to_container(mapping, resolve=True).items()]


def run_overrides(suite: DictConfig, algo: str, seed: int, run_dir: Path, *, setting: list[str] = (),
                  tuning: bool = False) -> list[str]:
    """The training overrides of one (algorithm, seed) run of ``suite``: its ``train`` section, the tuning
    section's ``train`` on top in a tuning trial, the algorithm's fixed ``algo_overrides``, then ``setting`` (a
    trial's grid point, or the tuned setting). A suite with ``eval_seed`` gives every seed its own
    evaluation noise: ``eval.seed`` = ``eval_seed`` + seed (the tuning section's ``eval_seed`` in a trial). A name
    in the suite's ``variants`` (``{name: {algo: grpo, overrides: [...]}}``) is that algorithm with those
    options, compared under its own name."""
    variant = (suite.get("variants") or {}).get(algo)  # a named setting of an algorithm, e.g. grpo_fast
    overrides = [f"algo={variant.algo if variant else algo}", f"model={suite.model}", f"reward={suite.reward}",
                 f"seed={seed}", f"prompts={suite.prompts}", "progress=false", "save_lora=false"]
    overrides += as_overrides(suite.train)
    overrides += list(variant.overrides) if variant else []
    section = suite.tuning if tuning else suite
    if tuning:
        overrides += as_overrides(section.get("train"))
    overrides += list((suite.get("algo_overrides") or {}).get(algo, []))
    if tuning:
        overrides += list((section.get("algo_overrides") or {}).get(algo, []))
    if section.get("eval_seed") is not None:
        overrides.append(f"eval.seed={int(section.eval_seed) + seed}")
    overrides += list(setting)
    if (run_dir / "config.yaml").exists():  # resume; one with no valid checkpoint starts over, files set aside
        overrides += [f"resume={run_dir}", "resume_restart=true"]
    return overrides


def merge_evals(out_dir: Path, suite_name: str) -> Path:
    """Collect every finished run's evaluation records (+ suite, algo, seed) into ``evals.jsonl``."""
    from rl4diffusion.data.prompts import resolve_prompts

    rows, set_sizes = [], {}
    for run_dir in sorted((out_dir / "runs").glob("*_s*")):
        metrics = run_dir / "metrics.jsonl"
        if not (run_dir / "summary.json").exists() or not metrics.exists():
            continue
        algo, _, seed = run_dir.name.rpartition("_s")
        samples_per_prompt = OmegaConf.load(run_dir / "config.yaml").eval.samples_per_prompt
        baseline = json.loads((run_dir / "summary.json").read_text()).get("baseline", False)
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record["phase"] == "eval":
                # win_n: the number of paired comparisons behind win_rate, so seeds can be pooled
                if record["prompt_set"] not in set_sizes:
                    set_sizes[record["prompt_set"]] = len(resolve_prompts(record["prompt_set"]))
                win_n = set_sizes[record["prompt_set"]] * samples_per_prompt
                rows.append({"suite": suite_name, "algo": algo, "seed": int(seed), **record, "win_n": win_n,
                             **({"baseline": True} if baseline else {})})
    path = out_dir / "evals.jsonl"
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
    failed = []
    for run_dir in sorted((out_dir / "runs").glob("*_s*")):
        if (run_dir / "failed.txt").exists():
            algo, _, seed = run_dir.name.rpartition("_s")
            error = (run_dir / "failed.txt").read_text().strip().replace("|", "/")
            failed.append({"suite": suite_name, "algo": algo, "seed": int(seed), "error": error})
    if failed:  # beside evals.jsonl, for the report's list of failed runs
        write_text_atomically(out_dir / "failed.jsonl", "".join(json.dumps(r) + "\n" for r in failed))
    return path


def parse_algos(value, default) -> list[str]:
    """``algos=`` as a list of names: None (the suite's ``default``), one name, ``a,b`` or ``[a,b]``."""
    if value is None:
        value = default
    if isinstance(value, str):
        value = value.strip("[]").split(",")
    if not isinstance(value, (list, tuple, ListConfig)) or not all(isinstance(a, str) and a.strip() for a in value):
        raise ConfigError(f"algos={value!r}: give algorithm names, one (algos=ddpo) or a list "
                          "(algos=[ddpo,nabla_gfn]).")
    return [a.strip() for a in value]


def parse_seeds(value) -> list[int]:
    """``seeds=`` as a list of seeds: a count N (seeds 0 … N−1) or a list of seeds (``[0,4]``, ``0,4``)."""
    if isinstance(value, str) and "," in value:
        value = value.strip("[]").split(",")
    if isinstance(value, (list, tuple, ListConfig)):
        try:
            seeds = [int(s) for s in value if not isinstance(s, (bool, float))]
        except ValueError:
            seeds = []
        if len(seeds) == len(value) and seeds and all(s >= 0 for s in seeds) and len(set(seeds)) == len(seeds):
            return seeds
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return list(range(value))
    raise ConfigError(f"seeds={value!r}: give the number of seeds, an integer ≥ 1 (seeds=3 runs seeds 0, 1, 2), or "
                      "a list of distinct seeds ≥ 0 (seeds=[0,4]).")


def train_config(overrides: list[str]) -> DictConfig:
    """``rl4diffusion.train``'s config for these command-line overrides, composed as the CLI composes it."""
    from hydra import compose, initialize_config_dir

    from rl4diffusion.cli.overrides import rewrite_overrides

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=rewrite_overrides(overrides))


def train_one(suite: DictConfig, algo: str, seed: int, run_dir: Path, *, setting: list[str] = (),
              tuning: bool = False) -> str:
    """Train (or resume) one run: "finished", "failed" (training aborted on non-finite values: recorded in the
    run's failed.txt, and not retried), "interrupted" (Ctrl-C / SIGTERM: checkpointed, the caller stops) or
    "skipped" (finished or failed in an earlier invocation: its result is already on disk). Any other error
    is raised: it is not a result of the setting."""
    from rl4diffusion.training.trainer import TrainingAborted, run

    # a run that diverged before is a result too, and is not retried (another error is raised, not recorded)
    if (run_dir / "summary.json").exists() or (run_dir / "failed.txt").exists():
        return "skipped"
    train_cfg = train_config(run_overrides(suite, algo, seed, run_dir, setting=setting, tuning=tuning))
    log.info("%s: training %s seed %d %s", run_dir.name, algo, seed, " ".join(setting))
    try:
        return "finished" if run(train_cfg, run_dir) else "interrupted"
    except TrainingAborted as e:  # diverged: a result of this setting, recorded as such
        log.warning("%s: failed: %s", run_dir.name, e)
        (run_dir / "failed.txt").write_text(f"{e}\n")
        return "failed"


def suite_seeds(cfg: DictConfig) -> list[int]:
    return parse_seeds(cfg.seeds if cfg.seeds is not None else cfg.suite.get("seeds", 3))


def run_suite(cfg: DictConfig) -> Path:
    """The final stage: every (algorithm, seed) at the suite's budget (at the tuned setting if it is tuned)."""
    from rl4diffusion.training import rundir
    from rl4diffusion.training.report import write_report

    suite = cfg.suite
    algos = checked_algos(cfg)
    seeds = suite_seeds(cfg)
    out_dir = Path(cfg.out_dir or Path("benchmarks") / "results" / suite.name).expanduser()
    settings = {}
    if suite.get("tuning") is not None:
        settings = chosen_settings(suite, tuning_dir(cfg), algos)
    rundir.check_writable(out_dir / "runs", what="the bench's out_dir", key="out_dir")  # before any run starts
    for seed, algo in [(seed, algo) for seed in seeds for algo in algos]:
        run_dir = out_dir / "runs" / f"{algo}_s{seed}"
        outcome = train_one(suite, algo, seed, run_dir, setting=settings.get(algo, []))
        if outcome == "skipped":
            # already in evals.jsonl and the report (rewritten once at the end): rewriting both after every
            # skipped run made a resumed suite spend ~20 s per finished run before training anything
            log.info("%s seed %d: done before, skipped", algo, seed)
            continue
        if outcome == "interrupted":  # checkpointed: the suite stops too
            log.warning("%s seed %d: interrupted; the suite stops here, run it again to resume", algo, seed)
            break
        # the lowest finished seed's grid, in whatever order the seeds ran
        if outcome == "finished" and not any((out_dir / "runs" / f"{algo}_s{lower}" / "summary.json").exists()
                                             for lower in range(seed)):
            keep_final_grids(run_dir, out_dir / "grids", algo)
        merge_evals(out_dir, suite.name)
        write_report(out_dir, suite_name=suite.name, allow_unequal_seeds=True)
    merge_evals(out_dir, suite.name)
    return write_report(out_dir, suite_name=suite.name, allow_unequal_seeds=True)


def keep_final_grids(run_dir: Path, grids_dir: Path, algo: str) -> list[Path]:
    """Copy the first page of the final evaluation's grid of every prompt set (base and final model on the
    same noise, prompts beside the images) to ``<grids_dir>/<algo>_<set>.png``: run directories' images are
    not committed, these are."""
    import shutil

    pages = sorted((run_dir / "images").glob("eval_*_p1.png"))
    last = {}
    for page in pages:  # eval_<step>_<set>_p1.png, steps zero-padded: the last one per set is the final's
        prompt_set = page.name[len("eval_00000_"):-len("_p1.png")]
        last[prompt_set] = page
    grids_dir.mkdir(parents=True, exist_ok=True)
    kept = []
    for prompt_set, page in sorted(last.items()):
        kept.append(Path(shutil.copyfile(page, grids_dir / f"{algo}_{prompt_set}.png")))
    return kept


def checked_algos(cfg: DictConfig) -> list[str]:
    from rl4diffusion.algorithms import ALGORITHMS

    algos = parse_algos(cfg.algos, cfg.suite.algos)
    variants = cfg.suite.get("variants") or {}
    unknown = [a for a in algos if a not in ALGORITHMS and a not in variants]
    unknown += [f"{name} (a variant of {v.algo})" for name, v in variants.items() if v.algo not in ALGORITHMS]
    if unknown:
        raise ConfigError(f"unknown algorithm(s) {unknown}. Valid names: {', '.join(sorted(ALGORITHMS))}"
                          f"{', and the suite variants ' + ', '.join(variants) if variants else ''}.")
    return algos


# ------------------------------------------------------------------------------------------------- tuning
def tuning_dir(cfg: DictConfig) -> Path:
    """Where the suite's tuning trials live; a suite with ``tuned_by: <suite>`` uses that suite's."""
    name = cfg.suite.get("tuned_by") or cfg.suite.name
    return Path(cfg.tuning_dir or Path("benchmarks") / "results" / "tuning" / name).expanduser()


def grid_settings(suite: DictConfig, algo: str) -> list[list[str]]:
    """An algorithm's tuning trials: every combination of its grid (``{option: [values]}``), in the declared
    order, each as a list of overrides."""
    grid = (suite.tuning.get("grid") or {}).get(algo)
    if not grid:
        raise ConfigError(f"suite {suite.name} has no tuning grid for {algo}: add tuning.grid.{algo} "
                          "({option: [values]}) to the suite, with as many trials as the other algorithms.")
    trials = [[]]
    for key, values in OmegaConf.to_container(grid, resolve=True).items():
        trials = [t + [f"{key}={json.dumps(v) if not isinstance(v, str) else v}"] for t in trials for v in values]
    return trials


def trial_score(run_dir: Path, prompt_set: str, metric: str) -> float | None:
    """The declared metric of a finished trial: its last evaluation of ``prompt_set``; None if not finished."""
    if not (run_dir / "summary.json").exists():
        return None
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if line.strip() and json.loads(line).get("phase") == "eval"]
    evals = [r for r in evals if r.get("prompt_set") == prompt_set and metric in r]
    if not evals:
        raise ConfigError(f"tuning trial {run_dir} has no {metric} on prompt set {prompt_set!r}: the suite's "
                          "tuning.metric and tuning.prompt_set must name an evaluation the trials record.")
    return float(evals[-1][metric])


def tuning_records(suite: DictConfig, out: Path, algos: list[str]) -> list[dict]:
    """One record per (algorithm, trial): its setting, status and score (the mean over the tuning seeds)."""
    t = suite.tuning
    records = []
    for algo in algos:
        for index, setting in enumerate(grid_settings(suite, algo)):
            scores, statuses = [], []
            for seed in t.seeds:
                run_dir = out / "runs" / f"{algo}_t{index}_s{seed}"
                failed = (run_dir / "failed.txt").exists()
                score = None if failed else trial_score(run_dir, t.prompt_set, t.metric)
                statuses.append("failed" if failed else "done" if score is not None else "pending")
                scores.append(score)
            status = "failed" if "failed" in statuses else "pending" if "pending" in statuses else "done"
            score = sum(scores) / len(scores) if status == "done" else None
            records.append({"algo": algo, "trial": index, "setting": setting, "status": status, "score": score,
                            "seed_scores": scores})
    return records


def choose(records: list[dict], algo: str) -> dict | None:
    """The best finished trial of ``algo`` (highest score; the first on a tie), once all its trials are
    finished or failed; None before."""
    trials = [r for r in records if r["algo"] == algo]
    if not trials or any(r["status"] == "pending" for r in trials):
        return None
    done = [r for r in trials if r["status"] == "done"]
    return max(done, key=lambda r: r["score"]) if done else None


def write_tuning(suite: DictConfig, out: Path) -> list[dict]:
    """``trials.jsonl``, ``tuning.md`` and ``chosen.yaml`` from the trials' run directories, for every algorithm
    of the suite (so that two tuning processes on disjoint ``algos=`` write the same, whole picture)."""
    t = suite.tuning
    algos = list(suite.algos)
    records = tuning_records(suite, out, algos)
    write_text_atomically(out / "trials.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    chosen = {}
    lines = [f"# Tuning: suite {suite.name}", "",
             f"Rule: {t.rule}", "",
             f"Score: the last evaluation's `{t.metric}` on the `{t.prompt_set}` prompts, mean over tuning seeds "
             f"{list(t.seeds)} (evaluation noise from seed {t.eval_seed} + seed; the final runs use other seeds and "
             "other noise). Each algorithm has the same number of trials.", "",
             "| algorithm | trial | setting | status | score | chosen |", "|---|---|---|---|---|---|"]
    for algo in algos:
        best = choose(records, algo)
        if best is not None:
            chosen[algo] = best["setting"]
        for r in (r for r in records if r["algo"] == algo):
            score = f"{r['score']:.4f}" if r["score"] is not None else "—"
            mark = "yes" if best is r else ""
            lines.append(f"| {algo} | {r['trial']} | `{' '.join(r['setting'])}` | {r['status']} | {score} | {mark} |")
    write_text_atomically(out / "tuning.md", "\n".join(lines) + "\n")
    write_text_atomically(out / "chosen.yaml", OmegaConf.to_yaml(OmegaConf.create(chosen)) if chosen else "{}\n")
    return records


def run_tuning(cfg: DictConfig) -> Path:
    """The tuning stage: every algorithm's grid on the tuning seeds; resumable like the final stage."""
    from rl4diffusion.training import rundir

    suite = cfg.suite
    if suite.get("tuning") is None:
        raise ConfigError(f"suite {suite.name} has no tuning section: stage=tune needs one (seeds, eval_seed, "
                          "prompt_set, metric, rule and a grid per algorithm); run its final stage instead.")
    if suite.get("tuned_by"):
        raise ConfigError(f"suite {suite.name} takes its settings from suite {suite.tuned_by}'s tuning: run "
                          f"python -m rl4diffusion.bench suite={suite.tuned_by} stage=tune instead.")
    algos = checked_algos(cfg)
    counts = {algo: len(grid_settings(suite, algo)) for algo in algos}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"suite {suite.name}'s tuning grids give the algorithms different numbers of trials "
                          f"({counts}): equal tuning effort means the same number for every algorithm.")
    out = tuning_dir(cfg)
    rundir.check_writable(out / "runs", what="the tuning directory", key="tuning_dir")
    jobs = [(index, setting, seed, algo) for algo in algos
            for index, setting in enumerate(grid_settings(suite, algo)) for seed in suite.tuning.seeds]
    jobs.sort(key=lambda job: (job[0], job[2]))  # trial 0 of every algorithm first: early results everywhere
    for index, setting, seed, algo in jobs:
        run_dir = out / "runs" / f"{algo}_t{index}_s{seed}"
        outcome = train_one(suite, algo, seed, run_dir, setting=setting, tuning=True)
        if outcome == "skipped":  # in tuning.md already (rewritten once at the end)
            continue
        if outcome == "interrupted":
            log.warning("interrupted; run the same command again to continue the tuning")
            break
        log.info("tuning %s trial %d seed %d: %s", algo, index, seed, outcome)
        write_tuning(suite, out)
    write_tuning(suite, out)
    return out / "tuning.md"


# ---------------------------------------------------------------------------------------------- baselines
BASELINE_ALGO = "ddpo"
"""The algorithm a baseline's config names: the trainer builds one, and the baseline never trains it."""


def baseline_run(suite: DictConfig, name: str, seed: int, run_dir: Path, *, setting: list[str], best_of: int,
                 tuning: bool = False) -> None:
    """Evaluate one no-training baseline into ``run_dir`` (skipped when it is already there)."""
    from rl4diffusion.training.baselines import run_baseline

    if (run_dir / "summary.json").exists():
        return
    log.info("baseline %s seed %d", name, seed)
    overrides = run_overrides(suite, BASELINE_ALGO, seed, run_dir, setting=setting, tuning=tuning)
    overrides = [o for o in overrides if not o.startswith("resume")]  # nothing to resume: evaluated again
    if set_aside(run_dir):  # what a killed one wrote is kept in before_restart_<time>/
        log.warning("baseline %s seed %d: a killed evaluation's files set aside; evaluating again", name, seed)
    run_baseline(train_config(overrides), run_dir, best_of=best_of)


def guidance_setting(guidance: float) -> list[str]:
    """A baseline's guidance scale: the model's, and the evaluation's too, which a suite may fix for its
    training runs (``eval.guidance_scale``, e.g. the flow suite's) and which would otherwise win."""
    return [f"model.guidance_scale={guidance}", f"eval.guidance_scale={guidance}"]


def run_baselines(cfg: DictConfig) -> Path:
    """The no-training baselines of a suite (its ``baselines`` section): the base model at the guidance scale
    that scores best on the tuning seeds and noise (by the tuning rule's metric), and best-of-N sampling at
    the model's guidance, both on every final seed's evaluation noise, into the suite's runs."""
    from rl4diffusion.training.report import write_report

    suite = cfg.suite
    spec = suite.get("baselines")
    if spec is None or suite.get("tuning") is None:
        raise ConfigError(f"suite {suite.name} declares no baselines: stage=baselines needs a baselines section "
                          "(guidance: [scales], best_of: N) and a tuning section (the guidance is chosen on its "
                          "seeds and noise).")
    t, tune_out = suite.tuning, tuning_dir(cfg)
    scores = {}
    for g in spec.guidance:
        runs = [tune_out / "runs" / f"base_g{g}_s{seed}" for seed in t.seeds]
        for seed, run_dir in zip(t.seeds, runs):
            baseline_run(suite, f"base_g{g}", seed, run_dir, setting=guidance_setting(g), best_of=1,
                         tuning=True)
        scores[g] = sum(trial_score(r, t.prompt_set, t.metric) for r in runs) / len(runs)
    best = max(spec.guidance, key=lambda g: scores[g])
    # A suite tuned by another shares its tuning directory, so the file names the suite that owns it.
    lines = [f"# No-training baselines: suite {suite.get('tuned_by') or suite.name}", "",
             f"The base model's guidance scale, chosen by the tuning rule's metric (`{t.metric}` on the "
             f"`{t.prompt_set}` prompts, tuning seeds {list(t.seeds)}): **{best}**.", "",
             "| guidance | score | chosen |", "|---|---|---|",
             *[f"| {g} | {scores[g]:.4f} | {'yes' if g == best else ''} |" for g in spec.guidance], "",
             f"Best-of-{spec.best_of}: each evaluation image is the best of {spec.best_of} candidates under the "
             "training reward, at the model's guidance.", ""]
    write_text_atomically(tune_out / "baselines.md", "\n".join(lines))
    out_dir = Path(cfg.out_dir or Path("benchmarks") / "results" / suite.name).expanduser()
    for seed in suite_seeds(cfg):
        baseline_run(suite, f"base_g{best}", seed, out_dir / "runs" / f"base_g{best}_s{seed}",
                     setting=guidance_setting(best), best_of=1)
        baseline_run(suite, f"best_of_{spec.best_of}", seed, out_dir / "runs" / f"best_of_{spec.best_of}_s{seed}",
                     setting=[], best_of=int(spec.best_of))
    merge_evals(out_dir, suite.name)
    return write_report(out_dir, suite_name=suite.name, allow_unequal_seeds=True)


def chosen_settings(suite: DictConfig, out: Path, algos: list[str]) -> dict[str, list[str]]:
    """Each algorithm's tuned setting, from the tuning trials; refuses an algorithm that is not tuned yet."""
    records = tuning_records(suite, out, algos)
    settings, missing = {}, []
    for algo in algos:
        best = choose(records, algo)
        if best is None:
            trials = [r for r in records if r["algo"] == algo]
            missing.append(f"{algo} ({sum(r['status'] != 'pending' for r in trials)}/{len(trials)} trials done"
                           f"{', all failed' if trials and all(r['status'] == 'failed' for r in trials) else ''})")
        else:
            settings[algo] = best["setting"]
    if missing:
        raise ConfigError(f"suite {suite.name} is tuned before its final runs, and these algorithms have no tuned "
                          f"setting yet: {', '.join(missing)}. Run python -m rl4diffusion.bench suite={suite.name} "
                          f"stage=tune first (trials in {out}), or pass algos= the tuned ones.")
    return settings


def main(argv: list[str] | None = None) -> None:
    """The command line: Hydra overrides of ``conf/bench.yaml``; bad input exits 2 with one message.

    The suite composes its config with Hydra's compose API rather than ``hydra.main``: every run
    composes the training config the same way, and a second Hydra context inside ``hydra.main``
    is refused by Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rl4diffusion.training import rundir
    from rl4diffusion.training.trainer import TrainingAborted

    args = [_as_list(a) for a in (sys.argv[1:] if argv is None else argv)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rundir.interrupt_on_sigterm()  # SIGTERM while a run starts stops like Ctrl-C (a running one checkpoints)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("bench", overrides=args)
        stages = {"final": run_suite, "tune": run_tuning, "baselines": run_baselines}
        if cfg.stage not in stages:
            raise ConfigError(f"stage={cfg.stage}: choose final (the suite's runs, the default), tune (its tuning "
                              "trials) or baselines (its no-training baselines).")
        report = stages[cfg.stage](cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(rundir.EXIT_BAD_INPUT)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: bad override: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(rundir.EXIT_BAD_INPUT)
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(rundir.EXIT_FAILED)
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted; run the same command again to continue the suite", file=sys.stderr)
        sys.exit(rundir.EXIT_INTERRUPTED)
    print(f"report: {report}")


def _as_list(arg: str) -> str:
    """``algos=a,b`` / ``seeds=0,4`` as the Hydra list ``[a,b]`` (Hydra's compose reads a bare comma list as a
    sweep, which it refuses)."""
    key, eq, value = arg.partition("=")
    if eq and key in ("algos", "seeds") and "," in value and not value.startswith("["):
        return f"{key}=[{value}]"
    return arg


if __name__ == "__main__":
    main()
