"""Compare algorithms on a benchmark suite at a matched budget:

    python -m rl4diffusion.bench suite=shapes algos=[ddpo,nabla_gfn] seeds=3
    python -m rl4diffusion.bench suite=shapes_smoke              # the CI-sized suite

``algos`` is one name, a comma list or a ``[list]``; ``seeds`` is a count (seeds 0 … N−1) or a list of
seeds (``seeds=[0,4]``).

Each (algorithm, seed) trains through ``rl4diffusion.training.trainer.run`` with the suite's model, reward,
prompts, evaluation protocol and budget (reward queries, training CPU-seconds and/or wall-clock
seconds — the suite says which bind; all three are recorded). Runs live in ``<out_dir>/runs/<algo>_s<seed>``: a finished run
(summary.json present) is skipped, an interrupted one resumes from its checkpoint, so a suite can
be completed over several sittings. After every run the evaluation records of all runs are merged
into ``<out_dir>/evals.jsonl`` and the report (``report.md`` + PNG plots) is regenerated.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from rl4diffusion.cli.overrides import CONF_DIR
from rl4diffusion.errors import ConfigError

log = logging.getLogger("rl4diffusion.bench")


def run_overrides(suite: DictConfig, algo: str, seed: int, run_dir: Path) -> list[str]:
    """The training overrides of one (algorithm, seed) run of ``suite``."""
    overrides = [f"algo={algo}", f"model={suite.model}", f"reward={suite.reward}", f"seed={seed}",
                 f"prompts={suite.prompts}", "progress=false", "save_lora=false"]
    for key, value in OmegaConf.to_container(suite.train, resolve=True).items():
        overrides.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    overrides += list((suite.get("algo_overrides") or {}).get(algo, []))
    if (run_dir / "config.yaml").exists():
        overrides.append(f"resume={run_dir}")
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
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record["phase"] == "eval":
                # win_n: the number of paired comparisons behind win_rate, so seeds can be pooled
                if record["prompt_set"] not in set_sizes:
                    set_sizes[record["prompt_set"]] = len(resolve_prompts(record["prompt_set"]))
                win_n = set_sizes[record["prompt_set"]] * samples_per_prompt
                rows.append({"suite": suite_name, "algo": algo, "seed": int(seed), **record, "win_n": win_n})
    path = out_dir / "evals.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
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


def run_suite(cfg: DictConfig) -> Path:
    from hydra import compose, initialize_config_dir

    from rl4diffusion.algorithms import ALGORITHMS
    from rl4diffusion.cli.overrides import rewrite_overrides
    from rl4diffusion.training import rundir
    from rl4diffusion.training.report import write_report
    from rl4diffusion.training.trainer import run

    suite = cfg.suite
    algos = parse_algos(cfg.algos, suite.algos)
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown:
        raise ConfigError(f"unknown algorithm(s) {unknown}. Valid names: {', '.join(sorted(ALGORITHMS))}.")
    seeds = parse_seeds(cfg.seeds)
    out_dir = Path(cfg.out_dir or Path("benchmarks") / "results" / suite.name).expanduser()
    rundir.check_writable(out_dir / "runs", what="the bench's out_dir", key="out_dir")  # before any run starts
    for seed, algo in [(seed, algo) for seed in seeds for algo in algos]:
        run_dir = out_dir / "runs" / f"{algo}_s{seed}"
        if (run_dir / "summary.json").exists():
            log.info("%s seed %d: done, skipped", algo, seed)
            continue
        log.info("%s seed %d: training", algo, seed)
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            train_cfg = compose("train", overrides=rewrite_overrides(run_overrides(suite, algo, seed, run_dir)))
        if not run(train_cfg, run_dir):  # stopped by SIGINT/SIGTERM (checkpointed): the suite stops too
            log.warning("%s seed %d: interrupted; the suite stops here, run it again to resume", algo, seed)
            break
        merge_evals(out_dir, suite.name)
        write_report(out_dir, suite_name=suite.name)
    merge_evals(out_dir, suite.name)
    return write_report(out_dir, suite_name=suite.name)


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
        report = run_suite(cfg)
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
