"""Start-up validation of the training config: ranges and types, with messages that say how to fix."""

from __future__ import annotations

from omegaconf import DictConfig

from rl4diffusion.errors import ConfigError

# (dotted key, type, minimum or None, what it is)
_CHECKS = [
    ("seed", int, None, "the random seed"),
    ("epochs", int, 1, "the number of collect → update cycles"),
    ("threads", int, 0, "torch CPU threads (0 = default)"),
    ("eval.every", int, 0, "epochs between evaluations (0 = base and final only)"),
    ("eval.samples_per_prompt", int, 1, "images per prompt at evaluation"),
    ("eval.seed", int, None, "the evaluation noise seed"),
    ("checkpoint.every", int, 0, "epochs between checkpoints (0 = only at the end)"),
    ("checkpoint.keep_last", int, 1, "checkpoints kept"),
    ("max_skipped_updates", int, 0, "non-finite updates tolerated before aborting"),
    ("budget.reward_queries", int, 1, "the reward-query budget"),
    ("budget.train_seconds", float, 0, "the training wall-clock budget"),
    ("budget.train_cpu_seconds", float, 0, "the training CPU-time budget"),
    ("eval.every_queries", int, 1, "reward queries between evaluations"),
    ("model.num_steps", int, 1, "denoising steps"),
    ("model.guidance_scale", float, 0, "the classifier-free guidance weight"),
    ("model.eta", float, 0, "DDIM's η"),
    ("model.lora_rank", int, 1, "the LoRA rank"),
]


def _get(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def validate_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value of the wrong type or out of range."""
    for key, kind, minimum, what in _CHECKS:
        value = _get(cfg, key)
        if value is None:
            continue
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
            isinstance(value, int) and not isinstance(value, bool))
        if not ok_type:
            raise ConfigError(f"{key} ({what}) must be {'a number' if kind is float else 'an integer'}, got {value!r}.")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key} ({what}) must be ≥ {minimum}, got {value}.")
    if cfg.get("device") not in (None, "auto", "cpu") and not str(cfg.device).startswith(("cuda", "mps", "xpu")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}.")
    if _get(cfg, "eval.metrics") and _get(cfg, "eval.samples_per_prompt") == 1:
        raise ConfigError("eval.samples_per_prompt=1 leaves no pairs for the diversity metric: use ≥ 2, "
                          "or turn the metrics off with eval.metrics=false.")
