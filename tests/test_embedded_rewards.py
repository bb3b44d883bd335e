"""The embedded rewards: shape_alignment (the judge) and colorfulness (Hasler–Süsstrunk)."""

from __future__ import annotations

import math

import pytest
import torch

from rl4diffusion.rewards import build_reward
from rl4diffusion.rewards.embedded import ShapeAlignment, colorfulness
from rl4diffusion.rewards.registry import RewardError
from rl4diffusion.zoo.shapes import ALL_PROMPTS, COLOURS, SHAPES, render_shapes, sample_shapes


@pytest.fixture(scope="module")
def alignment():
    return build_reward("shape_alignment")


def test_both_are_registered_as_differentiable(alignment):
    assert alignment.differentiable and build_reward("colorfulness").differentiable


def test_judge_is_loaded_lazily():
    reward = ShapeAlignment()
    assert reward._judge is None  # building the reward (and importing the package) loads no weights


def test_shape_alignment_prefers_the_right_prompt(alignment):
    batch = sample_shapes(48, torch.Generator().manual_seed(0))
    right = alignment(batch.images, batch.captions)
    # the same images with the colour and the shape both shifted by one: always a wrong prompt
    wrong = [ALL_PROMPTS[((c + 1) % len(COLOURS)) * len(SHAPES) + (s + 1) % len(SHAPES)]
             for c, s in zip(batch.colour_idx.tolist(), batch.shape_idx.tolist())]
    bad = alignment(batch.images, wrong)
    assert right.shape == (48,) and (right <= 0).all()
    assert (right > bad).all()
    assert right.mean() > math.log(0.9)  # the judge is confident on clean dataset images


def test_shape_alignment_gradient_wrt_pixels_is_finite_and_nonzero(alignment):
    images = sample_shapes(4, torch.Generator().manual_seed(1)).images.requires_grad_(True)
    alignment(images, ["a red circle", "a blue star", "a green square", "a yellow triangle"]).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_shape_alignment_resizes_other_resolutions(alignment):
    colour, shape = torch.tensor([0, 2]), torch.tensor([0, 3])
    images = render_shapes(colour, shape, torch.Generator().manual_seed(2))
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest").requires_grad_(True)  # [2, 3, 64, 64]
    prompts = ["a red circle", "a blue star"]
    r_big = alignment(big, prompts)
    assert torch.allclose(r_big, alignment(images, prompts), atol=0.5)
    r_big.sum().backward()
    assert torch.isfinite(big.grad).all() and big.grad.abs().sum() > 0


def test_shape_alignment_rejects_prompts_outside_the_world(alignment):
    with pytest.raises(RewardError, match="not in the shapes world"):
        alignment(torch.rand(2, 3, 32, 32), ["a red circle", "a photo of a cat"])


def test_colorfulness_matches_the_formula():
    # half pure red, half pure blue: rg ∈ {1, 0}, yb ∈ {0.5, −1}
    image = torch.zeros(1, 3, 4, 4)
    image[0, 0, :, :2] = 1.0
    image[0, 2, :, 2:] = 1.0
    sigma = math.sqrt(0.25 + 0.5625)  # var(rg) = 0.25, var(yb) = 0.75² = 0.5625
    mu = math.sqrt(0.5**2 + 0.25**2)  # mean(rg) = 0.5, mean(yb) = −0.25
    expected = math.sqrt(sigma**2 + 1e-6) + 0.3 * math.sqrt(mu**2 + 1e-6)
    assert colorfulness(image, [""]).item() == pytest.approx(expected, rel=1e-5)


def test_colorfulness_orders_grey_below_colour_and_has_finite_gradients():
    grey = torch.full((1, 3, 32, 32), 0.5)
    colourful = sample_shapes(1, torch.Generator().manual_seed(0)).images
    images = torch.cat([grey, colourful]).requires_grad_(True)
    scores = build_reward("colorfulness")(images, ["a red circle"] * 2)
    assert scores[0] < 0.01 < scores[1]
    scores.sum().backward()
    assert torch.isfinite(images.grad).all()  # √ at a flat image: ε keeps the slope finite
    assert images.grad[1].abs().sum() > 0


def test_bounded_alignment_is_the_probability_of_the_log_probability_form():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square"]
    log_form = build_reward("shape_alignment")(images, prompts)
    bounded = build_reward("shape_alignment_prob")(images, prompts)
    assert ((bounded >= 0) & (bounded <= 1)).all()
    torch.testing.assert_close(bounded, log_form.exp())
    # the preference methods see only which of two images wins: the same under both forms
    # (why suite shapes_4k_bounded leaves them out)
    assert torch.equal(log_form[:, None] > log_form[None, :], bounded[:, None] > bounded[None, :])
