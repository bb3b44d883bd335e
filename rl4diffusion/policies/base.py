"""DiffusionPolicy: a diffusers pipeline as a stochastic policy π_θ(x_{t-1} | x_t, c) over denoising steps.

This module holds what every model kind shares, written once:

* prompt encoding, cached per prompt (the text encoders are frozen, so an embedding never changes);
* classifier-free guidance, ε̂ = ε_u + w (ε_c − ε_u) (Ho & Salimans 2022), over the unconditional
  and conditional halves of one batched network call, as diffusers' pipelines do;
* the reference model: the same network with the LoRA adapter disabled (no second copy), or a
  frozen copy taken at construction under full fine-tuning — ``reference()``, ``use_reference=True``
  and ``reference_output(td)`` all go through it;
* the trainable parameters: a LoRA adapter through peft (Hu et al. 2021) or the whole network;
* the training wrapper (``set_training_denoiser``): accelerate's DDP/FSDP wrapper of the denoiser,
  through which every network call goes so that gradients sync;
* the unrolled sampling loop, ``act`` and ``log_prob`` over TensorDicts, decoding and encoding
  images with the VAE, and saving LoRA weights in diffusers' format.

A subclass says what differs between model kinds, and nothing else:

==========================  ===========================================================
``accepts(pipeline)``       whether it wraps this pipeline (``from_pretrained`` picks the
                            most specific subclass that does)
``_set_up_schedule``        the scheduler and its buffers (``timesteps`` and the step's own)
``_encode_text``            how the pipeline encodes prompts, and the extra conditioning
``_denoise``                how the network is called with its conditioning
``_step`` and ``pred_x0``   the stochastic step with its log-probability (``steps.py``)
==========================  ===========================================================

``sd.py`` (Stable Diffusion, DDIM step), ``sdxl.py`` (its SDXL variant) and ``flow.py`` (SD3,
flow-matching SDE step) are the subclasses. Importing ``rl4diffusion.policies`` registers them.

Example::

    policy = DiffusionPolicy.from_pretrained("tiny")  # a StableDiffusionPolicy
    out = policy.sample(["a red circle"], generator=torch.Generator().manual_seed(0))
    out["images"].shape  # torch.Size([1, 3, 32, 32])

The denoising loop is written out here on purpose (diffusers' pipeline ``__call__`` runs under
``no_grad`` and hides the log-probability). Sources: DDPO (Black et al. 2023,
kvablack/ddpo-pytorch ``pipeline_with_logprob.py``) for the loop, diffusers'
``StableDiffusionPipeline.__call__`` for the guidance layout, peft's ``LoraConfig`` and diffusers'
``PeftAdapterMixin`` (``add_adapter``, ``disable_adapters``) for the adapter.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from rl4diffusion import keys
from rl4diffusion.errors import ConfigError, MissingWeightsError
from rl4diffusion.policies.steps import StepOutput

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PolicyConfig:
    """How to load and sample the model (the Hydra ``model`` group mirrors this)."""

    pretrained: str = "tiny"
    """'tiny' (the embedded model), a local diffusers pipeline directory, or a hub id in the local cache."""
    num_steps: int = 20
    """Denoising steps N of the sampling chain (the MDP's horizon)."""
    guidance_scale: float = 2.0
    """Classifier-free guidance weight w (1 = no guidance, one network call per step)."""
    negative_prompt: str = ""
    """The prompt of guidance's unconditional branch (e.g. "blurry"): sampling, training and evaluation all
    use it; "" is the empty prompt (diffusers' default). Unused at guidance_scale 1."""
    eta: float = 1.0
    """DDIM η: 1 gives the DDPM-like variance every policy-gradient method needs; 0 is deterministic."""
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    """Reduce the per-element Gaussian log-density over latent dims by mean (DDPO) or sum (exact density)."""
    train_mode: Literal["lora", "full"] = "lora"
    """Train a LoRA adapter (reference = adapter disabled) or every weight (reference = a frozen copy)."""
    lora_rank: int = 4
    lora_alpha: float | None = None
    """LoRA scale numerator; None means equal to the rank (scale 1)."""
    lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")
    """Module names that receive LoRA layers (attention projections by default)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the frozen parts (VAE, text encoder, base weights); trainable LoRA weights stay float32."""
    gradient_checkpointing: bool = False
    """Enable diffusers' per-block gradient checkpointing in the denoiser."""
    height: int | None = None
    width: int | None = None
    """Image size; None takes the model's default (sample_size × VAE scale factor)."""
    vae_slicing: bool = False
    """Decode one image at a time (saves memory on large models)."""
    noise_level: float = 0.7
    """Flow-matching models only: the SDE's noise level a in s_t = a·sqrt(σ/(1−σ)) (Flow-GRPO 0.7; 0: ODE)."""
    max_sequence_length: int = 256
    """Flow-matching (SD3) models only: T5 prompt tokens (SD3's default 256)."""
    name: str = field(default="", repr=False)
    """Display name of the model config (filled by Hydra)."""

    def validate(self) -> None:
        """Ranges; keys, types and the Literal choices are the schema's (``rl4diffusion.schema``)."""
        from rl4diffusion.schema import at_least, finite

        at_least(("model.num_steps", self.num_steps, 1, "denoising steps"),
                 ("model.guidance_scale", self.guidance_scale, 0, "the classifier-free guidance weight"),
                 ("model.eta", self.eta, 0, "DDIM's η"),
                 ("model.noise_level", self.noise_level, 0, "the flow SDE's noise level"),
                 ("model.lora_rank", self.lora_rank, 1, "the LoRA rank"),
                 ("model.height", self.height, 1, "the image height in pixels"),
                 ("model.width", self.width, 1, "the image width in pixels"))
        finite(("model.guidance_scale", self.guidance_scale, "the classifier-free guidance weight"),
               ("model.noise_level", self.noise_level, "the flow SDE's noise level"))
        if self.eta > 1:
            # DDIM's σ_t = η·sqrt((1−ᾱ_{t−1})/(1−ᾱ_t))·sqrt(1−ᾱ_t/ᾱ_{t−1}) exceeds the posterior's spread for η > 1,
            # and the mean's sqrt(1 − ᾱ_{t−1} − σ_t²) can turn NaN (Song et al. 2021, eq. 12 and 16)
            raise ConfigError(f"model.eta (DDIM's η) must be in [0, 1], got {self.eta}: 1 is the DDPM-like "
                              "sampler every policy-gradient method needs, 0 the deterministic DDIM.")


def resolve_pretrained(pretrained: str) -> str:
    """Map a model name to a local path: 'tiny' / 'tiny_flow' → the shipped embedded models."""
    if pretrained == "tiny":
        from rl4diffusion.zoo.tiny import TINY_PATH

        return str(TINY_PATH)
    if pretrained == "tiny_flow":
        from rl4diffusion.zoo.tiny import TINY_FLOW_PATH

        return str(TINY_FLOW_PATH)
    return pretrained


def check_pretrained_available(pretrained: str) -> None:
    """Fail in milliseconds, before the heavy imports, when a model's weights are not on this machine."""
    path = resolve_pretrained(pretrained)
    if os.path.isdir(path) or path.startswith(("/", ".", "~")) or path.count("/") != 1:
        return  # local paths are checked (with better messages) by load_pipeline
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(path, "model_index.json"), str):
        raise MissingWeightsError(_missing_model_message(path))


