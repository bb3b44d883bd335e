"""The replay buffer every algorithm family reads from: torchrl's, over LazyTensorStorage."""

from __future__ import annotations

import torch
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.data.replay_buffers import RandomSampler, SamplerWithoutReplacement


def make_replay_buffer(
    capacity: int,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    without_replacement: bool = True,
    generator: torch.Generator | None = None,
) -> TensorDictReplayBuffer:
    """A TensorDict replay buffer of ``capacity`` items (trajectories [T], transitions or pairs).

    ``without_replacement`` gives epochs over the stored data (on-policy PPO-style passes);
    otherwise minibatches are drawn uniformly with replacement (DPOK's recent-transition buffer).
    """
    sampler = SamplerWithoutReplacement(drop_last=False) if without_replacement else RandomSampler()
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(capacity, device=device), sampler=sampler, batch_size=batch_size
    )
    if generator is not None:
        rb.set_rng(generator)
    return rb
