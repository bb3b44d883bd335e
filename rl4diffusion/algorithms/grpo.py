"""GRPO for diffusion — group-relative policy optimisation (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470;
DanceGRPO, Xue et al. 2025, arXiv 2505.07818).

Each batch holds K samples of each of its prompts; a sample's advantage is its reward standardised
within its group, so no value network or reward history is needed. The update is PPO's clipped
surrogate (as DDPO) plus β·KL to the pretrained model. On flow-matching models (SD3) the chain is
Flow-GRPO's SDE (``FlowMatchingPolicy``); on DDIM models the DDPO step — the algorithm is the same.
Reference implementation: yifan123/flow_grpo (``scripts/train_sd3.py``).

Implementation details (numbered as a checklist):
1. Prompts: ``GroupedPromptSampler`` picks batch_size/K distinct prompts and repeats each K times
   (upstream's DistributedKRepeatSampler); in multi-process runs every process takes its slice of
   the same global batch, and rewards are gathered before the group statistics.
2. A = (r − mean_group)/(std + 1e-4), std over the group (population std, as upstream's np.std) or,
   with ``global_std``, over the whole batch; clipped to ±adv_clip_max; same A for every step.
3. Groups whose advantages are all zero (all K rewards equal: no signal, only KL) are dropped from
   the update; ``diag/dropped_groups`` counts them. Upstream drops such samples too.
4. Loss per step = PPO-clip(A, ρ) (``ddpo_loss``) + β·KL to the reference (the adapter disabled).
   The flow step's Gaussian has std s_t·√|Δt| with s_t = a·√(σ/(1−σ)); its exact KL is
   reduce((μ_θ − μ_ref)²)/(2·s_t²·|Δt|) (``kl_scale=exact``, DPOK's closed form). Flow-GRPO's code
   divides by 2·s_t² only (``train_sd3.py``), i.e. the exact KL times |Δt| — the default
   ``kl_scale=upstream``, so that β means what it means in the paper. A DDIM step has no separate
   diffusion coefficient: its σ_t(η) is the Gaussian std itself (DDPO's ``ddim_step_with_logprob``),
   so there both scales are the exact KL. Upstream averages over latent elements, our default
   reduction. ``diag/kl`` is logged even with β = 0 (one extra forward without grad per step) so runs
   can be compared.
5. Each chain trains a random ⌊T·timestep_fraction⌋ of its steps; gradients accumulate over them and
   the optimiser steps once per minibatch of chains (one ``OptimisationStep``, one micro-batch per
   trained timestep); grad-norm clip ``max_grad_norm``.
6. Windowed sampling (``window_size``): only the steps at positions [l, l+w) of the schedule are
   stochastic, the others are the deterministic DDIM / ODE step (``DiffusionPolicy.sde_window``), and
   only the window's steps are trained (T above becomes w). Flow-GRPO-Fast (yifan123/flow_grpo):
   w = 1–2 at a position drawn every epoch (``window_start=null``) or fixed.
   MixGRPO (Li et al. 2025, arXiv 2507.21802): l = window_start + window_stride·⌊epoch/window_every⌋,
   moving from the noisy end towards the clean one; here it stays at the last position once there.
7. ``shared_noise`` (DanceGRPO): the K samples of one prompt start from the same x_T, so their
   rewards differ only through the sampling noise of the stochastic steps.
"""

from __future__ import annotations

import math
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
from rl4diffusion.algorithms.losses import clipped_surrogate, gaussian_mean_kl, group_advantages
from rl4diffusion.data import collect_trajectories, minibatches, terminal_rewards
from rl4diffusion.data.sampler import GroupedPromptSampler
from rl4diffusion.errors import ConfigError


