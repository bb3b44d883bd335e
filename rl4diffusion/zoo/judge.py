"""The judge: a small CNN that names the colour and the shape in a 32×32 image of the shapes world.

Its log-probabilities give the differentiable ``shape_alignment`` reward
(``rl4diffusion.rewards.embedded``); its penultimate features give the embedded feature space for
diversity and FID (``rl4diffusion.metrics.features``, name ``"judge"``). Trained by
``python -m rl4diffusion.zoo.train_judge`` with noise/blur augmentation so that it also judges the
imperfect images a generator draws.

Architecture: six 3×3 convolutions with BatchNorm and SiLU (24 channels at 32×32, 48-48 at 16×16,
96-96-128 at 8×8), global max pooling to a 128-d feature, and two linear heads — about 0.27 M
parameters.

Example::

    judge = load_judge()
    colour_logits, shape_logits = judge(images)   # images [B, 3, 32, 32] in [0, 1]
    feats = judge.features(images)                # [B, 128]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rl4diffusion.zoo.shapes import COLOURS, SHAPES

JUDGE_PATH = Path(__file__).resolve().parent / "weights" / "judge.safetensors"
"""The shipped weights (written by ``python -m rl4diffusion.zoo.train_judge``)."""


def _conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # no conv bias: BatchNorm's shift replaces it
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class Judge(nn.Module):
    """Colour and shape classifier for 32×32 images in [0, 1] (see the module docstring)."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        # most parameters sit at 8×8 and few at 32×32, which keeps a CPU step cheap
        self.body = nn.Sequential(
            _conv_bn(3, 24, 1),  # [B, 24, 32, 32]
            _conv_bn(24, 48, 2), _conv_bn(48, 48, 1),  # [B, 48, 16, 16]
            _conv_bn(48, 96, 2), _conv_bn(96, 96, 1), _conv_bn(96, 128, 1),  # [B, 128, 8, 8]
        )
        self.colour_head = nn.Linear(self.feature_dim, len(COLOURS))
        self.shape_head = nn.Linear(self.feature_dim, len(SHAPES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 128] of images [B, 3, 32, 32] in [0, 1]."""
        if images.dim() != 4 or images.shape[1:] != (3, 32, 32):
            raise ValueError(
                f"the judge takes images [B, 3, 32, 32] in [0, 1], got {tuple(images.shape)}; resize first "
                "(e.g. F.interpolate(images, size=32, mode='bilinear', antialias=True))"
            )
        # centre [0, 1] to [-1, 1] here so that callers never have to normalise
        h = self.body(images * 2 - 1)  # [B, 128, 8, 8]
        # global *max* pooling: a corner or a star tip fires in a few cells; an average over the
        # mostly-background 8×8 map dilutes it (with average pooling the shape head trained far slower)
        return h.amax(dim=(2, 3))  # [B, 128]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(colour logits [B, 6], shape logits [B, 4]) of images [B, 3, 32, 32] in [0, 1]."""
        h = self.features(images)
        return self.colour_head(h), self.shape_head(h)


def load_judge(device: str | torch.device = "cpu") -> Judge:
    """The shipped judge on ``device``, in eval mode, with every weight frozen (requires_grad False).

    Gradients still flow through it to the input images, which is what the differentiable
    ``shape_alignment`` reward needs.
    """
    from safetensors.torch import load_file

    from rl4diffusion.errors import MissingWeightsError

    if not JUDGE_PATH.is_file():
        raise MissingWeightsError(
            f"the judge's weights are missing ({JUDGE_PATH}). They ship with the package; regenerate them with "
            "`python -m rl4diffusion.zoo.train_judge` (about 3 minutes on a CPU)."
        )
    judge = Judge()
    judge.load_state_dict(load_file(str(JUDGE_PATH)))
    return judge.to(device).eval().requires_grad_(False)


@torch.no_grad()
def judge_predictions(judge: Judge, images: torch.Tensor, *, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted colour_idx [N], predicted shape_idx [N]) of images [N, 3, 32, 32], in chunks."""
    device = next(judge.parameters()).device
    colours, shapes = [], []
    for chunk in images.split(batch_size):
        c_logits, s_logits = judge(chunk.to(device))
        colours.append(c_logits.argmax(1).cpu())
        shapes.append(s_logits.argmax(1).cpu())
    return torch.cat(colours), torch.cat(shapes)


def judge_accuracy(judge: Judge, images: torch.Tensor, colour_idx: torch.Tensor, shape_idx: torch.Tensor) -> dict:
    """Fractions of images whose colour, shape, and both (``joint``) the judge names as labelled."""
    colour_pred, shape_pred = judge_predictions(judge, images)
    colour_ok = colour_pred == colour_idx.cpu()
    shape_ok = shape_pred == shape_idx.cpu()
    return {
        "colour": float(colour_ok.float().mean()),
        "shape": float(shape_ok.float().mean()),
        "joint": float((colour_ok & shape_ok).float().mean()),
    }


def to_judge_resolution(images: torch.Tensor) -> torch.Tensor:
    """Resize images [B, 3, H, W] to the judge's 32×32 (antialiased bilinear, differentiable); 32×32 passes through."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    if images.shape[-2:] == (32, 32):
        return images
    return F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
