"""Evaluation on fixed seeds: reward, diversity and FID of samples, so that the base model and
every checkpoint are compared on the same noise (paired)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_fixed(policy, prompts: list[str], *, samples_per_prompt: int, seed: int, batch_size: int = 64,
                 use_reference: bool = False) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Sample ``samples_per_prompt`` images of each prompt with noise fixed by ``seed``.

    Returns (images [N,3,H,W], the prompt of each image, its prompt index [N]).
    """
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    groups = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    images = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        images.append(policy.sample(chunk, generator=generator, use_reference=use_reference)["images"])
    return torch.cat(images), flat, groups


@torch.no_grad()
def evaluate(policy, reward, prompts: list[str], *, samples_per_prompt: int, seed: int, metrics=None,
             reference_features: torch.Tensor | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Reward statistics (and diversity / FID when ``metrics`` is given) of fixed-seed samples.

    Returns (stats, per-image rewards [N], images [N,3,H,W]). Reward queries made here are
    evaluation queries: the caller keeps them out of the training budget.
    """
    images, flat, groups = sample_fixed(policy, prompts, samples_per_prompt=samples_per_prompt, seed=seed)
    rewards = reward(images, flat).float()
    stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False))}
    if metrics is not None:
        stats.update(metrics(images, groups, reference_features))
    return stats, rewards, images
