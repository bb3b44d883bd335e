"""JPEG compressibility and incompressibility — DDPO's weight-free rewards.

Reward = ∓ (size of the JPEG-encoded image in kilobytes), quality 95 as in
kvablack/ddpo-pytorch `ddpo_pytorch/rewards.py`. Not differentiable.
"""

from __future__ import annotations

import torch

from rl4diffusion.rewards.registry import register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image [B, 3, H, W] in [0, 1] encoded as JPEG."""
    from torchvision.io import encode_jpeg  # imported here: torchvision takes seconds to import

    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    sizes = [encode_jpeg(img, quality=quality).numel() / 1000.0 for img in pixels]
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


@register_reward("jpeg_compressibility", differentiable=False)
def jpeg_compressibility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Negative JPEG size (kB): higher means simpler, more compressible images."""
    return -jpeg_size_kb(images)


@register_reward("jpeg_incompressibility", differentiable=False)
def jpeg_incompressibility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """JPEG size (kB): higher means more detailed, less compressible images."""
    return jpeg_size_kb(images)
