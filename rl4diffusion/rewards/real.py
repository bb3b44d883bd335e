"""Real-world rewards with pretrained weights: ``aesthetic``, ``pickscore``, ``clip_score``, ``hpsv2``.

All four are differentiable: the images go through preprocessing written in torch (resize with
``F.interpolate(..., antialias=True)``, centre crop, normalise with the model's mean/std — no PIL),
so ``∂reward/∂pixels`` reaches the policy in reward-backpropagation algorithms (ReFL, DRaFT,
AlignProp). The networks themselves are frozen (``eval()``, ``requires_grad_(False)``).

| name | model | score |
|---|---|---|
| ``aesthetic`` | open_clip ViT-L-14 (openai) + LAION MLP head | head(image embedding / ‖·‖₂) |
| ``pickscore`` | transformers ``CLIPModel`` (PickScore_v1, ViT-H-14) | exp(logit_scale) · cos(image, text) |
| ``clip_score`` | open_clip, any ``arch`` / ``pretrained`` (ViT-B-32 / openai) | scale · cos(image, text) |
| ``hpsv2`` | open_clip ViT-H-14 with the HPSv2 checkpoint | cos(image, text) |

Weights are looked up in the local caches only (see :mod:`rl4diffusion.rewards.weights`); when they
are absent, construction raises ``MissingWeightsError`` in well under a second, before open_clip or
transformers is imported. ``download=true`` lets the libraries fetch them on a networked machine.

For tests and for users who already hold a model in memory, every reward has a ``from_models``
classmethod that takes built modules (e.g. a tiny, randomly initialised model of the same class)::

    reward = ClipScoreReward.from_models(model, open_clip.get_tokenizer("ViT-B-32"))
    scores = reward(images, ["a red circle"] * len(images))      # Tensor[B]
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rl4diffusion.errors import ConfigError, MissingWeightsError
from rl4diffusion.rewards.registry import register_reward
from rl4diffusion.rewards.weights import (
    EMBEDDED_REWARD,
    MissingFile,
    check_download_allowed,
    find_file,
    find_in_hf_cache,
    hf_cache_dir,
    looks_like_path,
    missing_weights_error,
    toolkit_cache_dir,
    torch_hub_checkpoints_dir,
)

log = logging.getLogger(__name__)

DType = Literal["float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# CLIP's normalisation constants (OpenAI CLIP `clip/clip.py` `_transform`; open_clip `constants.py`).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# Differentiable preprocessing
# ---------------------------------------------------------------------------------------------


def clip_preprocess(images: torch.Tensor, *, resize: int, crop: tuple[int, int], mean: Sequence[float],
                    std: Sequence[float], resize_mode: Literal["shortest", "squash"] = "shortest") -> torch.Tensor:
    """CLIP's image preprocessing in torch, so gradients reach the pixels.

    Reproduces open_clip's ``image_transform`` (``resize_mode="shortest"``: bicubic resize of the
    shorter side to ``resize``, centre crop to ``crop``) and transformers' ``CLIPImageProcessor``
    (resize ``shortest_edge``, ``center_crop``), then ``(x − mean) / std``. ``"squash"`` resizes
    straight to ``crop`` (open_clip's DFN models). Like torchvision's tensor ``Resize``, the
    bicubic result is not clamped, which keeps the gradient everywhere.

    Args:
        images: [B, 3, H, W] in [0, 1].
        resize: target length of the shorter side.
        crop: (height, width) of the centre crop — the model's input size.
        mean, std: per-channel normalisation of the model.
        resize_mode: "shortest" (resize + centre crop) or "squash" (resize to ``crop`` directly).

    Returns:
        [B, 3, crop_h, crop_w] normalised pixels.
    """
    h, w = images.shape[-2:]
    if resize_mode == "squash":
        out_h, out_w = crop
    else:  # torchvision Resize(int): the short side becomes `resize`, the long side int(resize · long / short)
        long = int(resize * max(h, w) / min(h, w))
        out_h, out_w = (resize, long) if h <= w else (long, resize)
        out_h, out_w = max(out_h, crop[0]), max(out_w, crop[1])
    if (out_h, out_w) != (h, w):
        images = F.interpolate(images, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((out_h - crop[0]) / 2)), int(round((out_w - crop[1]) / 2))  # torchvision CenterCrop
    images = images[..., top:top + crop[0], left:left + crop[1]]  # (B, 3, crop_h, crop_w)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _freeze(model: nn.Module, device, dtype: torch.dtype | None = None) -> nn.Module:
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval().requires_grad_(False)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


class _PromptCache:
    """Text embeddings by prompt. Text towers are frozen, so an embedding never changes (bounded size)."""

    def __init__(self, encode, max_size: int = 65536):
        self.encode = encode  # list[str] -> Tensor[N, D], already L2-normalised
        self.max_size = max_size
        self.store: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.store]
        if new:
            if len(self.store) + len(new) > self.max_size:
                self.store.clear()
            for p, e in zip(new, self.encode(new)):
                self.store[p] = e
        return torch.stack([self.store[p] for p in prompts])  # (B, D)


# ---------------------------------------------------------------------------------------------
# open_clip weights: find the checkpoint file locally, then build the model from that file
# ---------------------------------------------------------------------------------------------

# The open_clip pretrained tags our defaults use (facts from open_clip `pretrained.py`), so that the
# absent-weights check runs without importing open_clip. Other tags are resolved through open_clip.
#   (arch, tag) -> (Hugging Face repo[/file], URL, quick_gelu)
_KNOWN_OPEN_CLIP = {
    ("ViT-L-14", "openai"): (
        "timm/vit_large_patch14_clip_224.openai/",
        "https://openaipublic.azureedge.net/clip/models/"
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        True,
    ),
    ("ViT-B-32", "openai"): (
        "timm/vit_base_patch32_clip_224.openai/",
        "https://openaipublic.azureedge.net/clip/models/"
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
        True,
    ),
    ("ViT-H-14", "laion2b_s32b_b79k"): ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K/", "", False),
}


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")  # open_clip's own tag normalisation


def _open_clip_source(arch: str, tag: str) -> tuple[str, str, bool, dict]:
    """(hf_hub, url, quick_gelu, preprocessing overrides) for a pretrained tag; imports open_clip if not known."""
    known = _KNOWN_OPEN_CLIP.get((arch, _clean_tag(tag)))
    if known is not None:
        return (*known, {})
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        if arch not in open_clip.list_models():
            raise ConfigError(f"open_clip has no architecture {arch!r}; see open_clip.list_models() for the names.")
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ConfigError(f"open_clip {arch!r} has no pretrained tag {tag!r}. Known tags: {tags}; "
                          "or give a local checkpoint file as pretrained=/path/to/weights.")
    extra = {k: cfg[k] for k in ("mean", "std", "resize_mode") if k in cfg}
    return cfg.get("hf_hub", ""), cfg.get("url", ""), bool(cfg.get("quick_gelu", False)), extra


def _find_open_clip_checkpoint(arch: str, pretrained: str, *, cache_dir: str | None, key: str,
                               download: bool) -> tuple[str | None, bool | None, dict, MissingFile | None]:
    """Locate the weights for ``arch``/``pretrained`` on disk.

    Returns (file or None, quick_gelu, preprocessing overrides, MissingFile or None). The file is
    None when it must be downloaded (``download=True``) or is missing (then MissingFile says why).
    quick_gelu is the tag's (OpenAI's CLIPs use QuickGELU), or None for a local file: a state dict
    does not say which activation it was trained with, so the caller decides.
    """
    if looks_like_path(pretrained):
        path = os.path.expanduser(pretrained)
        if os.path.isfile(path):
            return path, None, {}, None
        return None, None, {}, MissingFile(f"the open_clip {arch} checkpoint {path}", "your own copy", [path],
                                           f"{key}=/path/to/checkpoint")
    hf_hub, url, quick_gelu, extra = _open_clip_source(arch, pretrained)
    looked, sources = [], []
    if hf_hub:  # open_clip's convention: "org/repo/" (default file names) or "org/repo/file"
        repo, filename = os.path.split(hf_hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        found = find_in_hf_cache(repo, names, cache_dir=cache_dir)
        if found:
            return found, quick_gelu, extra, None
        looked.append(f"the Hugging Face cache {hf_cache_dir(cache_dir)}")
        sources.append(f"the Hugging Face repo {repo} (file {' or '.join(names)})")
    if url:
        clip_cache = cache_dir or os.path.expanduser("~/.cache/clip")  # open_clip's URL download cache
        found = find_file(os.path.basename(url), [clip_cache])
        if found:
            return found, quick_gelu, extra, None
        looked.append(clip_cache)
        sources.append(url)
    if download:
        return None, quick_gelu, extra, None
    hint = f"{key}=/path/to/{os.path.basename(url) if url else 'open_clip_model.safetensors'}"
    if quick_gelu:  # a bare file does not say which activation it needs
        hint += f" {key.rsplit('.', 1)[0]}.quick_gelu=true"
    return None, quick_gelu, extra, MissingFile(f"the open_clip {arch} '{pretrained}' weights", " or ".join(sources),
                                                looked, hint)


def _resolve_quick_gelu(option: bool | None, from_tag: bool | None, for_a_file: bool, owner: str) -> bool:
    """QuickGELU: the explicit option, else the tag's, else ``for_a_file`` (logged, since a file cannot tell)."""
    if option is not None:
        return bool(option)
    if from_tag is not None:
        return from_tag
    log.info("%s: a checkpoint file was given without quick_gelu; using quick_gelu=%s (OpenAI CLIP weights need "
             "true, most LAION ones false: set reward.quick_gelu to choose)", owner, for_a_file)
    return for_a_file


