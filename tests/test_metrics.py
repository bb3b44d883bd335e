"""Metrics: feature spaces, per-prompt diversity, Fréchet distance and the paired win rate."""

from __future__ import annotations

import math

import pytest
import torch

from rl4diffusion.metrics import (
    build_feature_space,
    frechet_distance,
    mean_pairwise_distance,
    register_feature_space,
    win_rate,
)
from rl4diffusion.metrics import features as features_module
from rl4diffusion.zoo.shapes import render_shapes, sample_shapes


@pytest.fixture(scope="module")
def judge_space():
    return build_feature_space("judge")


# --- feature spaces -------------------------------------------------------------------------
def test_judge_feature_space(judge_space):
    images = sample_shapes(5, torch.Generator().manual_seed(0)).images
    feats = judge_space(images)
    assert judge_space.name == "judge" and feats.shape == (5, 128) and torch.isfinite(feats).all()
    big = torch.nn.functional.interpolate(images, size=64, mode="bilinear")  # any size is resized to 32×32
    assert judge_space(big).shape == (5, 128)


def test_auto_falls_back_to_the_judge_and_records_the_choice(monkeypatch):
    def unavailable(device="cpu"):
        raise OSError("weights not on this machine")

    monkeypatch.setitem(features_module._REGISTRY, "heavy_for_test", unavailable)
    monkeypatch.setitem(features_module._AUTO_ORDER, "diversity", ("heavy_for_test", "judge"))
    assert build_feature_space("auto", kind="diversity").name == "judge"


def test_feature_space_errors_teach():
    with pytest.raises(ValueError, match="Registered: .*judge"):
        build_feature_space("no_such_space")
    with pytest.raises(ValueError, match="kind="):
        build_feature_space("auto")
    with pytest.raises(ValueError, match="already registered"):
        register_feature_space("judge")(lambda device="cpu": None)


# --- diversity ------------------------------------------------------------------------------
def test_mean_pairwise_distance_hand_computed():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    groups = torch.tensor([0, 0, 1, 1, 2])  # group 2 has one sample: no pairs, skipped
    assert mean_pairwise_distance(f, groups) == pytest.approx(0.5)  # (1 + 0) / 2
    assert mean_pairwise_distance(f, groups, distance="euclidean") == pytest.approx(math.sqrt(2) / 2)
    with pytest.raises(ValueError, match="two or more samples"):
        mean_pairwise_distance(f[:1], groups[:1])


def test_collapsed_samples_are_less_diverse_than_varied_ones(judge_space):
    g = torch.Generator().manual_seed(0)
    colour, shape = torch.zeros(16, dtype=torch.long), torch.zeros(16, dtype=torch.long)  # "a red circle" × 16
    varied = render_shapes(colour, shape, g)
    collapsed = varied[:1].expand(16, -1, -1, -1)  # one image repeated: mode collapse
    groups = torch.zeros(16, dtype=torch.long)
    d_varied = mean_pairwise_distance(judge_space(varied), groups)
    d_collapsed = mean_pairwise_distance(judge_space(collapsed), groups)
    assert d_collapsed == pytest.approx(0.0, abs=1e-6) and d_varied > 0.01


# --- Fréchet distance -----------------------------------------------------------------------
def test_frechet_distance_one_dimensional_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 1, generator=g)
    b = 2.0 + 3.0 * a  # N(2, 9) from the same draws: d² = (μ_a − μ_b)² + (σ_a − σ_b)²
    mu_a, mu_b = a.double().mean(), b.double().mean()
    s_a, s_b = a.double().std(), b.double().std()
    assert frechet_distance(a, b) == pytest.approx(float((mu_a - mu_b) ** 2 + (s_a - s_b) ** 2), rel=1e-6)


def test_frechet_distance_zero_on_identical_sets_and_larger_for_other_distributions(judge_space):
    g = torch.Generator().manual_seed(0)
    shapes_a = judge_space(sample_shapes(200, g).images)
    shapes_b = judge_space(sample_shapes(200, g).images)
    noise = judge_space(torch.rand(200, 3, 32, 32, generator=g))
    same = frechet_distance(shapes_a, shapes_a)
    assert same == pytest.approx(0.0, abs=1e-6 * frechet_distance(shapes_a, noise))
    assert 0 < frechet_distance(shapes_a, shapes_b) < frechet_distance(shapes_a, noise)


# --- win rate -------------------------------------------------------------------------------
def test_win_rate_wilson_interval_hand_computed():
    w = win_rate(torch.tensor([1.0] * 8 + [0.0] * 2), torch.tensor([0.5] * 10))  # 8 wins out of 10
    assert (w.rate, w.wins, w.ties, w.n) == (0.8, 8, 0, 10)
    assert w.low == pytest.approx(0.4902, abs=1e-4) and w.high == pytest.approx(0.9433, abs=1e-4)


def test_win_rate_ties_count_half_and_ci_contains_half_for_equal_models():
    g = torch.Generator().manual_seed(0)
    same = torch.randn(64, generator=g)
    tied = win_rate(same, same)
    assert tied.rate == 0.5 and tied.ties == 64 and not tied.excludes(0.5)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)  # two equally good models
    assert not win_rate(a, b).excludes(0.5)


def test_win_rate_ci_excludes_half_for_a_clearly_better_model():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(64, generator=g)
    better = win_rate(b + 1.5 + 0.5 * torch.randn(64, generator=g), b)
    assert better.rate > 0.9 and better.excludes(0.5) and better.low > 0.5
    with pytest.raises(ValueError, match="same length"):
        win_rate(torch.zeros(3), torch.zeros(4))


def test_frechet_distance_of_non_finite_features_is_nan_not_a_crash():
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    b[3, 1] = float("nan")
    assert math.isnan(frechet_distance(a, b))
