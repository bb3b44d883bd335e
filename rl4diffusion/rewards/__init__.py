"""Rewards: the registry and the built-ins. ``build_reward("name")`` gives a callable Reward."""

from rl4diffusion.rewards import (
    embedded,  # noqa: F401  (shape_alignment, colorfulness; the judge loads on first use)
    jpeg,  # noqa: F401  (registers the JPEG rewards)
    real,  # noqa: F401  (aesthetic, pickscore, clip_score, hpsv2; heavy imports are lazy)
)
from rl4diffusion.rewards.registry import (
    Reward,
    RewardError,
    available_rewards,
    build_reward,
    describe_rewards,
    register_reward,
)

__all__ = ["Reward", "RewardError", "available_rewards", "build_reward", "describe_rewards", "register_reward"]
