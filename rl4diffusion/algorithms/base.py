"""The shared algorithm interface: collect → update, plus state for exact resume."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from tensordict import TensorDictBase

from rl4diffusion.errors import ConfigError


class Algorithm:
    """One fine-tuning method over the shared primitives (policy, env, buffer, reward).

    Subclasses set ``name`` and, for gradient-based rewards, ``requires_differentiable_reward``;
    they implement ``collect`` (rollouts or a batch of pairs) and ``update`` (one optimisation
    phase, returning float metrics namespaced ``loss/…``, ``diag/…``, ``train/…``).
    """

    name: ClassVar[str] = ""
    requires_differentiable_reward: ClassVar[bool] = False
    distributed = None  # set by the trainer to a rl4diffusion.training.distributed.Distributed in multi-process runs

    def __init__(self, policy, reward):
        check_reward_compatible(type(self), reward)
        self.policy = policy
        self.reward = reward

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's tensor [B, ...] → the global batch's [world·B, ...] (identity in one process)."""
        return self.distributed.gather(tensor) if self.distributed is not None else tensor

    def local_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of a global-batch tensor that belong to this process."""
        if self.distributed is None:
            return tensor
        return tensor[self.distributed.local_slice(tensor.shape[0] // self.distributed.world)]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The algorithm's optimisers (found among its attributes)."""
        return [v for v in vars(self).values() if isinstance(v, torch.optim.Optimizer)]

    def collect(self, env) -> TensorDictBase:
        raise NotImplementedError

    def update(self, batch: TensorDictBase) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_reward_compatible(algo_cls: type[Algorithm], reward) -> None:
    """Refuse a non-differentiable reward for an algorithm that backpropagates through it."""
    if algo_cls.requires_differentiable_reward and not getattr(reward, "differentiable", False):
        raise ConfigError(
            f"algo={algo_cls.name} backpropagates through the reward, but reward "
            f"{getattr(reward, 'name', reward)!r} is not differentiable. Use a differentiable reward such as "
            "reward=shape_alignment or reward=colorfulness (embedded), or reward=aesthetic / pickscore / "
            "clip_score (real weights), or pick a scalar-reward algorithm: algo=ddpo, algo=dpok, algo=grpo."
        )


def make_optimizer(params, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW over the given parameters (the optimiser every method in ALGORITHMS.md uses)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters: check model.train_mode and model.lora_targets")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def build_config(config_cls, options: dict, algo_name: str):
    """Instantiate an algorithm's config dataclass, naming unknown keys and valid ones on error."""
    import dataclasses

    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(
            f"unknown option(s) for algo={algo_name}: {', '.join(unknown)}. Valid options: {', '.join(sorted(valid))}."
        )
    cfg = config_cls(**options)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg
