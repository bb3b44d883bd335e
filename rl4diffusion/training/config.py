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
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import MISSING, DictConfig, OmegaConf

from rl4diffusion.errors import ConfigError
from rl4diffusion.policies.base import PolicyConfig
from rl4diffusion.schema import at_least, hydra_node, instantiate


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
    prompt_sets: list[Any] = field(default_factory=lambda: ["train", "heldout"])
    """Prompt sets (names, .txt files or lists), each evaluated on the same fixed seeds."""
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

    def validate(self) -> None:
        at_least(("eval.every", self.every, 0, "epochs between evaluations (0 = base and final only)"),
                 ("eval.every_queries", self.every_queries, 1, "reward queries between evaluations"),
                 ("eval.samples_per_prompt", self.samples_per_prompt, 1, "images per prompt at evaluation"),
                 ("eval.reference_size", self.reference_size, 1, "dataset images for FID"))
        if self.metrics and self.samples_per_prompt == 1:
            raise ConfigError("eval.samples_per_prompt=1 leaves no pairs for the diversity metric: use ≥ 2, "
                              "or turn the metrics off with eval.metrics=false.")


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
    threads: int = 0
    """Torch CPU threads (0 = torch's default)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Accelerate's autocast for the forward passes (trainable weights stay float32)."""
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

    def validate(self) -> None:
        at_least(("epochs", self.epochs, 1, "the number of collect → update cycles"),
                 ("threads", self.threads, 0, "torch CPU threads (0 = default)"),
                 ("max_skipped_updates", self.max_skipped_updates, 0, "non-finite updates tolerated before aborting"))
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps", "xpu")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N (or mps, xpu), got {self.device!r}.")


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
