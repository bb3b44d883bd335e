"""DPO-C&M and SDPO — importance-weighted Diffusion-DPO (Yang, Tan et al. 2025, arXiv 2505.21893). EXPERIMENTAL.

**Experimental.** No official code was available to check against, and the authors' v2 flags an
error in their main theorem. Both methods are implemented as described below; whether they
beat Diffusion-DPO here is measured in ``benchmarks/preference_winrate.py``, not assumed.

Diffusion-DPO trains on chains drawn from the forward process q(x_{1:T} | x₀) of an offline
pair, not from the model: off-policy. The per-step importance weight of a training step is

    w_t = p_θ(x_{t−1} | x_t, c) / q(x_{t−1} | x_t, x₀)

with both densities Gaussian (notation: α_t = ᾱ_t/ᾱ_{t−1}, β_t = 1 − α_t):
* q(x_{t−1} | x_t, x₀) = N(μ̃(x_t, x₀), β̃_t I), μ̃ = √ᾱ_{t−1} β_t/(1−ᾱ_t) x₀ + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) x_t,
  β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t  (DDPM eq. 6–7);
* p_θ(x_{t−1} | x_t, c) = N(μ̃(x_t, x̂₀), β̃_t I), the model's DDPM reverse step with x̂₀ its one-step
  prediction (equivalently DDIM with η = 1 at stride 1; DDPM eq. 11 with σ_t² = β̃_t).
A sample x_{t−1} ~ q is drawn and log w_t = reduce_CHW[log p_θ(x_{t−1}) − log q(x_{t−1})].

Choices (documented because the paper leaves them open):
1. Reduction over latent dims: **sum** by default, because the paper's w_t is the ratio of the two
   densities of the whole latent x_{t−1}: a product over its dimensions, a sum of their log-densities.
   Measured on the tiny model's own samples (``benchmarks/importance_weights.py``): with the sum,
   54 % of the training steps are masked and 45 % of the weights clipped, and the
   weights are lowest at small t, as the paper reports for its "early" timesteps t ∈ [0, 100].
   ``weight_reduction=mean`` takes the per-dimension geometric mean instead (DDPO's log-prob
   convention), the D-th root of the ratio: it falls below the mask threshold only at t ≤ ~5 and is
   clipped nowhere (0 % of the grid's steps masked or clipped), so both methods become Diffusion-DPO
   with another β. Caveat: for the same per-dimension mismatch, log w grows with the number of latent
   dims D; on 4×64×64 Stable Diffusion latents (64× the tiny model's 4×8×8) expect most steps masked,
   so watch ``diag/masked_fraction``. No official code was available to see how the authors keep the
   ratio in range on their video latents.
2. At t = 0 the forward posterior is a point mass (β̃ = 0); its step carries no density ratio
   and gets w = 1.
3. Weights use the policy's current conditional prediction (the same forward pass as the loss),
   detached: sg(w).
4. A pair's timestep is masked when either image's weight is below ``mask_threshold`` (winner
   and loser share t); the loss is averaged over the unmasked pairs of the minibatch.
5. DPO-C&M weights each pair's *loss* by sg(clip(w_pair, 1 ± ε)) with w_pair = √(w_w·w_l) (the
   geometric mean of the pair's two weights) and masks low-weight steps.
   SDPO multiplies each image's DPO *log-ratio term* by its own sg(clip(w, 1 ± ε)) inside the sigmoid:
       u = −½·β·[ŵ_w (m_w − m_ref,w) − ŵ_l (m_l − m_ref,l)],  L = −Σ_kept log σ(u) / #kept.
   With every w = 1 and no mask both reduce exactly to Diffusion-DPO.
Every update logs whether the weights act (``weight_diagnostics``): ``diag/masked_fraction`` (pairs
left out of the loss), ``diag/clipped_fraction`` and ``diag/weight_mean`` (the share of the weights
the clip changed, and the mean clipped weight; SDPO's per image, DPO-C&M's per pair) and
``diag/log_weight_mean`` (the raw log w, finite even where w itself under- or overflows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase

from rl4diffusion.algorithms.base import register_algorithm
from rl4diffusion.algorithms.diffusion_dpo import (
    DiffusionDPO,
    DiffusionDPOConfig,
    error_diagnostics,
    preference_margin,
)
from rl4diffusion.errors import ConfigError
from rl4diffusion.policies.steps import gaussian_log_prob, model_output_to_x0_eps


@dataclass
class SDPOConfig(DiffusionDPOConfig):
    clip_epsilon: float = 0.2
    """Importance weights are clipped to [1 − ε, 1 + ε]."""
    mask_threshold: float = 0.9
    """Timesteps whose (unclipped) weight is below this are masked out of the loss."""
    weight_reduction: Literal["mean", "sum"] = "sum"
    """Reduce the per-element Gaussian log-ratio over latent dims by sum (default: the exact density ratio,
    as in the paper) or mean (its per-dimension geometric mean, which sits near 1 and rarely acts)."""

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.clip_epsilon < 1:
            raise ConfigError(f"algo.clip_epsilon must be in [0, 1), got {self.clip_epsilon}")
        if self.mask_threshold < 0:
            raise ConfigError(f"algo.mask_threshold must be ≥ 0 (0 disables masking), got {self.mask_threshold}")


# ---------------------------------------------------------------------------------------- importance weights
def forward_posterior(
    x0: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x_{t−1} | x_t, x₀) = N(μ̃, β̃) — DDPM eq. 6–7. alpha_t = ᾱ_t, alpha_prev = ᾱ_{t−1} per sample [B].

    Returns (μ̃ [B, C, H, W], β̃ [B, 1, 1, 1]).
    """
    a_t, a_prev = alpha_t.view(-1, 1, 1, 1), alpha_prev.view(-1, 1, 1, 1)
    beta_t = 1 - a_t / a_prev
    mean = a_prev.sqrt() * beta_t / (1 - a_t) * x0 + (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t) * x_t
    var = (1 - a_prev) / (1 - a_t) * beta_t
    return mean, var.clamp(min=0)


