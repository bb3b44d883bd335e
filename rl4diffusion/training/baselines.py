"""Baselines without training, evaluated exactly as a training run's evaluations are.

Two things a fine-tuning method has to beat to be worth its compute:

* **the base model at its best guidance scale** (``best_of=1``): more guidance alone often raises alignment;
* **best-of-N sampling** (``best_of=N``): for every evaluation image, N candidates on N noises (the first is
  the image the base model draws on the evaluation noise), scored by the training reward, the best one
  kept. It spends N reward queries per image at inference instead of training queries; a suite sets N so
  that its queries on the training prompts match the training budget.

``run_baseline(cfg, run_dir, best_of=N)`` takes a training config (``rl4diffusion.train``'s), builds its
model, reward and evaluation metrics through the trainer, trains nothing, and writes a run directory the
bench reads like a trained run's: ``metrics.jsonl`` with one evaluation of the base model (step 0) and, for
best-of-N, one of the selected images (step 1, ``reward_queries`` = the N × images it scored), then
``summary.json`` with ``"baseline": true``. Candidate k > 0 of an evaluation with noise seed s draws its noise
from seed s · 1000 + k, which no evaluation of a suite uses.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def best_of_n(policy, reward, prompts: list[str], *, samples_per_prompt: int, seed: int, n: int):
    """The base model's images on noise ``seed`` and, per image, the best of ``n`` candidates under ``reward``.

    Returns (base images, base rewards, chosen images, chosen rewards, image prompts, prompt index per image).
    """
    from rl4diffusion.training.evaluation import sample_fixed

    base_images, flat, groups = sample_fixed(policy, prompts, samples_per_prompt=samples_per_prompt, seed=seed)
    base_rewards = reward(base_images, flat).float()
    chosen, chosen_rewards = base_images.clone(), base_rewards.clone()
    for k in range(1, n):
        images, _, _ = sample_fixed(policy, prompts, samples_per_prompt=samples_per_prompt, seed=seed * 1000 + k)
        rewards = reward(images, flat).float()
        better = rewards > chosen_rewards  # ties keep the earlier candidate
        chosen[better], chosen_rewards[better] = images[better], rewards[better]
    return base_images, base_rewards, chosen, chosen_rewards, flat, groups


def run_baseline(cfg: DictConfig, run_dir: str | Path, *, best_of: int = 1) -> dict:
    """Evaluate the untrained model of ``cfg`` (best-of-``best_of`` when > 1) into ``run_dir``; the summary."""
    from rl4diffusion.training.evaluation import image_stats
    from rl4diffusion.training.trainer import Trainer

    if best_of < 1:
        raise ValueError(f"best_of must be ≥ 1, got {best_of}")
    trainer = Trainer(cfg, run_dir)
    trainer.build()
    trainer._set_up_evaluation()  # the metric networks, as fit() sets them up before its base evaluation
    OmegaConf.save(cfg, trainer.run_dir / "config.yaml", resolve=True)  # as a trained run's, for the bench
    t0, cpu0 = time.perf_counter(), time.process_time()
    final, queries = {}, 0
    with torch.no_grad(), trainer.policy.sampling_settings(**trainer.eval_sampling()):
        for name, prompts in trainer.eval_sets.items():
            base_images, base_rewards, chosen, chosen_rewards, flat, groups = best_of_n(
                trainer.policy, trainer.reward, prompts, samples_per_prompt=int(cfg.eval.samples_per_prompt),
                seed=int(cfg.eval.seed), n=best_of)
            records = [(0, 0, base_images, base_rewards)]
            if best_of > 1:
                records.append((1, best_of * len(flat), chosen, chosen_rewards))
                queries = max(queries, best_of * len(flat))
            for step, step_queries, images, rewards in records:  # the base's first: it is the metrics' reference
                stats = image_stats(images, rewards, groups, flat, metrics=trainer.eval_metrics, name=name)
                per_sample = {key: stats.pop(key) for key in list(stats) if key.startswith("sample_")}
                trainer.logger.log({"step": step, "phase": "eval", "prompt_set": name, **stats,
                                    "reward_queries": step_queries, "best_of": best_of, "wall_s": 0.0,
                                    "train_cpu_s": 0.0, "sample_rewards": [float(r) for r in rewards],
                                    **per_sample})
                final[name] = stats
    guidance = cfg.eval.get("guidance_scale")
    guidance = float(cfg.model.guidance_scale if guidance is None else guidance)
    summary = {"baseline": True, "best_of": best_of, "guidance_scale": guidance,
               "reward": trainer.reward.name, "model": cfg.model.pretrained, "seed": int(cfg.seed),
               "eval_seed": int(cfg.eval.seed), "reward_queries": queries, "epochs": 0,
               "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "final": final}
    trainer.logger.write_json("summary.json", summary)
    trainer.opened.record("finished", epoch=0, exit_code=0)
    trainer.close()
    trainer.opened.close()
    log.info("%s: best-of-%d at guidance %s: %s", Path(run_dir).name, best_of, guidance,
             {k: round(v["reward_mean"], 4) for k, v in final.items()})
    return summary
