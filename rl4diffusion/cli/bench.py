"""Compare algorithms on a benchmark suite at a matched budget:

    python -m rl4diffusion.bench suite=shapes algos=[ddpo,nabla_gfn] seeds=3
    python -m rl4diffusion.bench suite=shapes_smoke              # the CI-sized suite

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

from omegaconf import DictConfig, OmegaConf

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


def run_suite(cfg: DictConfig) -> Path:
    from hydra import compose, initialize_config_dir

    from rl4diffusion.algorithms import ALGORITHMS
    from rl4diffusion.cli.overrides import rewrite_overrides
    from rl4diffusion.training.report import write_report
    from rl4diffusion.training.trainer import run

    suite = cfg.suite
    algos = list(cfg.algos or suite.algos)
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown:
        raise ConfigError(f"unknown algorithm(s) {unknown}. Valid names: {', '.join(sorted(ALGORITHMS))}.")
    if int(cfg.seeds) < 1:
        raise ConfigError(f"seeds must be ≥ 1, got {cfg.seeds}")
    out_dir = Path(cfg.out_dir or Path("benchmarks") / "results" / suite.name)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    for seed, algo in [(seed, algo) for seed in range(int(cfg.seeds)) for algo in algos]:
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

    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("bench", overrides=args)
        report = run_suite(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: bad override: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
