"""DDPO: the clipped surrogate against a hand computation, the stat tracker, and training."""

import json

import torch

from rl4diffusion.algorithms.ddpo import ddpo_loss
from rl4diffusion.data import PerPromptStatTracker
from rl4diffusion.training.trainer import run
from tests.conftest import compose_config


def test_ddpo_loss_matches_hand_computation_in_every_clip_branch():
    eps = 0.1
    old = torch.zeros(4)
    # ratios 1.5 (above the range), 0.5 (below), 1.05 (inside), 1.5 with a negative advantage
    new = torch.log(torch.tensor([1.5, 0.5, 1.05, 1.5]))
    adv = torch.tensor([1.0, -2.0, 3.0, -1.0])
    out = ddpo_loss(new, old, adv, eps)
    # per element: max(−A·ρ, −A·clip(ρ))
    expected = torch.tensor([max(-1.5, -1.1), max(2.0 * 0.5, 2.0 * 0.9), -3.0 * 1.05, max(1.5, 1.1)])
    torch.testing.assert_close(out["loss_policy"], expected.mean())
    assert out["clip_fraction"].item() == 0.75
    torch.testing.assert_close(out["approx_kl"], 0.5 * (new**2).mean())
    # gradient is zero where the clipped branch is active and −A·ρ/B elsewhere
    new = new.clone().requires_grad_(True)
    ddpo_loss(new, old, adv, eps)["loss_policy"].backward()
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 0.0, -3.0 * 1.05 / 4, 1.5 / 4]))


def test_stat_tracker_uses_batch_stats_until_min_count_then_per_prompt():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tracker.update(["a", "b"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)  # batch mean 2, std 1
    adv = tracker.update(["a", "a", "b"], torch.tensor([2.0, 3.0, 3.0]))
    # "a" holds [1, 2, 3]: mean 2, std sqrt(2/3); "b" holds [3, 3]: std 0 → (3 − 3)/1e-6 = 0
    s = (2 / 3) ** 0.5
    torch.testing.assert_close(adv, torch.tensor([0.0, 1 / s, 0.0]), atol=1e-4, rtol=1e-4)
    state = tracker.state_dict()
    fresh = PerPromptStatTracker(buffer_size=4, min_count=2)
    fresh.load_state_dict(state)
    assert list(fresh.buffers["a"]) == [1.0, 2.0, 3.0]


def test_ddpo_raises_eval_reward_on_fixed_seeds(random_pipeline_dir, tmp_path, monkeypatch):
    (tmp_path / "bright_rewards.py").write_text("def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config([
        "algo=ddpo", "reward=bright_rewards:brightness", f"model=path:{random_pipeline_dir}", "model.num_steps=8",
        "model.guidance_scale=3.0", "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
        "eval.samples_per_prompt=8", "eval.every=0", "epochs=8", "algo.batch_size=16", "algo.minibatch_size=8",
        "algo.lr=5e-2", "progress=false",
    ])
    summary = run(cfg, tmp_path / "run")
    assert summary["final"]["set0"]["reward_mean"] > summary["base"]["set0"]["reward_mean"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["phase"] == "train"]
    assert len(train) == 8 and train[-1]["reward_queries"] == 8 * 16
    for r in lines:
        assert {"step", "phase", "reward_mean", "reward_std", "reward_queries", "wall_s"} <= set(r)
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "images").glob("eval_*.png"))
