"""The denoising MDP's transition core, shared by the torchrl and Gymnasium faces.

State s_t = (c, t, x_t); action a_t = x_{t-1}; the transition is deterministic (the next
state's latents are the action); the reward r(x₀, c) arrives at the terminal step, 0 before.
DDPO (Black et al. 2023), Sec. 4.1; DPOK (Fan et al. 2023), Sec. 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rl4diffusion import keys


class DenoisingCore:
    """Batched reset/step of the denoising MDP over a fixed list of prompts.

    Args:
        policy: the DiffusionPolicy whose sampling schedule, text encoder and VAE define the MDP
            (the environment never touches the trainable weights).
        reward: ``fn(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]``, called at the terminal step.
        prompts: the prompt list; states carry an index into it ("prompt_id").

    ``collect_trajectories`` reads two settings of how a batch of chains is collected (the trainer sets
    them from ``sample_chunks`` and ``reward_async``): ``sample_chunks``, the number of sub-batches the
    chains are sampled in, and ``reward_async``, whether each sub-batch is scored on a worker thread
    while the next one samples.
    """

    def __init__(self, policy, reward, prompts: Sequence[str]):
        if len(prompts) == 0:
            raise ValueError("the denoising environment needs at least one prompt")
        self.policy = policy
        self.reward = reward
        self.prompts = list(prompts)
        self.num_steps = len(policy.timesteps)
        self.last_images: torch.Tensor | None = None  # decoded images of the last finished batch
        self.sample_chunks = 1
        self.reward_async = False

    def prompts_of(self, prompt_ids: torch.Tensor) -> list[str]:
        return [self.prompts[i] for i in prompt_ids.tolist()]

    def reset(
        self,
        batch_size: int,
        *,
        prompt_ids: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Initial states: prompts (given, or drawn uniformly) and x_T ~ N(0, I) (given, or drawn)."""
        device = self.policy.device
        rank, world = self.policy.process_slice  # draw for the global batch, keep this process's rows
        local = slice(rank * batch_size, (rank + 1) * batch_size)
        if prompt_ids is None:
            drawn = torch.randint(len(self.prompts), (batch_size * world,), generator=generator,
                                  device=device)
            prompt_ids = drawn[local]
        prompt_ids = prompt_ids.to(device).long()
        if latents is None:
            latents = self.policy.draw_noise((batch_size, *self.policy.latent_shape), generator)
            latents = latents * self.policy.scheduler.init_noise_sigma
        return {
            keys.LATENTS: latents.to(device),
            keys.TIMESTEP: self.policy.timesteps[0].expand(batch_size).clone(),
            keys.STEP_INDEX: torch.zeros(batch_size, dtype=torch.long, device=device),
            keys.PROMPT_ID: prompt_ids,
            keys.PROMPT_EMBEDS: self.policy.encode_prompts(self.prompts_of(prompt_ids)),
            **self.extra_conditioning(prompt_ids),
        }

    def extra_conditioning(self, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditioning beyond prompt_embeds that the policy needs (SD3's pooled embeddings), by key."""
        extra = getattr(self.policy, "extra_conditioning", None)
        return extra(self.prompts_of(prompt_ids)) if extra is not None else {}

    @torch.no_grad()
    def step(
        self, state: dict[str, torch.Tensor], action: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Apply x_{t-1} = action. Returns (next state, reward [B], done [B]).

        All states of a batch share the step index (they were reset together), so the
        terminal test and the decode happen once per batch.
        """
        step_index = state[keys.STEP_INDEX] + 1
        done = step_index >= self.num_steps
        next_t = self.policy.timesteps[step_index.clamp(max=self.num_steps - 1)]
        reward = torch.zeros(action.shape[0], device=action.device)
        if bool(done.all()):
            images = self.policy.decode(action)
            reward = self.reward(images, self.prompts_of(state[keys.PROMPT_ID]))
            reward = reward.detach().float().to(action.device)
            self.last_images = images
        elif bool(done.any()):
            raise RuntimeError("states of one batch reached the terminal step at different times; "
                               "reset them together")
        next_state = {
            keys.LATENTS: action,
            keys.TIMESTEP: torch.where(done, torch.zeros_like(next_t), next_t),
            keys.STEP_INDEX: step_index,
            keys.PROMPT_ID: state[keys.PROMPT_ID],
            keys.PROMPT_EMBEDS: state[keys.PROMPT_EMBEDS],
        }
        for key in self.extra_keys:
            next_state[key] = state[key]
        return next_state, reward, done

    @property
    def extra_keys(self) -> tuple[str, ...]:
        """Keys of ``extra_conditioning`` (empty for Stable-Diffusion-style policies)."""
        return tuple(getattr(self.policy, "extra_conditioning_keys", ()))
