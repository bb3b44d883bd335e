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

    With ``env.core.sample_chunks`` > 1 or ``env.core.reward_async`` the chains are sampled in that many
    sub-batches (``collect_in_chunks``); the starting states are drawn for the whole batch first either way.

    Returns:
        A TensorDict [B, T]; the terminal reward is ``td["next", "reward"][:, -1, 0]``. The prompt's
        conditioning (``prompt_embeds`` and any extra key) is not stored per step — T copies of an
        [L, D] embedding per chain would dominate the batch at SD scale — only ``prompt_id``;
        ``conditioning_table`` and ``Algorithm.with_conditioning`` put it back for a minibatch.
    """
    start = _reset(env, prompt_ids, latents)  # every chain's prompt and x_T, from the environment's generator
    if env.core.sample_chunks == 1 and not env.core.reward_async:
        return _rollout(env, policy, start, generator)
    return collect_in_chunks(env, policy, start, generator)


def collect_in_chunks(env, policy, start: TensorDictBase, generator: torch.Generator | None) -> TensorDictBase:
    """The chains of ``start`` [B] sampled ``env.core.sample_chunks`` sub-batches at a time.

    Each sub-batch's decoded images go to a ``RewardScorer`` — a worker thread with ``reward_async``, so
    that sub-batch k is scored while k+1 samples (ddpo-pytorch's loop) — and the rewards are written into
    the trajectories once all are sampled. Scoring asynchronously or not gives identical trajectories: the
    sampling noise comes from ``generator`` sub-batch after sub-batch either way.
    """
    from rl4diffusion.rewards.async_reward import RewardScorer

    core, batch_size = env.core, env.batch_size[0]
    size = batch_size // core.sample_chunks
    images, scores = [], []

    def score_later(chunk_images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The sub-batch environment's reward: hand the images to the scorer, a placeholder meanwhile."""
        images.append(chunk_images)
        scores.append(scorer.submit(chunk_images, prompts))
        return torch.full((len(prompts),), float("nan"))

    chunk_env = type(env)(core.policy, score_later, core.prompts, batch_size=size)
    with RewardScorer(core.reward, asynchronous=core.reward_async) as scorer:
        parts = [_rollout(chunk_env, policy, _reset(chunk_env, start[keys.PROMPT_ID][i : i + size],
                                                    start[keys.LATENTS][i : i + size]), generator)
                 for i in range(0, batch_size, size)]
        rewards = torch.cat([score.result().detach().float().to(env.device) for score in scores])
    trajectories = torch.cat(parts)
    trajectories.get((keys.NEXT, keys.REWARD))[:, -1, 0] = rewards
    core.last_images = torch.cat(images)
    return trajectories


def _reset(env, prompt_ids: torch.Tensor | None, latents: torch.Tensor | None) -> TensorDictBase:
    """``env.reset`` with the given prompts and initial noise (the environment draws what is None)."""
    given = TensorDict({}, batch_size=env.batch_size, device=env.device)
    if prompt_ids is not None:
        given[keys.PROMPT_ID] = prompt_ids.to(env.device)
    if latents is not None:
        given[keys.LATENTS] = latents.to(env.device)
    return env.reset(given)


def _rollout(env, policy, start: TensorDictBase, generator: torch.Generator | None) -> TensorDictBase:
    """The chains from the reset states ``start`` to x₀: [B, T], without the per-step conditioning."""
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
