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

The ``Updater`` adds the options every algorithm shares (``OptimConfig``, the ``optim`` group of the
training config): gradient accumulation across optimisation steps (``accumulate``), a learning-rate
warm-up and schedule (``LearningRateSchedule``), and an exponential moving average of the trained
weights (diffusers' ``EMAModel``), swapped in by ``averaged_weights()`` for evaluation and export.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch

from rl4diffusion.algorithms.base import OptimisationStep, TrainedModule
from rl4diffusion.errors import ConfigError


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


def accumulate(steps: Iterable[OptimisationStep], count: int) -> Iterator[OptimisationStep]:
    """Merge every ``count`` consecutive steps that step the same optimisers with the same loss into one.

    The merged step's micro-batches are theirs, each weight divided by the group's size, so its gradient
    is the mean of theirs: ``count`` steps over minibatches of m give the gradient of one step over the
    k·m samples (ddpo-pytorch's and TRL's ``gradient_accumulation_steps``). A group is cut short where the
    optimisers or the loss change, and at the end of the epoch. A step is merged as soon as its group is
    full, so the algorithm's generator never runs ahead of the update by more than one group.
    """
    group: list[OptimisationStep] = []
    for step in steps:
        if group and (step.optimizers, step.loss_fn) != (group[0].optimizers, group[0].loss_fn):
            yield merge_steps(group)
            group = []
        group.append(step)
        if len(group) == count:
            yield merge_steps(group)
            group = []
    if group:
        yield merge_steps(group)


def merge_steps(group: list[OptimisationStep]) -> OptimisationStep:
    """One step with the micro-batches of ``group`` (same optimisers and loss), their weights divided by its size."""
    if len(group) == 1:
        return group[0]
    micro_batches, weights, diagnostics = [], [], {}
    for step in group:
        count = len(step.micro_batches)
        micro_batches.extend(step.micro_batches)
        weights.extend((w if w is not None else 1 / count) / len(group)
                       for w in (step.weights if step.weights is not None else [None] * count))
        for key, value in step.diagnostics.items():
            diagnostics.setdefault(key, []).append(value)
    return OptimisationStep(micro_batches, weights, group[0].optimizers, group[0].loss_fn,
                            {key: torch.stack(values).mean() for key, values in diagnostics.items()})


def check_grad_accumulation(algorithm_cls, count: int) -> None:
    """Refuse ``optim.grad_accumulation > 1`` for an algorithm whose steps cannot be merged."""
    if count > 1 and not algorithm_cls.supports_grad_accumulation:
        raise ConfigError(
            f"optim.grad_accumulation={count}: algo={algorithm_cls.name} cannot merge its optimisation steps (each "
            "one depends on the update before it, or it takes a single step per epoch already). Use "
            "optim.grad_accumulation=1 and size its steps with its own options (algo.minibatch_size, or algo."
            "gradient_accumulation_steps where it has one).")


class LearningRateSchedule:
    """A linear warm-up, then a constant or cosine learning rate, set on each optimiser before it steps.

    Optimiser step k = 1, 2, … of an optimiser in epoch e of E trains at
    ``lr · min(1, k / warmup_steps) · c(e)``, with c = 1 (constant) or ½(1 + cos(π(e−1)/E)) (cosine),
    where ``lr`` is each parameter group's learning rate when the schedule is made. Warm-up: Goyal et al.
    2017 (Accurate, Large Minibatch SGD); cosine annealing: Loshchilov & Hutter 2017 (SGDR), here without
    restarts and by epoch, because how many optimiser steps an epoch takes is not known in advance for
    every algorithm (GRPO drops groups without signal, ∇-GFlowNet skips its first epoch). Torch's
    schedulers count steps only, so this one is written out; its state is the step counts.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], *, warmup_steps: int = 0,
                 schedule: str = "constant", epochs: int = 1):
        self.optimizers = optimizers
        self.base_lrs = {name: [group["lr"] for group in opt.param_groups] for name, opt in optimizers.items()}
        self.warmup_steps, self.schedule, self.epochs = warmup_steps, schedule, epochs
        self.steps = dict.fromkeys(optimizers, 0)  # optimiser steps taken, by optimiser
        self.epoch = 1

    @property
    def active(self) -> bool:
        return self.warmup_steps > 0 or self.schedule != "constant"

    def factor(self, name: str) -> float:
        """The learning rate's factor for the next step of optimiser ``name``."""
        warm = min(1.0, (self.steps[name] + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * (self.epoch - 1) / self.epochs))
        return warm

    def apply(self, names: Iterable[str]) -> None:
        """Set the learning rate of the next step of the optimisers ``names``."""
        for name in names:
            factor = self.factor(name)
            for group, base in zip(self.optimizers[name].param_groups, self.base_lrs[name]):
                group["lr"] = base * factor

    def stepped(self, names: Iterable[str]) -> None:
        for name in names:
            self.steps[name] += 1

    def state_dict(self) -> dict:
        return {"steps": dict(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.steps.update(state["steps"])


class Updater:
    """An algorithm's update under accelerate: its modules and optimisers prepared once, then every
    ``OptimisationStep`` of an epoch run by ``run_optimisation_step``, with the shared options of
    ``options`` (an ``OptimConfig``: gradient accumulation, the learning-rate schedule over ``epochs``
    epochs, the EMA of the policy's trainable weights).

    The trainer builds one per run; tests and benchmarks use it directly::

        update = Updater(algorithm)            # a one-process CPU/GPU Accelerator unless one is given
        metrics = update(algorithm.collect(env))
        update = Updater(algorithm, options=OptimConfig(lr_schedule="cosine", ema_decay=0.99), epochs=10)
        metrics = update(algorithm.collect(env), epoch=1)
        with update.averaged_weights():        # the EMA weights in the policy, for evaluation or export
            ...
    """

    def __init__(self, algorithm, accelerator=None, *, options=None, epochs: int = 1):
        from rl4diffusion.training.config import OptimConfig

        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=algorithm.policy.device.type == "cpu")
        options = options or OptimConfig()
        check_grad_accumulation(type(algorithm), options.grad_accumulation)
        self.accelerator = accelerator
        self.algorithm = algorithm
        self.grad_accumulation = options.grad_accumulation
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
        self.schedule = LearningRateSchedule({name: entry.optimizer for name, entry in self.modules.items()},
                                             warmup_steps=options.lr_warmup_steps, schedule=options.lr_schedule,
                                             epochs=epochs)
        self.ema = None
        if options.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            # diffusers' EMA: its decay ramps up as (1 + n) / (10 + n) over the first steps, up to ema_decay
            self.ema = EMAModel(policy.trainable_parameters(), decay=options.ema_decay)
        self.skipped = 0  # optimisation steps skipped as non-finite in the last call

    def __call__(self, batch, epoch: int = 1) -> dict[str, float]:
        """All optimisation steps of one epoch (``epoch`` of the cosine schedule); returns the epoch's metrics
        (``skipped`` counts skipped steps)."""
        diagnostics, self.skipped = Diagnostics(), 0
        self.schedule.epoch = epoch
        for step in accumulate(self.algorithm.optimisation_steps(batch), self.grad_accumulation):
            self.schedule.apply(step.optimizers)
            ok = run_optimisation_step(self.accelerator, step, self.modules, self.optimizers, self.sync_modules,
                                       self.algorithm.loss_terms, diagnostics)
            self.skipped += not ok
            if ok:
                self.schedule.stepped(step.optimizers)
                if self.schedule.active and "policy" in step.optimizers:
                    diagnostics.add("diag/lr", self.modules["policy"].optimizer.param_groups[0]["lr"])
                if self.ema is not None and "policy" in step.optimizers:
                    self.ema.step(self.algorithm.policy.trainable_parameters())
        return diagnostics.means(self.algorithm.end_update(), self.accelerator)

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Within this block the policy's trainable weights are the EMA's (nothing changes without EMA)."""
        if self.ema is None:
            yield
            return
        params = self.algorithm.policy.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def state_dict(self) -> dict:
        """The schedule's step counts and the EMA weights: what a resume needs beyond accelerate's state."""
        return {"lr_schedule": self.schedule.state_dict(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["lr_schedule"])
        if self.ema is not None:
            if "ema" not in state:
                raise ConfigError("optim.ema_decay is set, but the checkpoint holds no EMA weights (it was written "
                                  "without EMA): resume with optim.ema_decay=null, or start a new run.")
            self.ema.load_state_dict(state["ema"])
            self.ema.to(device=self.algorithm.policy.device)
