"""A run directory's outputs: metrics.jsonl, the trackers' scalars and images (accelerate's ``log_with``), the
evaluation grids; and what a run prints: one line per evaluation, per epoch without the progress bar, the result."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from rl4diffusion.training.rundir import strict_json, write_json_atomically


class RunLogger:
    """Writes one JSON object per line to ``metrics.jsonl`` and mirrors scalars to the accelerator's trackers
    (TensorBoard under ``<run>/tb`` by default; wandb, mlflow, … through ``log_with``).

    Only the main process writes (``enabled=False`` elsewhere).
    """

    def __init__(self, run_dir: str | Path, *, accelerator=None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.accelerator = accelerator
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        """Append ``record`` (must hold "step" and "phase") to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        clean = strict_json(record)  # NaN and ±Infinity (also inside lists) become null: standard JSON
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.accelerator is not None and self.accelerator.trackers:
            prefix = record["phase"] + ("/" + record["prompt_set"] if "prompt_set" in record else "")
            scalars = {(k if "/" in k else f"{prefix}/{k}"): v for k, v in clean.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            self.accelerator.log(scalars, step=record["step"])

    def save_pages(self, pages: list, name: str, step: int, tag: str) -> list[Path]:
        """Write grid pages (``grids.Page``) as ``images/<name>_p<k>.png`` and send them to the trackers that
        take images: TensorBoard (``<tag>_p<k>``, under IMAGES in its UI) and wandb."""
        if not self.enabled:
            return []
        import numpy as np

        folder = self.run_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for number, page in enumerate(pages, 1):
            path = folder / f"{name}_p{number}.png"
            tmp = folder / f".{path.name}.tmp"
            try:
                page.image.save(tmp, format="PNG")
                os.replace(tmp, path)  # a full disk never leaves half an image behind
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            paths.append(path)
        for tracker in (self.accelerator.trackers if self.accelerator is not None else []):
            for number, page in enumerate(pages, 1):
                pixels = np.asarray(page.image)
                if tracker.name == "tensorboard":
                    tracker.log_images({f"{tag}_p{number}": pixels[None]}, step=step, dataformats="NHWC")
                elif tracker.name == "wandb":  # accelerate's tracker wraps each in wandb.Image
                    tracker.log_images({f"{tag}_p{number}": [pixels]}, step=step)
        return paths

    def write_json(self, name: str, payload: dict) -> None:
        """Write ``name`` atomically (temp file + rename) so a crash never leaves half a file; non-finite
        numbers are written as null."""
        if not self.enabled:
            return
        write_json_atomically(self.run_dir / name, payload)

    def close(self) -> None:
        """The trackers are closed by ``accelerator.end_training()``; nothing else is held open."""


# ---------------------------------------------------------------------------------------- the console
NOISY_LOGGERS = ("torchrl", "accelerate", "diffusers", "transformers", "huggingface_hub", "peft", "PIL",
                 "matplotlib", "urllib3", "filelock", "httpx")
"""Libraries whose INFO lines are noise in a training log (torchrl's storage note lands inside the progress bar,
accelerate names every file of a checkpoint): they log warnings and errors only."""


def quiet_libraries(progress: bool = True) -> None:
    """Set the loggers of ``NOISY_LOGGERS`` to WARNING; without ``progress``, also turn off diffusers' and
    transformers' model-loading bars (a run with ``progress=false`` shows no bars at all)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not progress:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


def total_loss(record: dict) -> float | None:
    """The sum of an update's ``loss/*`` terms (what the optimiser minimised), None when it logged none."""
    terms = [v for k, v in record.items() if k.startswith("loss/") and isinstance(v, (int, float))]
    return sum(terms) if terms else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def progress_postfix(record: dict) -> dict[str, str]:
    """What the progress bar shows after an epoch: the batch's mean reward when it has one (preference methods
    learn from stored pairs and have none) and the loss."""
    postfix = {}
    if _finite(record.get("reward_mean")):
        postfix["reward"] = f"{record['reward_mean']:.4f}"
    loss = total_loss(record)
    if _finite(loss):
        postfix["loss"] = f"{loss:.4g}"
    return postfix


class EpochLines:
    """When to log an epoch's line with the progress bar off: every epoch of a short run, about ten lines over a
    long one, and at least one a minute (``interval_s``), so that a log shows a run is alive."""

    def __init__(self, epochs: int, interval_s: float = 60.0):
        self.stride = max(1, epochs // 10)
        self.epochs = epochs
        self.interval_s = interval_s
        self.last = time.monotonic()

    def due(self, epoch: int) -> bool:
        now = time.monotonic()
        if epoch % self.stride == 0 or epoch == self.epochs or now - self.last >= self.interval_s:
            self.last = now
            return True
        return False


def epoch_line(epoch: int, epochs: int, record: dict) -> str:
    """``epoch 3/10: reward -1.3690, loss 23.76, 288 reward queries, 41 s``."""
    parts = [f"{k} {v}" for k, v in progress_postfix(record).items()]
    parts.append(f"{record.get('reward_queries', 0)} reward queries")
    if "wall_s" in record:
        parts.append(f"{record['wall_s']:.0f} s")
    return f"epoch {epoch}/{epochs}: " + ", ".join(parts)


def _set_summary(stats: dict, base: dict | None) -> str:
    text = f"reward {stats['reward_mean']:.3f}"
    if base is not None:
        text += f" (base {base['reward_mean']:.3f})"
    if _finite(stats.get("diversity")):
        text += f", diversity {stats['diversity']:.3f}"
    if base is not None and _finite(stats.get("win_rate")):
        text += f", win rate {stats['win_rate']:.0%}"
    return text


def eval_line(step: int, results: dict[str, dict], base: dict[str, dict] | None) -> str:
    """One line per evaluation, every prompt set: ``eval step 5: train reward -1.245 (base -1.700), diversity
    0.076, win rate 62% | heldout …`` (the base model's own evaluation has no base to compare with)."""
    head = "base eval (step 0)" if base is None else f"eval step {step}"
    if not results:  # eval.prompt_sets=null: nothing is evaluated
        return f"{head}: no evaluation (eval.prompt_sets=null)"
    return f"{head}: " + " | ".join(f"{name} {_set_summary(stats, (base or {}).get(name))}"
                                    for name, stats in results.items())


def final_line(step: int, final: dict[str, dict], base: dict[str, dict]) -> str:
    """The run's result in one line: base → final reward and diversity, and the win rate against the base model on
    the same noise with its 95% interval, for every prompt set."""
    parts = []
    for name, stats in final.items():
        before = base.get(name, {})
        text = f"{name} reward {before.get('reward_mean', math.nan):.3f} → {stats['reward_mean']:.3f}"
        if _finite(stats.get("diversity")):
            text += f", diversity {before.get('diversity', math.nan):.3f} → {stats['diversity']:.3f}"
        if _finite(stats.get("win_rate")):
            text += (f", win rate {stats['win_rate']:.0%} [{stats.get('win_rate_low', math.nan):.0%}, "
                     f"{stats.get('win_rate_high', math.nan):.0%}]")
        parts.append(text)
    return f"final (step {step}): " + (" | ".join(parts) or "no evaluation (eval.prompt_sets=null)")
