"""Fine-tune a diffusion model: ``python -m rl4diffusion.train [algo=…] [reward=…] [model=…] [key=value …]``.

Examples::

    python -m rl4diffusion.train                                   # defaults: the embedded world
    python -m rl4diffusion.train algo=ddpo reward=jpeg_compressibility epochs=20
    python -m rl4diffusion.train reward=my_pkg.my_rewards:sharpness model=path:/models/sd15
    python -m rl4diffusion.train -m algo=ddpo,nabla_gfn seed=0,1    # a Hydra sweep

Every field of conf/train.yaml and of the algo/reward/model groups is overridable. Bad input
is reported in one paragraph with exit code 2.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rl4diffusion import keys
from rl4diffusion.errors import ConfigError

log = logging.getLogger("rl4diffusion.train")
CONF_DIR = Path(__file__).parent / "conf"
GROUPS = ("algo", "reward", "model", "suite")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def rewrite_overrides(args: list[str]) -> list[str]:
    """Expand the CLI's shorthands into plain Hydra overrides and check group names.

    ``reward=pkg.module:fn`` → ``reward=custom reward.name=pkg.module:fn``;
    ``model=path:/dir`` → ``model=path model.pretrained=/dir``.
    """
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key.lstrip("+~") not in GROUPS or arg.startswith("-"):
            out.append(arg)
            continue
        group = key.lstrip("+~")
        if group == "reward" and ":" in value:
            out += ["reward=custom", f"reward.name={value}"]
            continue
        if group == "model" and value.startswith("path:"):
            out += ["model=path", f"model.pretrained={value[len('path:'):]}"]
            continue
        for choice in value.split(","):  # a -m sweep lists several
            if choice not in group_options(group):
                extra = {
                    "reward": " or your own function as reward=my_pkg.my_module:my_fn",
                    "model": " or any local diffusers pipeline as model=path:/dir",
                }.get(group, "")
                raise ConfigError(
                    f"unknown {group} {choice!r}. Valid names: {', '.join(group_options(group))}{extra}."
                )
        out.append(arg)
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train as ``cfg`` says and write the run directory; returns the summary."""
    from rl4diffusion.algorithms import algorithm_classes, build_algorithm
    from rl4diffusion.algorithms.base import check_reward_compatible
    from rl4diffusion.data import terminal_rewards
    from rl4diffusion.envs import DenoisingEnv
    from rl4diffusion.evaluation import evaluate
    from rl4diffusion.policy import DiffusionPolicy, PolicyConfig
    from rl4diffusion.prompts import resolve_prompts
    from rl4diffusion.rewards import build_reward
    from rl4diffusion.runlog import RunLogger

    start = time.perf_counter()
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be ≥ 1, got {cfg.epochs}")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    run_dir = Path(run_dir)

    # 1. the primitives: reward, policy, prompts, algorithm, environment
    reward_options = OmegaConf.to_container(cfg.reward, resolve=True)
    reward = build_reward(reward_options.pop("name"), device=device, **reward_options)
    model_options = OmegaConf.to_container(cfg.model, resolve=True)
    unknown = sorted(set(model_options) - set(PolicyConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(unknown)}. Valid: {', '.join(PolicyConfig.__dataclass_fields__)}.")
    algo_options = OmegaConf.to_container(cfg.algo, resolve=True)
    algo_name = algo_options.pop("name")
    check_reward_compatible(algorithm_classes(algo_name)[0], reward)  # fail before loading the model
    prompts = resolve_prompts(OmegaConf.to_container(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else cfg.prompts)
    policy = DiffusionPolicy.from_pretrained(device=device, **model_options)
    algorithm = build_algorithm(algo_name, algo_options, policy, reward, seed=int(cfg.seed))
    env = DenoisingEnv(policy, reward, prompts, batch_size=int(getattr(algorithm.config, "batch_size", 8)))
    env.set_seed(int(cfg.seed))
    eval_specs = OmegaConf.to_container(cfg.eval.prompt_sets, resolve=True)
    eval_sets = {spec if isinstance(spec, str) else f"set{i}": resolve_prompts(spec) for i, spec in enumerate(eval_specs)}

    logger = RunLogger(run_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    log.info("run directory: %s", run_dir)
    log.info("algo=%s reward=%s model=%s prompts=%d epochs=%d", algo_name, reward.name, cfg.model.pretrained,
             len(prompts), cfg.epochs)

    eval_queries = 0
    eval_seconds = 0.0

    def run_eval(step: int) -> dict:
        nonlocal eval_queries, eval_seconds
        t0 = time.perf_counter()
        before = reward.queries
        results = {}
        for name, set_prompts in eval_sets.items():
            stats, _, images = evaluate(policy, reward, set_prompts, samples_per_prompt=cfg.eval.samples_per_prompt,
                                        seed=cfg.eval.seed)
            results[name] = stats
            logger.save_images(images[: 8 * cfg.eval.samples_per_prompt], f"eval_{step:05d}_{name}",
                               nrow=cfg.eval.samples_per_prompt * 2)
        eval_queries += reward.queries - before
        eval_seconds += time.perf_counter() - t0
        for name, stats in results.items():
            logger.log({"step": step, "phase": "eval", "prompt_set": name, **stats,
                        "reward_queries": reward.queries - eval_queries, "wall_s": time.perf_counter() - start})
        return results

    # 2. the base model on the evaluation seeds
    base = run_eval(0)
    log.info("base eval: %s", {k: round(v["reward_mean"], 4) for k, v in base.items()})

    # 3. collect → update
    from tqdm.auto import tqdm

    last = base
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"{algo_name}", disable=not cfg.progress, dynamic_ncols=True)
    for epoch in bar:
        batch = algorithm.collect(env)
        record = {"step": epoch, "phase": "train"}
        if keys.NEXT in batch.keys() and batch.batch_dims == 2:
            rewards = terminal_rewards(batch)
            record.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std(unbiased=False)))
        metrics = algorithm.update(batch)
        record.update(metrics)
        record.update(reward_queries=reward.queries - eval_queries, wall_s=time.perf_counter() - start,
                      train_wall_s=time.perf_counter() - start - eval_seconds)
        logger.log(record)
        bar.set_postfix(reward=f"{record.get('reward_mean', float('nan')):.4f}")
        if cfg.eval.every and epoch % cfg.eval.every == 0 and epoch != cfg.epochs:
            last = run_eval(epoch)
    final = run_eval(cfg.epochs) if cfg.epochs else last

    # 4. outputs
    if cfg.save_lora:
        policy.save_pretrained_lora(run_dir / "lora")
    summary = {
        "algo": algo_name, "reward": reward.name, "model": cfg.model.pretrained, "seed": int(cfg.seed),
        "epochs": int(cfg.epochs), "reward_queries": reward.queries - eval_queries,
        "wall_s": time.perf_counter() - start, "eval_seed": int(cfg.eval.seed),
        "base": base, "final": final,
        "improvement": {k: final[k]["reward_mean"] - base[k]["reward_mean"] for k in final},
    }
    logger.write_json("summary.json", summary)
    logger.close()
    log.info("final eval: %s (base %s)", {k: round(v["reward_mean"], 4) for k, v in final.items()},
             {k: round(v["reward_mean"], 4) for k, v in base.items()})
    return summary


def _hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(config_path="conf", config_name="train", version_base="1.3")
    def entry(cfg: DictConfig) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            run(cfg, run_dir)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Exception as e:  # a bug, not bad input: keep the traceback in the run directory
            import traceback

            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.log").write_text(traceback.format_exc())
            print(f"error: training failed with {type(e).__name__}: {e}. The full traceback is in "
                  f"{run_dir / 'error.log'}; please include it when reporting the problem.", file=sys.stderr)
            sys.exit(1)

    entry()


def check_config(args: list[str]) -> None:
    """Compose the config once before Hydra runs, so bad overrides fail with exit code 2."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    plain = [a for a in args if not a.startswith("-") and "," not in a.partition("=")[2]]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            compose("train", overrides=plain)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]} (see conf/train.yaml and conf/<group>/*.yaml)") from None


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = rewrite_overrides(args)
        if "--help" not in args and "-h" not in args and "--cfg" not in args:
            check_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *args]
    _hydra_main()


if __name__ == "__main__":
    main()
