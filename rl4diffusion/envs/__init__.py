"""The denoising MDP: one transition core, a torchrl face and a Gymnasium face."""

import gymnasium

from rl4diffusion.envs.core import DenoisingCore
from rl4diffusion.envs.torchrl_env import DenoisingEnv

ENV_ID = "rl4diffusion/Denoising-v0"
if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="rl4diffusion.envs.gym_env:DenoisingGymEnv")

__all__ = ["ENV_ID", "DenoisingCore", "DenoisingEnv"]
