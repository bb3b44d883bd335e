"""DMPO — Divergence Minimization Preference Optimization (Li, Xu, Dang, Ermon 2025, arXiv 2507.07510).

DPO's logistic loss fits σ(u) to the label 1, which keeps pushing the implicit margin u up
(mass-covering). DMPO instead minimises the *reverse* KL between the model's implicit
preference probability σ(u) and a smoothed target 1 − α (mode seeking): the loss is minimal at
u* = log((1 − α)/α), so confident pairs stop pulling once their margin reaches u*.

    u = −½·β·[(m_w − m_l) − (m_ref,w − m_ref,l)]     (the Diffusion-DPO margin, same t and ε)
    L = σ(u)·log(σ(u)/(1−α)) + σ(−u)·log(σ(−u)/α)  = KL(Bern(σ(u)) ‖ Bern(1−α))

    ∂L/∂u = σ(u)·σ(−u)·(u − u*): the same sign as DPO's (−σ(−u)) while u < u*, zero at u*.

No official code; implemented from the paper's objective. Defaults: β = 2000, α = 0.01 (the
paper's ablation: quality rises then falls in both). Costs the same as Diffusion-DPO; every
other detail (data, timesteps, reference, caption dropout) is Diffusion-DPO's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass
class DMPOConfig(DiffusionDPOConfig):
    alpha: float = 0.01
    """Target smoothing α: the loss pulls σ(u) towards 1 − α (paper: 0.01)."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.alpha < 0.5:
            raise ConfigError(f"algo.alpha must be in (0, 0.5) (the target preference probability is 1 − α), "
                              f"got {self.alpha}")


def dmpo_loss(
    model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, *,
    beta: float, alpha: float,
) -> dict[str, torch.Tensor]:
    """KL(Bern(σ(u)) ‖ Bern(1 − α)) averaged over pairs — DMPO's objective on the Diffusion-DPO margin.

    Args:
        model_err_w, model_err_l, ref_err_w, ref_err_l: per-sample errors [B] as in ``diffusion_dpo_loss``.
        beta: β; alpha: the target smoothing α ∈ (0, ½).
    Returns:
        ``loss_dmpo``; diagnostics ``implicit_accuracy`` (mean[u > 0]) and ``margin`` (mean u).
    """
    u = preference_margin(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    log_p, log_q = F.logsigmoid(u), F.logsigmoid(-u)  # log σ(u), log σ(−u), stable for large |u|
    kl = log_p.exp() * (log_p - math.log1p(-alpha)) + log_q.exp() * (log_q - math.log(alpha))
    return {
        "loss_dmpo": kl.mean(),
        "implicit_accuracy": (u > 0).float().mean().detach(),
        "margin": u.mean().detach(),
    }


@register_algorithm("dmpo", config=DMPOConfig)
class DMPO(DiffusionDPO):
    def loss_terms(self, pairs: TensorDictBase) -> dict[str, torch.Tensor]:
        fwd = self.pair_forward(pairs)
        mw, ml = fwd.model_err.chunk(2)
        rw, rl = fwd.ref_err.chunk(2)
        terms = dmpo_loss(mw, ml, rw, rl, beta=self.config.beta, alpha=self.config.alpha)
        return {**terms, **error_diagnostics(mw, ml, rw, rl)}