def _load_open_clip(arch: str, pretrained: str, checkpoint: str | None, *, quick_gelu: bool, cache_dir: str | None,
                    device, dtype: torch.dtype):
    """Build an open_clip model from a local checkpoint file (or let open_clip download the tag)."""
    import open_clip

    model = open_clip.create_model(arch, pretrained=checkpoint or pretrained, force_quick_gelu=quick_gelu,
                                   cache_dir=cache_dir, device="cpu")
    return _freeze(model, device, dtype), open_clip.get_tokenizer(arch)


class _OpenClipImageText:
    """Shared by clip_score and hpsv2: ``scale · cos(f_image(x), f_text(prompt))`` with an open_clip model."""

    scale: float = 1.0

    @classmethod
    def from_models(cls, model: nn.Module, tokenizer, *, device: str | torch.device = "cpu",
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    resize_mode: Literal["shortest", "squash"] | None = None, scale: float | None = None):
        """Wrap an already-built open_clip model (``open_clip.CLIP`` or ``CustomTextCLIP``) and its tokenizer.

        Mean/std/resize mode default to the model's ``visual.preprocess_cfg`` (set by
        ``open_clip.create_model``), else CLIP's constants.
        """
        self = cls.__new__(cls)
        self._setup(model, tokenizer, device=device, mean=mean, std=std, resize_mode=resize_mode,
                    scale=cls.scale if scale is None else scale)
        return self

    def _setup(self, model, tokenizer, *, device, mean=None, std=None, resize_mode=None, scale=1.0):
        self.device = torch.device(device)
        self.model = _freeze(model, self.device)
        self.tokenizer = tokenizer
        self.scale = float(scale)
        pp = getattr(model.visual, "preprocess_cfg", None) or {}
        self.input_size = _pair(getattr(model.visual, "image_size", pp.get("size", 224)))
        self.mean = tuple(mean or pp.get("mean", OPENAI_CLIP_MEAN))
        self.std = tuple(std or pp.get("std", OPENAI_CLIP_STD))
        self.resize_mode = resize_mode or ("squash" if pp.get("resize_mode") == "squash" else "shortest")
        self._text = _PromptCache(self._encode_text)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] (differentiable w.r.t. ``images``)."""
        x = clip_preprocess(images.to(self.device, _model_dtype(self.model)), resize=min(self.input_size),
                            crop=self.input_size, mean=self.mean, std=self.std, resize_mode=self.resize_mode)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (self.image_features(images) * self._text(list(prompts))).sum(dim=-1)  # (B,)
        return (self.scale * cos).to(images.device)


# ---------------------------------------------------------------------------------------------
# aesthetic — LAION improved aesthetic predictor
# ---------------------------------------------------------------------------------------------

AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      + AESTHETIC_HEAD_FILE)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP, with the published layer structure.

    ``layers`` = Linear(768, 1024) – Dropout(0.2) – Linear(1024, 128) – Dropout(0.2) – Linear(128, 64)
    – Dropout(0.1) – Linear(64, 16) – Linear(16, 1): no activations, as published
    (christophschuhmann/improved-aesthetic-predictor, ``simple_inference.py``). State-dict keys
    ``layers.{0,2,4,6,7}.{weight,bias}`` match ``sac+logos+ava1-l14-linearMSE.pth``. It reads an
    L2-normalised CLIP ViT-L/14 image embedding and predicts a 1–10 aesthetic rating.
    """

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)

    @classmethod
    def load(cls, path: str) -> AestheticHead:
        """Load the published head (``torch.load(weights_only=True)``, or safetensors for ``*.safetensors``)."""
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        if "layers.0.weight" not in state:
            raise ConfigError(f"aesthetic head {path}: expected the LAION MLP state dict with keys layers.0.weight … "
                              f"layers.7.bias, found keys {sorted(state)[:6]}. Use {AESTHETIC_HEAD_FILE}.")
        head = cls(in_features=state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head


@register_reward("aesthetic", differentiable=True)
class AestheticReward:
    """LAION aesthetic score (≈1–10): MLP head on the L2-normalised open_clip ViT-L-14 (openai) image embedding.

    Source: christophschuhmann/improved-aesthetic-predictor (head ``sac+logos+ava1-l14-linearMSE.pth``,
    ``simple_inference.py``); the reward of DDPO (Black et al. 2023, kvablack/ddpo-pytorch
    ``aesthetic_scorer.py``), DRaFT and AlignProp. The prompt is ignored.

    Args:
        head_path: the head's weights file; default: ``sac+logos+ava1-l14-linearMSE.pth`` in
            ``~/.cache/rl4diffusion`` or the torch hub checkpoints directory.
        clip_arch: open_clip architecture of the image encoder (the head was trained on ViT-L-14).
        pretrained: open_clip tag (``openai``) or a local checkpoint file of that encoder.
        quick_gelu: QuickGELU activations (default: the tag's; for a file, true — OpenAI's ViT-L/14 uses them).
        cache_dir: open_clip cache directory (Hugging Face cache and URL cache); default: theirs.
        download: fetch missing files (needs network; off by default so absence fails fast).
        dtype: dtype of the CLIP encoder ("float16" halves GPU memory; the head stays float32).
        device: where the models run.

    Example::

        python -m rl4diffusion.train reward=aesthetic reward.head_path=/data/sac+logos+ava1-l14-linearMSE.pth
    """

    def __init__(self, *, head_path: str | None = None, clip_arch: str = "ViT-L-14", pretrained: str = "openai",
                 quick_gelu: bool | None = None, cache_dir: str | None = None, download: bool = False,
                 dtype: DType = "float32", device: str | torch.device = "cpu"):
        head_file, missing = self._find_head(head_path, download)
        clip_file, tag_quick_gelu, _, clip_missing = _find_open_clip_checkpoint(
            clip_arch, pretrained, cache_dir=cache_dir, key="reward.pretrained", download=download)
        missing += [clip_missing] if clip_missing else []
        if missing:
            raise missing_weights_error("reward 'aesthetic'", missing, download_key="reward.download=true")
        if head_file is None or clip_file is None:  # download=True and something must be fetched
            check_download_allowed("reward 'aesthetic'")
        if head_file is None:
            head_file = self._download_head()
        # the head was trained on OpenAI's ViT-L/14, which uses QuickGELU: a bare file defaults to it
        quick_gelu = _resolve_quick_gelu(quick_gelu, tag_quick_gelu, True, "reward 'aesthetic'")
        model, _ = _load_open_clip(clip_arch, pretrained, clip_file, quick_gelu=quick_gelu, cache_dir=cache_dir,
                                   device=device, dtype=_DTYPES[dtype])
        self._setup(model, AestheticHead.load(head_file), device=device)

    @staticmethod
    def _find_head(head_path: str | None, download: bool) -> tuple[str | None, list[MissingFile]]:
        key = f"reward.head_path=/path/to/{AESTHETIC_HEAD_FILE}"
        if head_path:
            path = os.path.expanduser(head_path)
            if os.path.isfile(path):
                return path, []
            return None, [MissingFile(f"the LAION aesthetic head {path}", AESTHETIC_HEAD_URL, [path], key)]
        places = [toolkit_cache_dir(), torch_hub_checkpoints_dir()]
        found = find_file(AESTHETIC_HEAD_FILE, places)
        if found or download:
            return found, []
        return None, [MissingFile(f"the LAION aesthetic head {AESTHETIC_HEAD_FILE}", AESTHETIC_HEAD_URL,
                                  [str(p) for p in places], key)]

    @staticmethod
    def _download_head() -> str:
        target = toolkit_cache_dir() / AESTHETIC_HEAD_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(AESTHETIC_HEAD_URL, str(target))
        return str(target)

    @classmethod
    def from_models(cls, clip_model: nn.Module, head: nn.Module, *, device: str | torch.device = "cpu",
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> AestheticReward:
        """Wrap an already-built open_clip model and head (e.g. tiny random ones in tests)."""
        self = cls.__new__(cls)
        self._setup(clip_model, head, device=device, mean=mean, std=std)
        return self

    def _setup(self, clip_model, head, *, device, mean=None, std=None):
        self.device = torch.device(device)
        self.clip = _OpenClipImageText.from_models(clip_model, tokenizer=None, device=device, mean=mean, std=std)
        self.head = _freeze(head, self.device, torch.float32)
        out_dim = getattr(clip_model.visual, "output_dim", None)
        in_dim = self.head.layers[0].in_features if isinstance(self.head, AestheticHead) else None
        if out_dim is not None and in_dim is not None and out_dim != in_dim:
            raise ConfigError(f"reward 'aesthetic': the head reads {in_dim}-d embeddings but the CLIP encoder gives "
                              f"{out_dim}-d ones; the LAION head needs ViT-L-14 (reward.clip_arch=ViT-L-14).")

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embedding = self.clip.image_features(images)  # (B, 768), unit L2 norm as the head was trained
        return self.head(embedding).squeeze(-1).to(images.device)


# ---------------------------------------------------------------------------------------------
# clip_score
# ---------------------------------------------------------------------------------------------


@register_reward("clip_score", differentiable=True)
class ClipScoreReward(_OpenClipImageText):
    """Image–prompt agreement: ``scale · cos(f_image(x), f_text(prompt))`` with an open_clip model.

    Source: CLIP (Radford et al. 2021); CLIPScore (Hessel et al. 2021) reports w·max(cos, 0) and
    torchmetrics' ``CLIPScore`` reports 100·max(cos, 0). We keep the cosine unclamped so its gradient
    never vanishes; ``scale=100`` gives torchmetrics' units for positive cosines.

    Args:
        arch: open_clip architecture name (``open_clip.list_models()``).
        pretrained: open_clip pretrained tag, or a local checkpoint file.
        scale: multiplier of the cosine (1.0: raw cosine in [−1, 1]).
        quick_gelu: QuickGELU activations (default: the tag's; for a file, whether ``arch`` ends in
            ``-quickgelu`` — set it to true for OpenAI checkpoint files such as ``ViT-B-32.pt``).
        cache_dir, download, dtype, device: as for ``aesthetic``.

    Example::

        python -m rl4diffusion.train reward=clip_score reward.arch=ViT-B-32 reward.pretrained=/data/ViT-B-32.pt
    """

    def __init__(self, *, arch: str = "ViT-B-32", pretrained: str = "openai", scale: float = 1.0,
                 quick_gelu: bool | None = None, cache_dir: str | None = None, download: bool = False,
                 dtype: DType = "float32", device: str | torch.device = "cpu"):
        ckpt, tag_quick_gelu, extra, missing = _find_open_clip_checkpoint(
            arch, pretrained, cache_dir=cache_dir, key="reward.pretrained", download=download)
        if missing:
            raise missing_weights_error("reward 'clip_score'", [missing], download_key="reward.download=true")
        if ckpt is None:  # download=True: open_clip fetches the tag
            check_download_allowed("reward 'clip_score'")
        quick_gelu = _resolve_quick_gelu(quick_gelu, tag_quick_gelu, arch.endswith("-quickgelu"), "reward 'clip_score'")
        model, tokenizer = _load_open_clip(arch, pretrained, ckpt, quick_gelu=quick_gelu, cache_dir=cache_dir,
                                           device=device, dtype=_DTYPES[dtype])
        self._setup(model, tokenizer, device=device, mean=extra.get("mean"), std=extra.get("std"),
                    resize_mode=extra.get("resize_mode"), scale=scale)


# ---------------------------------------------------------------------------------------------
# hpsv2 — Human Preference Score v2
# ---------------------------------------------------------------------------------------------

_HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
_HPS_REPO = "xswu/HPSv2"


@register_reward("hpsv2", differentiable=True)
class HPSv2Reward(_OpenClipImageText):
    """Human Preference Score v2: cos(image, prompt) under an open_clip ViT-H-14 fine-tuned on HPD v2.

    Source: Wu et al. 2023, tgxs002/HPSv2 (``img_score.py``: score = diag(image_features @
    text_features.T) of the normalised features). Needs the ``hpsv2`` package installed
    (``pip install hpsv2``; not an rl4diffusion dependency) and its checkpoint, which loads into
    open_clip's ViT-H-14.

    Args:
        version: "v2.1" (``HPS_v2.1_compressed.pt``) or "v2.0" (``HPS_v2_compressed.pt``).
        checkpoint_path: local checkpoint; default: ``$HPS_ROOT`` or ``~/.cache/hpsv2``, then the
            Hugging Face cache of ``xswu/HPSv2``.
        cache_dir, download, dtype, device: as for ``aesthetic``.
    """

    def __init__(self, *, version: Literal["v2.0", "v2.1"] = "v2.1", checkpoint_path: str | None = None,
                 cache_dir: str | None = None, download: bool = False, dtype: DType = "float32",
                 device: str | torch.device = "cpu"):
        if version not in _HPS_FILES:
            raise ConfigError(f"reward 'hpsv2': version must be one of {sorted(_HPS_FILES)}, got {version!r}")
        filename = _HPS_FILES[version]
        key = f"reward.checkpoint_path=/path/to/{filename}"
        if importlib.util.find_spec("hpsv2") is None:
            raise MissingWeightsError(
                "reward 'hpsv2' needs the hpsv2 package, which is not installed here: run `pip install hpsv2` "
                "(it is not an rl4diffusion dependency). Its checkpoint then comes from the Hugging Face repo "
                f"{_HPS_REPO} ({filename}); point at a local copy with {key}. To run offline now, "
                f"{EMBEDDED_REWARD}."
            )
        ckpt = self._find_checkpoint(filename, checkpoint_path, cache_dir, key, download)
        if ckpt is None:
            check_download_allowed("reward 'hpsv2'")
            from huggingface_hub import hf_hub_download

            ckpt = hf_hub_download(_HPS_REPO, filename, cache_dir=cache_dir)
        model, tokenizer = _load_open_clip("ViT-H-14", ckpt, ckpt, quick_gelu=False, cache_dir=cache_dir,
                                           device=device, dtype=_DTYPES[dtype])
        self._setup(model, tokenizer, device=device, scale=1.0)

    @staticmethod
    def _find_checkpoint(filename, checkpoint_path, cache_dir, key, download) -> str | None:
        if checkpoint_path:
            path = os.path.expanduser(checkpoint_path)
            if os.path.isfile(path):
                return path
            raise missing_weights_error("reward 'hpsv2'", [MissingFile(f"the HPSv2 checkpoint {path}",
                                        f"the Hugging Face repo {_HPS_REPO}", [path], key)])
        hps_root = os.environ.get("HPS_ROOT") or os.path.expanduser("~/.cache/hpsv2")
        found = find_file(filename, [hps_root]) or find_in_hf_cache(_HPS_REPO, [filename], cache_dir=cache_dir)
        if found or download:
            return found
        raise missing_weights_error(
            "reward 'hpsv2'", [MissingFile(f"the HPSv2 checkpoint {filename}", f"the Hugging Face repo {_HPS_REPO}",
                                           [hps_root, f"the Hugging Face cache {hf_cache_dir(cache_dir)}"], key)],
            download_key="reward.download=true")


# ---------------------------------------------------------------------------------------------
# pickscore — transformers CLIPModel
# ---------------------------------------------------------------------------------------------

_HF_WEIGHTS = ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json"]


def _find_hf_files(repo_or_dir: str, groups: dict[str, list[str]], cache_dir: str | None) -> dict[str, str | None]:
    """For each file label (e.g. ``"model.safetensors"``: [alternatives…]) the first alternative found locally, or None.

    ``repo_or_dir`` is a local directory (searched directly) or a hub id (searched in the HF cache).
    """
    local = looks_like_path(repo_or_dir) or os.path.isdir(os.path.expanduser(repo_or_dir))
    out = {}
    for label, names in groups.items():
        if local:
            out[label] = next((p for n in names if (p := find_file(n, [os.path.expanduser(repo_or_dir)]))), None)
        else:
            out[label] = find_in_hf_cache(repo_or_dir, names, cache_dir=cache_dir)
    return out


@register_reward("pickscore", differentiable=True)
class PickScoreReward:
    """PickScore: ``exp(logit_scale) · cos(image, prompt)`` with a transformers ``CLIPModel`` (≈ 18–23 for SD images).

    Source: Kirstain et al. 2023, "Pick-a-Pic" (yuvalkirstain/PickScore, model card of
    ``yuvalkirstain/PickScore_v1``: a CLIP-H/14 fine-tuned on Pick-a-Pic preferences, used with the
    processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). Preprocessing follows that
    processor's ``preprocessor_config.json`` (resize shortest edge, centre crop, CLIP mean/std),
    in torch.

    Args:
        model_path: hub id (looked up in the local Hugging Face cache) or a local directory saved with
            ``CLIPModel.save_pretrained``.
        processor_path: hub id or directory with the tokenizer and ``preprocessor_config.json``.
        cache_dir: Hugging Face cache directory (default: ``HF_HUB_CACHE``).
        download, dtype, device: as for ``aesthetic``.

    Example::

        python -m rl4diffusion.train reward=pickscore reward.model_path=/data/PickScore_v1 \\
            reward.processor_path=/data/CLIP-ViT-H-14-laion2B-s32B-b79K
    """

    def __init__(self, *, model_path: str = "yuvalkirstain/PickScore_v1",
                 processor_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", cache_dir: str | None = None,
                 download: bool = False, dtype: DType = "float32", device: str | torch.device = "cpu"):
        model_files = _find_hf_files(model_path, {"config.json": ["config.json"], "model.safetensors": _HF_WEIGHTS},
                                     cache_dir)
        proc_files = _find_hf_files(processor_path, {"tokenizer.json": ["tokenizer.json", "vocab.json"],
                                                     "preprocessor_config.json": ["preprocessor_config.json"]},
                                    cache_dir)
        missing = [
            _missing_hf_files(path, files, key, cache_dir)
            for path, files, key in ((model_path, model_files, "reward.model_path=/path/to/PickScore_v1"),
                                     (processor_path, proc_files, "reward.processor_path=/path/to/clip-processor"))
            if None in files.values()
        ]
        if missing and not download:
            raise missing_weights_error("reward 'pickscore'", missing, download_key="reward.download=true")
        if missing:
            check_download_allowed("reward 'pickscore'")
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(model_path, local_files_only=not download, cache_dir=cache_dir)
            tokenizer = AutoTokenizer.from_pretrained(processor_path, local_files_only=not download,
                                                      cache_dir=cache_dir)
        except OSError as e:  # e.g. a shard listed in the index is absent
            raise MissingWeightsError(
                f"reward 'pickscore': loading {model_path} / {processor_path} from local files failed ({e}). "
                "Copy the complete repositories here and point at them with reward.model_path=/path/to/PickScore_v1 "
                f"and reward.processor_path=/path/to/clip-processor. To run offline now, {EMBEDDED_REWARD}."
            ) from None
        pp_file = proc_files["preprocessor_config.json"]
        if pp_file is None:  # download=True: the tokenizer download does not bring the image settings
            from huggingface_hub import hf_hub_download

            pp_file = hf_hub_download(processor_path, "preprocessor_config.json", cache_dir=cache_dir)
        with open(pp_file) as f:
            pp = json.load(f)
        model = model.to(_DTYPES[dtype])
        self._setup(model, tokenizer, device=device, **_image_settings_from_processor(pp))

    @classmethod
    def from_models(cls, model: nn.Module, tokenizer, *, device: str | torch.device = "cpu",
                    resize: int | None = None, crop: int | tuple[int, int] | None = None,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD) -> PickScoreReward:
        """Wrap an already-built ``transformers.CLIPModel`` and tokenizer (default input size: the model's)."""
        self = cls.__new__(cls)
        size = model.config.vision_config.image_size
        self._setup(model, tokenizer, device=device, resize=resize or size, crop=_pair(crop or size), mean=mean,
                    std=std)
        return self

    def _setup(self, model, tokenizer, *, device, resize, crop, mean, std):
        self.device = torch.device(device)
        self.model = _freeze(model, self.device)
        self.tokenizer = tokenizer
        self.resize, self.crop, self.mean, self.std = int(resize), _pair(crop), tuple(mean), tuple(std)
        self.max_length = min(int(model.config.text_config.max_position_embeddings),
                              int(getattr(tokenizer, "model_max_length", 77) or 77))
        self._text = _PromptCache(self._encode_text)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        # text_projection(pooled EOS state): what CLIPModel.get_text_features returns in transformers 4 and 5
        pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                       attention_mask=tokens.get("attention_mask")).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] (differentiable w.r.t. ``images``)."""
        x = clip_preprocess(images.to(self.device, _model_dtype(self.model)), resize=self.resize, crop=self.crop,
                            mean=self.mean, std=self.std)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (self.image_features(images) * self._text(list(prompts))).sum(dim=-1)  # (B,)
        return (self.model.logit_scale.exp().float() * cos).to(images.device)


def _missing_hf_files(path: str, files: dict[str, str | None], key: str, cache_dir: str | None) -> MissingFile:
    absent = ", ".join(label for label, found in files.items() if found is None)
    if looks_like_path(path) or os.path.isdir(os.path.expanduser(path)):
        return MissingFile(f"{absent} in {path}", "a save_pretrained copy of the model", [path], key)
    return MissingFile(f"{absent} of {path}", f"the Hugging Face repo {path}",
                       [f"the Hugging Face cache {hf_cache_dir(cache_dir)}"], key)


def _image_settings_from_processor(pp: dict) -> dict:
    """resize/crop/mean/std from a CLIPImageProcessor ``preprocessor_config.json``."""
    size = pp.get("size", 224)
    resize = size if isinstance(size, int) else size.get("shortest_edge") or min(size["height"], size["width"])
    crop = pp.get("crop_size", resize) if pp.get("do_center_crop", True) else resize
    crop = crop if isinstance(crop, int) else (crop["height"], crop["width"])
    return {"resize": int(resize), "crop": _pair(crop), "mean": tuple(pp.get("image_mean", OPENAI_CLIP_MEAN)),
            "std": tuple(pp.get("image_std", OPENAI_CLIP_STD))}
