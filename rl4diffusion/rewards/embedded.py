"""The embedded world's rewards: ``shape_alignment`` (the judge's log-probability), its bounded form
``shape_alignment_prob`` (the judge's probability) and ``colorfulness`` (a formula).

Both run offline on a CPU, take images [B, 3, H, W] in [0, 1] and prompts, and are
differentiable with respect to the pixels, so every algorithm family can use them.

Example::

    from rl4diffusion.rewards import build_reward
    reward = build_reward("shape_alignment")
    reward(images, ["a red circle"] * len(images))   # Tensor[B], ≤ 0; 0 = certain and right
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rl4diffusion.rewards.registry import register_reward


@register_reward("shape_alignment", differentiable=True)
class ShapeAlignment:
    """log p(prompted colour) + log p(prompted shape) under the embedded judge (shapes-world prompts only).

    r(x, c) = log p_judge(colour(c) | x) + log p_judge(shape(c) | x) ≤ 0. The log-probability,
    not the 0/1 "aligned?" outcome, is the reward because it is smooth and differentiable — the
    same choice DDPO's prompt-alignment and DRaFT's classifier rewards make. Images that are not
    32×32 are resized with an antialiased bilinear ``F.interpolate`` (differentiable). Prompts
    must be shapes-world captions ("a red circle"); any other prompt raises a ValueError that
    lists the vocabulary, and ``check_prompts`` finds them before any image is sampled (the trainer
    calls it at start-up). The judge is loaded on the first call, not at import.

    Args:
        device: where the judge runs; the reward is returned on the images' device.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._judge = None

    @property
    def judge(self):
        if self._judge is None:  # lazy: importing rl4diffusion.rewards must stay cheap
            from rl4diffusion.zoo.judge import load_judge

            self._judge = load_judge(self.device)
        return self._judge

    def check_prompts(self, prompts: list[str]) -> list[str]:
        """One sentence naming the prompts the judge cannot score and what it accepts; [] if it scores all."""
        from rl4diffusion.zoo.shapes import COLOURS, SHAPES, parse_prompt

        bad = []
        for prompt in dict.fromkeys(prompts):  # each distinct prompt once, in order
            try:
                parse_prompt(prompt)
            except ValueError:
                bad.append(prompt)
        if not bad:
            return []
        shown = ", ".join(repr(p) for p in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return [f"{shown} {'is' if len(bad) == 1 else 'are'} not in the shapes world, whose prompts look like "
                f"'a <colour> <shape>' with colour in {', '.join(COLOURS)} and shape in {', '.join(SHAPES)} "
                "(e.g. 'a red circle')."]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from rl4diffusion.zoo.judge import to_judge_resolution
        from rl4diffusion.zoo.shapes import parse_prompt

        labels = torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long, device=self.device)  # [B, 2]
        x = to_judge_resolution(images.to(device=self.device, dtype=torch.float32))
        colour_logits, shape_logits = self.judge(x)
        rows = torch.arange(len(prompts), device=self.device)
        reward = (
            F.log_softmax(colour_logits, dim=1)[rows, labels[:, 0]]
            + F.log_softmax(shape_logits, dim=1)[rows, labels[:, 1]]
        )
        return reward.to(images.device)


@register_reward("shape_alignment_prob", differentiable=True)
class ShapeAlignmentProbability(ShapeAlignment):
    """The bounded form of ``shape_alignment``: p(prompted colour) · p(prompted shape) ∈ [0, 1].

    r(x, c) = exp(log p_judge(colour(c) | x) + log p_judge(shape(c) | x)): the judge's probability that
    the image shows the prompt. A failed image costs at most 1 here, where the log-probability can
    cost tens; methods that normalise rewards (DDPO, GRPO) see lighter tails, and reward-backprop
    methods a gradient that vanishes on images the judge is sure are wrong. Same prompts, judge and
    ``check_prompts`` as ``shape_alignment``.
    """

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return super().__call__(images, prompts).exp()


_EPS = 1e-6
"""Added inside every square root of colorfulness: √ has an infinite slope at 0 (a flat image)."""


@register_reward("colorfulness", differentiable=True)
def colorfulness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Hasler–Süsstrunk colourfulness M = σ_rgyb + 0.3·μ_rgyb of each image (prompts are ignored).

    Source: D. Hasler and S. Süsstrunk, "Measuring colourfulness in natural images", SPIE Human
    Vision and Electronic Imaging 2003, §3 (the metric M^(3)): with the opponent channels
    rg = R − G and yb = ½(R + G) − B over all pixels,
    σ_rgyb = √(σ_rg² + σ_yb²), μ_rgyb = √(μ_rg² + μ_yb²), M = σ_rgyb + 0.3 μ_rgyb.

    Computed on [0, 1] pixels, so values are the paper's (0–255 scale) divided by 255: 0 for a
    grey image, about 0.1–0.6 for coloured ones. A small ε inside each square root keeps the
    gradient finite for flat images.
    """
    r, g, b = images.float().unbind(dim=1)  # each [B, H, W]
    rg = (r - g).flatten(1)  # [B, H·W]
    yb = (0.5 * (r + g) - b).flatten(1)
    sigma = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + _EPS)
    mu = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + _EPS)
    return sigma + 0.3 * mu
