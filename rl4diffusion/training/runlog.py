"""A run directory's outputs: metrics.jsonl, the trackers' scalars (accelerate's ``log_with``) and image grids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

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

    def save_images(self, images: torch.Tensor, name: str, nrow: int = 8) -> Path | None:
        if not self.enabled:
            return None
        from torchvision.utils import save_image

        path = self.run_dir / "images" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images.detach().float().cpu(), str(path), nrow=nrow, padding=1)
        return path

    def write_json(self, name: str, payload: dict) -> None:
        """Write ``name`` atomically (temp file + rename) so a crash never leaves half a file; non-finite
        numbers are written as null."""
        if not self.enabled:
            return
        write_json_atomically(self.run_dir / name, payload)

    def close(self) -> None:
        """The trackers are closed by ``accelerator.end_training()``; nothing else is held open."""