@dataclass
class GRPOConfig:
    lr: float = 3e-3
    """AdamW learning rate (Flow-GRPO: 3e-4 for SD3.5 LoRA; the tiny model's LoRA needs a larger step to move in
    CPU-minutes)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    batch_size: int = 32
    """Chains sampled per epoch (global): batch_size / group_size prompts × group_size samples."""
    group_size: int = 4
    """K, samples per prompt in a batch (Flow-GRPO: 24); ≥ 2 and must divide batch_size. Tiny model, 6 epochs:
    K = 8 gave −0.23 eval reward, K = 4 +0.09."""
    minibatch_size: int = 8
    """Chains per optimiser step; must divide batch_size."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    clip_range: float = 1e-4
    """PPO clip ε on the per-step likelihood ratio."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to ±adv_clip_max."""
    beta: float = 0.04
    """β: weight of the KL to the pretrained model (Flow-GRPO 0.01–0.04; 0 = no penalty)."""
    global_std: bool = False
    """Standardise by the whole batch's reward std instead of each group's."""
    std_eps: float = 1e-4
    """Added to the std in the advantage's denominator."""
    timestep_fraction: float = 1.0
    """Fraction of each chain's steps that are trained (Flow-GRPO trains ~all of its 10 steps)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    kl_scale: str = "upstream"
    """"upstream": Flow-GRPO's KL, (μ_θ − μ_ref)²/(2s_t²) without the step's |Δt|; "exact": the Gaussian KL of
    the step, (μ_θ − μ_ref)²/(2s_t²|Δt|), larger by 1/|Δt| per step. The same on DDIM models."""
    window_size: int | None = None
    """w: only w consecutive steps of the chain are stochastic and trained, the rest deterministic (Flow-GRPO-Fast:
    1–2). None: every step (plain GRPO)."""
    window_start: int | None = 0
    """Position of the window's first step (0 = the noisiest); None draws it uniformly every epoch."""
    window_stride: int = 0
    """MixGRPO: the window moves this many steps towards the clean end every ``window_every`` epochs."""
    window_every: int = 1
    """MixGRPO's τ: epochs between two moves of the window."""
    shared_noise: bool = False
    """DanceGRPO: the K samples of one prompt share their initial noise x_T."""

    def validate(self) -> None:
        if self.group_size < 2:
            raise ConfigError(
                f"algo.group_size={self.group_size}: GRPO compares the K samples of each prompt with one another, so it "
                "needs at least 2 per group (a group of one always has advantage 0 and nothing would train). "
                "Set algo.group_size to 2 or more, e.g. algo.group_size=4."
            )
        if self.batch_size < 1 or self.batch_size % self.group_size:
            raise ConfigError(
                f"algo.group_size={self.group_size} does not divide algo.batch_size={self.batch_size}: every batch must "
                "hold whole groups of K samples of one prompt. Choose a batch size that is a multiple of the group "
                f"size (e.g. algo.batch_size={max(1, self.batch_size // self.group_size) * self.group_size or self.group_size}) "
                "or a group size that divides it."
            )
        check_minibatch(self.batch_size, self.minibatch_size)
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"algo.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.kl_scale not in ("upstream", "exact"):
            raise ConfigError(f"algo.kl_scale={self.kl_scale!r} is not a KL scale: use upstream (Flow-GRPO's, the "
                              "default) or exact (the Gaussian KL of the step).")
        if self.window_size is not None and self.window_size < 1:
            raise ConfigError(f"algo.window_size={self.window_size}: the window holds the steps that are trained, so "
                              "it needs at least one; use null for the whole chain or e.g. algo.window_size=2.")
        if (self.window_start is not None and self.window_start < 0) or self.window_stride < 0 or self.window_every < 1:
            raise ConfigError(f"algo.window_start={self.window_start}, algo.window_stride={self.window_stride} and "
                              f"algo.window_every={self.window_every}: the start and the stride must be ≥ 0 (or the "
                              "start null, drawn every epoch) and window_every ≥ 1.")
        if self.lr <= 0 or self.clip_range <= 0 or self.num_inner_epochs < 1 or self.beta < 0 or self.std_eps <= 0:
            raise ConfigError("algo.lr, algo.clip_range and algo.std_eps must be > 0, algo.beta ≥ 0 and "
                              "algo.num_inner_epochs ≥ 1.")


