"""The denoising MDP the Gymnasium way: ``gymnasium.make("rl4diffusion/Denoising-v0")``.

One image per environment (no batch dimension), numpy observations, the same transition
core as DenoisingEnv. By default it runs the embedded world (model=tiny, reward
shape_alignment, the training prompts); pass ``policy=``, ``reward=`` and ``prompts=`` to
use your own.
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from rl4diffusion import keys
from rl4diffusion.envs.core import DenoisingCore


class DenoisingGymEnv(gym.Env):
    """Observation: {"latents": x_t, "step_index": i, "prompt_id": c}; action: x_{t-1}; reward at the end."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, policy=None, reward=None, prompts: Sequence[str] | None = None, render_mode: str | None = None):
        if policy is None:
            from rl4diffusion.policies.base import DiffusionPolicy

            policy = DiffusionPolicy.from_pretrained("tiny")
        if reward is None:
            from rl4diffusion.rewards import build_reward

            reward = build_reward("shape_alignment", device=policy.device)
        if prompts is None:
            from rl4diffusion.zoo.shapes import prompt_set

            prompts = prompt_set("train")
        self.core = DenoisingCore(policy, reward, prompts)
        self.render_mode = render_mode
        shape = policy.latent_shape
        self.observation_space = spaces.Dict(
            {
                keys.LATENTS: spaces.Box(-np.inf, np.inf, shape=shape, dtype=np.float32),
                keys.STEP_INDEX: spaces.Discrete(self.core.num_steps + 1),
                keys.PROMPT_ID: spaces.Discrete(len(self.core.prompts)),
            }
        )
        self.action_space = spaces.Box(-np.inf, np.inf, shape=shape, dtype=np.float32)
        self._state: dict[str, torch.Tensor] | None = None
        self._rng = torch.Generator(device=policy.device)

    def _obs(self) -> dict:
        s = self._state
        return {
            keys.LATENTS: s[keys.LATENTS][0].cpu().numpy().astype(np.float32),
            keys.STEP_INDEX: int(s[keys.STEP_INDEX][0]),
            keys.PROMPT_ID: int(s[keys.PROMPT_ID][0]),
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng.manual_seed(seed)
        else:  # derive from gymnasium's np_random so that reset() without a seed still varies
            self._rng.manual_seed(int(self.np_random.integers(2**62)))
        options = options or {}
        prompt_ids = torch.tensor([options["prompt_id"]]) if "prompt_id" in options else None
        self._state = self.core.reset(1, prompt_ids=prompt_ids, generator=self._rng)
        return self._obs(), {"prompt": self.core.prompts[int(self._state[keys.PROMPT_ID][0])]}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        device = self.core.policy.device
        action = torch.as_tensor(np.asarray(action, dtype=np.float32), device=device).unsqueeze(0)
        self._state, reward, done = self.core.step(self._state, action)
        terminated = bool(done[0])
        return self._obs(), float(reward[0]), terminated, False, {}

    def render(self):
        if self.core.last_images is None:  # nothing decoded yet: a black frame of the image size
            p = self.core.policy
            return np.zeros((p.height, p.width, 3), dtype=np.uint8)
        return (self.core.last_images[0].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
