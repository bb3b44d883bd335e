"""The stochastic denoising steps with their Gaussian log-probabilities — pure functions.

(DDIM for ε/v-prediction models below; the flow-matching SDE step is ``flow_sde_step_with_log_prob``.)

Notation (DDIM, Song et al. 2021, eq. 12 and 16; DDPO, Black et al. 2023, Sec. 4):
    x_t      noisy latents at scheduler timestep t
    t'       the next (less noisy) timestep, t' = t − T_train / N
    ᾱ_t      cumulative product of alphas (``scheduler.alphas_cumprod``)
    ε̂        (guided) noise prediction; x̂₀ the one-step clean-sample prediction
    σ_t(η)   η · sqrt[(1 − ᾱ_t') / (1 − ᾱ_t) · (1 − ᾱ_t / ᾱ_t')]
    μ        sqrt(ᾱ_t') x̂₀ + sqrt(1 − ᾱ_t' − σ_t²) ε̂
    x_t'     μ + σ_t z,   z ~ N(0, I)

The log-probability of the action x_t' is the diagonal Gaussian density N(x_t'; μ, σ_t² I),
reduced over the latent dimensions with ``reduction="mean"`` (DDPO's convention: summing over
16k dimensions gave NaNs upstream, jannerm/ddpo#10) or ``"sum"`` (the true log-density).
Gradients flow through μ only: the sampled action is treated as data.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

Reduction = Literal["mean", "sum"]


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_t'  [B, C, H, W]
    log_prob: torch.Tensor  # log N(x_t'; μ, σ²) reduced over C, H, W  [B]
    mean: torch.Tensor  # μ  [B, C, H, W]
    std: torch.Tensor  # σ_t  [B, 1, 1, 1]
    pred_x0: torch.Tensor  # x̂₀  [B, C, H, W]


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample vector [B] (or scalar) against a batch of latents [B, C, H, W]."""
    values = values.to(device=like.device, dtype=like.dtype)
    if values.dim() == 0:
        values = values.expand(like.shape[0])
    return values.view(-1, *([1] * (like.dim() - 1)))


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """log N(x; mean, std² I) reduced over all non-batch dims. ``std`` broadcasts against x.

    Where std == 0 the step is deterministic and carries no action: its log-probability is 0.
    """
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    elementwise = -((x.detach() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    elementwise = torch.where(std > 0, elementwise, torch.zeros_like(elementwise))
    dims = tuple(range(1, x.dim()))
    return elementwise.mean(dim=dims) if reduction == "mean" else elementwise.sum(dim=dims)


def ddim_alphas(
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor | float,
    timestep: torch.Tensor,
    step_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_t') for per-sample timesteps [B]; t' = t − step_size, and t' < 0 uses the final alpha."""
    timestep = timestep.long().to(alphas_cumprod.device)
    prev = timestep - step_size
    alpha_t = alphas_cumprod[timestep]
    final = torch.as_tensor(final_alpha_cumprod, dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    alpha_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
    return alpha_t, alpha_prev


def model_output_to_x0_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert an ε-, v- or x₀-prediction into (x̂₀, ε̂) — DDIM eq. (9), Salimans & Ho 2022 for v."""
    a = _per_sample(alpha_t, sample)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output
        eps = a.sqrt() * model_output + (1 - a).sqrt() * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")
    return x0, eps


def ddim_step_with_log_prob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    *,
    eta: float,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """One stochastic DDIM step x_t → x_t' and log p(x_t' | x_t).

    Args:
        model_output: the network's (guided) prediction [B, C, H, W].
        sample: x_t [B, C, H, W].
        alpha_t, alpha_prev: ᾱ_t and ᾱ_t' per sample [B] (see ``ddim_alphas``).
        eta: DDIM's η (1 = DDPM-like variance; 0 = deterministic).
        prev_sample: if given, the action whose log-probability to compute (training);
            otherwise x_t' is sampled with ``noise`` or ``generator``.
        clip_sample_range: clamp x̂₀ to ±range, as DDIMScheduler does when clip_sample=True.
        reduction: "mean" (DDPO) or "sum" over latent dimensions.
    """
    # 1. x̂₀ and ε̂ from the model output — DDIM eq. (12), "predicted x₀"
    x0, eps = model_output_to_x0_eps(model_output, sample, alpha_t, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    a_t, a_prev = _per_sample(alpha_t, sample), _per_sample(alpha_prev, sample)
    # 2. σ_t(η) — DDIM eq. (16)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    # 3. the mean: "direction pointing to x_t" plus the rescaled x̂₀ — DDIM eq. (12)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    # 4. sample the action unless it is given
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = mean + std * noise
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduction)
    return StepOutput(prev_sample, log_prob, mean, std, x0)


def flow_sde_step_with_log_prob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    noise_level: float,
    sigma_cap: float | None = None,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """One step of the flow-matching ODE turned SDE, σ → σ_next, and log p(x_next | x_σ).

    Rectified flow (SD3): x_σ = (1 − σ) x₀ + σ ε, the network predicts the velocity
    v = ε − x₀, and the deterministic Euler step is x_next = x + v·Δt with Δt = σ_next − σ < 0.
    Flow-GRPO (Liu et al. 2025, eq. 8–9) replaces the ODE by the SDE with the same marginals:

        s_t    = a · sqrt(σ / (1 − σ))                         diffusion coefficient, a = noise_level
        μ      = x + [v + s_t² / (2σ) · (x + (1 − σ) v)] · Δt
        x_next = μ + s_t · sqrt(−Δt) · z,   z ~ N(0, I)

    With ``noise_level = 0`` this is exactly ``FlowMatchEulerDiscreteScheduler.step``.

    Args:
        model_output: the (guided) velocity prediction v̂ [B, C, H, W].
        sample: x at noise level σ [B, C, H, W].
        sigma, sigma_next: σ and the next (smaller) σ per sample [B] (or scalars).
        noise_level: a (0.7 in Flow-GRPO; 0 = the ODE).
        sigma_cap: σ is capped at this value inside s_t only. The first σ of a schedule is often
            exactly 1, where sqrt(σ / (1 − σ)) is infinite; Flow-GRPO's code uses the schedule's
            second σ there, which is what the policy passes.
        prev_sample: the action whose log-probability to compute (training); otherwise sampled.
        reduction: "mean" (DDPO's convention) or "sum" over latent dimensions.
    """
    s, s_next = _per_sample(sigma, sample), _per_sample(sigma_next, sample)
    dt = s_next - s  # (B, 1, 1, 1), negative: the chain runs from σ = 1 (noise) to σ = 0 (data)
    # 1. the diffusion coefficient s_t = a sqrt(σ / (1 − σ)), with σ capped below 1
    s_capped = s.clamp(max=sigma_cap) if sigma_cap is not None else s
    diffusion = noise_level * (s / (1 - s_capped)).sqrt() if noise_level > 0 else torch.zeros_like(s)  # a = 0: the ODE
    # 2. the SDE's mean: the Euler step plus the score correction s_t²/(2σ)·(x + (1 − σ) v)
    mean = sample + (model_output + diffusion**2 / (2 * s) * (sample + (1 - s) * model_output)) * dt
    std = diffusion * (-dt).clamp(min=0).sqrt()
    # 3. sample the action unless it is given
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = mean + std * noise
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduction)
    pred_x0 = sample - s * model_output  # x̂₀ = x − σ v
    return StepOutput(prev_sample, log_prob, mean, std, pred_x0)
