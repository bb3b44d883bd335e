"""Scale-out through accelerate: the same ``python -m rl4diffusion.train`` runs alone, under
``torchrun --nproc_per_node N`` (CPU: gloo) or under ``accelerate launch`` (DDP/FSDP/DeepSpeed configs).

How a run is split, and why it matches one process with the same global batch:

* every process draws the *global* batch's random numbers (prompts, x_T, step noise) from the
  same seeded generators and keeps its own slice, so process r runs exactly the chains that a
  single process would run at positions [r·B, (r+1)·B) — noise is cheap, network calls are not;
* rewards are gathered across processes before per-prompt statistics (``gather``);
* gradients are averaged across processes right before each optimiser step (a step pre-hook on
  every optimiser of the algorithm), so all replicas take the same step;
* only the main process writes logs, images and checkpoints.
"""

from __future__ import annotations

import torch


class Distributed:
    """Process layout from accelerate, plus the three collectives training needs."""

    def __init__(self, device: torch.device):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=device.type == "cpu")
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device if device.type != "cpu" else device

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def local_slice(self, batch_size: int) -> slice:
        """Positions of this process's chains within the global batch (world × batch_size)."""
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-process tensor [B, ...] along dim 0 in rank order → [world·B, ...]."""
        return self.accelerator.gather(tensor.contiguous()) if self.enabled else tensor

    def average_gradients_before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.enabled:
            return

        def hook(opt, args, kwargs):
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.copy_(self.accelerator.reduce(p.grad, reduction="mean"))

        optimizer.register_step_pre_hook(hook)
