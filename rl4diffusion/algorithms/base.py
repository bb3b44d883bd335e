"""The algorithm interface: collect → optimisation steps → loss terms, plus state for exact resume.

An algorithm owns its data and its loss; the trainer (``rl4diffusion.training``) owns the
optimisation step. Per epoch the trainer calls

    batch = algorithm.collect(env)                       # rollouts, starting states or preference pairs
    for step in algorithm.optimisation_steps(batch):     # what one optimiser step trains on
        for micro, weight in zip(step.micro_batches, step.weights):
            terms = step.loss_fn(micro)                  # "loss_*" tensors + detached diagnostics
            backward(weight · Σ terms["loss_*"])         # gradients add up over the micro-batches
        clip, skip if non-finite, step the optimisers named in step.optimizers
    metrics = algorithm.end_update()                     # anything the algorithm logs once per epoch

so no algorithm calls ``backward()`` or ``step()``. Diagnostics are averaged over the micro-batches
of the epoch and logged under ``loss/…`` (the ``loss_*`` terms), the key itself when it contains a
``/``, and ``diag/…`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tensordict import TensorDictBase
from torch import nn

from rl4diffusion import keys
from rl4diffusion.errors import ConfigError


@dataclass
class TrainedModule:
    """An optimiser, its gradient-norm clip, and the module it trains when that is the algorithm's own.

    ``module`` is None for the policy's trainable weights: the trainer prepares ``policy.unet`` itself.
    An algorithm's own network (a value baseline, a residual flow) is prepared too, and the prepared
    module (e.g. a DDP wrapper, whose forward reduces gradients across processes) replaces the
    algorithm's attribute ``attribute``; its weights are checkpointed by accelerate, not by the
    algorithm's ``state_dict``.
    """

    optimizer: torch.optim.Optimizer
    max_grad_norm: float | None = None
    module: nn.Module | None = None
    attribute: str | None = None


@dataclass
class OptimisationStep:
    """The work of one optimiser step.

    Args:
        micro_batches: the inputs of ``loss_fn``; their gradients add up before the step.
        weights: the factor of each micro-batch's loss (default 1/len(micro_batches)). A weight of 0
            marks padding: a process of a multi-process run that has less data than the others still
            runs a forward and backward, so that every process joins the same gradient reduction.
        optimizers: names (keys of ``Algorithm.trained_modules()``) of the optimisers that step.
        loss_fn: default ``algorithm.loss_terms``.
    """

    micro_batches: Sequence[Any]
    weights: Sequence[float] | None = None
    optimizers: tuple[str, ...] = ("policy",)
    loss_fn: Callable[[Any], dict[str, torch.Tensor]] | None = None
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra per-step diagnostics (tensors, no host sync) the trainer averages with the loss terms."""


