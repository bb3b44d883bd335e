"""DiffusionNFT — online RL on the forward process (Zheng et al. 2025, "DiffusionNFT: Online Diffusion
Reinforcement with Forward Process", arXiv 2509.16117). Reference implementation: NVlabs/DiffusionNFT
(``scripts/train_nft_sd3.py``, ``config/nft.py``).

The sampling ("old") policy v_old draws K images per prompt with any solver; only the clean samples x₀
and their rewards are kept — no trajectories, no log-probabilities. The rewards become an optimality
probability r ∈ [0, 1]; the trained policy v_θ then defines two implicit policies,

    v⁺ = (1 − β)·v_old + β·v_θ          v⁻ = (1 + β)·v_old − β·v_θ          (paper eq. 6)

and is trained, on the forward process x_t = (1 − t)·x₀ + t·ε with the flow-matching target v = ε − x₀,
to move v⁺ towards the good samples and v⁻ towards the bad ones:

    L(θ) = E_{c, x₀ ~ π_old, t, ε} [ r·‖v⁺ − v‖² + (1 − r)·‖v⁻ − v‖² ]        (paper eq. 8)

Since v⁺ − v⁻ = 2β(v_θ − v_old), the optimum moves v_θ along the direction that separates the good samples
from the bad ones; where r ≡ ½ (no reward signal) the loss is ‖v_old − v‖² + β²‖v_θ − v_old‖², a pull
towards v_old and nothing else, and where r ≡ 1 its gradient at θ = θ_old is β times plain flow matching
on the samples (rejection-sampling fine-tuning). Classifier-free guidance is not used in training (the
conditional prediction only).

Implementation details (numbered as a checklist; the authors' code where the paper leaves a choice):
1. Prompts: ``GroupedPromptSampler`` picks batch_size/K prompts and repeats each K times (as GRPO).
2. Advantages A = (R − mean_group)/(std + 1e-4), std over the whole batch (upstream's ``PerPromptStatTracker``
   with ``global_std=True``, cleared every epoch); r = clip(A, ±A_max)/(2·A_max) + ½ with A_max = 5.
3. Samples come from the policy's own sampler under the *old* weights, at guidance ``sampling_guidance``:
   1 by default, CFG-free as upstream samples (with a deterministic solver there: ``model.eta=0``, or
   ``model.noise_level=0`` for flow models), whatever ``model.guidance_scale`` says; the trainer also
   evaluates at it unless ``eval.guidance_scale`` is set, because what NFT trains is the conditional
   prediction, the model sampled at guidance 1. Sampling with guidance (``sampling_guidance=null``: the
   model's) trains the conditional prediction on samples it does not produce; the algorithm warns.
   Measured on the training prompts, base → final on the same noise. Embedded model, 12 epochs: sampled at
   guidance 2 the reward fell (−1.70 → −1.88); CFG-free it rose, −4.59 → −3.47 with ``model.eta=1``,
   −3.19 → −2.54 with ``model.eta=0`` (lr 1e-3, one optimiser step per epoch). tiny_flow (model guidance 3),
   evaluated on 160 images on the same noise: with the defaults the CFG-free reward rises −3.27 → −2.67 and
   −3.27 → −3.14 in 10 epochs, −3.27 → −2.70 and −3.27 → −2.76 in 20 (seeds 0, 1), while the reward at
   guidance 3 of those 20-epoch runs moves by −0.06 and +0.09; 20 epochs sampled at guidance 3 raise that one
   by 0.15 and the CFG-free one by 0.18 (seed 0). NFT improves the policy at the guidance it samples. With
   2 samples per prompt (40 images, ``eval.samples_per_prompt=2``) the same runs read −0.90 → −1.28, −1.24
   and −1.39 at guidance 3, 0.3–0.65 below their 160-image differences: changes of that size are evaluation
   noise there.
4. Each sample trains at ⌊N·timestep_fraction⌋ of the N timesteps of the sampling schedule, picked at
   random per sample, with fresh noise ε at each (upstream: 0.99, so N − 1 of them); gradients add up over
   the timesteps and the optimiser steps once per minibatch.
5. Adaptive time weighting (upstream's, the paper's "adaptive loss weighting"): each term is computed on the
   clean-sample prediction x̂₀ = x_t − t·v^±, as ‖x̂₀ − x₀‖² / sg(mean|x̂₀ − x₀|) per sample, i.e.
   t·‖v^± − v‖²/sg(mean|v^± − v|); ``weighting="uniform"`` uses the plain ‖v^± − v‖² of eq. 8.
6. The loss is multiplied by A_max/β as upstream does (constant scales: the gradient norm stays of the same
   size whatever β, which matters for the gradient clip), plus ``kl_weight``·mean‖v_θ − v_ref‖² to the
   pretrained model (upstream ``train.beta`` = 1e-4; the reference is the adapter disabled).
7. The old policy is a slowly updated copy of the trainable weights (the LoRA adapter), updated once per
   epoch after the optimiser steps: θ_old ← η·θ_old + (1 − η)·θ with η = min(rate·max(0, s − delay), η_max),
   s the optimiser steps so far (upstream ``decay_type=1``: rate 1e-3, η_max 0.5, delay 0; ``decay_type=2``,
   used for OCR: rate 7.5e-3, η_max 0.999, delay 75). θ_old starts equal to θ.
8. ε-prediction UNets (the tiny model, SD1.5) use the same loss through the ε ↔ v relation: the DDPM forward
   process x_t = √ᾱ·x₀ + √(1 − ᾱ)·ε divided by (√ᾱ + √(1 − ᾱ)) is the rectified-flow one at
   t = √(1 − ᾱ)/(√ᾱ + √(1 − ᾱ)), so the network's ε̂ (or v- or x₀-prediction), converted to (x̂₀, ε̂) at x_t,
   gives v̂ = ε̂ − x̂₀ and the target is v = ε − x₀. v̂ is affine in the network output, so v^± of the
   converted outputs equals the conversion of the same combination of outputs; for ε-prediction
   v̂ − v = (ε̂ − ε)·(√ᾱ + √(1 − ᾱ))/√ᾱ.

Differences from upstream: upstream keeps θ_old as a second LoRA adapter and evaluates with an EMA of θ;
here θ_old is a copy of the trainable tensors swapped in for the old policy's forward passes, and
evaluation samples θ itself. Upstream trains with mixed-precision autocast; here the trainer's setting.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase

from rl4diffusion import keys
from rl4diffusion.algorithms.base import Algorithm, OptimisationStep, check_minibatch, register_algorithm
from rl4diffusion.algorithms.losses import group_advantages
from rl4diffusion.data import collect_trajectories, minibatches, terminal_rewards
from rl4diffusion.data.rollout import final_latents
from rl4diffusion.data.sampler import GroupedPromptSampler
from rl4diffusion.errors import ConfigError
from rl4diffusion.policies.steps import model_output_to_x0_eps

log = logging.getLogger(__name__)


@dataclass
class NFTConfig:
    lr: float = 3e-3
    """AdamW learning rate (upstream: 3e-4 for SD3.5-M's rank-32 LoRA; the tiny model's LoRA needs a larger step to
    move in CPU-minutes)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (upstream 1e-4)."""
    batch_size: int = 32
    """Images sampled per epoch (global): batch_size / group_size prompts × group_size samples (upstream 48 × 24)."""
    group_size: int = 4
    """K, samples per prompt (upstream: 24); ≥ 2 and must divide batch_size."""
    minibatch_size: int = 8
    """Samples per optimiser step; must divide batch_size (upstream: 1 or 2 optimiser steps per epoch)."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    beta: float = 1.0
    """β, how far the implicit policies v^± = v_old ± β(v_θ − v_old) reach (upstream 1.0; 0.1 for OCR and the
    multi-reward run)."""
    adv_clip_max: float = 5.0
    """A_max: advantages are clipped to ±A_max and mapped to r = A/(2·A_max) + ½ (upstream 5)."""
    global_std: bool = True
    """Divide advantages by the whole batch's reward std (upstream) instead of each group's."""
    std_eps: float = 1e-4
    """Added to the std in the advantage's denominator."""
    timestep_fraction: float = 0.99
    """Fraction of the sampling schedule's N timesteps each sample trains at (upstream 0.99: N − 1 of them)."""
    weighting: Literal["adaptive", "uniform"] = "adaptive"
    """Time weighting: upstream's adaptive x₀-space weighting, or the plain ‖v^± − v‖² of the paper's eq. 8."""
    kl_weight: float = 1e-4
    """Weight of mean‖v_θ − v_ref‖² to the pretrained model (upstream ``train.beta`` 1e-4; 0 skips its forward)."""
    old_decay_rate: float = 1e-3
    """The old policy's decay η grows by this per optimiser step (upstream ``decay_type=1``: 1e-3)."""
    old_decay_max: float = 0.5
    """η's ceiling (upstream 0.5; 0 keeps the old policy equal to θ, fully on-policy)."""
    old_decay_delay: int = 0
    """Optimiser steps during which η stays 0 (upstream ``decay_type=1``: 0; ``decay_type=2``: 75)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip (upstream 1.0)."""
    sampling_guidance: float | None = 1.0
    """Guidance weight of the samples NFT collects and trains on (upstream: 1, CFG-free sampling, matching the
    CFG-free training); null samples with the model's (``model.guidance_scale``). The trainer evaluates at it too,
    unless ``eval.guidance_scale`` is set. Where the model is used at its guidance, sample at it: the shapes_4k
    tuning, which evaluates at guidance 2, scores null above 1 at every learning rate."""

    def validate(self) -> None:
        if self.group_size < 2 or self.batch_size < 1 or self.batch_size % self.group_size:
            raise ConfigError(
                f"algo.group_size={self.group_size} and algo.batch_size={self.batch_size}: NFT compares the K samples "
                "of each prompt with one another, so it needs at least 2 per group and a batch of whole groups. Use "
                "a group size ≥ 2 that divides the batch size, e.g. algo.batch_size=32 algo.group_size=4."
            )
        check_minibatch(self.batch_size, self.minibatch_size)
        if not 0 < self.beta <= 1:
            raise ConfigError(f"algo.beta must be in (0, 1], got {self.beta}: it is how far the implicit policies "
                              "v± = v_old ± β(v_θ − v_old) reach (the paper uses 1 and 0.1).")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"algo.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if not 0 <= self.old_decay_max < 1:
            raise ConfigError(f"algo.old_decay_max must be in [0, 1), got {self.old_decay_max}: at 1 the old "
                              "policy would never follow the trained one.")
        if self.sampling_guidance is not None and not (math.isfinite(self.sampling_guidance)
                                                       and self.sampling_guidance >= 0):
            raise ConfigError(f"algo.sampling_guidance must be a finite guidance weight ≥ 0 (1 = CFG-free, as the "
                              f"paper samples) or null (the model's), got {self.sampling_guidance}")
        if (self.lr <= 0 or self.adv_clip_max <= 0 or self.std_eps <= 0 or self.num_inner_epochs < 1
                or self.kl_weight < 0 or self.old_decay_rate < 0 or self.old_decay_delay < 0):
            raise ConfigError("algo.lr, algo.adv_clip_max and algo.std_eps must be > 0, algo.num_inner_epochs ≥ 1, "
                              "and algo.kl_weight, algo.old_decay_rate and algo.old_decay_delay ≥ 0.")


