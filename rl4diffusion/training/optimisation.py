"""The one optimisation step every algorithm shares, under accelerate.

For each ``OptimisationStep`` an algorithm yields (``rl4diffusion.algorithms.base``):

1. every micro-batch runs its forward under ``accelerator.autocast()`` and backpropagates
   ``weight · Σ loss_*`` with ``accelerator.backward``; all micro-batches but the last run inside
   ``no_sync`` of every prepared module, so a multi-process run reduces gradients once per step
   (the nanoGPT / accelerate accumulation pattern);
2. each named optimiser's gradients are clipped with ``accelerator.clip_grad_norm_`` (which also
   unscales fp16 gradients); the norm before clipping is logged;
3. if the summed loss or any gradient norm is not finite the step is skipped — gradients are
   dropped, weights and optimiser state are untouched, so nothing needs to be copied beforehand.
   This is the step's only host sync;
4. the optimisers step and their gradients are cleared.

Diagnostics stay on the device and are averaged over the epoch (and over processes) by
``Diagnostics``; one ``tolist()`` at the end of the update is the epoch's only other sync.
"""

from __future__ import annotations

import contextlib
import math

import torch

from rl4diffusion.algorithms.base import OptimisationStep, TrainedModule


def metric_name(key: str) -> str:
    """``loss_kl`` → ``loss/kl``; a key with a ``/`` is kept; anything else → ``diag/<key>``."""
    if key.startswith("loss_"):
        return f"loss/{key[5:]}"
    return key if "/" in key else f"diag/{key}"


class Diagnostics:
    """Running means of scalar tensors, kept on their device until ``means()`` (one host sync)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value).detach().float().reshape(())
        self.sums[name] = self.sums[name] + value.to(self.sums[name].device) if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def means(self, extra: dict[str, torch.Tensor | float] | None = None, accelerator=None) -> dict[str, float]:
        """The running means (averaged over processes too, when ``accelerator`` runs several), then
        ``extra`` as given (an algorithm's per-epoch values are its own to make global)."""
        names = list(self.sums)
        values = [self.sums[k] / self.counts[k] for k in names]
        if values and accelerator is not None and accelerator.num_processes > 1:
            values = list(accelerator.reduce(torch.stack(values), reduction="mean"))  # one collective
        for k, v in (extra or {}).items():
            names.append(k)
            values.append(torch.as_tensor(v).detach().float().reshape(()))
        if not values:
            return {}
        device = values[0].device
        return dict(zip(names, torch.stack([v.to(device) for v in values]).tolist()))  # the one sync


def run_optimisation_step(
    accelerator,
    step: OptimisationStep,
    modules: dict[str, TrainedModule],
    prepared: dict[str, torch.optim.Optimizer],
    sync_modules: list[torch.nn.Module],
    default_loss_fn,
    diagnostics: Diagnostics,
) -> bool:
    """Run one optimisation step (see the module docstring); returns False when it was skipped."""
    micro_batches = list(step.micro_batches)
    count = len(micro_batches)
    weights = list(step.weights) if step.weights is not None else [None] * count  # None: the mean, loss / count
    loss_fn = step.loss_fn or default_loss_fn
    total = None
    for index, (micro, weight) in enumerate(zip(micro_batches, weights)):
        last = index == len(micro_batches) - 1
        with contextlib.ExitStack() as stack:
            if not last and accelerator.num_processes > 1:  # reduce gradients once, on the last micro-batch
                for module in sync_modules:
                    stack.enter_context(accelerator.no_sync(module))
            with accelerator.autocast():
                terms = loss_fn(micro)
            loss = sum(v for k, v in terms.items() if k.startswith("loss_"))
            scaled = loss / count if weight is None else loss * weight
            accelerator.backward(scaled)
        if weight != 0:  # padding micro-batches (weight 0) are left out of the diagnostics
            total = scaled.detach() if total is None else total + scaled.detach()
            for key, value in terms.items():
                diagnostics.add(metric_name(key), value)
    norms = {}
    for name in step.optimizers:
        params = [p for group in modules[name].optimizer.param_groups for p in group["params"]]
        clip = modules[name].max_grad_norm
        norms[name] = accelerator.clip_grad_norm_(params, clip if clip is not None else math.inf)
    finite = torch.stack([torch.isfinite(n).all() for n in norms.values()]).all()
    if total is not None:
        finite = finite & torch.isfinite(total)
    ok = bool(finite)  # the step's one host sync
    if ok:
        for name in step.optimizers:
            prepared[name].step()
        for name, norm in norms.items():
            diagnostics.add("diag/grad_norm" if name == "policy" else f"diag/{name}_grad_norm", norm)
        for key, value in step.diagnostics.items():
            diagnostics.add(metric_name(key), value)
    for name in step.optimizers:
        prepared[name].zero_grad(set_to_none=True)
    return ok


class Updater:
    """An algorithm's update under accelerate: its modules and optimisers prepared once, then every
    ``OptimisationStep`` of an epoch run by ``run_optimisation_step``.

    The trainer builds one per run; tests and benchmarks use it directly::

        update = Updater(algorithm)            # a one-process CPU/GPU Accelerator unless one is given
        metrics = update(algorithm.collect(env))
    """

    def __init__(self, algorithm, accelerator=None):
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=algorithm.policy.device.type == "cpu")
        self.accelerator = accelerator
        self.algorithm = algorithm
        policy = algorithm.policy
        self.modules = algorithm.trained_modules()
        self.denoiser = accelerator.prepare(policy.unet)
        if self.denoiser is not policy.unet:  # e.g. a DDP wrapper: the policy's forward calls must go through it
            policy.set_training_denoiser(self.denoiser)
        self.sync_modules = [self.denoiser]
        self.optimizers = {}
        for name, entry in self.modules.items():
            if entry.module is not None:
                wrapped = accelerator.prepare(entry.module)
                if entry.attribute is not None:
                    setattr(algorithm, entry.attribute, wrapped)  # its forward is the one that syncs
                self.sync_modules.append(wrapped)
            self.optimizers[name] = accelerator.prepare(entry.optimizer)
        self.skipped = 0  # optimisation steps skipped as non-finite in the last call

    def __call__(self, batch) -> dict[str, float]:
        """All optimisation steps of one epoch; returns the epoch's metrics (``skipped`` counts skipped steps)."""
        diagnostics, self.skipped = Diagnostics(), 0
        for step in self.algorithm.optimisation_steps(batch):
            ok = run_optimisation_step(self.accelerator, step, self.modules, self.optimizers, self.sync_modules,
                                       self.algorithm.loss_terms, diagnostics)
            self.skipped += not ok
        return diagnostics.means(self.algorithm.end_update(), self.accelerator)
