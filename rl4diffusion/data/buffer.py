"""Minibatches and the replay buffer.

* ``minibatches`` shuffles the items of one batch into minibatches: what on-policy methods
  (DDPO, GRPO, reward backpropagation, the preference methods) iterate over;
* ``make_replay_buffer`` is torchrl's buffer over LazyTensorStorage, for methods that replay data
  across updates (DPOK's recent transitions, ∇-GFlowNet's lagged batch).

One rule for random index draws: **the generator lives on the device of the tensor it indexes** —
a CPU generator for CPU storage, a CUDA generator for CUDA storage. PyTorch refuses a CPU
generator for a CUDA draw (``torch.randperm(n, device="cuda", generator=cpu_gen)``), so a buffer
on a GPU with a CPU generator would fail at its first minibatch; both helpers below build or
check their generator against the storage device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.data.replay_buffers import RandomSampler, SamplerWithoutReplacement


def check_generator_device(generator: torch.Generator | None, device: str | torch.device) -> None:
    """Raise ValueError unless ``generator`` (if any) draws on ``device``'s type."""
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"a generator on {generator.device} cannot draw indices for storage on {device}: "
                         "create the generator on the storage's device, torch.Generator(device=...)")


def minibatches(
    num_items: int, size: int, *, generator: torch.Generator | None = None, device: str | torch.device | None = None
) -> Iterator[torch.Tensor]:
    """Index tensors [≤ size] of one shuffled pass over ``num_items`` items (the last may be smaller).

    ``device`` is where the indexed data lives (None: the generator's device, or the CPU).

    Example::

        for index in minibatches(batch.shape[0], 8, generator=g, device=batch.device):
            train_on(batch[index])
    """
    if size < 1:
        raise ValueError(f"minibatch size must be ≥ 1, got {size}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    check_generator_device(generator, device)
    order = torch.randperm(num_items, generator=generator, device=device)
    for start in range(0, num_items, size):
        yield order[start : start + size]


def make_replay_buffer(
    capacity: int,
    batch_size: int | None,
    *,
    device: str | torch.device = "cpu",
    without_replacement: bool = True,
    generator: torch.Generator | None = None,
) -> TensorDictReplayBuffer:
    """A TensorDict replay buffer of ``capacity`` items (trajectories [T], transitions or pairs).

    ``without_replacement`` gives epochs over the stored data; otherwise minibatches are drawn
    uniformly with replacement (DPOK's recent-transition buffer). ``generator`` (on ``device``, by the
    rule above; checked) makes the draws reproducible; the caller keeps it to save its state.
    """
    check_generator_device(generator, device)
    sampler = SamplerWithoutReplacement(drop_last=False) if without_replacement else RandomSampler()
    rb = TensorDictReplayBuffer(
        storage=LazyTensorStorage(capacity, device=device), sampler=sampler, batch_size=batch_size
    )
    if generator is not None:
        rb.set_rng(generator)
    return rb