# ---------------------------------------------------------------------------------------- pure functions
def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = clip(A, ±A_max)/(2·A_max) + ½ ∈ [0, 1] (the paper's normalisation; upstream's ``normalized_advantages``)."""
    return advantages.clamp(-adv_clip_max, adv_clip_max) / (2 * adv_clip_max) + 0.5


def old_decay(optimiser_steps: int, *, rate: float, maximum: float, delay: int) -> float:
    """η of θ_old ← η·θ_old + (1 − η)·θ after ``optimiser_steps`` steps (upstream's ``return_decay``)."""
    return 0.0 if optimiser_steps < delay else min(rate * (optimiser_steps - delay), maximum)


def nft_loss(
    velocity: torch.Tensor, old_velocity: torch.Tensor, target: torch.Tensor, t: torch.Tensor, r: torch.Tensor, *,
    beta: float, adv_clip_max: float, weighting: str = "adaptive", ref_velocity: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """DiffusionNFT's loss on one batch of noised samples — paper eq. 8 with the authors' weighting and scale.

        v⁺ = (1 − β)·v_old + β·v_θ,   v⁻ = (1 + β)·v_old − β·v_θ                         (eq. 6)
        ℓ^± = mean(t²(v^± − v)²) / sg(max(mean|t(v^± − v)|, 1e-5))    ("adaptive": x₀-space error x̂₀ − x₀)
        ℓ^± = mean((v^± − v)²)                                        ("uniform")
        loss_policy = (A_max/β) · mean_B[ r·ℓ⁺ + (1 − r)·ℓ⁻ ]                             (eq. 8)
        loss_kl     = kl_weight · mean_B mean((v_θ − v_ref)²)

    Means without a subscript are over a sample's latent elements.

    Args:
        velocity: v_θ(x_t, t, c) [B, C, h, w] (with grad); old_velocity: v_old, the same without grad.
        target: v = ε − x₀ [B, C, h, w]; t: flow time in [0, 1] [B] (x_t = (1 − t)·x₀ + t·ε).
        r: optimality probability [B] in [0, 1].
        ref_velocity: the pretrained model's v [B, C, h, w], needed when kl_weight > 0.
    Returns:
        ``loss_policy``, ``loss_kl`` (when kl_weight > 0) and detached diagnostics ``positive``, ``negative``
        (mean ℓ^±), ``old_deviation`` (mean (v_θ − v_old)²) and ``kl`` (when a reference is given).
    """
    old_velocity = old_velocity.detach()
    positive = (1 - beta) * old_velocity + beta * velocity
    negative = (1 + beta) * old_velocity - beta * velocity
    dims = tuple(range(1, velocity.dim()))
    t = t.view(-1, *([1] * len(dims)))

    def per_sample(implicit: torch.Tensor) -> torch.Tensor:
        if weighting == "uniform":
            return ((implicit - target) ** 2).mean(dim=dims)
        error = t * (implicit - target)  # = x₀ − x̂₀ with x̂₀ = x_t − t·v^±
        scale = error.detach().abs().mean(dim=dims).clamp(min=1e-5)
        return (error**2).mean(dim=dims) / scale

    positive_loss, negative_loss = per_sample(positive), per_sample(negative)
    terms = {
        "loss_policy": (adv_clip_max / beta) * (r * positive_loss + (1 - r) * negative_loss).mean(),
        "positive": positive_loss.mean().detach(),
        "negative": negative_loss.mean().detach(),
        "old_deviation": ((velocity - old_velocity) ** 2).mean().detach(),
    }
    if ref_velocity is not None:
        kl = ((velocity - ref_velocity.detach()) ** 2).mean(dim=dims)
        terms["kl"] = kl.mean().detach()
        if kl_weight > 0:
            terms["loss_kl"] = kl_weight * kl.mean()
    return terms


# ---------------------------------------------------------------------------------------- the forward process
def noised_sample(policy, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """(x_t, flow time t [B]) of clean latents x₀ noised to the schedule's ``timesteps`` [B].

    A flow model: x_t = (1 − σ)·x₀ + σ·ε and t = σ. A DDPM-trained UNet: x_t = √ᾱ·x₀ + √(1 − ᾱ)·ε, whose
    rescaling x_t/(√ᾱ + √(1 − ᾱ)) is the rectified-flow point at t = √(1 − ᾱ)/(√ᾱ + √(1 − ᾱ)).
    """
    if policy.kind == "flow":
        sigma = policy.sigmas_of(timesteps)[0]
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise, sigma
    alpha = policy.alphas_cumprod[timesteps.long()]
    a = alpha.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, (1 - alpha).sqrt() / (alpha.sqrt() + (1 - alpha).sqrt())


def as_velocity(policy, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The network output at x_t as a rectified-flow velocity v̂ = ε̂ − x̂₀ (a flow model's output is one already)."""
    if policy.kind == "flow":
        return output
    alpha = policy.alphas_cumprod[timesteps.long()]
    x0, eps = model_output_to_x0_eps(output, noisy, alpha, policy.scheduler.config.prediction_type)
    return eps - x0


# ---------------------------------------------------------------------------------------- the algorithm
@register_algorithm("nft", config=NFTConfig)
class NFT(Algorithm):
    """DiffusionNFT over the shared primitives: collect clean samples under θ_old, train v_θ on their forward process."""

    supports_grad_accumulation = False  # θ_old's decay schedule counts the optimisation steps it yields

    def __init__(self, config: NFTConfig, policy, reward, *, seed: int = 0):
        super().__init__(policy, reward, config)
        self.seed = seed
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self.order_generator = torch.Generator(device=policy.device).manual_seed(seed + 1)  # the minibatch order
        self.sampler: GroupedPromptSampler | None = None  # built on the first collect (needs the prompt count)
        self._sampler_state: dict | None = None
        self.old_weights = [p.detach().clone() for p in policy.trainable_parameters()]  # θ_old = θ at the start
        self.optimiser_steps = 0
        if self.sampling_guidance != 1:
            log.warning("algo=nft trains the conditional prediction only (CFG-free, as the paper does), but it samples "
                        "with guidance %g: the samples are not those of the model it trains. Set "
                        "algo.sampling_guidance=1 (the default) to sample as the paper does.", self.sampling_guidance)

    @property
    def sampling_guidance(self) -> float:
        """The guidance weight of the collected samples: ``algo.sampling_guidance``, or the model's when null."""
        configured = self.config.sampling_guidance
        return self.policy.config.guidance_scale if configured is None else configured

    @contextlib.contextmanager
    def old_policy(self) -> Iterator[None]:
        """Within this block the policy's trainable weights are θ_old (swapped in place, restored after)."""
        params = self.policy.trainable_parameters()
        with torch.no_grad():
            current = [p.detach().clone() for p in params]
            for p, old in zip(params, self.old_weights, strict=True):
                p.copy_(old)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(params, current, strict=True):
                    p.copy_(saved)

    def collect(self, env) -> TensorDictBase:
        """K samples per prompt from the old policy: the chains [B, T] with each chain's advantage.

        Only the clean latents x₀, the prompt and the advantage are trained on; the chains are returned whole so
        that the trainer logs and checks their rewards as for every online method."""
        rank, world = (self.distributed.rank, self.distributed.world) if self.distributed is not None else (0, 1)
        if self.sampler is None:
            self.sampler = GroupedPromptSampler(len(env.prompts), self.config.group_size, seed=self.seed,
                                                rank=rank, world_size=world, state=self._sampler_state)
        self.remember_prompts(env.prompts)
        prompt_ids, group_ids = self.sampler.sample(env.batch_size[0])
        with self.old_policy(), self.policy.sampling_settings(guidance_scale=self.sampling_guidance):
            batch = collect_trajectories(env, self.policy, prompt_ids=prompt_ids, generator=self.generator)
        # statistics over the global batch (all processes), then this process's share
        rewards = self.gather(terminal_rewards(batch))
        all_groups = self.gather(group_ids.to(rewards.device))
        advantages = group_advantages(rewards, all_groups, self.config.std_eps, self.config.global_std)
        batch[keys.ADVANTAGE] = self.local_part(advantages)[:, None].expand(batch.shape)  # (B, T)
        return batch

    def optimisation_steps(self, batch: TensorDictBase) -> Iterator[OptimisationStep]:
        """One step per minibatch of samples; its micro-batches are the samples' randomly picked timesteps."""
        cfg, timesteps = self.config, self.policy.timesteps
        trained = max(1, int(len(timesteps) * cfg.timestep_fraction))
        minibatch = cfg.minibatch_size // self.world  # sizes are global: each process holds its share
        clean = TensorDict({keys.LATENTS: final_latents(batch), keys.PROMPT_ID: batch[keys.PROMPT_ID][:, 0],
                            keys.ADVANTAGE: batch[keys.ADVANTAGE][:, 0]}, batch_size=batch.shape[:1], device=batch.device)
        for _ in range(cfg.num_inner_epochs):
            for index in minibatches(clean.shape[0], minibatch, generator=self.order_generator, device=clean.device):
                samples = clean[index]
                order = torch.rand((samples.shape[0], len(timesteps)), generator=self.generator,
                                   device=batch.device).argsort(dim=1)[:, :trained]  # (M, k) schedule positions
                micro = []
                for j in range(trained):
                    step = samples.clone(recurse=False)
                    step[keys.TIMESTEP] = timesteps[order[:, j]]
                    micro.append(step)
                self.optimiser_steps += 1
                yield OptimisationStep(micro)

    def loss_terms(self, micro: TensorDictBase) -> dict[str, torch.Tensor]:
        policy, cfg = self.policy, self.config
        micro = self.with_conditioning(micro)
        x0, timesteps = micro[keys.LATENTS], micro[keys.TIMESTEP]
        noise = torch.randn(x0.shape, generator=self.generator, device=x0.device)
        noisy, t = noised_sample(policy, x0, noise, timesteps)
        state = micro.clone(recurse=False).set(keys.LATENTS, noisy)

        def velocity(**options) -> torch.Tensor:  # the conditional prediction only: training is CFG-free
            return as_velocity(policy, policy.predict_from_td(state, guidance_scale=1.0, **options), noisy, timesteps)

        with torch.no_grad():  # before v_θ's forward: the weight swap must not touch tensors saved for backward
            with self.old_policy():
                old = velocity()
            ref = velocity(use_reference=True) if cfg.kl_weight > 0 else None
        r = optimality_probability(micro[keys.ADVANTAGE], cfg.adv_clip_max)
        terms = nft_loss(velocity(), old, noise - x0, t, r, beta=cfg.beta, adv_clip_max=cfg.adv_clip_max,
                         weighting=cfg.weighting, ref_velocity=ref, kl_weight=cfg.kl_weight)
        terms["optimality"] = r.mean().detach()
        return terms

    def end_update(self) -> dict[str, float]:
        """After the epoch's optimiser steps: θ_old ← η·θ_old + (1 − η)·θ (upstream updates once per epoch)."""
        cfg = self.config
        decay = old_decay(self.optimiser_steps, rate=cfg.old_decay_rate, maximum=cfg.old_decay_max,
                          delay=cfg.old_decay_delay)
        with torch.no_grad():
            for old, p in zip(self.old_weights, self.policy.trainable_parameters(), strict=True):
                old.mul_(decay).add_(p.detach().to(old.device), alpha=1 - decay)
        return {"diag/old_decay": decay}

    def state_dict(self) -> dict:
        sampler = self.sampler.state_dict() if self.sampler is not None else self._sampler_state
        return {
            "generator": self.generator.get_state(),
            "order_generator": self.order_generator.get_state(),
            "old_weights": [w.cpu() for w in self.old_weights],
            "optimiser_steps": torch.tensor(self.optimiser_steps),
            **({"sampler": sampler} if sampler is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order_generator.set_state(state["order_generator"])
        for old, saved in zip(self.old_weights, state["old_weights"], strict=True):
            old.copy_(saved)
        self.optimiser_steps = int(state["optimiser_steps"])
        self._sampler_state = state.get("sampler")
        if self.sampler is not None and self._sampler_state is not None:
            self.sampler.load_state_dict(self._sampler_state)
