"""The reward registry: names, user modules, weighted sums and clear errors."""

import sys

import pytest
import torch

from rl4diffusion.errors import ConfigError
from rl4diffusion.rewards import available_rewards, build_reward, register_reward
from rl4diffusion.rewards.jpeg import jpeg_size_kb


def test_jpeg_rewards_rank_flat_above_noisy_images():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((2, 3, 32, 32), 0.5)
    noisy = torch.rand(2, 3, 32, 32, generator=g)
    comp = build_reward("jpeg_compressibility")
    assert (comp(flat, ["a", "b"]) > comp(noisy, ["a", "b"])).all()
    incomp = build_reward("jpeg_incompressibility")
    torch.testing.assert_close(incomp(noisy, ["a", "b"]), jpeg_size_kb(noisy))
    assert not comp.differentiable and comp.queries == 4


def test_register_and_build_by_name():
    @register_reward("test_brightness", differentiable=True)
    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    r = build_reward("test_brightness")
    assert r.differentiable and "test_brightness" in available_rewards()
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    r(x, ["p"] * 3).sum().backward()
    assert x.grad is not None and (x.grad > 0).all()


def test_user_module_target_and_weighted_sum(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def red(images, prompts):\n    return images[:, 0].mean(dim=(1, 2))\nred.differentiable = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    r = build_reward("my_rewards:red")
    assert r.differentiable and r.name == "red"
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = 1.0
    assert r(images, ["x", "y"]).tolist() == [1.0, 0.0]
    w = build_reward("weighted", terms={"my_rewards:red": 2.0, "jpeg_compressibility": 0.0})
    assert w(images, ["x", "y"]).tolist() == [2.0, 0.0] and not w.differentiable
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    "name, message",
    [("no_such_reward", "Valid names"), ("no_such_module_xyz:fn", "could not import"),
     ("rl4diffusion.rewards.jpeg:nope", "has no attribute")],
)
def test_bad_reward_names_raise_config_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        build_reward(name)


def test_reward_output_shape_is_checked():
    r = build_reward("weighted", terms={"jpeg_compressibility": 1.0})
    with pytest.raises(ValueError, match="images"):
        r(torch.zeros(2, 1, 4, 4), ["a", "b"])


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "heavy"])
def test_a_weighted_sum_refuses_a_weight_that_is_not_a_finite_number(weight):
    from rl4diffusion.errors import ConfigError
    from rl4diffusion.rewards.registry import WeightedSum

    with pytest.raises(ConfigError, match="weight of term 'shape_alignment' must be a finite number"):
        WeightedSum({"shape_alignment": weight})
