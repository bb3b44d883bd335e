"""Pieces of loss functions that several algorithms share: PPO's clipped surrogate, the Gaussian KL
between two denoising steps, and group-relative advantages (GRPO, DiffusionNFT). Each algorithm's own
loss lives in its file; what two of them need lives here, never in another algorithm's file. (The
reference model's output is the policy's: ``policy.reference_output(td)``, or
``policy.predict_noise(..., use_reference=True)``.)"""

from __future__ import annotations

import math

import torch


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> dict[str, torch.Tensor]:
    """PPO's clipped surrogate on one denoising step (Schulman et al. 2017, eq. 7; DDPO eq. 4).

        ρ = exp(log π_θ(a|s) − log π_old(a|s))
        loss_policy = mean( max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) )

    Args:
        log_prob: log π_θ of the sampled actions [B] (with grad).
        old_log_prob: log π_old recorded at sampling time [B].
        advantages: [B].
    Returns:
        ``loss_policy`` plus detached diagnostics ``approx_kl`` (½·mean Δlogp²) and ``clip_fraction``.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return {
        "loss_policy": torch.maximum(unclipped, clipped).mean(),
        "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean().detach(),
        "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
    }


def gaussian_mean_kl(
    mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """KL(N(μ_θ, σ²I) ‖ N(μ_ref, σ²I)) per sample [B], = (μ_θ − μ_ref)²/(2σ²) reduced over non-batch dims.

    DPOK Lemma 4.2; Flow-GRPO's KL term. ``reduction="mean"`` averages over latent elements (the
    log-prob convention, DDPO), ``"sum"`` gives the exact KL of the whole latent. Deterministic
    steps (σ = 0) carry no action and contribute 0, as in ``gaussian_log_prob``.
    """
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    elementwise = (mean - ref_mean) ** 2 / (2 * safe_std**2)
    elementwise = torch.where(std > 0, elementwise, torch.zeros_like(elementwise))
    dims = tuple(range(1, mean.dim()))
    return elementwise.mean(dim=dims) if reduction == "mean" else elementwise.sum(dim=dims)


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4, global_std: bool = False
) -> torch.Tensor:
    """Group-relative advantages A_i = (r_i − mean_{g(i)}) / (std + eps) — Flow-GRPO eq. (5).

    Args:
        rewards: [B]; group_ids: [B] (equal ids = samples of the same prompt in this batch).
        eps: added to the std.
        global_std: use the whole batch's std instead of each group's (population std either way).
    Returns:
        [B], in the rewards' dtype. A group whose rewards are all equal gets exactly 0 (not rounding noise).
    """
    r = rewards.detach().double()
    _, inverse = torch.unique(group_ids, return_inverse=True)  # (B,) group index 0..G−1
    num_groups = int(inverse.max()) + 1
    counts = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros_like(counts).index_add_(0, inverse, r) / counts
    centred = r - mean[inverse]
    if global_std:
        std = r.std(unbiased=False).expand_as(r)
    else:
        std = (torch.zeros_like(counts).index_add_(0, inverse, centred**2) / counts).sqrt()[inverse]
    highest = torch.full_like(counts, -math.inf).scatter_reduce(0, inverse, r, "amax")
    lowest = torch.full_like(counts, math.inf).scatter_reduce(0, inverse, r, "amin")
    constant = (highest == lowest)[inverse]
    advantages = torch.where(constant, torch.zeros_like(r), centred / (std + eps))
    return advantages.to(rewards.dtype)
