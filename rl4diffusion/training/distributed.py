"""The process layout of a run, from accelerate: the same ``python -m rl4diffusion.train`` runs alone,
under ``torchrun --nproc_per_node N`` (CPU: gloo) or under ``accelerate launch`` (DDP/FSDP/DeepSpeed).

How a run is split, and why it matches one process with the same global batch:

* every process draws the *global* batch's random numbers (prompts, x_T, step noise) from the
  same seeded generators and keeps its own slice, so process r runs exactly the chains that a
  single process would run at positions [r·B, (r+1)·B) — noise is cheap, network calls are not;
* rewards are gathered across processes before per-prompt or group statistics (``gather``);
* gradients are averaged by the prepared (DDP) modules in the backward of each optimisation
  step's last micro-batch (``training/optimisation.py``), so all replicas take the same step;
* only the main process writes logs, images and checkpoint files.
"""

from __future__ import annotations

import torch


class Distributed:
    """Rank, world size and the gather that algorithms need, read from the run's Accelerator."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def local_slice(self, batch_size: int) -> slice:
        """Positions of this process's chains within the global batch (world × batch_size)."""
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-process tensor [B, ...] along dim 0 in rank order → [world·B, ...]."""
        return self.accelerator.gather(tensor.contiguous()) if self.enabled else tensor
