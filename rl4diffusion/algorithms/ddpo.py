"""DDPO — Denoising Diffusion Policy Optimization (Black et al. 2023, arXiv 2305.13301).

The denoising chain is an MDP whose actions are the stochastic DDIM steps; DDPO_IS applies
PPO's clipped importance-sampled policy gradient to it, with one scalar reward per chain.
Reference implementation: kvablack/ddpo-pytorch @1958463 (``scripts/train.py``).

Implementation details (numbered as a checklist):
1. Advantages use a per-prompt FIFO of rewards (``PerPromptStatTracker``); while a prompt has
   fewer than ``stat_min_count`` rewards, the whole batch's mean/std is used. A is clipped
   to ±``adv_clip_max`` and shared by every timestep of the chain.
2. Each chain trains a random ⌊T·timestep_fraction⌋ of its steps; gradients accumulate over
   those steps and the optimiser steps once per minibatch (upstream's accumulation): one
   ``OptimisationStep`` per minibatch, one micro-batch per trained timestep.
3. Log-probabilities are per-element means (``model.log_prob_reduction``), which is why the
   clip range is tiny (1e-4).
4. CFG is used at training time too: the log-prob is of the guided step that was sampled.
5. Gradient norm clipped at ``max_grad_norm``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase

from rl4diffusion import keys
from rl4diffusion.algorithms.base import (
    Algorithm,
    OptimisationStep,
    check_minibatch,
    register_algorithm,
)
from rl4diffusion.algorithms.losses import clipped_surrogate
from rl4diffusion.data import PerPromptStatTracker, collect_trajectories, minibatches, terminal_rewards


@dataclass
class DDPOConfig:
    lr: float = 3e-3
    """AdamW learning rate (paper: 3e-4 for SD1.5 LoRA; the tiny model's LoRA needs a larger step to move in CPU-minutes)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    batch_size: int = 32
    """Chains sampled per epoch (the environment's batch size)."""
    minibatch_size: int = 8
    """Chains per optimiser step; must divide batch_size."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    clip_range: float = 1e-4
    """PPO clip ε on the per-step likelihood ratio."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to ±adv_clip_max."""
    timestep_fraction: float = 1.0
    """Fraction of each chain's steps that are trained."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    per_prompt_stat_tracking: bool = True
    """Normalise rewards per prompt (True) or over the batch (False)."""
    stat_buffer_size: int = 32
    """Rewards kept per prompt."""
    stat_min_count: int = 16
    """Below this many rewards for a prompt, use the batch statistics."""

    def validate(self) -> None:
        from rl4diffusion.errors import ConfigError

        check_minibatch(self.batch_size, self.minibatch_size)
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"algo.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.lr <= 0 or self.clip_range <= 0 or self.num_inner_epochs < 1:
            raise ConfigError("algo.lr and algo.clip_range must be > 0 and algo.num_inner_epochs ≥ 1")


def ddpo_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> dict[str, torch.Tensor]:
    """DDPO_IS's loss on one denoising step — DDPO eq. (4) with PPO's clip: ``clipped_surrogate``.

        ρ = exp(log π_θ(a|s) − log π_old(a|s));  loss_policy = mean( max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) )

    Returns ``loss_policy`` plus detached ``approx_kl`` (½·mean Δlogp²) and ``clip_fraction``.
    """
    return clipped_surrogate(log_prob, old_log_prob, advantages, clip_range)


@register_algorithm("ddpo", config=DDPOConfig)
class DDPO(Algorithm):
    needs_log_prob = True  # its loss scores log π_θ of sampled steps: η = 0 is refused

    def __init__(self, config: DDPOConfig, policy, reward, *, seed: int = 0):
        super().__init__(policy, reward, config)
        self.stat_tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)

    def collect(self, env) -> TensorDictBase:
        self.remember_prompts(env.prompts)
        batch = collect_trajectories(env, self.policy, generator=self.generator)
        # statistics over the global batch (all processes), then this process's share
        rewards = self.gather(terminal_rewards(batch))
        prompt_ids = self.gather(batch[keys.PROMPT_ID][:, 0])
        if self.config.per_prompt_stat_tracking:
            advantages = self.stat_tracker.update(env.core.prompts_of(prompt_ids), rewards)
        else:
            advantages = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
        advantages = self.local_part(advantages).clamp(-self.config.adv_clip_max, self.config.adv_clip_max)
        batch[keys.ADVANTAGE] = advantages[:, None].expand(batch.shape)  # (B, T): same A for every step
        return batch

    def optimisation_steps(self, batch: TensorDictBase) -> Iterator[OptimisationStep]:
        """One step per minibatch of chains; its micro-batches are the chains' randomly picked timesteps."""
        cfg = self.config
        num_chains, num_steps = batch.shape
        steps_trained = max(1, int(num_steps * cfg.timestep_fraction))
        minibatch = cfg.minibatch_size // self.world  # sizes are global: each process holds its share
        for _ in range(cfg.num_inner_epochs):
            # the order of chains comes from the global RNG (restored on resume), as in upstream
            for index in minibatches(num_chains, minibatch, device=batch.device):
                chains = batch[index]  # (M, T)
                order = torch.rand(chains.shape, generator=self.generator, device=chains.device).argsort(dim=1)
                picked = chains[torch.arange(chains.shape[0])[:, None], order[:, :steps_trained]]  # (M, k)
                yield OptimisationStep([picked[:, j] for j in range(steps_trained)])  # k micro-batches of (M,)

    def loss_terms(self, step: TensorDictBase) -> dict[str, torch.Tensor]:
        out = self.policy.log_prob(self.with_conditioning(step))
        return ddpo_loss(out.log_prob, step[keys.SAMPLE_LOG_PROB], step[keys.ADVANTAGE], self.config.clip_range)

    def state_dict(self) -> dict:
        return {"stat_tracker": self.stat_tracker.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.stat_tracker.load_state_dict(state["stat_tracker"])
        self.generator.set_state(state["generator"])
