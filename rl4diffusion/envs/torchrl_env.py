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

    ``policy.act`` reads and writes the TensorDict keys itself, so torchrl is told to pass it the
    TensorDict as it is (``trust_policy=True``) rather than to wrap it in a module built from the
    observation spec. One rollout of ``num_steps`` steps is one batch of whole chains; a collector
    runs chain after chain, resetting the chains that are done.

    Example::

        env = DenoisingEnv(policy, reward, prompts=["a red circle"], batch_size=4)
        td = env.rollout(policy.config.num_steps, policy.act, break_when_any_done=False, trust_policy=True)
        td.batch_size  # torch.Size([4, 20]);  td["next", "reward"][:, -1] holds r(x₀, c)

        from torchrl.collectors import Collector  # SyncDataCollector in older torchrl

        frames = env.batch_size[0] * policy.config.num_steps  # one batch of chains per iteration
        collector = Collector(env, policy.act, frames_per_batch=frames, total_frames=2 * frames,
                              trust_policy=True)
        for batch in collector:  # TensorDict [4, 20], the env's layout plus ("collector", "traj_ids")
            ...
        collector.shutdown()
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
            # on the env's device: a Composite refuses a sub-spec on another (found on CUDA, not on a CPU)
            self.observation_spec[key] = Unbounded(shape=(*b, *value.shape[1:]), dtype=value.dtype,
                                                   device=self.observation_spec.device)
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
            n, prompt_ids=given.get(keys.PROMPT_ID, None), latents=given.get(keys.LATENTS, None),
            generator=self.rng,
        )
        false = torch.zeros(n, 1, dtype=torch.bool, device=self.device)
        done = {keys.DONE: false, keys.TERMINATED: false.clone()}
        return TensorDict({**state, **done}, batch_size=self.batch_size)

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
