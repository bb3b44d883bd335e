"""Rewards: the registry and the built-ins. ``build_reward("name")`` gives a callable Reward."""

from rl4diffusion.rewards import jpeg  # noqa: F401  (registers the JPEG rewards)
from rl4diffusion.rewards.registry import (
    Reward,
    available_rewards,
    build_reward,
    describe_rewards,
    register_reward,
)

__all__ = ["Reward", "available_rewards", "build_reward", "describe_rewards", "register_reward"]
