"""The held-out evaluator: a second colour and shape classifier that scores evaluations, never training.

The training reward ``shape_alignment`` is the judge (``rl4diffusion.zoo.judge``). A method that
optimises the judge can learn to fool it — images it scores well that do not show the prompt — and
numbers measured by the judge itself cannot reveal that. The evaluator is an independent second
opinion: another architecture, other augmentations, other seeds, trained by its own script
(``python -m rl4diffusion.zoo.train_evaluator``) and deliberately **not** registered as a reward. Every
evaluation of a shapes-world prompt set reports its accuracy, log-probability, diversity and FID
beside the judge's (``rl4diffusion.training.evaluation.EvalMetrics``); a gain under the judge that the
evaluator does not confirm is reward hacking.

Architecture (a small ResNet, unlike the judge's plain CNN with BatchNorm and max pooling): a 3×3
stem (32 channels at 32×32), then three stages that each halve the resolution with a strided 3×3
convolution and add one residual block (40 channels at 16×16, 80 at 8×8, 96 at 4×4), GroupNorm and
GELU throughout, and the concatenated global average and max of the last map as a 192-d feature,
with two linear heads — about 0.42 M parameters (the judge: 0.27 M).

Shipped weights (seed 1, 600 steps of batch 64, 4.6 min of training on one busy CPU thread;
``train_evaluator`` prints these numbers when it writes the file), on 4096 images drawn with a seed
neither network trained on:

    clean images:                       colour 1.0000  shape 1.0000  joint 1.0000
    with the evaluator's augmentations: colour 1.0000  shape 0.9971  joint 0.9971
    with the judge's augmentations:     colour 1.0000  shape 0.9937  joint 0.9937
    agreement with the judge (both name the same colour and shape): 1.0000 clean, 0.9934 degraded

Example::

    evaluator = load_evaluator()
    colour_logits, shape_logits = evaluator(images)   # images [B, 3, 32, 32] in [0, 1]
    correct, logprob = evaluator_scores(evaluator, images, ["a red circle"] * len(images))
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rl4diffusion.zoo.shapes import COLOURS, SHAPES

EVALUATOR_PATH = Path(__file__).resolve().parent / "weights" / "evaluator.safetensors"
"""The shipped weights (written by ``python -m rl4diffusion.zoo.train_evaluator``)."""


def _conv_gn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: its output does not depend on the batch, in training or evaluation
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    return nn.Sequential(conv, nn.GroupNorm(8, c_out), nn.GELU())


class ResidualBlock(nn.Module):
    """x + conv(conv(x)), two 3×3 convolutions with GroupNorm (He et al. 2016, "Deep residual learning")."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv_gn(channels, channels), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(8, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


class Evaluator(nn.Module):
    """Colour and shape classifier for 32×32 images in [0, 1] (see the module docstring)."""

    feature_dim = 192

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_gn(3, 32),  # [B, 32, 32, 32]
            _conv_gn(32, 40, stride=2), ResidualBlock(40),  # [B, 40, 16, 16]
            _conv_gn(40, 80, stride=2), ResidualBlock(80),  # [B, 80, 8, 8]
            _conv_gn(80, 96, stride=2), ResidualBlock(96),  # [B, 96, 4, 4]
        )
        self.colour_head = nn.Linear(self.feature_dim, len(COLOURS))
        self.shape_head = nn.Linear(self.feature_dim, len(SHAPES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features [B, 192] of images [B, 3, 32, 32] in [0, 1]: global average and max of the last map."""
        if images.dim() != 4 or images.shape[1:] != (3, 32, 32):
            raise ValueError(
                f"the evaluator takes images [B, 3, 32, 32] in [0, 1], got {tuple(images.shape)}; "
                "resize first (rl4diffusion.zoo.judge.to_judge_resolution)"
            )
        h = self.body(images * 2 - 1)  # [B, 96, 4, 4]
        # the average sees colour and size, the max a corner or a star tip
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # [B, 192]

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(colour logits [B, 6], shape logits [B, 4]) of features [B, 192]."""
        return self.colour_head(features), self.shape_head(features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(colour logits [B, 6], shape logits [B, 4]) of images [B, 3, 32, 32] in [0, 1]."""
        return self.heads(self.features(images))


def load_evaluator(device: str | torch.device = "cpu") -> Evaluator:
    """The shipped evaluator on ``device``, in eval mode, with every weight frozen."""
    from safetensors.torch import load_file

    from rl4diffusion.errors import MissingWeightsError

    if not EVALUATOR_PATH.is_file():
        raise MissingWeightsError(
            f"the evaluator's weights are missing ({EVALUATOR_PATH}). They ship with the package; "
            "regenerate them with `python -m rl4diffusion.zoo.train_evaluator` (a few minutes on a CPU)."
        )
    evaluator = Evaluator()
    evaluator.load_state_dict(load_file(str(EVALUATOR_PATH)))
    return evaluator.to(device).eval().requires_grad_(False)


def label_scores(colour_logits: torch.Tensor, shape_logits: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour and shape both right [B] bool, log p(colour) + log p(shape) [B]) for labels [B, 2]."""
    rows = torch.arange(len(labels), device=labels.device)
    logprob = (F.log_softmax(colour_logits, dim=1)[rows, labels[:, 0]]
               + F.log_softmax(shape_logits, dim=1)[rows, labels[:, 1]])
    correct = (colour_logits.argmax(1) == labels[:, 0]) & (shape_logits.argmax(1) == labels[:, 1])
    return correct, logprob


@torch.no_grad()
def evaluator_scores(evaluator: Evaluator, images: torch.Tensor, prompts: list[str]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(right [N] bool, log p of the prompt's colour and shape [N]) of images [N, 3, H, W] in [0, 1].

    Images of any size are resized to 32×32; prompts must be shapes-world captions ("a red circle").
    """
    from rl4diffusion.zoo.judge import to_judge_resolution
    from rl4diffusion.zoo.shapes import parse_prompt

    device = next(evaluator.parameters()).device
    labels = torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long, device=device)  # [N, 2]
    colour_logits, shape_logits = evaluator(to_judge_resolution(images.to(device, torch.float32)))
    correct, logprob = label_scores(colour_logits, shape_logits, labels)
    return correct.cpu(), logprob.cpu()
