"""Per-prompt reward statistics for advantage normalisation (DDPO, Black et al. 2023, App. B).

A FIFO of each prompt's recent rewards persists across epochs; the advantage of a reward is
(r − mean) / (std + 1e-6) over its prompt's FIFO, or over the whole batch while the FIFO holds
fewer than ``min_count`` rewards.
"""

from __future__ import annotations

from collections import deque

import torch


class PerPromptStatTracker:
    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be ≥ 1")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add rewards [B] of ``prompts`` to the FIFOs and return their advantages [B]."""
        rewards_cpu = rewards.detach().double().cpu()
        advantages = torch.empty_like(rewards_cpu)
        batch_mean, batch_std = rewards_cpu.mean(), rewards_cpu.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):  # unique, in order
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            fifo = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            fifo.extend(rewards_cpu[idx].tolist())
            if len(fifo) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(fifo), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            advantages[idx] = (rewards_cpu[idx] - mean) / (std + 1e-6)
        return advantages.to(dtype=rewards.dtype, device=rewards.device)

    def state_dict(self) -> dict:
        return {"buffers": {p: list(v) for p, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}