def _missing_model_message(path: str) -> str:
    return (
        f"the weights of model {path!r} are not on this machine (looked in the Hugging Face cache "
        f"{os.environ.get('HF_HOME', '~/.cache/huggingface')} with local_files_only=True). They are normally "
        f"fetched from the Hugging Face hub: on a machine with access run `huggingface-cli download {path}` "
        "and copy the cache here, or save the pipeline with save_pretrained and pass "
        "model.pretrained=/that/dir (or model=path:/that/dir). To run offline now, use the embedded model: "
        "model=tiny."
    )


def _check_local_path(path: str) -> None:
    """Refuse a local model path that is not a pipeline directory, naming what it is instead."""
    if os.path.isfile(path):
        raise ConfigError(f"model path {path!r} is a file, not a pipeline directory. Point model.pretrained (or "
                          "model=path:/dir) at the directory that holds model_index.json (pipe.save_pretrained(dir) "
                          "writes one), or use the embedded model with model=tiny.")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ConfigError(
            f"{path!r} is not a diffusers pipeline directory (no model_index.json). Save one with "
            "pipe.save_pretrained(dir), or use the embedded model with model=tiny."
        )


def _read_json(path: Path) -> dict:
    """A pipeline's JSON file as a dict; a malformed one is a ConfigError naming it."""
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is not valid JSON ({e}). Restore it from the model's source (or save the "
                          "pipeline again with pipe.save_pretrained), or use the embedded model with "
                          "model=tiny.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a JSON {type(value).__name__}, not the object diffusers writes. Restore "
                          "it from the model's source, or use the embedded model with model=tiny.")
    return value