def groups_with_signal(advantages: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] bool: True where the sample's group has at least one non-zero advantage."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    nonzero = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=advantages.device)
    nonzero.index_add_(0, inverse, (advantages != 0).long())
    return nonzero[inverse] > 0


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, mean: torch.Tensor,
              ref_mean: torch.Tensor, std: torch.Tensor, *, clip_range: float, beta: float,
              reduction: str = "mean", kl_time_step: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """GRPO's per-step loss: PPO-clip on group-relative advantages plus β·KL to the reference.

        loss_policy = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))                 (``clipped_surrogate``; PPO eq. 7)
        loss_kl     = β · mean(KL),  KL = reduce((μ_θ − μ_ref)²) / (2σ²)     (Flow-GRPO eq. 6, closed form)

    σ is the step's Gaussian std ``std``; ``kl_time_step`` [B] (|Δt|) multiplies the KL by it, which gives
    Flow-GRPO's code's scale, σ² = s_t² (``kl_scale=upstream``). Flow-GRPO's code averages the squared mean
    difference over latent elements (our ``reduction="mean"``); the paper writes the KL of the full
    Gaussians (``"sum"``). Returns ``loss_policy``, ``loss_kl`` and detached ``kl``, ``approx_kl``,
    ``clip_fraction``.
    """
    terms = clipped_surrogate(log_prob, old_log_prob, advantages, clip_range)
    kl = gaussian_mean_kl(mean, ref_mean, std, reduction)
    if kl_time_step is not None:
        kl = kl * kl_time_step.to(kl)
    return {
        "loss_policy": terms["loss_policy"],
        "loss_kl": beta * kl.mean(),
        "kl": kl.mean().detach(),
        "approx_kl": terms["approx_kl"],
        "clip_fraction": terms["clip_fraction"],
    }


