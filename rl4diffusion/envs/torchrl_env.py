"""DenoisingEnv: the denoising MDP as a batched torchrl EnvBase (the face all training code uses)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from rl4diffusion import keys
from rl4diffusion.envs.core import DenoisingCore


class DenoisingEnv(EnvBase):
    """Batched denoising MDP on the policy's device, TensorDict in and out, with specs.

    ``reset`` accepts an optional tensordict carrying "prompt_id" [B] (which prompts to run)
    and/or "latents" [B, C, h, w] (the initial noise); whatever is absent is drawn from the
    environment's generator (``set_seed``).

    Example::

        env = DenoisingEnv(policy, reward, prompts=["a red circle"], batch_size=4)
        td = env.rollout(policy.config.num_steps, policy.act, break_when_any_done=False)
        td.batch_size  # torch.Size([4, 20]);  td["next", "reward"][:, -1] holds r(x₀, c)
    """

    def __init__(self, policy, reward, prompts: Sequence[str], *, batch_size: int = 8):
        super().__init__(batch_size=torch.Size([batch_size]), device=policy.device)
        self.core = DenoisingCore(policy, reward, prompts)
        self.rng = torch.Generator(device=policy.device)
        latent_shape = policy.latent_shape
        embeds = policy.encode_prompts(prompts[:1])
        b = (batch_size,)
        self.observation_spec = Composite(
            {
                keys.LATENTS: Unbounded(shape=(*b, *latent_shape), dtype=torch.float32),
                keys.TIMESTEP: Unbounded(shape=b, dtype=policy.timesteps.dtype),
                keys.STEP_INDEX: Unbounded(shape=b, dtype=torch.long),
                keys.PROMPT_ID: Categorical(len(self.core.prompts), shape=b, dtype=torch.long),
                keys.PROMPT_EMBEDS: Unbounded(shape=(*b, *embeds.shape[1:]), dtype=embeds.dtype),
            },
            shape=b,
        )
        for key, value in self.core.extra_conditioning(torch.zeros(1, dtype=torch.long)).items():
            self.observation_spec[key] = Unbounded(shape=(*b, *value.shape[1:]), dtype=value.dtype)
        self.core_state_keys = (*type(self).core_state_keys, *self.core.extra_keys)
        self.action_spec = Unbounded(shape=(*b, *latent_shape), dtype=torch.float32)
        self.reward_spec = Unbounded(shape=(*b, 1), dtype=torch.float32)
        self.done_spec = Composite(
            {
                keys.DONE: Categorical(2, shape=(*b, 1), dtype=torch.bool),
                keys.TERMINATED: Categorical(2, shape=(*b, 1), dtype=torch.bool),
            },
            shape=b,
        )

    @property
    def prompts(self) -> list[str]:
        return self.core.prompts

    @property
    def last_images(self) -> torch.Tensor | None:
        return self.core.last_images

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        n = self.batch_size[0]
        given = tensordict if tensordict is not None else {}
        state = self.core.reset(
            n, prompt_ids=given.get(keys.PROMPT_ID, None), latents=given.get(keys.LATENTS, None), generator=self.rng
        )
        false = torch.zeros(n, 1, dtype=torch.bool, device=self.device)
        return TensorDict({**state, keys.DONE: false, keys.TERMINATED: false.clone()}, batch_size=self.batch_size)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        state = {k: tensordict[k] for k in self.core_state_keys}
        next_state, reward, done = self.core.step(state, tensordict[keys.ACTION])
        done = done.unsqueeze(-1)
        return TensorDict(
            {**next_state, keys.REWARD: reward.unsqueeze(-1), keys.DONE: done, keys.TERMINATED: done.clone()},
            batch_size=self.batch_size,
        )

    core_state_keys = (keys.LATENTS, keys.TIMESTEP, keys.STEP_INDEX, keys.PROMPT_ID, keys.PROMPT_EMBEDS)

    def _set_seed(self, seed: int | None) -> None:
        self.rng.manual_seed(int(seed) if seed is not None else torch.seed())