def pipeline_directory(pretrained: str) -> Path | None:
    """The directory of a model's files, found without loading anything: a local pipeline directory, or the
    snapshot of a hub id in the local Hugging Face cache; None for a hub id that is not cached."""
    path = resolve_pretrained(pretrained)
    _check_local_path(path)
    if os.path.isdir(path):
        return Path(path)
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        return None  # load_pipeline names the missing directory
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(path, "model_index.json")
    return Path(index).parent if isinstance(index, str) else None


def size_multiple(vae_config, denoiser_config) -> int:
    """The image sizes (pixels) a pipeline can take are multiples of this: the VAE's downscaling times the
    denoiser's (a UNet halves the latent at every down block but the last; a transformer cuts it into patches)."""
    multiple = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if "down_block_types" in denoiser_config:
        return multiple * 2 ** (len(denoiser_config["down_block_types"]) - 1)
    return multiple * int(denoiser_config.get("patch_size") or 1)


def check_image_size(config: PolicyConfig, multiple: int, default: int) -> None:
    """Refuse a ``model.height`` / ``model.width`` that is not a multiple of ``multiple`` (``size_multiple``)."""
    for key in ("height", "width"):
        value = getattr(config, key)
        if value is not None and value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise ConfigError(f"model.{key}={value} is a size this model cannot generate: its VAE and denoiser take "
                              f"multiples of {multiple} pixels. Use e.g. model.{key}={nearest}, or model.{key}=null "
                              f"for the model's own size ({default}).")


