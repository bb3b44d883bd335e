"""Do SDPO's and DPO-C&M's importance weights act? Masked / clipped fractions under both reductions.

The tiny model samples two images of each training prompt (its defaults: 20 steps, guidance 2), the
images are VAE-encoded as the preference pairs are, and each pair is noised to every timestep of a
grid with the noise shared by winner and loser, as in training. At each step the importance weights
w_t = p_θ(x_{t−1} | x_t) / q(x_{t−1} | x_t, x₀) are computed by the training code
(``importance_log_weights``) with the log-density ratio reduced over latent dims by ``sum`` (the exact
ratio, the default) and by ``mean``, and the losses' own ``weight_diagnostics`` say how many steps
are masked and how many weights clipped (SDPO clips each image's weight, DPO-C&M the pair's).
The timestep grid is uniform, so the "all t" row is what a training run sees on average.

    PYTHONPATH=. python benchmarks/importance_weights.py [--stride 10] [--seed 0]

Writes ``benchmarks/results/importance_weights.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rl4diffusion.algorithms.sdpo import SDPOConfig, dpo_cm_loss, importance_log_weights, sdpo_loss
from rl4diffusion.policies.base import DiffusionPolicy
from rl4diffusion.policies.steps import model_output_to_x0_eps
from rl4diffusion.zoo.shapes import TRAIN_PROMPTS

DIAGNOSTICS = ("masked_fraction", "clipped_fraction", "weight_mean", "log_weight_mean")


@torch.no_grad()
def own_sample_pairs(policy, prompts: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two samples of each prompt, VAE-encoded as preference pairs are: (x₀ winners, x₀ losers, embeds)."""
    generator = torch.Generator().manual_seed(seed)
    first = policy.encode_images(policy.sample(prompts, generator=generator)["images"])
    second = policy.encode_images(policy.sample(prompts, generator=generator)["images"])
    return first, second, policy.encode_prompts(prompts)


@torch.no_grad()
def pair_log_weights(policy, x0_w, x0_l, embeds, t_value: int, reduction: str, generator) -> tuple:
    """log w of winners and losers [P] at timestep ``t_value``, noised and sampled as in training."""
    n = x0_w.shape[0]
    t = torch.full((2 * n,), t_value)
    x0 = torch.cat([x0_w, x0_l])
    noise = torch.randn(x0_w.shape, generator=generator).repeat(2, 1, 1, 1)  # shared by winner and loser
    step_noise = torch.randn(x0_w.shape, generator=generator).repeat(2, 1, 1, 1)
    alphas = policy.alphas_cumprod
    alpha_t = alphas[t]
    alpha_prev = alphas[t - 1] if t_value > 0 else torch.ones_like(alpha_t)
    noisy = alpha_t.sqrt().view(-1, 1, 1, 1) * x0 + (1 - alpha_t).sqrt().view(-1, 1, 1, 1) * noise
    output = policy.predict_noise(noisy, t, embeds.repeat(2, 1, 1), guidance_scale=1.0)
    pred_x0, _ = model_output_to_x0_eps(output, noisy, alpha_t, policy.scheduler.config.prediction_type)
    log_w = importance_log_weights(x0, noisy, pred_x0, alpha_t, alpha_prev, step_noise, reduction=reduction)
    return log_w.chunk(2)


def diagnostics(loss_fn, log_w_w, log_w_l, cfg: SDPOConfig) -> dict[str, float]:
    """The loss's own weight diagnostics (the preference errors do not enter them: zeros)."""
    zeros = torch.zeros_like(log_w_w)
    out = loss_fn(zeros, zeros, zeros, zeros, log_w_w, log_w_l, beta=cfg.beta, clip_epsilon=cfg.clip_epsilon,
                  mask_threshold=cfg.mask_threshold)
    return {k: float(out[k]) for k in DIAGNOSTICS}


def measure(policy, pairs, timesteps: list[int], reduction: str, cfg: SDPOConfig, seed: int) -> dict:
    """{t: (log w winners, log w losers)} over the grid, the same draws for every reduction (same seed)."""
    generator = torch.Generator().manual_seed(seed)
    return {t: pair_log_weights(policy, *pairs, t, reduction, generator) for t in timesteps}


def summarise(log_ws: dict, bins: list[tuple[int, int]], cfg: SDPOConfig) -> list[tuple[str, dict, dict]]:
    """Per timestep bin (and all t): (label, SDPO diagnostics, DPO-C&M diagnostics) of the pooled pairs."""
    rows = []
    for low, high in [*bins, (0, 10**9)]:
        chosen = [log_ws[t] for t in log_ws if low <= t < high]
        w_w, w_l = torch.cat([c[0] for c in chosen]), torch.cat([c[1] for c in chosen])
        label = "all t" if high == 10**9 else f"{low}–{high - 1}"
        rows.append((label, diagnostics(sdpo_loss, w_w, w_l, cfg), diagnostics(dpo_cm_loss, w_w, w_l, cfg)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stride", type=int, default=10, help="timestep grid: 0, stride, 2·stride, …")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "importance_weights.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    cfg = SDPOConfig()
    policy = DiffusionPolicy.from_pretrained("tiny")
    prompts = list(TRAIN_PROMPTS)
    pairs = own_sample_pairs(policy, prompts, args.seed)
    total = policy.alphas_cumprod.numel()
    timesteps = list(range(0, total, args.stride))
    bins = [(start, start + 100) for start in range(0, total, 100)]
    dims = "×".join(str(d) for d in policy.latent_shape)

    lines = [
        "# Importance weights of SDPO and DPO-C&M on the tiny model's own samples",
        "",
        f"Generated by `benchmarks/importance_weights.py --stride {args.stride} --seed {args.seed}`: {len(prompts)} "
        f"pairs (two samples of each training prompt), {dims} latents, every {args.stride}th of {total} timesteps "
        f"({len(timesteps)} steps per pair). Defaults: mask below w = {cfg.mask_threshold}, clip to 1 ± "
        f"{cfg.clip_epsilon}. *masked*: share of pairs (timesteps) left out of the loss; *clipped*: share of the "
        "weights the clip changed, *mean w*: mean clipped weight (SDPO: each image's; DPO-C&M: the pair's "
        "√(w_w·w_l)); "
        "*mean log w*: the raw log-weight of every image. The same pairs, timesteps and noise for both reductions.",
        "",
    ]
    for reduction in ("sum", "mean"):
        rows = summarise(measure(policy, pairs, timesteps, reduction, cfg, args.seed), bins, cfg)
        default = " (the default)" if reduction == cfg.weight_reduction else ""
        lines += [
            f"## weight_reduction={reduction}{default}",
            "",
            "| t | masked | SDPO clipped | SDPO mean w | DPO-C&M clipped | DPO-C&M mean w | mean log w |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, sdpo, cm in rows:
            bold = "**" if label == "all t" else ""
            lines.append(
                f"| {bold}{label}{bold} | {sdpo['masked_fraction']:.1%} | {sdpo['clipped_fraction']:.1%} "
                f"| {sdpo['weight_mean']:.3f} | {cm['clipped_fraction']:.1%} | {cm['weight_mean']:.3f} "
                f"| {sdpo['log_weight_mean']:.3g} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
