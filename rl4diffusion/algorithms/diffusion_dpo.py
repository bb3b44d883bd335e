"""Diffusion-DPO (Wallace et al. 2024, arXiv 2311.12908) and its SFT baseline.

DPO's Bradley–Terry likelihood on a preference pair (c, x₀ʷ, x₀ˡ), with the intractable
log-likelihood ratio of the whole chain replaced by one noised step: both images are noised
to the **same** t and with the **same** ε, and the policy is rewarded for denoising the
winner better (relative to the frozen reference) than the loser.
Reference implementation: SalesforceAIResearch/DiffusionDPO ``train.py``.

Notation: m = mean_CHW (ε_θ(x_t, c, t) − ε)², m_ref the same with the reference network.

    u = −½·β·[(m_w − m_l) − (m_ref,w − m_ref,l)]          (the implicit reward margin)
    L_DPO = −mean log σ(u)                               (paper eq. 14 with T·ω(λ_t) folded into β)
    implicit accuracy = mean[u > 0]

Implementation details:
1. t ~ U{0..T_train−1} and ε ~ N(0, I) are shared by winner and loser (one forward of 2B).
2. The prediction is *conditional* (no classifier-free guidance) for policy and reference,
   as upstream trains; ``caption_dropout`` replaces a pair's caption with "" (paper: 20 %).
3. The reference is the same network with the LoRA adapter disabled (``policy.reference()``),
   or the frozen copy when ``model.train_mode=full`` — never a second copy under LoRA.
4. The paper's weighting T·ω(λ_t) is a constant folded into β (upstream does the same).
5. Data: a Pick-a-Pic-style parquet (``algo.dataset``) or, when unset, AI-feedback pairs
   generated from the base model and the run's reward at the first ``collect`` (cached,
   ``rl4diffusion.data.preferences``). ``collect`` samples pairs from the shared replay buffer
   (without replacement: epochs over the dataset); the environment is not stepped. Generated
   pairs cost their reward queries (2 per pair, plus ties) once per run, also when read from
   the cache, so ``reward_queries`` compares fairly with the online methods.
6. SFT (``algo=sft``): the plain denoising loss on the winners only (the paper's baseline).

Flow-matching models (SD3, ``model=tiny_flow``): the flow form of the loss, Flow-DPO (Liu et al. 2025,
"Improving Video Generation with Human Feedback", arXiv 2501.13918, Sec. 5). Winner and loser are noised
with the same σ and ε along the rectified-flow path, and the velocity errors replace the ε errors:

    x_σ = (1 − σ)·x₀ + σ·ε,   v = ε − x₀,   m = mean_CHW (v_θ(x_σ, 1000σ, c) − v)²,   σ ~ U(0, 1)
    u = −½·β·[(m_w − m_l) − (m_ref,w − m_ref,l)],   L = −mean log σ(u)          (the same β convention)

At a fixed x_σ the converted predictions satisfy ε̂ − ε = (1 − σ)(v̂ − v), so the ε form is this loss with
β_σ = β·(1 − σ)². Flow-DPO derives that time-dependent β_σ and reports that it over-optimises at high noise
(where (1 − σ)² makes the tie to the reference weak) and hacks the reward, so it uses a constant β, as here. σ is drawn
uniformly, as Diffusion-DPO draws t uniformly (SD3's own pre-training draws it logit-normal). DMPO and SFT
share this forward pass; DPO-C&M and SDPO refuse flow models (their importance weight is defined on the
DDPM posterior, see ``sdpo.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase

from rl4diffusion import keys
from rl4diffusion.algorithms.base import Algorithm, OptimisationStep, check_minibatch, register_algorithm
from rl4diffusion.data import make_replay_buffer, minibatches
from rl4diffusion.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class PreferenceConfig:
    """Options shared by every preference method (SFT, Diffusion-DPO, DMPO, DPO-C&M, SDPO: the same step, so a
    comparison is about the method)."""

    lr: float = 3e-4
    """AdamW learning rate (Diffusion-DPO: 2.048e-5 = 1e-8 per sample × 2048 effective batch, full UNet). Tiny model,
    200 epochs, paired win rate vs base (24 samples × 20 prompts, seed 0): Diffusion-DPO lr 3e-3 53.1 %, 1e-3 55.4 %,
    3e-4 56.7 %; DMPO 3e-4 62 % over 3 seeds, 1e-3 60 % in the shapes suite."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    batch_size: int = 32
    """Pairs drawn from the replay buffer per epoch (one ``collect``; paper: effective batch 2048)."""
    minibatch_size: int = 16
    """Pairs per optimiser step; must divide batch_size."""
    num_inner_epochs: int = 1
    """Passes over each epoch's pairs."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    caption_dropout: float = 0.0
    """Probability of training a pair with the empty caption (paper: 0.2)."""
    dataset: str | None = None
    """Pick-a-Pic-style parquet file or directory; None = generate AI-feedback pairs at start-up."""
    num_pairs: int = 256
    """Pairs generated from the base model and the reward when ``dataset`` is None."""
    min_margin: float = 0.0
    """Generated pairs whose rewards differ by at most this (reward units) count as ties and are skipped."""
    max_pairs: int | None = None
    """Use at most this many pairs of the dataset (None = all)."""
    cache_dir: str | None = None
    """Cache of encoded latents and generated pairs (None = $RL4DIFFUSION_CACHE or ~/.cache/rl4diffusion)."""
    generation_batch_size: int = 32
    """Pairs sampled per batch when generating AI-feedback pairs (also images per VAE call when encoding)."""

    def validate(self) -> None:
        check_minibatch(self.batch_size, self.minibatch_size)
        if self.lr <= 0 or self.num_inner_epochs < 1 or self.max_grad_norm <= 0:
            raise ConfigError("algo.lr and algo.max_grad_norm must be > 0 and algo.num_inner_epochs ≥ 1")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"algo.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.num_pairs < 1 or (self.max_pairs is not None and self.max_pairs < 1) or self.generation_batch_size < 1:
            raise ConfigError("algo.num_pairs, algo.max_pairs and algo.generation_batch_size must be ≥ 1")
        if self.min_margin < 0:
            raise ConfigError(f"algo.min_margin must be ≥ 0, got {self.min_margin}")


@dataclass
class DiffusionDPOConfig(PreferenceConfig):
    beta: float = 2000.0
    """DPO's β (paper: 2000 for SD1.5, 5000 for SDXL and in the launchers)."""

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"algo.beta must be > 0, got {self.beta}")


