"""rl4diffusion: fine-tune diffusion models with RL, reward backpropagation, GFlowNets and
preference optimisation, on one denoising MDP and one rollout/replay interface.

``import rl4diffusion`` registers the Gymnasium environment, so this is all it takes::

    import gymnasium
    import rl4diffusion

    env = gymnasium.make("rl4diffusion/Denoising-v0")

The registration stores only the id and a dotted entry point: torch, diffusers and the model are
imported by ``gymnasium.make``, not by ``import rl4diffusion``.
"""

import gymnasium

__version__ = "0.1.0"

ENV_ID = "rl4diffusion/Denoising-v0"
"""The Gymnasium id of the denoising MDP (``rl4diffusion.envs.gym_env.DenoisingGymEnv``)."""

if ENV_ID not in gymnasium.registry:  # a reload of the package must not register it twice
    gymnasium.register(id=ENV_ID, entry_point="rl4diffusion.envs.gym_env:DenoisingGymEnv")
