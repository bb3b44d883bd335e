"""Rollout collection: [B, T] trajectory TensorDicts with the keys of ``rl4diffusion.keys``."""

from __future__ import annotations

import functools

import torch
from tensordict import TensorDict, TensorDictBase

from rl4diffusion import keys


@torch.no_grad()
def collect_trajectories(
    env,
    policy,
    *,
    prompt_ids: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> TensorDictBase:
    """Run one batch of full denoising chains through ``env`` with ``policy.act``.

    Args:
        env: a DenoisingEnv (its batch size is the number of chains).
        prompt_ids: which prompts to run [B]; drawn by the environment when None.
        latents: the initial noise x_T [B, C, h, w]; drawn by the environment when None.
        generator: the policy's sampling noise (seed it for paired comparisons).

    Returns:
        A TensorDict [B, T]; the terminal reward is ``td["next", "reward"][:, -1, 0]``. The prompt's
        conditioning (``prompt_embeds`` and any extra key) is not stored per step — T copies of an
        [L, D] embedding per chain would dominate the batch at SD scale — only ``prompt_id``;
        ``conditioning_table`` and ``Algorithm.with_conditioning`` put it back for a minibatch.
    """
    reset_in = TensorDict({}, batch_size=env.batch_size, device=env.device)
    if prompt_ids is not None:
        reset_in[keys.PROMPT_ID] = prompt_ids.to(env.device)
    if latents is not None:
        reset_in[keys.LATENTS] = latents.to(env.device)
    start = env.reset(reset_in)
    steps = env.rollout(
        env.core.num_steps,
        policy=functools.partial(policy.act, generator=generator),
        auto_reset=False,
        tensordict=start,
        break_when_any_done=False,
        return_contiguous=False,  # a lazy stack: the per-step references to one embedding are never copied
        trust_policy=True,  # policy.act reads and writes the TensorDict keys itself
    )
    conditioning = conditioning_keys(policy)
    return steps.exclude(*conditioning, *[(keys.NEXT, k) for k in conditioning]).contiguous()


def conditioning_keys(policy) -> tuple[str, ...]:
    """The keys of a state's prompt conditioning: ``prompt_embeds`` plus the policy's extra ones (SD3's pooled)."""
    return (keys.PROMPT_EMBEDS, *getattr(policy, "extra_conditioning_keys", ()))


@torch.no_grad()
def conditioning_table(policy, prompts) -> dict[str, torch.Tensor]:
    """Every prompt's conditioning by key, [P, ...], from the policy's cache: index it with ``prompt_id``."""
    return {keys.PROMPT_EMBEDS: policy.encode_prompts(list(prompts)), **policy.extra_conditioning(list(prompts))}


def terminal_rewards(trajectories: TensorDictBase) -> torch.Tensor:
    """r(x₀, c) of each chain [B] from a [B, T] trajectory batch."""
    return trajectories[keys.NEXT, keys.REWARD][:, -1, 0]


def final_latents(trajectories: TensorDictBase) -> torch.Tensor:
    """x₀ of each chain [B, C, h, w]."""
    return trajectories[keys.NEXT, keys.LATENTS][:, -1]
