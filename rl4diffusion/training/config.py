"""The training config's schema (``TrainConfig``) and the nodes Hydra composes it from.

``python -m rl4diffusion.train`` composes ``conf/train.yaml``, which extends ``TrainConfig``
(stored in Hydra's ConfigStore as ``train_schema``) with the groups

* ``algo`` — each registered algorithm's config dataclass, stored as ``algo/<name>_schema`` by
  ``@register_algorithm``; ``conf/algo/<name>.yaml`` extends it (``defaults: [<name>_schema, _self_]``);
* ``model`` — ``PolicyConfig``, the type of ``TrainConfig.model``;
* ``reward`` — free-form: a reward is a function, and its options are its keyword arguments.

So Hydra checks every key and type while it composes; ``validate()`` of each dataclass checks ranges
and cross-field rules (``validate_train_config`` for this one, ``build_config`` for the algorithm's).
The dataclass defaults are what runs; a YAML line only overrides one, with its reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import MISSING, DictConfig, OmegaConf

from rl4diffusion.errors import ConfigError
from rl4diffusion.policies.base import PolicyConfig
from rl4diffusion.schema import at_least, hydra_node, instantiate

log = logging.getLogger(__name__)


@dataclass
class BudgetConfig:
    """Stop early once a budget is spent (None = no limit); the benchmark suites match these."""

    reward_queries: int | None = None
    """Reward queries of training (images scored, or reward gradients)."""
    train_seconds: float | None = None
    """Wall-clock seconds of training (evaluations excluded)."""
    train_cpu_seconds: float | None = None
    """CPU seconds of training: what a shared, noisy machine cannot eat."""

    def validate(self) -> None:
        at_least(("budget.reward_queries", self.reward_queries, 1, "the reward-query budget"),
                 ("budget.train_seconds", self.train_seconds, 0, "the training wall-clock budget"),
                 ("budget.train_cpu_seconds", self.train_cpu_seconds, 0, "the training CPU-time budget"))


@dataclass
class CheckpointConfig:
    every: int = 5
    """Epochs between checkpoints (0 = only the one always written at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""

    def validate(self) -> None:
        at_least(("checkpoint.every", self.every, 0, "epochs between checkpoints (0 = only at the end)"),
                 ("checkpoint.keep_last", self.keep_last, 1, "checkpoints kept"))


@dataclass
class EvalConfig:
    every: int = 5
    """Epochs between evaluations (the base model and the final one are always evaluated; 0 = only those)."""
    every_queries: int | None = None
    """Also evaluate each time the training reward queries pass a multiple of this."""
    prompt_sets: Any = "auto"
    """Prompt sets, each evaluated on the same fixed seeds: a list of set names, .txt files or prompt lists,
    or a mapping {name: set}. auto = train and heldout when prompts= is a shapes-world set (train, heldout,
    all), else the training prompts (one set named after the .txt file, or "prompts"); config.yaml records
    what it stood for. null = no evaluation at all (an empty list is refused: say null)."""
    samples_per_prompt: int = 2
    """Images per prompt at evaluation."""
    seed: int = 1234
    """The evaluation noise seed."""
    metrics: bool = True
    """Diversity, FID (vs data, vs base) and win rate vs base in every evaluation."""
    feature_space: str = "auto"
    """Features of diversity and FID: auto = DreamSim / Inception when their weights exist, else the judge's."""
    reference_size: int = 256
    """Dataset images for FID (shapes-world prompt sets only)."""
    num_steps: int | None = None
    """Denoising steps of evaluation samples (None = model.num_steps, training's)."""
    guidance_scale: float | None = None
    """Guidance weight of evaluation samples (None = training's: model.guidance_scale, or the algorithm's own
    sampling guidance where it has one, e.g. NFT's algo.sampling_guidance)."""

    def validate(self) -> None:
        at_least(("eval.every", self.every, 0, "epochs between evaluations (0 = base and final only)"),
                 ("eval.every_queries", self.every_queries, 1, "reward queries between evaluations"),
                 ("eval.samples_per_prompt", self.samples_per_prompt, 1, "images per prompt at evaluation"),
                 ("eval.reference_size", self.reference_size, 1, "dataset images for FID"),
                 ("eval.num_steps", self.num_steps, 1, "denoising steps of evaluation samples"),
                 ("eval.guidance_scale", self.guidance_scale, 0, "the guidance weight of evaluation samples"))
        if self.metrics and self.samples_per_prompt == 1:
            raise ConfigError("eval.samples_per_prompt=1 leaves no pairs for the diversity metric: use ≥ 2, "
                              "or turn the metrics off with eval.metrics=false.")


@dataclass
class OptimConfig:
    """The optimisation options every algorithm shares (its learning rate itself is ``algo.lr``)."""

    grad_accumulation: int = 1
    """Consecutive optimisation steps merged into one optimiser step (their losses averaged): k steps over
    minibatches of m act as one step over k·m. Algorithms whose steps depend on the previous update refuse k > 1."""
    lr_warmup_steps: int = 0
    """Linear warm-up over this many optimiser steps n: step k = 1, 2, … trains at lr·min(1, k/n) (0 = none)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant, or cosine over epochs (epoch e of E trains at lr·½(1 + cos(π(e−1)/E)))."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the trained weights with this decay (e.g. 0.999; None = off);
    evaluation and the saved LoRA use it."""

    def validate(self) -> None:
        at_least(("optim.grad_accumulation", self.grad_accumulation, 1, "optimisation steps per optimiser step"),
                 ("optim.lr_warmup_steps", self.lr_warmup_steps, 0, "warm-up optimiser steps"),
                 ("optim.ema_decay", self.ema_decay, 0, "the EMA decay"))
        if self.ema_decay is not None and self.ema_decay >= 1:
            raise ConfigError(f"optim.ema_decay (the EMA decay) must be < 1, got {self.ema_decay}: at 1 the "
                              "average never moves. Typical values are 0.99 to 0.9999; null turns EMA off.")


@dataclass
class TrainConfig:
    """Everything ``python -m rl4diffusion.train`` reads; every field is overridable (``key=value``)."""

    algo: Any = MISSING
    """The algorithm's options: the group ``algo`` (its dataclass, see ``rl4diffusion.algorithms``)."""
    reward: Any = MISSING
    """The reward's name and keyword arguments: the group ``reward`` (free-form)."""
    model: PolicyConfig = field(default_factory=PolicyConfig)
    """How to load and sample the model: the group ``model``."""
    seed: int = 0
    """The random seed."""
    epochs: int = 10
    """Collect → update cycles."""
    prompts: Any = "train"
    """train | heldout | all (the shapes world), animals, a .txt file, or a list of prompts."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps | xpu."""
    threads: int | str = "auto"
    """Torch CPU threads: auto = $OMP_NUM_THREADS when set, else half the cores (two runs sharing a machine do not
    oversubscribe it), N = N, 0 = torch's default (every core)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Accelerate's autocast for the forward passes (trainable weights stay float32)."""
    sample_chunks: int = 1
    """Sample each epoch's chains in this many sub-batches (ddpo-pytorch's num_batches_per_epoch); must
    divide the batch. Fewer chains in memory at once; other sampling noise than 1 chunk."""
    reward_async: bool = False
    """Score each sub-batch on a worker thread while the next one samples (for a reward on another device or
    process; identical results to false). Algorithms that sample chains for a reward only."""
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers: tensorboard, wandb (offline with WANDB_MODE=offline), mlflow, … ([] = none)."""
    progress: bool = True
    """Show a progress bar."""
    save_lora: bool = True
    """Write the adapter in diffusers format to <run>/lora at the end."""
    resume: str | None = None
    """A run directory to continue from its newest valid checkpoint."""
    resume_restart: bool = False
    """With resume=: start the run over when it holds no valid checkpoint, instead of refusing (its files
    move to <run>/before_restart_<time>/)."""
    max_skipped_updates: int = 3
    """Non-finite rewards or losses skip the update; abort after this many."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        at_least(("epochs", self.epochs, 1, "the number of collect → update cycles"),
                 ("max_skipped_updates", self.max_skipped_updates, 0, "non-finite updates tolerated before aborting"),
                 ("sample_chunks", self.sample_chunks, 1, "sub-batches an epoch's chains are sampled in"))
        if self.threads != "auto" and (type(self.threads) is not int or self.threads < 0):
            raise ConfigError(f"threads must be auto (half the cores, or $OMP_NUM_THREADS) or a number of torch CPU "
                              f"threads ≥ 1 (0 = torch's default, every core), got {self.threads!r}.")
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N with N a device number (or mps, xpu, "
                              f"xpu:N), got {self.device!r}.")
        if self.resume is not None and not self.resume.strip():
            raise ConfigError("resume= is empty: give the run directory to continue, e.g. "
                              "resume=runs/2025-01-01/12-00-00_ddpo, or leave resume out to start a new run.")
        if self.eval.prompt_sets in ([], {}, ""):
            raise ConfigError(f"eval.prompt_sets={self.eval.prompt_sets!r} evaluates nothing: the run would report no "
                              "base, evaluation or final results. Give the sets (e.g. eval.prompt_sets=auto or "
                              "[train,heldout]), or, to train without any evaluation, say so with "
                              "eval.prompt_sets=null.")
        check_learning_rates(self.algo)


