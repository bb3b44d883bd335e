"""rl4diffusion: fine-tune diffusion models with RL, reward backpropagation, GFlowNets and
preference optimisation, on one denoising MDP and one rollout/replay interface."""

__version__ = "0.1.0"
