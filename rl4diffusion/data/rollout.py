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
        A TensorDict [B, T]; the terminal reward is ``td["next", "reward"][:, -1, 0]``.
    """
    reset_in = TensorDict({}, batch_size=env.batch_size, device=env.device)
    if prompt_ids is not None:
        reset_in[keys.PROMPT_ID] = prompt_ids.to(env.device)
    if latents is not None:
        reset_in[keys.LATENTS] = latents.to(env.device)
    start = env.reset(reset_in)
    return env.rollout(
        env.core.num_steps,
        policy=functools.partial(policy.act, generator=generator),
        auto_reset=False,
        tensordict=start,
        break_when_any_done=False,
        return_contiguous=True,
        trust_policy=True,  # policy.act reads and writes the TensorDict keys itself
    )


def terminal_rewards(trajectories: TensorDictBase) -> torch.Tensor:
    """r(x₀, c) of each chain [B] from a [B, T] trajectory batch."""
    return trajectories[keys.NEXT, keys.REWARD][:, -1, 0]


def final_latents(trajectories: TensorDictBase) -> torch.Tensor:
    """x₀ of each chain [B, C, h, w]."""
    return trajectories[keys.NEXT, keys.LATENTS][:, -1]
