"""The ``"dreamsim"`` feature space: DreamSim embeddings, for per-prompt diversity.

Source: Fu et al. 2023, "DreamSim: Learning New Dimensions of Human Visual Similarity using
Synthetic Data"; the ``dreamsim`` package (ssundaram21/dreamsim, ``dreamsim/model.py``). The
default ``"ensemble"`` model concatenates the CLS/embedding features of DINO ViT-B/16, CLIP
ViT-B/16 and OpenCLIP ViT-B/16, each fine-tuned with LoRA on human similarity judgements; the
single-branch types (``dino_vitb16``, ``open_clip_vitb32``, …) use one backbone.

The package's ``dreamsim(pretrained=True, cache_dir=…, normalize_embeds=True)`` builds a
``PerceptualModel`` wrapped in a peft ``PeftModel``; ``model.embed(x)`` with x a [B, 3, 224, 224]
tensor in [0, 1] gives the embedding. With ``normalize_embeds=True`` each embedding is centred and
L2-normalised, and the DreamSim distance of two images is ``1 − cos(e_a, e_b)`` — the cosine
distance ``metrics/diversity.py`` computes.

Weights: ``dreamsim()`` downloads a zip from the package's GitHub releases into ``cache_dir``
(its default ``./models`` depends on the working directory; ours is
``$RL4DIFFUSION_DREAMSIM_DIR``, else ``~/.cache/rl4diffusion/dreamsim``), and the DINO branches also
need their torch-hub repository and checkpoint there. We check every file first and raise
``MissingWeightsError`` at once when one is absent, before importing ``dreamsim`` — nothing
reaches for the network.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rl4diffusion.metrics.features import register_feature_space
from rl4diffusion.rewards.weights import MissingFile, missing_weights_error, toolkit_cache_dir

log = logging.getLogger(__name__)

DreamSimType = Literal["ensemble", "dino_vitb16", "open_clip_vitb32", "clip_vitb32", "dinov2_vitb14",
                       "synclr_vitb16"]

#: What ``dreamsim.model.download_weights`` requires in ``cache_dir`` for each type (facts from dreamsim 0.2).
REQUIRED_FILES: dict[str, list[str]] = {
    "ensemble": ["dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar", "clip_vitb16_pretrain.pth.tar",
                 "ensemble_lora"],
    "dino_vitb16": ["dino_vitb16_pretrain.pth", "dino_vitb16_single_lora"],
    "dinov2_vitb14": ["dinov2_vitb14_pretrain.pth", "dinov2_vitb14_single_lora"],
    "open_clip_vitb32": ["open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora"],
    "clip_vitb32": ["clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora"],
    "synclr_vitb16": ["synclr_vit_b_16.pth", "synclr_vitb16_single_lora"],
}

#: DINO backbones come through ``torch.hub.load`` with the hub directory set to ``cache_dir``:
#: the repository checkout and the checkpoint torch hub downloads must both be there.
TORCH_HUB_FILES: dict[str, list[str]] = {
    "dino_vitb16": ["facebookresearch_dino_main", "checkpoints/dino_vitbase16_pretrain.pth"],
    "dinov2_vitb14": ["facebookresearch_dinov2_main", "checkpoints/dinov2_vitb14_pretrain.pth"],
}
TORCH_HUB_FILES["ensemble"] = TORCH_HUB_FILES["dino_vitb16"]

RELEASES = "the dreamsim GitHub releases, https://github.com/ssundaram21/dreamsim/releases (dreamsim_{type}_checkpoint.zip, unzipped)"
ALTERNATIVE = ("use the embedded world (reward=shape_alignment model=tiny), which measures diversity and FID with the "
               "embedded judge's features, build_feature_space('judge') — the fallback of build_feature_space('auto')")


def default_cache_dir() -> Path:
    """``$RL4DIFFUSION_DREAMSIM_DIR``, else ``~/.cache/rl4diffusion/dreamsim``."""
    if os.environ.get("RL4DIFFUSION_DREAMSIM_DIR"):
        return Path(os.environ["RL4DIFFUSION_DREAMSIM_DIR"]).expanduser()
    return toolkit_cache_dir() / "dreamsim"


def _missing_files(cache_dir: Path, dreamsim_type: str) -> list[str]:
    needed = REQUIRED_FILES[dreamsim_type] + TORCH_HUB_FILES.get(dreamsim_type, [])
    return [name for name in needed if not (cache_dir / name).exists()]


@register_feature_space("dreamsim")
class DreamSimFeatures:
    """DreamSim embeddings [B, D] (centred, unit L2 norm): ``1 − a·b`` is the DreamSim distance.

    Args:
        device: where the model runs.
        dreamsim_type: "ensemble" (the paper's default, D = 1792) or a single-branch type.
        cache_dir: the directory holding DreamSim's files (default: :func:`default_cache_dir`).
        batch_size: images per forward pass.

    Example::

        space = DreamSimFeatures(device="cuda")            # or build_feature_space("dreamsim", "cuda")
        e = space(images)                                  # [B, 1792]
        distance = 1 - e[0] @ e[1]
    """

    setup_hint = "RL4DIFFUSION_DREAMSIM_DIR"
    """Where its weights are found (named in the one line an offline run prints)."""

    def __init__(self, device: str | torch.device = "cpu", *, dreamsim_type: DreamSimType = "ensemble",
                 cache_dir: str | Path | None = None, batch_size: int = 64):
        if dreamsim_type not in REQUIRED_FILES:
            raise ValueError(f"dreamsim_type must be one of {sorted(REQUIRED_FILES)}, got {dreamsim_type!r}")
        cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        missing = _missing_files(cache, dreamsim_type)
        if missing:
            raise missing_weights_error(
                f"feature space 'dreamsim' ({dreamsim_type})",
                [MissingFile(f"{', '.join(missing)} in {cache}", RELEASES.replace("{type}", dreamsim_type)
                             + ("; the DINO repository and checkpoint from torch hub (facebookresearch/dino)"
                                if any(m in TORCH_HUB_FILES.get(dreamsim_type, []) for m in missing) else ""),
                             [str(cache)], "RL4DIFFUSION_DREAMSIM_DIR=/path/to/dreamsim_models")],
                alternative=ALTERNATIVE)
        model = _load_dreamsim(dreamsim_type, cache, torch.device(device))
        self._setup(model, device=device, name="dreamsim" if dreamsim_type == "ensemble"
                    else f"dreamsim:{dreamsim_type}", batch_size=batch_size)

    @classmethod
    def from_model(cls, model: nn.Module, *, device: str | torch.device = "cpu", name: str = "dreamsim",
                   image_size: int = 224, batch_size: int = 64) -> DreamSimFeatures:
        """Wrap an already-built DreamSim model — anything with ``embed(x [B,3,S,S] in [0,1]) -> [B, D]``."""
        self = cls.__new__(cls)
        self._setup(model, device=device, name=name, image_size=image_size, batch_size=batch_size)
        return self

    def _setup(self, model, *, device, name, image_size=224, batch_size=64):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.name = name
        self.image_size = image_size
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in images.split(self.batch_size):
            # dreamsim's own preprocessing: PIL Resize((224, 224), BICUBIC) → ToTensor — here in torch
            x = F.interpolate(chunk.to(self.device, torch.float32), size=(self.image_size, self.image_size),
                              mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            out.append(self.model.embed(x).reshape(x.shape[0], -1).float())  # (b, D)
        return torch.cat(out)


def _load_dreamsim(dreamsim_type: str, cache_dir: Path, device: torch.device) -> nn.Module:
    """``dreamsim.dreamsim(pretrained=True, …)`` with its prints captured and torch hub's directory restored."""
    from dreamsim import dreamsim

    hub_dir = torch.hub.get_dir()  # dreamsim's DINO loader calls torch.hub.set_dir(cache_dir) globally
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            # dreamsim's loader calls PeftModel.from_pretrained on a model get_peft_model already wrapped; peft warns
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            model, _ = dreamsim(pretrained=True, device=str(device), cache_dir=str(cache_dir), normalize_embeds=True,
                                dreamsim_type=dreamsim_type)
    finally:
        torch.hub.set_dir(hub_dir)
    log.debug("dreamsim: %s", printed.getvalue().strip())
    return model
