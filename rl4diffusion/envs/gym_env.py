"""The denoising MDP the Gymnasium way: ``gymnasium.make("rl4diffusion/Denoising-v0")``.

One image per environment (no batch dimension), numpy observations, the same transition
core as DenoisingEnv. By default it runs the embedded world (model=tiny, reward
shape_alignment, the training prompts); pass ``policy=``, ``reward=`` and ``prompts=`` to
use your own. ``import rl4diffusion`` registers the id.

The observation holds what the model reads at a step — x_t, t and the prompt (as an index into
``prompts``; ``info["prompt"]`` has its text) — so an agent with its own copy of the model can act
from it alone::

    import gymnasium
    import rl4diffusion
    import torch
    from tensordict import TensorDict
    from rl4diffusion.policies.base import DiffusionPolicy

    env = gymnasium.make("rl4diffusion/Denoising-v0")
    agent = DiffusionPolicy.from_pretrained("tiny")  # the environment's model, the agent's own copy
    obs, info = env.reset(seed=0)
    terminated = False
    while not terminated:
        state = TensorDict({"latents": torch.as_tensor(obs["latents"])[None],  # (1, C, h, w)
                            "timestep": torch.as_tensor(obs["timestep"])[None],  # (1,)
                            "prompt_embeds": agent.encode_prompts([info["prompt"]])}, batch_size=[1])
        action = agent.act(state)["action"][0].numpy()  # x_{t-1}, (C, h, w)
        obs, reward, terminated, truncated, info = env.step(action)
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
    """One denoising chain: observation {"latents", "timestep", "step_index", "prompt_id"}; action x_{t-1}.

    Observation (a ``spaces.Dict``):

    - ``"latents"``: x_t, float32 [C, h, w];
    - ``"timestep"``: the scheduler timestep t the model is called with — an int (``Discrete``) for
      integer schedules such as DDIM's, a float32 scalar (``Box``) for flow models' sigma * 1000; 0
      after the last step;
    - ``"step_index"``: i, the position of t in the sampling schedule (0 = noisiest);
    - ``"prompt_id"``: the index of the prompt in ``prompts`` (``info["prompt"]`` is its text).

    The reward r(x₀, c) arrives with ``terminated=True`` after ``num_steps`` steps, 0 before.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, policy=None, reward=None, prompts: Sequence[str] | None = None,
                 render_mode: str | None = None):
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
                keys.TIMESTEP: self._timestep_space(policy.timesteps),
                keys.STEP_INDEX: spaces.Discrete(self.core.num_steps + 1),
                keys.PROMPT_ID: spaces.Discrete(len(self.core.prompts)),
            }
        )
        self.action_space = spaces.Box(-np.inf, np.inf, shape=shape, dtype=np.float32)
        self._state: dict[str, torch.Tensor] | None = None
        self._rng = torch.Generator(device=policy.device)

    @staticmethod
    def _timestep_space(timesteps: torch.Tensor) -> spaces.Space:
        """``Discrete`` for an integer schedule (DDIM), a scalar ``Box`` for a float one (flow); with 0."""
        highest = timesteps.max().item()
        if timesteps.dtype.is_floating_point:
            return spaces.Box(0.0, highest, shape=(), dtype=np.float32)
        return spaces.Discrete(int(highest) + 1)

    @property
    def prompts(self) -> list[str]:
        """The prompt list that ``"prompt_id"`` indexes."""
        return self.core.prompts

    def _obs(self) -> dict:
        s = self._state
        t = s[keys.TIMESTEP][0]
        return {
            keys.LATENTS: s[keys.LATENTS][0].cpu().numpy().astype(np.float32),
            keys.TIMESTEP: np.asarray(t.item(), dtype=np.float32) if t.is_floating_point() else int(t),
            keys.STEP_INDEX: int(s[keys.STEP_INDEX][0]),
            keys.PROMPT_ID: int(s[keys.PROMPT_ID][0]),
        }

    def _info(self) -> dict:
        return {"prompt": self.core.prompts[int(self._state[keys.PROMPT_ID][0])]}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start a chain: x_T ~ N(0, I) and a prompt drawn uniformly, or ``options={"prompt_id": i}``."""
        super().reset(seed=seed)
        if seed is not None:
            self._rng.manual_seed(seed)
        else:  # derive from gymnasium's np_random so that reset() without a seed still varies
            self._rng.manual_seed(int(self.np_random.integers(2**62)))
        options = options or {}
        prompt_ids = torch.tensor([options["prompt_id"]]) if "prompt_id" in options else None
        self._state = self.core.reset(1, prompt_ids=prompt_ids, generator=self._rng)
        return self._obs(), self._info()

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if int(self._state[keys.STEP_INDEX][0]) >= self.core.num_steps:
            raise RuntimeError("this chain has already terminated (x₀ was reached): call reset() for another")
        device = self.core.policy.device
        action = torch.as_tensor(np.asarray(action, dtype=np.float32), device=device)[None]  # (1, C, h, w)
        self._state, reward, done = self.core.step(self._state, action)
        terminated = bool(done[0])
        return self._obs(), float(reward[0]), terminated, False, self._info()

    def render(self):
        if self.core.last_images is None:  # nothing decoded yet: a black frame of the image size
            p = self.core.policy
            return np.zeros((p.height, p.width, 3), dtype=np.uint8)
        return (self.core.last_images[0].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
