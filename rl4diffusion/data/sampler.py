"""Grouped prompt sampling for group-relative methods (GRPO): K samples of each prompt per batch.

Flow-GRPO (Liu et al. 2025) and DanceGRPO normalise each reward against the other samples of
the same prompt drawn in the same batch, so a batch must hold whole groups: batch_size / K
distinct prompts, each repeated K times.

Distributed runs: every process builds the same global batch from the shared seed and keeps its
own slice of it, so the processes together run exactly the groups a single process would run
(groups may straddle two processes when K does not divide the per-process batch; the rewards are
gathered before the group statistics, so that is harmless).

Example::

    sampler = GroupedPromptSampler(num_prompts=10, group_size=4, seed=0)
    prompt_ids, group_ids = sampler.sample(8)  # e.g. [7, 7, 7, 7, 2, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1]
"""

from __future__ import annotations

import torch


class GroupedPromptSampler:
    """Draws batches of whole groups: ``batch_size / group_size`` prompts, each repeated ``group_size`` times.

    Args:
        num_prompts: size of the prompt list the ids index into.
        group_size: K, samples per prompt within a batch (≥ 1; GRPO needs ≥ 2).
        seed: the shared seed (the same on every process).
        rank, world_size: this process's position; each keeps rows [rank·B, (rank+1)·B) of the global batch.
        state: a ``state_dict()`` to continue from (a resumed run's), or None.
    """

    def __init__(self, num_prompts: int, group_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 state: dict | None = None):
        if num_prompts < 1 or group_size < 1:
            raise ValueError(f"need num_prompts ≥ 1 and group_size ≥ 1, got {num_prompts} and {group_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_prompts = num_prompts
        self.group_size = group_size
        self.rank = rank
        self.world_size = world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        if state is not None:
            self.load_state_dict(state)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's (prompt ids [B], group ids [B]) of the next global batch of ``batch_size · world_size``.

        Group ids number the groups of the global batch (0 … G−1), so equal ids mean "same group"
        on every process. Prompts are distinct within a batch while there are enough of them.
        """
        total = batch_size * self.world_size
        if total % self.group_size:
            raise ValueError(f"the global batch ({total}) must be a multiple of the group size ({self.group_size})")
        num_groups = total // self.group_size
        if num_groups <= self.num_prompts:
            prompts = torch.randperm(self.num_prompts, generator=self.generator)[:num_groups]
        else:  # more groups than prompts: some prompts appear in several groups
            prompts = torch.randint(self.num_prompts, (num_groups,), generator=self.generator)
        prompt_ids = prompts.repeat_interleave(self.group_size)  # (G·K,) = (world·B,)
        group_ids = torch.arange(num_groups).repeat_interleave(self.group_size)
        self.batches_drawn += 1
        local = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return prompt_ids[local], group_ids[local]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])