@register_algorithm("grpo", config=GRPOConfig)
class GRPO(Algorithm):
    needs_log_prob = True  # its loss scores log π_θ of sampled steps: η = 0 is refused

    def __init__(self, config: GRPOConfig, policy, reward, *, seed: int = 0):
        super().__init__(policy, reward, config)
        self.seed = seed
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self.order_generator = torch.Generator(device=policy.device).manual_seed(seed + 1)  # the minibatch order
        self.window_generator = torch.Generator().manual_seed(seed + 2)  # window_start=null: the window's position
        self.iteration = 0  # epochs collected: MixGRPO moves its window with it
        self.window: range | None = None  # this epoch's SDE window (None: the whole chain)
        num_steps = len(policy.timesteps)
        if config.window_size is not None and (config.window_size > num_steps
                                               or (config.window_start or 0) + config.window_size > num_steps):
            raise ConfigError(f"algo.window_size={config.window_size} with algo.window_start={config.window_start} "
                              f"does not fit in the chain of model.num_steps={num_steps} steps: the window must lie "
                              "inside the schedule. Use a smaller window or start, or more steps.")
        self.sampler: GroupedPromptSampler | None = None  # built on the first collect (needs the prompt count)
        self._sampler_state: dict | None = None
        self._epoch_metrics: dict[str, float] = {}

    def _layout(self) -> tuple[int, int]:
        return (self.distributed.rank, self.distributed.world) if self.distributed is not None else (0, 1)

    def sde_window(self) -> range | None:
        """This epoch's window of stochastic, trained steps (section 6 of the module docstring)."""
        cfg = self.config
        if cfg.window_size is None:
            return None
        last_start = len(self.policy.timesteps) - cfg.window_size
        if cfg.window_start is None:
            start = int(torch.randint(last_start + 1, (1,), generator=self.window_generator))
        else:
            start = min(cfg.window_start + cfg.window_stride * (self.iteration // cfg.window_every), last_start)
        return range(start, start + cfg.window_size)

    def collect(self, env) -> TensorDictBase:
        rank, world = self._layout()
        if self.sampler is None:
            self.sampler = GroupedPromptSampler(len(env.prompts), self.config.group_size, seed=self.seed,
                                                rank=rank, world_size=world, state=self._sampler_state)
        self.remember_prompts(env.prompts)
        prompt_ids, group_ids = self.sampler.sample(env.batch_size[0])
        latents = None
        if self.config.shared_noise:  # one x_T per group of the global batch, so every process agrees
            num_groups = env.batch_size[0] * self._layout()[1] // self.config.group_size
            per_group = torch.randn((num_groups, *self.policy.latent_shape), generator=self.generator,
                                    device=self.policy.device)
            latents = per_group[group_ids.to(per_group.device)] * self.policy.scheduler.init_noise_sigma
        self.window = self.sde_window()
        self.iteration += 1
        with self.policy.sde_window(self.window):
            batch = collect_trajectories(env, self.policy, prompt_ids=prompt_ids, latents=latents,
                                         generator=self.generator)
        # statistics over the global batch (all processes), then this process's share
        rewards = self.gather(terminal_rewards(batch))
        all_groups = self.gather(group_ids.to(rewards.device))
        advantages = group_advantages(rewards, all_groups, self.config.std_eps, self.config.global_std)
        advantages = self.local_part(advantages).clamp(-self.config.adv_clip_max, self.config.adv_clip_max)
        batch[keys.ADVANTAGE] = advantages[:, None].expand(batch.shape)  # (B, T): same A for every step
        batch[keys.GROUP_ID] = group_ids.to(batch.device)[:, None].expand(batch.shape)
        return batch

    def optimisation_steps(self, batch: TensorDictBase) -> Iterator[OptimisationStep]:
        """One step per minibatch of the chains whose group has a signal; micro-batches are picked timesteps.

        Every process takes the same number of steps (gradients are reduced across them): one with
        fewer chains pads with a zero-weight micro-batch.
        """
        cfg = self.config
        world = self.world
        advantages, group_ids = batch[keys.ADVANTAGE][:, 0], batch[keys.GROUP_ID][:, 0]
        keep = groups_with_signal(advantages, group_ids)
        all_adv, all_groups = self.gather(advantages), self.gather(group_ids)
        dropped = int(torch.unique(all_groups[~groups_with_signal(all_adv, all_groups)]).numel())
        kept = batch[keep]  # (B', T): only groups with a learning signal
        if self.window is not None:  # only the window's steps are stochastic: the others have no log-probability
            kept = kept[:, self.window.start:self.window.stop]
        steps_trained = max(1, int(kept.shape[1] * cfg.timestep_fraction))
        minibatch = max(1, cfg.minibatch_size // world)
        num_minibatches = math.ceil(kept.shape[0] / minibatch)
        if world > 1:  # every process must take the same number of optimiser steps
            num_minibatches = int(self.gather(torch.tensor([num_minibatches], device=batch.device)).max())
        self._epoch_metrics = {"diag/dropped_groups": float(dropped), "train/trained_chains": float(kept.shape[0] * world)}
        if self.window is not None:
            self._epoch_metrics["diag/window_start"] = float(self.window.start)
        for _ in range(cfg.num_inner_epochs):
            order = iter(minibatches(kept.shape[0], minibatch, generator=self.order_generator, device=batch.device)
                         if kept.shape[0] else [])
            for _ in range(num_minibatches):
                index = next(order, None)
                if index is None:  # nothing left here: pad so this process joins the step's gradient reduction
                    yield OptimisationStep([batch[:1, 0]], weights=[0.0])
                    continue
                chains = kept[index]  # (M, T); the last one may be smaller
                picked_order = torch.rand(chains.shape, generator=self.generator, device=chains.device).argsort(dim=1)
                picked = chains[torch.arange(chains.shape[0])[:, None], picked_order[:, :steps_trained]]  # (M, k)
                weight = chains.shape[0] / minibatch / steps_trained
                yield OptimisationStep([picked[:, j] for j in range(steps_trained)], weights=[weight] * steps_trained)

    def loss_terms(self, step: TensorDictBase) -> dict[str, torch.Tensor]:
        policy, cfg = self.policy, self.config
        step = self.with_conditioning(step)
        out = policy.predict_from_td(step)
        new = policy.step(out, step[keys.LATENTS], step[keys.TIMESTEP], prev_sample=step[keys.ACTION])
        ref = policy.step(policy.reference_output(step), step[keys.LATENTS], step[keys.TIMESTEP],
                          prev_sample=step[keys.ACTION])
        kl_time_step = policy.sde_time_step(step[keys.TIMESTEP]) if cfg.kl_scale == "upstream" else None
        return grpo_loss(new.log_prob, step[keys.SAMPLE_LOG_PROB], step[keys.ADVANTAGE], new.mean, ref.mean, new.std,
                         clip_range=cfg.clip_range, beta=cfg.beta, reduction=policy.config.log_prob_reduction,
                         kl_time_step=kl_time_step)

    def end_update(self) -> dict[str, float]:
        return self._epoch_metrics

    def state_dict(self) -> dict:
        sampler = self.sampler.state_dict() if self.sampler is not None else self._sampler_state
        return {
            "generator": self.generator.get_state(),
            "order_generator": self.order_generator.get_state(),
            "window_generator": self.window_generator.get_state(),
            "iteration": self.iteration,
            **({"sampler": sampler} if sampler is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order_generator.set_state(state["order_generator"])
        if "window_generator" in state:  # absent from checkpoints written before windowed sampling
            self.window_generator.set_state(state["window_generator"])
        self.iteration = int(state.get("iteration", 0))
        self._sampler_state = state.get("sampler")
        if self.sampler is not None and self._sampler_state is not None:
            self.sampler.load_state_dict(self._sampler_state)