def check_pipeline_files(config: PolicyConfig) -> str | None:
    """Check a model's files before any weight loads: a readable ``model_index.json`` naming a text-to-image
    latent pipeline this toolkit wraps, and an image size its VAE and denoiser can take (``check_image_size``).

    Returns the sampler family, ``"flow"`` (a flow-matching scheduler, e.g. SD3) or ``"ddim"``, or None when
    the files are not on this machine (``load_pipeline`` then says what to download). Raises ConfigError."""
    directory = pipeline_directory(config.pretrained)
    if directory is None:
        return None
    index_file = directory / "model_index.json"
    index = _read_json(index_file)
    present = {k for k, v in index.items() if not k.startswith("_") and v not in (None, [None, None])}
    denoiser = "unet" if "unet" in present else "transformer"
    missing = [k for k in ("vae", "text_encoder", denoiser) if k not in present]
    if missing:
        raise ConfigError(
            f"{index_file} describes a {index.get('_class_name', 'pipeline')} with no {' and no '.join(missing)}: "
            "rl4diffusion fine-tunes text-to-image latent pipelines (Stable Diffusion 1.x/2.x, SDXL, SD3 and others "
            "with a vae, a text_encoder and a unet or transformer). Point model.pretrained at such a pipeline, or "
            "use the embedded model with model=tiny.")
    vae_file, denoiser_file = directory / "vae" / "config.json", directory / denoiser / "config.json"
    if vae_file.is_file() and denoiser_file.is_file():
        vae, network = _read_json(vae_file), _read_json(denoiser_file)
        if "block_out_channels" in vae and isinstance(network.get("sample_size"), int):
            multiple = size_multiple(vae, network)
            check_image_size(config, multiple, network["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1))
    scheduler = index.get("scheduler") or [None, ""]
    return "flow" if "FlowMatch" in str(scheduler[-1]) else "ddim"


def load_pipeline(pretrained: str, *, dtype: torch.dtype = torch.float32):
    """Load a diffusers pipeline from a local directory or the local hub cache, never the network.

    Raises MissingWeightsError with what to download and the embedded alternative when absent.
    """
    from diffusers import DiffusionPipeline

    path = resolve_pretrained(pretrained)
    _check_local_path(path)
    is_local = os.path.isdir(path)
    if not is_local and (path.startswith(("/", ".", "~")) or os.sep in path.strip("/").split("/", 1)[-1]):
        raise ConfigError(
            f"model path {path!r} does not exist. Point model.pretrained (or model=path:/dir) at a diffusers "
            "pipeline directory (one with model_index.json), or use the embedded model with model=tiny."
        )
    absent = {}  # components saved as absent (e.g. SD3 without T5) must be passed as None explicitly
    if is_local:
        index = _read_json(Path(path, "model_index.json"))
        absent = {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=dtype, **absent)
    except (OSError, ValueError) as e:
        if is_local:
            raise ConfigError(f"could not load the diffusers pipeline in {path!r}: {e}") from None
        raise MissingWeightsError(_missing_model_message(path)) from None
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def per_sample_timesteps(timesteps: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Timesteps [B] for a batch of latents [B, ...]: a scalar timestep is shared by every sample."""
    return timesteps.to(latents.device).expand(latents.shape[0]) if timesteps.dim() == 0 else timesteps


class DiffusionPolicy(nn.Module):
    """The shared base of the policy classes: a diffusers pipeline as a policy π_θ(x_{t-1} | x_t, c).

    Build one with ``DiffusionPolicy.from_pretrained(...)``, which picks the subclass that fits the
    pipeline, or construct a subclass directly.

    Args:
        pipeline: a loaded diffusers pipeline that ``accepts`` says this class wraps.
        config: sampling and training options (see PolicyConfig).
        device: where the policy runs.
    """

    kind: ClassVar[str]
    """The step family: "ddim" or "flow"."""
    needs: ClassVar[str] = ""
    """What a pipeline must have for this class, for error messages."""
    denoiser_name: ClassVar[str] = "unet"
    """The pipeline's name for the network: its attribute, its LoRA save argument and its folder."""
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    """The pipeline's frozen text encoders (absent ones are skipped)."""
    extra_conditioning_keys: ClassVar[tuple[str, ...]] = ()
    """TensorDict keys of the conditioning that states carry beyond ``prompt_embeds``."""
    sde_steps: range | None = None
    """Positions of the schedule whose steps are stochastic; the others take the deterministic step (η = 0).
    None: every step is stochastic. Set it with ``sde_window``."""

    def __init__(self, pipeline, config: PolicyConfig | None = None, *, device: str | torch.device = "cpu"):
        super().__init__()
        self.config = config or PolicyConfig()
        self._check_config(self.config)
        if not self.accepts(pipeline):
            raise ConfigError(self._cannot_wrap_message(pipeline))
        self.pipeline = pipeline
        self.vae = pipeline.vae
        self.add_module(self.denoiser_name, getattr(pipeline, self.denoiser_name))
        encoders = [getattr(pipeline, name, None) for name in self.text_encoder_names]
        self.text_encoders = nn.ModuleList([e for e in encoders if e is not None])

        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        sample_size = self.unet.config.sample_size
        self.height = self.config.height or sample_size * self.vae_scale_factor
        self.width = self.config.width or sample_size * self.vae_scale_factor
        check_image_size(self.config, size_multiple(self.vae.config, self.unet.config),
                         sample_size * self.vae_scale_factor)
        self.latent_shape = (self.unet.config.in_channels, self.height // self.vae_scale_factor,
                             self.width // self.vae_scale_factor)
        self._set_up_schedule(device)
        pipeline.scheduler = self.scheduler  # so that the pipeline, if called, samples our schedule

        frozen_dtype = _DTYPES[self.config.dtype]
        for frozen in (self.vae, *self.text_encoders):
            frozen.requires_grad_(False).eval().to(device)
            if frozen.dtype != frozen_dtype:
                frozen.to(dtype=frozen_dtype)
        self.unet.to(device=device)
        if self.config.vae_slicing and hasattr(self.vae, "enable_slicing"):
            self.vae.enable_slicing()
        self._reference_unet = self._make_trainable(frozen_dtype)
        if self.config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

        self._embed_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._in_reference = False
        self._training_denoiser: nn.Module | None = None
        # (rank, world): in a multi-process run each process keeps its slice of the global batch's noise
        self.process_slice: tuple[int, int] = (0, 1)

    # ------------------------------------------------------------------ choosing the class
    @classmethod
    def accepts(cls, pipeline) -> bool:
        """Whether this class wraps ``pipeline``. The base class wraps none: it is only shared code."""
        return False

    @classmethod
    def from_pretrained(cls, pretrained: str = "tiny", *, device: str | torch.device = "cpu", **options):
        """Load a pipeline (see ``load_pipeline``) and wrap it. ``options`` are PolicyConfig fields.

        The class is the most specific one, among ``cls`` and its subclasses, whose ``accepts(pipeline)``
        is true: ``DiffusionPolicy.from_pretrained`` returns an ``SDXLPolicy`` for an SDXL pipeline and a
        ``FlowMatchingPolicy`` for SD3. A subclass that does not declare its own ``accepts`` is picked
        only through its own ``from_pretrained``.
        """
        if pretrained == "tiny_flow" and "max_sequence_length" not in options:
            from rl4diffusion.zoo.tiny import FLOW_T5_LENGTH

            options["max_sequence_length"] = FLOW_T5_LENGTH  # it has no T5 and was trained with this many
        config = PolicyConfig(pretrained=pretrained, **options)
        check_pipeline_files(config)  # a wrong model or image size fails before seconds of loading
        pipe = load_pipeline(pretrained, dtype=_DTYPES[config.dtype])
        return cls._class_for(pipe)(pipe, config, device=device)

    @classmethod
    def _class_for(cls, pipeline) -> type[DiffusionPolicy]:
        fits = [c for c in _descendants(cls) if "accepts" in vars(c) and c.accepts(pipeline)]
        if cls.accepts(pipeline):
            fits.append(cls)
        most_specific = [c for c in fits if not any(o is not c and issubclass(o, c) for o in fits)]
        if len(most_specific) == 1:
            return most_specific[0]
        if not most_specific:
            wanted = "; ".join(f"{c.__name__} needs {c.needs}" for c in (cls, *_descendants(cls)) if c.needs)
            raise ConfigError(f"{cls.__name__}.from_pretrained found no policy class for a "
                              f"{type(pipeline).__name__}: {wanted or 'none is registered'}.")
        names = ", ".join(c.__name__ for c in most_specific)
        raise ConfigError(f"{names} all accept a {type(pipeline).__name__}; construct the one you want "
                          "directly, or make the others' accepts() stricter.")

    def _cannot_wrap_message(self, pipeline) -> str:
        name = type(self).__name__
        if not self.needs:  # the shared base class itself
            subclasses = ", ".join(c.__name__ for c in _descendants(type(self)) if c.needs)
            return (f"{name} is the shared base class: construct one of {subclasses}, or call "
                    f"{name}.from_pretrained, which picks the one that fits the pipeline.")
        return (f"{name} needs {self.needs}; got a {type(pipeline).__name__}. "
                "DiffusionPolicy.from_pretrained picks the policy class that fits a pipeline.")

    def _check_config(self, cfg: PolicyConfig) -> None:
        """Raise ConfigError for options no model can use (PolicyConfig's Literal choices and ``validate()``);
        subclasses add the checks of their model kind."""
        from rl4diffusion.schema import check

        check(cfg, "model")

    # ------------------------------------------------------------------ what subclasses provide
    def _set_up_schedule(self, device: str | torch.device) -> None:
        """Create ``self.scheduler`` for ``config.num_steps`` and register the ``timesteps`` buffer [N]."""
        raise NotImplementedError

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning of distinct prompts by key: ``prompt_embeds`` [B, L, D] and any extra key [B, ...]."""
        raise NotImplementedError

    def _denoise(self, network: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                 conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        """One call of ``network`` on latents [B, C, h, w], timesteps [B] and conditioning by key."""
        raise NotImplementedError

    def _step(self, model_output: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor,
              eta: float | None, action: dict) -> StepOutput:
        """The step at per-sample timesteps [B]; ``action``: prev_sample, noise, generator, reduction."""
        raise NotImplementedError

    def pred_x0(self, latents: torch.Tensor, timesteps: torch.Tensor,
                model_output: torch.Tensor) -> torch.Tensor:
        """The one-step clean-sample prediction x̂₀(x_t) from the model output."""
        raise NotImplementedError

    # ------------------------------------------------------------------ conditioning
    @property
    def device(self) -> torch.device:
        return self.timesteps.device

    @torch.no_grad()
    def _conditioning(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every conditioning tensor of ``prompts`` by key, [B, ...], computed once per distinct prompt."""
        missing = sorted({p for p in prompts if p not in self._embed_cache})
        if missing:
            encoded = self._encode_text(missing)
            for i, prompt in enumerate(missing):
                self._embed_cache[prompt] = {key: value[i] for key, value in encoded.items()}
        return {key: torch.stack([self._embed_cache[p][key] for p in prompts])
                for key in (keys.PROMPT_EMBEDS, *self.extra_conditioning_keys)}

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [B, L, D] for a list of prompts, computed once per distinct prompt."""
        return self._conditioning(prompts)[keys.PROMPT_EMBEDS]

    def extra_conditioning(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """What the environment stores in each state besides prompt_embeds, by key (empty for SD)."""
        conditioning = self._conditioning(prompts)
        return {key: conditioning[key] for key in self.extra_conditioning_keys}

    def _negative_conditioning(self) -> dict[str, torch.Tensor]:
        """The unconditional half of classifier-free guidance: the conditioning of ``config.negative_prompt``
        (the empty prompt by default), unbatched.

        Read straight from the cache: this runs at every guided network call, inside the denoising loop."""
        negative = self.config.negative_prompt
        if negative not in self._embed_cache:
            self._conditioning([negative])
        return self._embed_cache[negative]

    @property
    def negative_embeds(self) -> torch.Tensor:
        """The unconditional (negative prompt) embedding [L, D] used by classifier-free guidance."""
        return self._negative_conditioning()[keys.PROMPT_EMBEDS]

    # ------------------------------------------------------------------ the network and the reference
    def set_training_denoiser(self, module: nn.Module | None) -> None:
        """Call the trainable denoiser through ``module`` from now on (None: through ``self.unet`` again).

        ``module`` is what ``accelerator.prepare(policy.unet)`` returns: a DDP/FSDP wrapper whose
        forward must run for gradients to sync across processes. Every call of the trainable
        network goes through it, the reference under LoRA included (the adapter is switched off on
        the wrapped module). ``policy.unet`` stays the raw module, which peft and checkpoints use.
        """
        inner = module  # unwrap: DDP, FSDP and DeepSpeed hold it as .module, torch.compile as ._orig_mod
        while inner is not None and inner is not self.unet:
            inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
        if module is not None and inner is None:
            raise ValueError(f"set_training_denoiser expects a wrapper of policy.unet (what accelerator."
                             f"prepare(policy.unet) returns); this {type(module).__name__} does not wrap it")
        # a plain attribute, not a submodule: the wrapper's parameters are self.unet's, already registered
        object.__setattr__(self, "_training_denoiser", module)

    def _network(self) -> nn.Module:
        """The module a network call goes through now: the frozen copy inside ``reference()`` under full
        fine-tuning, otherwise the trainable denoiser, through its training wrapper when one is set."""
        if self._in_reference and self._reference_unet is not None:
            return self._reference_unet
        return self._training_denoiser if self._training_denoiser is not None else self.unet

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this block the policy is the frozen pretrained model: the LoRA adapter disabled (no
        second copy), or the frozen copy taken at construction under ``train_mode="full"``."""
        if self._in_reference:  # nested: already the reference
            yield
            return
        lora = self._reference_unet is None
        self._in_reference = True
        if lora:
            self.unet.disable_adapters()
        try:
            yield
        finally:
            if lora:
                self.unet.enable_adapters()
            self._in_reference = False

    def _guided_output(self, latents: torch.Tensor, timesteps: torch.Tensor,
                       conditioning: dict[str, torch.Tensor], *, guidance_scale: float | None = None,
                       use_reference: bool = False) -> torch.Tensor:
        """ε̂ = ε_u + w (ε_c − ε_u) for latents [B, C, h, w], timesteps [B] or [], conditioning by key."""
        if use_reference:
            with self.reference():
                return self._guided_output(latents, timesteps, conditioning, guidance_scale=guidance_scale)
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        network = self._network()
        dtype = next(self.unet.parameters()).dtype  # the frozen weights' dtype (the reference copy's too)
        timesteps = per_sample_timesteps(timesteps, latents)
        if w == 1.0:  # no guidance: one network call
            conditioning = {key: value.to(dtype) for key, value in conditioning.items()}
            return self._denoise(network, latents.to(dtype), timesteps, conditioning).float()
        negative = self._negative_conditioning()
        both = {key: torch.cat([negative[key].expand_as(value), value]).to(dtype)  # (2B, ...)
                for key, value in conditioning.items()}
        out = self._denoise(
            network,
            torch.cat([latents, latents]).to(dtype),  # (2B, C, h, w): unconditional half first, as diffusers
            torch.cat([timesteps, timesteps]),
            both,
        ).float()
        uncond, cond = out.chunk(2)
        return uncond + w * (cond - uncond)

    def predict_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        *,
        guidance_scale: float | None = None,
        use_reference: bool = False,
    ) -> torch.Tensor:
        """Guided model output ε̂ = ε_u + w (ε_c − ε_u) for latents [B, C, h, w] at per-sample timesteps [B].

        ``use_reference=True`` gives the frozen pretrained model's output (see ``reference``), with
        gradients to the inputs if they require them.
        """
        return self._guided_output(latents, timesteps, {keys.PROMPT_EMBEDS: prompt_embeds},
                                   guidance_scale=guidance_scale, use_reference=use_reference)

    def predict_from_td(self, td, *, use_reference: bool = False,
                        guidance_scale: float | None = None) -> torch.Tensor:
        """The guided model output for a TensorDict of states (reads the conditioning keys the model uses)."""
        conditioning = {key: td[key] for key in (keys.PROMPT_EMBEDS, *self.extra_conditioning_keys)}
        return self._guided_output(td[keys.LATENTS], td[keys.TIMESTEP], conditioning,
                                   guidance_scale=guidance_scale, use_reference=use_reference)

    @torch.no_grad()
    def reference_output(self, td, *, guidance_scale: float | None = None) -> torch.Tensor:
        """The frozen pretrained model's guided output for a TensorDict of states, without grad.

        The KL-regularised and preference methods compare the policy with it (DPOK, Fan et al. 2023;
        Diffusion-DPO, Wallace et al. 2023).
        """
        return self.predict_from_td(td, use_reference=True, guidance_scale=guidance_scale)

    # ------------------------------------------------------------------ the step
    def step(
        self,
        model_output: torch.Tensor,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        eta: float | None = None,
    ) -> StepOutput:
        """One stochastic step from x_t (latents) and the model output, with its log-probability.

        Args:
            prev_sample: the action whose log-probability to compute (training); otherwise the
                action is sampled with ``noise`` or ``generator``.
            eta: the step's noise scale instead of the config's (DDIM's η; a flow model's noise level).
        """
        action = dict(prev_sample=prev_sample, noise=noise, generator=generator,
                      reduction=self.config.log_prob_reduction)
        return self._step(model_output, latents, per_sample_timesteps(timesteps, latents), eta, action)

    def sde_time_step(self, timesteps: torch.Tensor) -> torch.Tensor:
        """|Δt| [B] of the step at per-sample ``timesteps`` in the time of the SDE the step discretises, whose
        Gaussian std is s_t·√|Δt|. A DDIM step's σ_t(η) already is its Gaussian std (DDPO), so 1 here."""
        return torch.ones(timesteps.reshape(-1).shape, device=self.device)

    def schedule_position(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Position [B] in the sampling schedule (0 = the first, noisiest step) of per-sample ``timesteps``."""
        t = timesteps.to(self.timesteps.device).float().reshape(-1)
        return (self.timesteps.float()[None, :] - t[:, None]).abs().argmin(dim=1)

    @contextlib.contextmanager
    def sde_window(self, positions: range | None) -> Iterator[None]:
        """Within this block only the steps at ``positions`` of the schedule are stochastic (with their
        log-probabilities); the others are the deterministic DDIM / ODE step, whose log-probability is 0.

        Flow-GRPO-Fast and MixGRPO (Li et al. 2025, arXiv 2507.21802) sample so and train only the
        window. The noise is drawn for every step either way, so a full window samples exactly what the
        plain sampler does and an empty one exactly what ``eta=0`` does, for the same generator.
        """
        saved, self.sde_steps = self.sde_steps, positions
        try:
            yield
        finally:
            self.sde_steps = saved

    def _noise_scale_at(self, position: int, eta: float | None) -> float | None:
        """The step's noise scale at ``position`` of the schedule: ``eta`` inside the SDE window, 0 outside."""
        return eta if self.sde_steps is None or position in self.sde_steps else 0.0

    def log_prob(self, td, *, use_reference: bool = False, guidance_scale: float | None = None) -> StepOutput:
        """Recompute the step for a batch of stored transitions (with grad), scoring td["action"]."""
        out = self.predict_from_td(td, use_reference=use_reference, guidance_scale=guidance_scale)
        return self.step(out, td[keys.LATENTS], td[keys.TIMESTEP], prev_sample=td[keys.ACTION])

    def draw_noise(self, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """N(0, I) noise of ``shape`` [B, ...] for rollouts.

        In a run of ``world`` processes this draws the global batch [world·B, ...] and keeps this
        process's rows, so a multi-process run samples exactly what one process would.
        """
        rank, world = self.process_slice
        full = torch.randn((shape[0] * world, *shape[1:]), generator=generator, device=self.device)
        return full[rank * shape[0] : (rank + 1) * shape[0]]

    @torch.no_grad()
    def act(self, td, generator: torch.Generator | None = None):
        """The rollout policy: read x_t, t and c from ``td``; write the action x_{t-1} and its log-prob."""
        latents, out = td[keys.LATENTS], self.predict_from_td(td)
        eta = None
        if self.sde_steps is not None:  # a rollout's chains are all at the same step: the first one's position
            eta = self._noise_scale_at(int(self.schedule_position(td[keys.TIMESTEP])[0]), None)
        step = self.step(out, latents, td[keys.TIMESTEP], noise=self.draw_noise(latents.shape, generator), eta=eta)
        td.set(keys.ACTION, step.prev_sample)
        td.set(keys.SAMPLE_LOG_PROB, step.log_prob)
        return td

    # ------------------------------------------------------------------ images
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] → images [B, 3, H, W] in [0, 1] (differentiable); SD3's VAE has a shift."""
        cfg = self.vae.config
        shift = cfg.get("shift_factor") or 0.0
        images = self.vae.decode((latents / cfg.scaling_factor + shift).to(self.vae.dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] → clean latents x₀ (the posterior mean, shifted and scaled)."""
        cfg = self.vae.config
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return (dist.mean.float() - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor

    def initial_latents(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T ~ N(0, I) [B, C, h, w], drawn exactly as diffusers' pipelines draw it on this device."""
        noise = torch.randn((batch_size, *self.latent_shape), generator=generator, device=self.device)
        return noise * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        use_reference: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run the whole chain without grad; returns {"latents": x₀ [B,C,h,w], "images": [B,3,H,W]}.

        ``eta`` overrides the step's noise scale (0 gives the deterministic DDIM / ODE sampler);
        ``use_reference=True`` samples the frozen pretrained model. Inside ``sde_window`` only the window's
        steps are stochastic.
        """
        conditioning = self._conditioning(prompts)
        x = self.initial_latents(len(prompts), generator) if latents is None else latents.to(self.device)
        for position, t in enumerate(self.timesteps):
            out = self._guided_output(x, t, conditioning, guidance_scale=guidance_scale,
                                      use_reference=use_reference)
            x = self.step(out, x, t, generator=generator, eta=self._noise_scale_at(position, eta)).prev_sample
        return {"latents": x, "images": self.decode(x)}

    @contextlib.contextmanager
    def sampling_settings(self, *, num_steps: int | None = None,
                          guidance_scale: float | None = None) -> Iterator[None]:
        """Within this block the policy samples with ``num_steps`` denoising steps and guidance weight
        ``guidance_scale`` (None: keep the config's), then returns to its own settings.

        Evaluation uses it to sample with other settings than training (``eval.num_steps``,
        ``eval.guidance_scale``); a new step count rebuilds the schedule for the block's duration. Stored
        transitions are scored with the schedule they were sampled with, so do not train inside it.
        """
        changes = {key: value for key, value in (("num_steps", num_steps), ("guidance_scale", guidance_scale))
                   if value is not None and value != getattr(self.config, key)}
        if not changes:
            yield
            return
        saved = self.config
        self.config = replace(saved, **changes)
        try:
            if "num_steps" in changes:
                self._set_up_schedule(self.device)
            yield
        finally:
            self.config = saved
            if "num_steps" in changes:
                self._set_up_schedule(self.device)

    # ------------------------------------------------------------------ parameters and checkpoints
    def _make_trainable(self, frozen_dtype: torch.dtype) -> nn.Module | None:
        """Add the LoRA adapter (returns None: the reference is the adapter disabled) or unfreeze the
        whole network (returns a frozen copy taken before any update: the reference)."""
        cfg = self.config
        if cfg.train_mode == "full":
            self.unet.requires_grad_(True).float()
            return copy.deepcopy(self.unet).requires_grad_(False).eval()
        from peft import LoraConfig

        self.unet.requires_grad_(False)
        if self.unet.dtype != frozen_dtype:
            self.unet.to(dtype=frozen_dtype)
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
            init_lora_weights="gaussian",
            target_modules=list(cfg.lora_targets),
        )
        try:
            self.unet.add_adapter(lora)
        except ValueError as e:
            raise ConfigError(f"model.lora_targets={list(cfg.lora_targets)} do not match the "
                              f"{type(self.unet).__name__}: {e}") from None
        for p in self.unet.parameters():  # LoRA weights train in float32 even when the base is half
            if p.requires_grad:
                p.data = p.data.float()
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in diffusers' naming (what ``pipe.load_lora_weights`` reads)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))

    def save_pretrained_lora(self, directory: str | Path) -> None:
        """Save LoRA weights in diffusers format: ``pipe.load_lora_weights(directory)`` loads them.

        Under ``train_mode="full"`` the whole network goes to ``directory/unet`` (``transformer`` for SD3).
        """
        if self.config.train_mode != "lora":
            self.unet.save_pretrained(Path(directory) / self.denoiser_name)
            return
        layers = {f"{self.denoiser_name}_lora_layers": self.lora_state_dict()}  # e.g. unet_lora_layers
        type(self.pipeline).save_lora_weights(str(directory), **layers, safe_serialization=True)


def _descendants(cls: type) -> list[type]:
    """Every subclass of ``cls``, recursively, each once."""
    found: dict[type, None] = {}
    for sub in cls.__subclasses__():
        found[sub] = None
        found.update(dict.fromkeys(_descendants(sub)))
    return list(found)