def importance_log_weights(
    x0: torch.Tensor, x_t: torch.Tensor, pred_x0: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor,
    noise: torch.Tensor, *, reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """log w_t = reduce[log p_θ(x_{t−1} | x_t) − log q(x_{t−1} | x_t, x₀)] at x_{t−1} = μ̃ + √β̃·noise ~ q.

    Args:
        x0: the data x₀ [B, C, H, W]; x_t: its noised version; pred_x0: the model's x̂₀(x_t).
        alpha_t, alpha_prev: ᾱ_t, ᾱ_{t−1} [B] (ᾱ_{−1} = 1 at t = 0).
        noise: standard normal [B, C, H, W] for the sample x_{t−1}.
        reduction: "mean" or "sum" over C, H, W.
    Returns:
        log w [B] (0 where β̃ = 0); no gradient flows (the weights enter the losses as sg(w)).
    """
    with torch.no_grad():
        mean_q, var = forward_posterior(x0, x_t, alpha_t, alpha_prev)
        mean_p, _ = forward_posterior(pred_x0, x_t, alpha_t, alpha_prev)
        std = var.sqrt()
        x_prev = mean_q + std * noise
        return gaussian_log_prob(x_prev, mean_p, std, reduction) - gaussian_log_prob(x_prev, mean_q, std, reduction)


def clip_weights(log_weight: torch.Tensor, clip_epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sg(clip(w, 1 − ε, 1 + ε)), whether the clip changed w) from log w [B]."""
    w = log_weight.detach().exp()
    clipped = w.clamp(1 - clip_epsilon, 1 + clip_epsilon)
    return clipped, clipped != w


def kept_pairs(log_weight_w: torch.Tensor, log_weight_l: torch.Tensor, mask_threshold: float) -> torch.Tensor:
    """A pair's timestep stays in the loss when both its weights are ≥ ``mask_threshold`` [B] bool."""
    return (log_weight_w.detach().exp() >= mask_threshold) & (log_weight_l.detach().exp() >= mask_threshold)


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    keep = keep.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp(min=1)


def weight_diagnostics(applied: torch.Tensor, was_clipped: torch.Tensor, keep: torch.Tensor,
                       log_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Whether the importance weights act: all 0 but ``weight_mean`` = 1 when they change nothing.

    Args:
        applied: the clipped weights, [B] (one per pair) or [B, 2] (winner, loser); the loss applies those of
            the kept pairs; was_clipped: whether the clip changed each of them (same shape);
        keep: the unmasked pairs [B]; log_weights: every raw log w of the minibatch.
    Returns: ``masked_fraction`` (share of pairs left out of the loss), ``clipped_fraction`` (share of the
    weights the clip changed), ``weight_mean`` (mean clipped weight), ``log_weight_mean`` (mean raw log w).
    All are plain means over the minibatch, so the trainer's average over minibatches stays exact.
    """
    return {
        "masked_fraction": 1 - keep.float().mean(),
        "clipped_fraction": was_clipped.float().mean(),
        "weight_mean": applied.mean(),
        "log_weight_mean": log_weights.detach().mean(),
    }


def dpo_cm_loss(
    model_err_w, model_err_l, ref_err_w, ref_err_l, log_weight_w, log_weight_l, *,
    beta: float, clip_epsilon: float, mask_threshold: float,
) -> dict[str, torch.Tensor]:
    """DPO-C&M: Diffusion-DPO's per-pair loss weighted by sg(clip(√(w_w w_l))) over unmasked timesteps.

    Args: per-sample errors [B] as in ``diffusion_dpo_loss``; log importance weights [B] of winner and loser.
    Returns: ``loss_dpo_cm``, implicit accuracy and margin, and ``weight_diagnostics`` of the pair weights.
    """
    u = preference_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    w_pair, was_clipped = clip_weights(0.5 * (log_weight_w + log_weight_l), clip_epsilon)
    keep = kept_pairs(log_weight_w, log_weight_l, mask_threshold)
    return {"loss_dpo_cm": _masked_mean(w_pair * -F.logsigmoid(u), keep),
            "implicit_accuracy": (u > 0).float().mean().detach(), "margin": u.mean().detach(),
            **weight_diagnostics(w_pair, was_clipped, keep, torch.cat([log_weight_w, log_weight_l]))}


def sdpo_loss(
    model_err_w, model_err_l, ref_err_w, ref_err_l, log_weight_w, log_weight_l, *,
    beta: float, clip_epsilon: float, mask_threshold: float,
) -> dict[str, torch.Tensor]:
    """SDPO: each image's log-ratio term scaled by its sg(clipped w) inside DPO's sigmoid, unmasked steps only.

        u = −½·β·[ŵ_w (m_w − m_ref,w) − ŵ_l (m_l − m_ref,l)];  loss_sdpo = −Σ_kept log σ(u) / #kept

    Returns: ``loss_sdpo``, implicit accuracy and margin of the unweighted margin, and ``weight_diagnostics``
    of the per-image weights.
    """
    ww, clipped_w = clip_weights(log_weight_w, clip_epsilon)
    wl, clipped_l = clip_weights(log_weight_l, clip_epsilon)
    keep = kept_pairs(log_weight_w, log_weight_l, mask_threshold)
    u = -0.5 * beta * (ww * (model_err_w - ref_err_w) - wl * (model_err_l - ref_err_l))
    plain = preference_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    return {"loss_sdpo": _masked_mean(-F.logsigmoid(u), keep),
            "implicit_accuracy": (plain > 0).float().mean().detach(), "margin": plain.mean().detach(),
            **weight_diagnostics(torch.stack([ww, wl], dim=1), torch.stack([clipped_w, clipped_l], dim=1), keep,
                                 torch.cat([log_weight_w, log_weight_l]))}


# ---------------------------------------------------------------------------------------- the classes
@register_algorithm("dpo_cm", config=SDPOConfig)
class DPOCM(DiffusionDPO):
    """DPO-C&M (experimental): Diffusion-DPO with clipped, masked importance weights on the loss."""

    _loss_fn = staticmethod(dpo_cm_loss)
    # Diffusion-DPO's flow form carries over (diffusion_dpo.py), the importance weight does not: w_t is defined with
    # the DDPM posterior q(x_{t−1} | x_t, x₀) and the DDPM reverse step at that variance, and a flow model samples with
    # another kernel (Flow-GRPO's SDE step, whose variance s_t²·|Δt| is not the posterior's), so w_t has no definition
    # there that the paper gives
    needs_ddim = ("the importance weight p_θ(x_{t−1} | x_t) / q(x_{t−1} | x_t, x₀) on the DDPM posterior with its ᾱ_t "
                  "schedule (the flow form of Diffusion-DPO carries over, this weight does not: use algo=diffusion_dpo "
                  "or algo=dmpo on flow models)")

    def loss_terms(self, pairs: TensorDictBase) -> dict[str, torch.Tensor]:
        policy, cfg = self.policy, self.config
        fwd = self.pair_forward(pairs)
        t = fwd.timesteps
        alpha_t = policy.alphas_cumprod[t]
        alpha_prev = torch.where(t > 0, policy.alphas_cumprod[(t - 1).clamp(min=0)], torch.ones_like(alpha_t))
        pred_x0, _ = model_output_to_x0_eps(fwd.model_output, fwd.noisy, alpha_t, policy.scheduler.config.prediction_type)
        m = pairs.shape[0]
        noise = self.local_part(torch.randn((m * self.world, *fwd.x0.shape[1:]), generator=self.generator,
                                            device=fwd.x0.device)).repeat(2, 1, 1, 1)  # global draw, this process's rows
        log_w = importance_log_weights(fwd.x0, fwd.noisy, pred_x0, alpha_t, alpha_prev, noise,
                                       reduction=cfg.weight_reduction)
        mw, ml = fwd.model_err.chunk(2)
        rw, rl = fwd.ref_err.chunk(2)
        lw, ll = log_w.chunk(2)
        terms = self._loss_fn(mw, ml, rw, rl, lw, ll, beta=cfg.beta, clip_epsilon=cfg.clip_epsilon,
                              mask_threshold=cfg.mask_threshold)
        return {**terms, **error_diagnostics(mw, ml, rw, rl)}


@register_algorithm("sdpo", config=SDPOConfig)
class SDPO(DPOCM):
    """SDPO (experimental): importance-weighted log-ratio terms inside DPO's sigmoid."""

    _loss_fn = staticmethod(sdpo_loss)
