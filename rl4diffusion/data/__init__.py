"""Rollout collection, the shared replay buffer, reward statistics (and preference datasets)."""

from rl4diffusion.data.buffer import make_replay_buffer, minibatches
from rl4diffusion.data.rollout import collect_trajectories, final_latents, terminal_rewards
from rl4diffusion.data.stats import PerPromptStatTracker

__all__ = ["PerPromptStatTracker", "collect_trajectories", "final_latents", "make_replay_buffer", "minibatches",
           "terminal_rewards"]