class Algorithm:
    """One fine-tuning method over the shared primitives (policy, env, replay buffer, reward).

    Subclasses set ``name`` (the registry does, through ``@register_algorithm``) and, for gradient-based
    rewards, ``requires_differentiable_reward``. They implement ``collect``, ``optimisation_steps`` and
    ``loss_terms``; ``trained_modules`` defaults to the policy's trainable weights with ``self.optimizer``.
    An algorithm whose steps cannot be merged by ``optim.grad_accumulation`` (a step built from the update
    before it, or one step per epoch) sets ``supports_grad_accumulation = False``.
    """

    name: ClassVar[str] = ""
    requires_differentiable_reward: ClassVar[bool] = False
    needs_log_prob: ClassVar[bool] = False
    """True when the loss uses log π_θ(x_{t−1} | x_t) of sampled steps, which needs a stochastic sampler
    (DDIM η > 0; a flow model's noise_level > 0): ``check_sampler_fits`` refuses a deterministic one."""
    supports_grad_accumulation: ClassVar[bool] = True
    needs_ddim: ClassVar[str] = ""
    """What the algorithm needs that only a DDIM-style (ε/v-prediction) model has; non-empty refuses a
    flow-matching model with a message naming it."""
    distributed = None  # set by the trainer in multi-process runs: rank, world, gather (see training/trainer.py)

    def __init__(self, policy, reward, config=None):
        """Keep the primitives; with ``config``, also the config and ``self.optimizer``: AdamW over the policy's
        trainable weights at ``config.lr`` and ``config.weight_decay`` (0 when the config has none)."""
        check_reward_compatible(type(self), reward)
        check_sampler_fits(type(self), getattr(policy, "config", None), getattr(policy, "kind", None))
        if self.needs_ddim and getattr(policy, "kind", None) == "flow":
            raise ConfigError(f"algo={self.name} needs {self.needs_ddim}, which a flow-matching model (model=tiny_flow, "
                              "model=sd3) does not provide yet. Use a DDIM-style model such as model=tiny, or an "
                              "algorithm that trains flow models: algo=grpo, ddpo, dpok, nft, refl, draft, alignprop, "
                              "diffusion_dpo, dmpo or sft.")
        self.policy = policy
        self.reward = reward
        self._conditioning: dict[str, torch.Tensor] = {}
        if config is not None:
            self.config = config
            self.optimizer = make_optimizer(policy.trainable_parameters(), lr=config.lr,
                                            weight_decay=getattr(config, "weight_decay", 0.0))

    # ---------------------------------------------------------------- conditioning of stored trajectories
    def remember_prompts(self, prompts) -> None:
        """Keep the conditioning table of the environment's prompts (trajectories store only ``prompt_id``)."""
        from rl4diffusion.data.rollout import conditioning_table

        self._conditioning = conditioning_table(self.policy, prompts)

    def with_conditioning(self, td: TensorDictBase) -> TensorDictBase:
        """``td`` with its prompts' conditioning looked up by ``prompt_id`` (for a minibatch, not every step)."""
        for key, table in self._conditioning.items():
            td.set(key, table[td[keys.PROMPT_ID]])
        return td

    # ---------------------------------------------------------------- multi-process helpers
    @property
    def world(self) -> int:
        return self.distributed.world if self.distributed is not None else 1

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's tensor [B, ...] → the global batch's [world·B, ...] (identity in one process)."""
        return self.distributed.gather(tensor) if self.distributed is not None else tensor

    def local_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of a global-batch tensor that belong to this process."""
        if self.distributed is None:
            return tensor
        return tensor[self.distributed.local_slice(tensor.shape[0] // self.distributed.world)]

    # ---------------------------------------------------------------- the interface
    def trained_modules(self) -> dict[str, TrainedModule]:
        """The optimisers by name; "policy" steps the policy's trainable weights."""
        return {"policy": TrainedModule(self.optimizer, getattr(self.config, "max_grad_norm", None))}

    def collect(self, env) -> TensorDictBase:
        raise NotImplementedError

    def optimisation_steps(self, batch: TensorDictBase) -> Iterator[OptimisationStep]:
        raise NotImplementedError

    def loss_terms(self, micro_batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def end_update(self) -> dict[str, float | torch.Tensor]:
        """Metrics logged once per epoch after the last step (e.g. counters); keys are logged as given."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_reward_compatible(algo_cls: type[Algorithm], reward) -> None:
    """Refuse a non-differentiable reward for an algorithm that backpropagates through it."""
    if algo_cls.requires_differentiable_reward and not getattr(reward, "differentiable", False):
        raise ConfigError(
            f"algo={algo_cls.name} backpropagates through the reward, but reward "
            f"{getattr(reward, 'name', reward)!r} is not differentiable. If your function is differentiable "
            "(torch operations from the images to the score, no .detach() or numpy), declare it with "
            "+reward.differentiable=true. Otherwise use a differentiable reward such as "
            "reward=shape_alignment or reward=colorfulness (embedded), or reward=aesthetic / pickscore / "
            "clip_score (real weights), or pick a scalar-reward algorithm: algo=ddpo, algo=dpok, algo=grpo."
        )


def check_sampler_fits(algo_cls: type[Algorithm], model_config, kind: str | None) -> None:
    """Refuse a deterministic sampler for an algorithm that needs the log-probability of its steps.

    ``model_config``: the PolicyConfig (or the ``model`` options); ``kind``: the policy's step family, "ddim"
    or "flow" (None: not known yet, taken as "ddim"). With η = 0 (or noise_level = 0) every step is a point
    mass: its log-probability is undefined and its gradient zero, so nothing would train.
    """
    if not algo_cls.needs_log_prob or model_config is None:
        return
    key, value = ("noise_level", model_config.noise_level) if kind == "flow" else ("eta", model_config.eta)
    if value == 0:
        raise ConfigError(
            f"algo={algo_cls.name} needs the log-probability of each sampled step, but model.{key}=0 makes the "
            f"sampler deterministic: the log-probability is undefined and the policy gradient zero, so nothing "
            f"would train. Use model.{key} in (0, 1] (1 is the DDPM-like default), or an algorithm without "
            "log-probabilities such as algo=draft or algo=diffusion_dpo."
        )


def make_optimizer(params, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW over the given parameters (the optimiser every implemented method uses)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters: check model.train_mode and model.lora_targets")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def check_minibatch(batch_size: int, minibatch_size: int) -> None:
    """Refuse a minibatch size that does not divide the batch (every optimisation step sees a full minibatch)."""
    if batch_size < 1 or minibatch_size < 1 or batch_size % minibatch_size:
        raise ConfigError(f"algo.minibatch_size ({minibatch_size}) must be ≥ 1 and divide algo.batch_size "
                          f"({batch_size}).")


def build_config(config_cls, options: dict, algo_name: str):
    """Instantiate an algorithm's config dataclass from ``options`` and check it: unknown keys (listing the valid
    ones), types and ``Literal`` choices by the dataclass's annotations, then its ``validate()``."""
    from rl4diffusion.schema import instantiate

    return instantiate(config_cls, options, prefix="algo", owner=f"algo={algo_name}")


def register_algorithm(name: str, *, config: type) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: make an Algorithm selectable as ``algo=<name>``, with ``config`` the schema of its options.

    Sets ``cls.name``, adds ``name`` to ``rl4diffusion.algorithms.ALGORITHMS`` and stores ``config`` in Hydra's
    ConfigStore as ``algo/<name>_schema`` (the node a ``conf/algo/<name>.yaml`` extends). A user's package calls
    it too: see the README's "Add your own algorithm".

    Example::

        @register_algorithm("rank_ddpo", config=RankDDPOConfig)
        class RankDDPO(DDPO): ...
    """

    def decorate(cls: type[Algorithm]) -> type[Algorithm]:
        from rl4diffusion.algorithms import _add_algorithm

        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"@register_algorithm({name!r}) decorates a subclass of Algorithm, not {cls!r}")
        _add_algorithm(name, cls, config)
        cls.name = name
        return cls

    return decorate
