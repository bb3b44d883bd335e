"""DRaFT — Direct Reward Fine-Tuning (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on
Differentiable Rewards", arXiv 2309.17400). No official code; implemented from the paper.

    DRaFT      backpropagate r(x₀) through the whole sampling chain (Alg. 1), every UNet call
               checkpointed so memory stays ~constant in N;
    DRaFT-K    stop-gradient before the last K steps (Sec. 4.1): only steps N−K … N−1 carry grad
               (``algo.k=K``; K = 0 or null is the full chain). K = 1 works best in the paper;
    DRaFT-LV   (K = 1, Sec. 4.2, Alg. 2) sample x₀ without grad, then n times re-noise it to the
               last sampling timestep t_{N−1}, x̃ = √ᾱ·sg(x₀) + √(1−ᾱ)·ε, and denoise that one
               step with grad; the n reward gradients are averaged (``algo.lv=true``, ``algo.lv_n=2``).

Flow-matching models (SD3, ``model=tiny_flow``): the chain is the flow's sampler (``backprop.py``: Euler
steps x_next = x + (σ_next − σ)·v̂_θ at ``algo.eta=0``, Flow-GRPO's SDE step at the model's noise level
otherwise) and DRaFT-LV re-noises by the rectified-flow forward process x̃ = (1 − σ)·sg(x₀) + σ·ε at the
last step's σ.

Implementation details:
1. Loss = −scale · mean(r): the mean over the minibatch (and over the n re-noisings for LV).
   The paper sums the n LV gradients; averaging only rescales it (and Adam ignores the scale).
2. Step noise inside the window is reparameterised (x_{i+1} = μ_θ(x_i) + σ z): gradients flow
   through μ and the latents linking the window's steps, never through z.
3. The n re-noisings of LV run as one batch [n·M] through one UNet call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase

from rl4diffusion import keys
from rl4diffusion.algorithms.backprop import BackpropConfig, RewardBackprop, chain_noise, extra_conditioning
from rl4diffusion.algorithms.base import register_algorithm
from rl4diffusion.errors import ConfigError


@dataclass
class DRaFTConfig(BackpropConfig):
    """DRaFT's options (the shared ones are ``BackpropConfig``'s): ``k=0`` backpropagates through the whole chain
    (DRaFT), ``k=1 lv=true`` is DRaFT-LV. The paper (as restated by a reimplementation): lr 4e-4 with LoRA rank 8,
    weight decay 0.1, 50 DDIM steps at guidance 7.5."""

    k: int | None = 1
    """Backpropagate through the last K steps only (DRaFT-K; paper: K = 1 works best); 0 or null = the whole chain."""
    lv: bool = False
    """DRaFT-LV: re-noise the no-grad sample lv_n times and backpropagate one step each (requires k=1)."""
    lv_n: int = 2
    """Re-noisings per sample for DRaFT-LV (paper: 2)."""
    loss_scale: float = 1.0
    """Multiplier on −mean(r)."""

    def validate(self) -> None:
        super().validate()
        if self.k is not None and self.k < 0:
            raise ConfigError(f"algo.k must be ≥ 1 (DRaFT-K) or 0/null (the whole chain), got {self.k}.")
        if self.lv and self.k != 1:
            raise ConfigError(f"algo.lv=true is DRaFT-LV, defined for K = 1; set algo.k=1 (got algo.k={self.k}).")
        if self.lv_n < 1:
            raise ConfigError(f"algo.lv_n must be ≥ 1, got {self.lv_n}.")


def draft_loss(rewards: torch.Tensor, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """DRaFT's objective, maximise E[r(x₀, c)] (paper eq. 2): ``loss_reward`` = −scale · mean(r).

    Args:
        rewards: [B] (or [n·B] for LV) with the graph to the parameters.
    """
    return {"loss_reward": -scale * rewards.mean()}


def draft_grad_start(num_steps: int, k: int | None) -> int:
    """Index of the first step with grad: N − K for DRaFT-K, 0 for the full chain (K = 0/None)."""
    if not k:
        return 0
    if k > num_steps:
        raise ConfigError(f"algo.k={k} exceeds the {num_steps} sampling steps (model.num_steps); use k ≤ {num_steps} "
                          "or k=0 for the whole chain.")
    return num_steps - k


def lv_renoise(x0: torch.Tensor, alpha_bar: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """DRaFT-LV's re-noising (Alg. 2): x̃ = √ᾱ · sg(x₀) + √(1 − ᾱ) · ε, ε ~ N(0, I).

    Args:
        x0: the no-grad sample [B, C, h, w] (broadcasts against ``noise`` [n, B, C, h, w]).
        alpha_bar: ᾱ at the last sampling timestep t_{N−1}.
        noise: ε.
    """
    a = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    return a.sqrt() * x0.detach() + (1 - a).sqrt() * noise


@register_algorithm("draft", config=DRaFTConfig)
class DRaFT(RewardBackprop):
    def __init__(self, config: DRaFTConfig, policy, reward, *, seed: int = 0):
        super().__init__(config, policy, reward, seed=seed)
        self.grad_start = draft_grad_start(self.num_steps, config.k)  # fails at start-up if k > N

    def lv_rewards(self, x0, prompt_embeds, prompt_ids, renoise: torch.Tensor, step_noise: torch.Tensor,
                   conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Rewards [n·M] of the n one-step denoisings of re-noised x₀ (ε = ``renoise`` [n, M, C, h, w],
        the last step's z = ``step_noise`` [n, M, C, h, w]); the graph runs through that one step.
        ``conditioning``: the denoiser's inputs beyond prompt_embeds, [M, ...] each (a flow model's pooled ones)."""
        conditioning = conditioning or {}
        n, m = renoise.shape[:2]
        last = self.num_steps - 1
        t = self.policy.timesteps[last]
        if self.policy.kind == "flow":  # the rectified-flow forward process at the last step's σ
            sigma = self.policy.sigmas_of(t.reshape(1))[0]
            noisy = (1 - sigma) * x0.detach() + sigma * renoise
        else:
            noisy = lv_renoise(x0, self.policy.alphas_cumprod[t], renoise)
        noisy = noisy.flatten(0, 1)  # (n·M, C, h, w), re-noising j at rows j·M …
        conditioning = {key: value.repeat(n, *([1] * (value.dim() - 1))) for key, value in conditioning.items()}
        out = self.window(noisy, prompt_embeds.repeat(n, 1, 1), grad_start=last, start=last,
                          noise=step_noise.flatten(0, 1)[None], conditioning=conditioning)  # noise [1, n·M, …]
        return self.score(out.latents, prompt_ids.repeat(n))

    def loss(self, minibatch: TensorDictBase) -> dict[str, torch.Tensor]:
        cfg = self.config
        x_T, embeds, ids = minibatch[keys.LATENTS], minibatch[keys.PROMPT_EMBEDS], minibatch[keys.PROMPT_ID]
        conditioning = extra_conditioning(self.policy, minibatch)
        if cfg.lv:
            x0 = self.window(x_T, embeds, grad_start=self.num_steps, conditioning=conditioning).latents  # no grad
            renoise = chain_noise(self.policy, cfg.lv_n, x0.shape, self.generator)
            step_noise = chain_noise(self.policy, cfg.lv_n, x0.shape, self.generator)
            rewards = self.lv_rewards(x0, embeds, ids, renoise, step_noise, conditioning)
            grad_steps = 1
        else:
            out = self.window(x_T, embeds, grad_start=self.grad_start, conditioning=conditioning)
            rewards = self.score(out.latents, ids)
            grad_steps = out.grad_steps
        return {**draft_loss(rewards, scale=cfg.loss_scale), "rewards": rewards,
                "grad_steps": torch.tensor(float(grad_steps))}
