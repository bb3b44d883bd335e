"""The ``"inception"`` feature space: InceptionV3 2048-d pool features, the features of FID.

Source: Heusel et al. 2017 (FID) use the pool3 features of the TensorFlow InceptionV3 graph
``2015-12-05``. torch-fidelity (toshas/torch-fidelity, ``feature_extractor_inceptionv3.py``) ports
that graph and its weights bit-exactly; torchmetrics' ``FrechetInceptionDistance`` runs the same
network as ``torchmetrics.image.fid.NoTrainInceptionV3`` (a torch-fidelity subclass that never
leaves eval mode). We use that class, so our features are torchmetrics' FID features.

Protocol (as torchmetrics with ``normalize=True``): images in [0, 1] → uint8 (×255, rounded) →
bilinear resize to 299×299 → (x − 128) / 128 → pool3 → [B, 2048]. ``antialias=False`` (default)
keeps torch-fidelity's TF1-compatible resize that published FIDs use; ``antialias=True`` is
torchmetrics' newer default.

Weights: ``weights-inception-2015-12-05-6726825d.pth`` from torch-fidelity's GitHub release,
normally cached by torch hub in ``$TORCH_HOME/hub/checkpoints``. We look there, in
``~/.cache/rl4diffusion`` and at ``$RL4DIFFUSION_INCEPTION_WEIGHTS``, and raise
``MissingWeightsError`` at once when absent — torch-fidelity would otherwise try to download it.
The network code needs the ``torch-fidelity`` package (``pip install torch-fidelity``, or
``torchmetrics[image]``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from rl4diffusion.errors import MissingWeightsError
from rl4diffusion.metrics.features import register_feature_space
from rl4diffusion.rewards.weights import (
    MissingFile,
    find_file,
    missing_weights_error,
    toolkit_cache_dir,
    torch_hub_checkpoints_dir,
)

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILE
ALTERNATIVE = ("use the embedded world (reward=shape_alignment model=tiny), which measures diversity and FID with the "
               "embedded judge's features, build_feature_space('judge') — the fallback of build_feature_space('auto')")


def find_weights(weights_path: str | None = None) -> str:
    """The local InceptionV3 FID weights file, or MissingWeightsError naming what to fetch."""
    explicit = weights_path or os.environ.get("RL4DIFFUSION_INCEPTION_WEIGHTS")
    key = f"RL4DIFFUSION_INCEPTION_WEIGHTS=/path/to/{WEIGHTS_FILE}"
    if explicit:
        path = os.path.expanduser(explicit)
        if os.path.isfile(path):
            return path
        raise missing_weights_error("feature space 'inception'", [MissingFile(
            f"the FID InceptionV3 weights {path}", WEIGHTS_URL, [path], key)], alternative=ALTERNATIVE)
    places = [torch_hub_checkpoints_dir(), toolkit_cache_dir()]
    found = find_file(WEIGHTS_FILE, places)
    if found:
        return found
    raise missing_weights_error("feature space 'inception'", [MissingFile(
        f"the FID InceptionV3 weights {WEIGHTS_FILE}", WEIGHTS_URL, [str(p) for p in places], key)],
        alternative=ALTERNATIVE)


@register_feature_space("inception")
class InceptionFeatures:
    """FID's InceptionV3 pool3 features [B, 2048] (torchmetrics ``NoTrainInceptionV3`` / torch-fidelity).

    Args:
        device: where the network runs.
        weights_path: the weights file (default: ``$RL4DIFFUSION_INCEPTION_WEIGHTS``, the torch hub
            checkpoints directory, ``~/.cache/rl4diffusion``).
        antialias: resize with antialiasing (torchmetrics' default) instead of the TF1-compatible
            bilinear resize of the reference FID (our default).
        batch_size: images per forward pass.
    """

    setup_hint = "RL4DIFFUSION_INCEPTION_WEIGHTS"
    """Where its weights are found (named in the one line an offline run prints)."""

    name = "inception"

    def __init__(self, device: str | torch.device = "cpu", *, weights_path: str | Path | None = None,
                 antialias: bool = False, batch_size: int = 64):
        if importlib.util.find_spec("torch_fidelity") is None:
            raise MissingWeightsError(
                "feature space 'inception' needs the torch-fidelity package for torchmetrics' FID InceptionV3 "
                "(`pip install torch-fidelity`, or `pip install torchmetrics[image]`), and then its weights "
                f"{WEIGHTS_FILE} from {WEIGHTS_URL} (point at a copy with RL4DIFFUSION_INCEPTION_WEIGHTS=/path/to/"
                f"{WEIGHTS_FILE}). Without them, {ALTERNATIVE}."
            )
        path = find_weights(str(weights_path) if weights_path else None)
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=path, antialias=antialias)
        self._setup(net, device=device, batch_size=batch_size)

    @classmethod
    def from_model(cls, net: nn.Module, *, device: str | torch.device = "cpu", batch_size: int = 64):
        """Wrap an already-built ``NoTrainInceptionV3`` (or any module mapping uint8 [B,3,H,W] to [B, D])."""
        self = cls.__new__(cls)
        self._setup(net, device=device, batch_size=batch_size)
        return self

    def _setup(self, net, *, device, batch_size):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # uint8 as the reference FID sees saved images (torchmetrics' normalize=True truncates; we round)
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return torch.cat([self.net(chunk.to(self.device)).float() for chunk in pixels.split(self.batch_size)])
