"""Shared fixtures: a tiny random StableDiffusionPipeline saved once per session (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is as fast, and robust on a busy machine


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one torch thread, whatever the previous one set (run(threads=N) changes it)."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def random_pipeline_dir(tmp_path_factory):
    """A random tiny StableDiffusionPipeline saved with save_pretrained (loaded like SD1.5)."""
    from rl4diffusion.testing import make_random_sd_pipeline

    path = tmp_path_factory.mktemp("random_pipeline")
    make_random_sd_pipeline(seed=0).save_pretrained(str(path))
    return str(path)


@pytest.fixture
def make_policy(random_pipeline_dir):
    """Build a fresh DiffusionPolicy over the saved random pipeline (options = PolicyConfig fields)."""
    from rl4diffusion.policies.base import DiffusionPolicy

    def build(**options):
        options.setdefault("num_steps", 5)
        options.setdefault("guidance_scale", 3.0)
        return DiffusionPolicy.from_pretrained(random_pipeline_dir, **options)

    return build


def compose_config(overrides: list[str]):
    """The training config as the CLI would build it from ``overrides``."""
    from hydra import compose, initialize_config_dir

    from rl4diffusion.cli.overrides import CONF_DIR, rewrite_overrides

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=rewrite_overrides(overrides))


def brightness(images, prompts):
    """A differentiable toy reward: mean pixel value."""
    return images.mean(dim=(1, 2, 3))


def bright_reward():
    from rl4diffusion.rewards import Reward

    return Reward("brightness", brightness, differentiable=True)