# ---------------------------------------------------------------------------------------- pure losses
def preference_margin(
    model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """u = −½·β·[(m_w − m_l) − (m_ref,w − m_ref,l)] per pair [B] (Diffusion-DPO eq. 14's sigmoid argument)."""
    return -0.5 * beta * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))


def diffusion_dpo_loss(
    model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, *,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Diffusion-DPO on per-sample denoising errors — Wallace et al. 2024, eq. 14.

    Args:
        model_err_w, model_err_l: mean_CHW (ε_θ − ε)² of winner and loser [B] (with grad).
        ref_err_w, ref_err_l: the same for the frozen reference [B].
        beta: β.
    Returns:
        ``loss_dpo`` = −mean log σ(u); diagnostics ``implicit_accuracy`` = mean[u > 0] and ``margin`` = mean u.
    """
    u = preference_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    return {
        "loss_dpo": -F.logsigmoid(u).mean(),
        "implicit_accuracy": (u > 0).float().mean().detach(),
        "margin": u.mean().detach(),
    }


def sft_loss(model_err_w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Supervised fine-tuning on the preferred images: ``loss_sft`` = mean m_w (the DDPM loss, Ho et al. eq. 14)."""
    return {"loss_sft": model_err_w.mean()}


# ---------------------------------------------------------------------------------------- shared pieces
class PairForward(NamedTuple):
    """One noised forward pass over a minibatch of M pairs; rows [:M] are winners, [M:] losers."""

    model_err: torch.Tensor  # [2M] with grad
    ref_err: torch.Tensor | None  # [2M]
    x0: torch.Tensor  # [2M, C, h, w]
    noisy: torch.Tensor  # x_t [2M, C, h, w]
    model_output: torch.Tensor  # policy prediction, detached [2M, C, h, w]
    timesteps: torch.Tensor  # [2M]


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network regresses: ε, v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022), or x₀."""
    a = alpha_t.view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ConfigError(f"unsupported scheduler prediction_type {prediction_type!r}: epsilon, v_prediction or sample")


@register_algorithm("diffusion_dpo", config=DiffusionDPOConfig)
class DiffusionDPO(Algorithm):
    """Diffusion-DPO over pairs sampled from the shared replay buffer; subclasses change ``loss_terms``."""

    uses_reference = True

    def __init__(self, config: PreferenceConfig, policy, reward, *, seed: int = 0):
        super().__init__(policy, reward, config)
        self.seed = seed
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self.sampler_generator = torch.Generator(device=policy.device).manual_seed(seed + 1)
        self.data = None
        self.buffer = None
        self._pending_sampler_state = None
        self._feedback_counted = False  # AI-feedback pairs' reward queries added to reward.queries (once per run)
        if config.dataset:
            self._load_data(config.dataset)

    # ------------------------------------------------------------------ data
    def _load_data(self, path) -> None:
        from rl4diffusion.data.preferences import load_preference_pairs

        cfg = self.config
        self.data = load_preference_pairs(path, self.policy, cache_dir=cfg.cache_dir, max_pairs=cfg.max_pairs,
                                          batch_size=cfg.generation_batch_size)
        self.buffer = make_replay_buffer(len(self.data), cfg.batch_size, device=self.policy.device,
                                         without_replacement=True, generator=self.sampler_generator)
        self.buffer.extend(self.data.pairs.to(self.policy.device))
        if self._pending_sampler_state is not None:
            self.buffer.sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None

    def collect(self, env) -> TensorDictBase:
        """A batch [B] of pairs from the replay buffer (the dataset is loaded or generated on first call)."""
        if self.data is None:
            from rl4diffusion.data.preferences import ensure_generated_pairs, generation_stats

            cfg = self.config
            before = self.reward.queries
            path = ensure_generated_pairs(self.policy, self.reward, env.prompts, cfg.num_pairs, seed=self.seed,
                                          cache_dir=cfg.cache_dir, batch_size=cfg.generation_batch_size,
                                          min_margin=cfg.min_margin)
            # the pairs cost their reward queries once per run, whether generated now or read from the cache;
            # every process generates the same pairs, and the trainer counts queries × processes
            spent = 0 if self._feedback_counted else int(generation_stats(path).get("reward_queries", 0)) // self.world
            self.reward.queries = before + spent
            self._feedback_counted = True
            self._load_data(path)
        batch = self.buffer.sample()  # the global batch: the same on every process (same generator)
        prompts = self.data.prompts_of(batch[keys.PROMPT_ID])
        batch[keys.PROMPT_EMBEDS] = self.policy.encode_prompts(prompts)
        batch.update(self.policy.extra_conditioning(prompts))  # a flow model's pooled embeddings
        return batch

    # ------------------------------------------------------------------ the forward pass
    def pair_forward(self, pairs: TensorDictBase, *, winners_only: bool = False) -> PairForward:
        """Noise winner and loser to the same t with the same ε; denoising errors of policy (and reference).

        DDIM-style models: t ~ U{0..T−1}, x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε and the scheduler's target (ε, v or x₀).
        Flow models: σ ~ U(0, 1) at timestep 1000σ, x_σ = (1 − σ)x₀ + σε and the velocity v = ε − x₀.
        The draws are made for the global minibatch and sliced (``local_part``), so a process's pairs get
        the t and ε they would get in a one-process run.
        """
        policy, m = self.policy, pairs.shape[0] * self.world
        embeds = pairs[keys.PROMPT_EMBEDS]
        conditioning = {key: pairs[key] for key in policy.extra_conditioning_keys}  # a flow model's pooled embeds
        if self.config.caption_dropout > 0:
            drop = self.local_part(torch.rand(m, generator=self.generator, device=embeds.device))
            dropped = drop < self.config.caption_dropout
            embeds = torch.where(dropped[:, None, None], policy.negative_embeds.to(embeds.dtype), embeds)
            negative = policy.extra_conditioning([policy.config.negative_prompt])
            conditioning = {key: torch.where(dropped.view(-1, *([1] * (value.dim() - 1))),
                                             negative[key].to(value.dtype), value)
                            for key, value in conditioning.items()}
        flow = policy.kind == "flow"
        if flow:  # σ ~ U(0, 1); the transformer's timestep is σ·T_train (1000σ)
            t = self.local_part(torch.rand(m, generator=self.generator, device=embeds.device))
            t = t * policy.scheduler.config.num_train_timesteps
        else:
            t = self.local_part(torch.randint(0, policy.alphas_cumprod.numel(), (m,), generator=self.generator,
                                              device=embeds.device))
        noise = self.local_part(torch.randn((m, *pairs[keys.LATENTS_W].shape[1:]), generator=self.generator,
                                            device=embeds.device))
        copies = 1 if winners_only else 2
        x0 = pairs[keys.LATENTS_W] if winners_only else torch.cat([pairs[keys.LATENTS_W], pairs[keys.LATENTS_L]])
        t, noise, embeds = t.repeat(copies), noise.repeat(copies, 1, 1, 1), embeds.repeat(copies, 1, 1)  # (2M, …)
        conditioning = {key: value.repeat(copies, *([1] * (value.dim() - 1))) for key, value in conditioning.items()}
        if flow:
            sigma = (t / policy.scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
            noisy = (1 - sigma) * x0 + sigma * noise  # the rectified-flow path (SD3)
            target = noise - x0  # the velocity v = ε − x₀
        else:
            alpha = policy.alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise  # q(x_t | x₀) — DDPM eq. 4
            target = training_target(x0, noise, alpha.view(-1), policy.scheduler.config.prediction_type)
        output = policy.predict_noise(noisy, t, embeds, guidance_scale=1.0, **conditioning)
        model_err = ((output - target) ** 2).mean(dim=(1, 2, 3))
        ref_err = None
        if self.uses_reference:
            with torch.no_grad():  # the frozen reference's conditional prediction
                ref_out = policy.predict_noise(noisy, t, embeds, guidance_scale=1.0, use_reference=True, **conditioning)
            ref_err = ((ref_out - target) ** 2).mean(dim=(1, 2, 3))
        return PairForward(model_err, ref_err, x0, noisy, output.detach(), t)

    def loss_terms(self, pairs: TensorDictBase) -> dict[str, torch.Tensor]:
        fwd = self.pair_forward(pairs)
        mw, ml = fwd.model_err.chunk(2)
        rw, rl = fwd.ref_err.chunk(2)
        terms = diffusion_dpo_loss(mw, ml, rw, rl, beta=self.config.beta)
        return {**terms, **error_diagnostics(mw, ml, rw, rl)}

    # ------------------------------------------------------------------ the update
    def optimisation_steps(self, batch: TensorDictBase) -> Iterator[OptimisationStep]:
        """One optimiser step per minibatch of pairs, ``num_inner_epochs`` shuffled passes over the batch.

        Every process holds the global batch and trains on its share of each minibatch.
        """
        for _ in range(self.config.num_inner_epochs):
            for index in minibatches(batch.shape[0], self.config.minibatch_size, generator=self.generator,
                                     device=batch.device):
                yield OptimisationStep([self.local_part(batch[index])])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        sampler = self.buffer.sampler.state_dict() if self.buffer is not None else self._pending_sampler_state
        return {
            "generator": self.generator.get_state(),
            "sampler_generator": self.sampler_generator.get_state(),
            "sampler": dict(sampler) if sampler is not None else None,
            "feedback_counted": torch.tensor(self._feedback_counted),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.sampler_generator.set_state(state["sampler_generator"])
        self._feedback_counted = bool(state["feedback_counted"])
        if state.get("sampler") is None:
            return
        if self.buffer is not None:
            self.buffer.sampler.load_state_dict(state["sampler"])
        else:  # the dataset is generated at the first collect: restore the sampler then
            self._pending_sampler_state = state["sampler"]


def error_diagnostics(mw, ml, rw, rl) -> dict[str, torch.Tensor]:
    """How much the policy improved on winners and losers relative to the reference (positive = lower error)."""
    return {"winner_gain": (rw - mw).mean().detach(), "loser_gain": (rl - ml).mean().detach(),
            "model_err_w": mw.mean().detach(), "model_err_l": ml.mean().detach()}


@register_algorithm("sft", config=PreferenceConfig)
class SFT(DiffusionDPO):
    """Supervised fine-tuning on the preferred images only (Diffusion-DPO's baseline); no reference pass."""

    uses_reference = False

    def loss_terms(self, pairs: TensorDictBase) -> dict[str, torch.Tensor]:
        fwd = self.pair_forward(pairs, winners_only=True)
        return sft_loss(fwd.model_err)
