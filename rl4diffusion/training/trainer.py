"""The training loop behind ``python -m rl4diffusion.train``: build the primitives, collect → update, evaluate, checkpoint.

Examples::

    python -m rl4diffusion.train                                   # defaults: the embedded world
    python -m rl4diffusion.train algo=ddpo reward=jpeg_compressibility epochs=20
    python -m rl4diffusion.train reward=my_pkg.my_rewards:sharpness model=path:/models/sd15
    python -m rl4diffusion.train -m algo=ddpo,nabla_gfn seed=0,1    # a Hydra sweep

Every field of conf/train.yaml and of the algo/reward/model groups is overridable. Bad input
is reported in one paragraph with exit code 2.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rl4diffusion import keys
from rl4diffusion.errors import ConfigError


class TrainingAborted(Exception):
    """Training stopped on purpose (too many non-finite updates); the message says why."""


log = logging.getLogger("rl4diffusion.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """The directory this run writes to: a fresh one, or the run being resumed (checked for compatibility)."""
    if cfg.resume:
        resumed = Path(str(cfg.resume)).expanduser()
        saved = resumed / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"resume={resumed}: no config.yaml there — is it a run directory of rl4diffusion.train?")
        old = OmegaConf.load(saved)
        for key in ("algo", "model", "reward", "prompts", "seed"):
            a = OmegaConf.to_container(old, resolve=True).get(key)
            b = OmegaConf.to_container(cfg, resolve=True).get(key)
            if a != b:
                raise ConfigError(f"resume={resumed}: its config differs from this one in '{key}' ({a!r} vs {b!r}). "
                                  "Resume with the same algo/model/reward/prompts/seed (only epochs may grow).")
        return resumed
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run (metrics.jsonl); choose another hydra.run.dir, or continue "
                          f"it with resume={run_dir}. Nothing was overwritten.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the run directory {run_dir} ({e.strerror}). Choose a writable "
                          "location with hydra.run.dir=/some/dir.") from None
    return run_dir


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run may have logged more)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish the current update, checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: finishing the current update, then checkpointing", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def is_finite_update(metrics: dict, policy) -> bool:
    losses_ok = all(math.isfinite(v) for k, v in metrics.items() if isinstance(v, float) and k.startswith("loss"))
    return losses_ok and all(torch.isfinite(p).all() for p in policy.trainable_parameters())


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train as ``cfg`` says and write the run directory; returns the summary (``{}`` if interrupted)."""
    from rl4diffusion.policies.base import check_pretrained_available
    from rl4diffusion.training.config import validate_train_config

    # fail in seconds on bad values or absent weights, before the heavy imports below
    validate_train_config(cfg)
    check_pretrained_available(str(cfg.model.pretrained))

    # the reward next: a reward whose weights are absent fails here, in seconds, before the heavy imports
    from rl4diffusion.rewards import build_reward
    from rl4diffusion.training.distributed import Distributed

    start, cpu_start = time.perf_counter(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dist = Distributed(resolve_device(cfg.device))  # one process, or one of torchrun / accelerate launch's
    device = dist.device
    reward_options = OmegaConf.to_container(cfg.reward, resolve=True)
    reward = build_reward(reward_options.pop("name"), device=device, **reward_options)

    from rl4diffusion.algorithms import algorithm_classes, build_algorithm
    from rl4diffusion.algorithms.base import build_config, check_reward_compatible
    from rl4diffusion.data import terminal_rewards
    from rl4diffusion.data.prompts import resolve_prompts
    from rl4diffusion.envs import DenoisingEnv
    from rl4diffusion.policies.base import DiffusionPolicy, PolicyConfig
    from rl4diffusion.training.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        load_trainable_state,
        rng_state,
        save_checkpoint,
        set_rng_state,
        trainable_state,
    )
    from rl4diffusion.training.evaluation import EvalMetrics, evaluate, reference_images, sample_fixed
    from rl4diffusion.training.runlog import RunLogger

    run_dir = prepare_run_dir(cfg, Path(run_dir))
    torch.manual_seed(cfg.seed)

    # 1. the primitives: prompts, policy, algorithm, environment (cheap checks before the model loads)
    model_options = OmegaConf.to_container(cfg.model, resolve=True)
    unknown = sorted(set(model_options) - set(PolicyConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(unknown)}. Valid: {', '.join(PolicyConfig.__dataclass_fields__)}.")
    algo_options = OmegaConf.to_container(cfg.algo, resolve=True)
    algo_name = algo_options.pop("name")
    check_reward_compatible(algorithm_classes(algo_name)[0], reward)
    build_config(algorithm_classes(algo_name)[1], dict(algo_options), algo_name)  # bad algo options fail before the model loads
    prompts = resolve_prompts(OmegaConf.to_container(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else cfg.prompts)
    eval_specs = OmegaConf.to_container(cfg.eval.prompt_sets, resolve=True)
    eval_sets = {spec if isinstance(spec, str) else f"set{i}": resolve_prompts(spec) for i, spec in enumerate(eval_specs)}
    policy = DiffusionPolicy.from_pretrained(device=device, **model_options)
    algorithm = build_algorithm(algo_name, algo_options, policy, reward, seed=int(cfg.seed))
    batch_size = int(getattr(algorithm.config, "batch_size", 8))
    if dist.enabled:  # each process runs its slice of the global batch; gradients are averaged
        for key in ("batch_size", "minibatch_size"):
            value = getattr(algorithm.config, key, None)
            if value is not None and value % dist.world:
                raise ConfigError(f"algo.{key} ({value}) is global and must be divisible by the number of processes "
                                  f"({dist.world}).")
        batch_size //= dist.world
        policy.process_slice = (dist.rank, dist.world)
        algorithm.distributed = dist
        for optimizer in algorithm.optimizers():
            dist.average_gradients_before_step(optimizer)
    env = DenoisingEnv(policy, reward, prompts, batch_size=batch_size)
    env.set_seed(int(cfg.seed))

    # 2. loop state, restored from the latest checkpoint when resuming
    # (a checkpoint's loop state is merged over these defaults, so keys added later start at their default)
    loop = {"epoch": 0, "base": None, "last_eval": None, "last_eval_step": -1, "eval_queries": 0, "eval_seconds": 0.0, "skipped": 0,
            "wall_before": 0.0, "cpu_before": 0.0, "eval_cpu_seconds": 0.0, "query_evals": 0}
    checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint, policy)
        algorithm.load_state_dict(saved["algorithm"])
        env.rng.set_state(saved["env_rng"])
        reward.queries = int(saved["reward_queries"])
        loop.update(json.loads(saved["loop"]))
        truncate_metrics(run_dir, loop["epoch"])
        log.info("resumed %s from %s (epoch %d)", run_dir, checkpoint.name, loop["epoch"])
    elif cfg.resume:
        truncate_metrics(run_dir, 0)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # no checkpoint yet: start over in the same directory
    eval_metrics = None
    if cfg.eval.metrics:
        refs = {name: reference_images(p, cfg.eval.reference_size, cfg.eval.seed) for name, p in eval_sets.items()}
        eval_metrics = EvalMetrics(device, cfg.eval.feature_space, {k: v for k, v in refs.items() if v is not None})
    logger = RunLogger(run_dir, enabled=dist.is_main)
    if dist.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    log.info("run directory: %s", run_dir)
    log.info("algo=%s reward=%s model=%s prompts=%d epochs=%d", algo_name, reward.name, cfg.model.pretrained,
             len(prompts), cfg.epochs)

    def train_queries() -> int:  # reward queries spent on training, summed over processes
        return (reward.queries - loop["eval_queries"]) * dist.world

    def wall() -> float:
        return loop["wall_before"] + time.perf_counter() - start

    def cpu() -> float:  # CPU seconds of this process: a budget that other jobs on the machine do not eat
        return loop["cpu_before"] + time.process_time() - cpu_start

    def run_eval(step: int) -> dict:
        t0, cpu0 = time.perf_counter(), time.process_time()
        before = reward.queries
        results, per_sample = {}, {}
        for name, set_prompts in eval_sets.items():
            stats, sample_rewards, images = evaluate(policy, reward, set_prompts, metrics=eval_metrics, name=name,
                                                     samples_per_prompt=cfg.eval.samples_per_prompt, seed=cfg.eval.seed)
            results[name] = stats
            per_sample[name] = [round(float(r), 5) for r in sample_rewards]  # for head-to-head comparisons
            logger.save_images(images[: 8 * cfg.eval.samples_per_prompt], f"eval_{step:05d}_{name}",
                               nrow=cfg.eval.samples_per_prompt * 2)
        loop["eval_queries"] += reward.queries - before
        loop["eval_seconds"] += time.perf_counter() - t0
        loop["eval_cpu_seconds"] += time.process_time() - cpu0
        for name, stats in results.items():
            logger.log({"step": step, "phase": "eval", "prompt_set": name, **stats,
                        "reward_queries": train_queries(), "wall_s": wall(),
                        "train_cpu_s": cpu() - loop["eval_cpu_seconds"], "sample_rewards": per_sample[name]})
        loop["last_eval"], loop["last_eval_step"] = results, step
        return results

    def write_checkpoint() -> None:
        loop["wall_before"], loop["cpu_before"] = wall(), cpu()
        state = {"algorithm": algorithm.state_dict(), "env_rng": env.rng.get_state(), "rng": rng_state(),
                 "reward_queries": reward.queries, "loop": json.dumps(loop)}
        if dist.is_main:  # every process holds the same state: the generators draw global batches
            save_checkpoint(run_dir, loop["epoch"], state, policy, keep_last=int(cfg.checkpoint.keep_last))
        nonlocal start, cpu_start
        start, cpu_start = time.perf_counter(), time.process_time()

    # 3. the base model on the evaluation seeds (a resumed run recomputes its samples for FID / win rate)
    if eval_metrics is not None and loop["base"] is not None:
        for name, set_prompts in eval_sets.items():
            images, flat, _ = sample_fixed(policy, set_prompts, samples_per_prompt=cfg.eval.samples_per_prompt,
                                           seed=cfg.eval.seed, use_reference=True)
            eval_metrics.set_base(name, images, reward.fn(images, flat).float())
    if loop["base"] is None:
        loop["base"] = run_eval(0)
        log.info("base eval: %s", {k: round(v["reward_mean"], 4) for k, v in loop["base"].items()})

    if checkpoint is not None:  # last, so that nothing above (metric networks, base samples) shifts the RNGs
        set_rng_state(saved["rng"])
    # the training clocks (re)start here: loading, metric set-up and the base samples are not training
    start, cpu_start = time.perf_counter(), time.process_time()
    if loop["epoch"] == 0:
        loop["eval_seconds"] = loop["eval_cpu_seconds"] = 0.0

    # 4. collect → update, with non-finite updates skipped and SIGINT/SIGTERM handled between updates
    from tqdm.auto import tqdm

    interrupted = False
    with StopRequest() as stop:
        bar = tqdm(range(loop["epoch"] + 1, cfg.epochs + 1), desc=algo_name, disable=not cfg.progress, dynamic_ncols=True)
        for epoch in bar:
            batch = algorithm.collect(env)
            record = {"step": epoch, "phase": "train"}
            rewards = terminal_rewards(batch) if keys.NEXT in batch.keys() and batch.batch_dims == 2 else None
            rewards = dist.gather(rewards) if rewards is not None else None
            if rewards is not None:
                record.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std(unbiased=False)))
            snapshot = copy.deepcopy((algorithm.state_dict(), trainable_state(policy)))
            if rewards is not None and not torch.isfinite(rewards).all():
                metrics, ok = {}, False
                log.warning("epoch %d: non-finite reward in the batch; update skipped", epoch)
            else:
                metrics = algorithm.update(batch)
                ok = is_finite_update(metrics, policy)
                if not ok:
                    log.warning("epoch %d: non-finite loss or weights; update undone and skipped", epoch)
                    algorithm.load_state_dict(snapshot[0])
                    load_trainable_state(policy, snapshot[1])
            if not ok:
                loop["skipped"] += 1
                if loop["skipped"] > cfg.max_skipped_updates:
                    raise TrainingAborted(f"{loop['skipped']} updates were skipped for non-finite rewards or losses "
                                          f"(max_skipped_updates={cfg.max_skipped_updates}). Lower the learning rate "
                                          "or check the reward; the last checkpoint is intact.")
            record.update(metrics)
            record.update({"train/skipped_updates": loop["skipped"], "reward_queries": train_queries(),
                           "wall_s": wall(), "train_wall_s": wall() - loop["eval_seconds"],
                           "train_cpu_s": cpu() - loop["eval_cpu_seconds"]})
            logger.log(record)
            loop["epoch"] = epoch
            bar.set_postfix(reward=f"{record.get('reward_mean', float('nan')):.4f}")
            query_evals = record["reward_queries"] // cfg.eval.every_queries if cfg.eval.get("every_queries") else 0
            by_epoch = cfg.eval.every and epoch % cfg.eval.every == 0
            if (by_epoch or query_evals > loop["query_evals"]) and epoch != cfg.epochs:
                run_eval(epoch)
            loop["query_evals"] = query_evals
            spent = {"reward_queries": record["reward_queries"], "train_seconds": record["train_wall_s"],
                     "train_cpu_seconds": record["train_cpu_s"]}
            over = [k for k, limit in cfg.budget.items() if limit is not None and spent[k] >= limit]
            if over and epoch != cfg.epochs:
                log.info("budget reached (%s) after epoch %d", ", ".join(over), epoch)
                break
            if stop.requested:
                write_checkpoint()
                interrupted = True
                log.warning("stopped after epoch %d; continue with resume=%s", epoch, run_dir)
                break
            if cfg.checkpoint.every and epoch % cfg.checkpoint.every == 0 and epoch != cfg.epochs:
                write_checkpoint()
    if interrupted:
        logger.close()
        return {}
    final = loop["last_eval"] if loop["last_eval_step"] == loop["epoch"] > 0 else run_eval(loop["epoch"])
    write_checkpoint()

    # 5. outputs
    if cfg.save_lora and dist.is_main:
        policy.save_pretrained_lora(run_dir / "lora")
    base = loop["base"]
    summary = {
        "algo": algo_name, "reward": reward.name, "model": cfg.model.pretrained, "seed": int(cfg.seed),
        "epochs": int(loop["epoch"]), "reward_queries": train_queries(),
        "wall_s": wall(), "train_wall_s": wall() - loop["eval_seconds"],
        "train_cpu_s": cpu() - loop["eval_cpu_seconds"], "skipped_updates": loop["skipped"],
        "eval_seed": int(cfg.eval.seed), "base": base, "final": final,
        "improvement": {k: final[k]["reward_mean"] - base[k]["reward_mean"] for k in final},
    }
    logger.write_json("summary.json", summary)
    logger.close()
    log.info("final eval: %s (base %s)", {k: round(v["reward_mean"], 4) for k, v in final.items()},
             {k: round(v["reward_mean"], 4) for k, v in base.items()})
    return summary


