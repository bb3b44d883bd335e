"""The denoising MDP: one transition core, a torchrl face and a Gymnasium face.

``DenoisingEnv`` is the batched torchrl ``EnvBase`` all training code uses;
``gymnasium.make(ENV_ID)`` builds ``gym_env.DenoisingGymEnv`` (registered by ``import rl4diffusion``).
"""

from rl4diffusion import ENV_ID
from rl4diffusion.envs.core import DenoisingCore
from rl4diffusion.envs.torchrl_env import DenoisingEnv

__all__ = ["ENV_ID", "DenoisingCore", "DenoisingEnv"]