LR_RANGE = (1e-8, 1e-2)
"""Learning rates outside this range are allowed with a warning: LoRA fine-tuning uses 1e-5 … 1e-3 (DDPO 3e-4,
DPOK 1e-5, Diffusion-DPO 1e-8 × batch size, AlignProp 1e-3)."""


def check_learning_rates(algo_options: Any) -> None:
    """Refuse a non-finite or non-positive ``algo.lr`` (or ``algo.*_lr``), and warn outside ``LR_RANGE``, where
    an update either destroys the weights or does nothing."""
    if not isinstance(algo_options, dict):
        return
    for key, value in algo_options.items():
        if not (key == "lr" or key.endswith("_lr")) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"algo.{key} (a learning rate) must be a finite number > 0, got {value}. Typical LoRA "
                              f"learning rates are 1e-5 to 1e-3.")
        if not LR_RANGE[0] <= value <= LR_RANGE[1]:
            log.warning("algo.%s=%g is outside the usual range of learning rates [%g, %g]: %s", key, value, *LR_RANGE,
                        "the weights may blow up" if value > LR_RANGE[1] else "training may not move")


def validate_train_config(cfg: DictConfig) -> None:
    """Check a composed training config: keys and types against ``TrainConfig``, then every ``validate()``
    of it and its parts (the algorithm's options are ``build_config``'s). Raises ConfigError."""
    options = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    instantiate(TrainConfig, options, prefix="", owner="the training config")


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore: ``train_schema`` and every registered algorithm's ``algo/<name>_schema``
    (importing the built-in algorithms; a user's registers itself when its module is imported). Idempotent."""
    from hydra.core.config_store import ConfigStore

    from rl4diffusion.algorithms import ALGORITHMS, algorithm_classes

    ConfigStore.instance().store(name="train_schema", node=hydra_node(TrainConfig))
    for name in list(ALGORITHMS):
        algorithm_classes(name)  # the import runs @register_algorithm, which stores algo/<name>_schema


def store_algorithm_schema(name: str, config_cls: type) -> None:
    """Store ``config_cls`` (plus ``name``) as ``algo/<name>_schema``, the node ``conf/algo/<name>.yaml`` extends."""
    from hydra.core.config_store import ConfigStore

    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config={config_cls!r} of algorithm {name!r} must be a dataclass")
    ConfigStore.instance().store(group="algo", name=f"{name}_schema", node=hydra_node(config_cls, name))
