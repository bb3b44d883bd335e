"""DiffusionPolicy: a diffusers pipeline seen as a stochastic policy over denoising steps.

The policy owns what every algorithm needs from the model and nothing else:

* prompt encoding, cached (the text encoder is frozen, so an embedding never changes);
* the noise prediction with classifier-free guidance, ε̂ = ε_u + w (ε_c − ε_u);
* one stochastic DDIM step **with its Gaussian log-probability** (``rl4diffusion.policies.steps``);
* the one-step clean-sample prediction x̂₀(x_t) and decoding latents to images in [0, 1];
* the trainable parameters (LoRA through peft by default, or the full network) and the
  reference model — the same network with the adapter disabled, so no second copy.

Example::

    policy = DiffusionPolicy.from_pretrained("tiny")
    out = policy.sample(["a red circle"], generator=torch.Generator().manual_seed(0))
    out["images"].shape  # torch.Size([1, 3, 32, 32])

The denoising loop is written out here on purpose (diffusers' pipeline ``__call__`` runs
under ``no_grad`` and hides the log-probability). Sources: DDPO (Black et al. 2023,
kvablack/ddpo-pytorch ``ddim_with_logprob.py``) for the step, DDIM (Song et al. 2021).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rl4diffusion import keys
from rl4diffusion.errors import ConfigError, MissingWeightsError
from rl4diffusion.policies.steps import StepOutput, ddim_alphas, ddim_step_with_log_prob

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PolicyConfig:
    """How to load and sample the model (the Hydra ``model`` group mirrors this)."""

    pretrained: str = "tiny"
    """'tiny' (the embedded model), a local diffusers pipeline directory, or a hub id found in the local cache."""
    num_steps: int = 20
    """Denoising steps N of the sampling chain (the MDP's horizon)."""
    guidance_scale: float = 2.0
    """Classifier-free guidance weight w (1 = no guidance, one network call per step)."""
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
    """Flow-matching models only: the SDE's noise level a in s_t = a·sqrt(σ/(1−σ)) (Flow-GRPO: 0.7; 0 = the ODE)."""
    max_sequence_length: int = 256
    """Flow-matching (SD3) models only: T5 prompt tokens (SD3's default 256)."""
    name: str = field(default="", repr=False)
    """Display name of the model config (filled by Hydra)."""


def resolve_pretrained(pretrained: str) -> str:
    """Map a model name to a local path: 'tiny' → the shipped embedded model."""
    if pretrained == "tiny":
        from rl4diffusion.zoo.tiny import TINY_PATH

        return str(TINY_PATH)
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
        "and copy the cache here, or save the pipeline with save_pretrained and pass model.pretrained=/that/dir "
        "(or model=path:/that/dir). To run offline now, use the embedded model: model=tiny."
    )


def load_pipeline(pretrained: str, *, dtype: torch.dtype = torch.float32):
    """Load a diffusers pipeline from a local directory or the local hub cache, never the network.

    Raises MissingWeightsError with what to download and the embedded alternative when absent.
    """
    from diffusers import DiffusionPipeline

    path = resolve_pretrained(pretrained)
    is_local = os.path.isdir(path)
    if not is_local and (path.startswith(("/", ".", "~")) or os.sep in path.strip("/").split("/", 1)[-1]):
        raise ConfigError(
            f"model path {path!r} does not exist. Point model.pretrained (or model=path:/dir) at a diffusers "
            "pipeline directory (one with model_index.json), or use the embedded model with model=tiny."
        )
    if is_local and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ConfigError(
            f"{path!r} is not a diffusers pipeline directory (no model_index.json). Save one with "
            "pipe.save_pretrained(dir), or use the embedded model with model=tiny."
        )
    absent = {}  # components saved as absent (e.g. SD3 without T5) must be passed as None explicitly
    if is_local:
        import json

        index = json.loads(Path(path, "model_index.json").read_text())
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


class DiffusionPolicy(nn.Module):
    """A diffusers Stable-Diffusion-style pipeline as a policy π_θ(x_{t-1} | x_t, c).

    Args:
        pipeline: a loaded pipeline with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``.
        config: sampling and training options (see PolicyConfig).
    """

    def __init__(self, pipeline, config: PolicyConfig | None = None, *, device: str | torch.device = "cpu"):
        super().__init__()
        from diffusers import DDIMScheduler

        self.config = config or PolicyConfig()
        cfg = self.config
        if cfg.num_steps < 1:
            raise ConfigError(f"model.num_steps must be ≥ 1, got {cfg.num_steps}")
        if cfg.eta < 0:
            raise ConfigError(f"model.eta must be ≥ 0, got {cfg.eta}")
        if cfg.log_prob_reduction not in ("mean", "sum"):
            raise ConfigError(f"model.log_prob_reduction must be 'mean' or 'sum', got {cfg.log_prob_reduction!r}")
        if getattr(pipeline, "unet", None) is None:
            raise ConfigError(
                f"{type(pipeline).__name__} has no UNet; DiffusionPolicy needs a Stable-Diffusion-style pipeline "
                "(unet, vae, text_encoder, tokenizer, scheduler)."
            )
        self.pipeline = pipeline
        self.kind = "ddim"
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        # The stochastic step is DDIM's whatever scheduler the model shipped with (as DDPO does).
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.scheduler.set_timesteps(cfg.num_steps)
        pipeline.scheduler = self.scheduler

        frozen_dtype = _DTYPES[cfg.dtype]
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False).eval().to(device)
            if frozen.dtype != frozen_dtype:
                frozen.to(dtype=frozen_dtype)
        self.unet.to(device=device)
        if cfg.vae_slicing and hasattr(self.vae, "enable_slicing"):
            self.vae.enable_slicing()
        self._reference_unet: nn.Module | None = None
        if cfg.train_mode == "lora":
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
                raise ConfigError(f"model.lora_targets={list(cfg.lora_targets)} do not match the UNet: {e}") from None
            for p in self.unet.parameters():  # LoRA weights train in float32 even when the base is half
                if p.requires_grad:
                    p.data = p.data.float()
        elif cfg.train_mode == "full":
            self.unet.requires_grad_(True).float()
            # the reference is the pretrained network: a frozen copy taken before any update
            self._reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        else:
            raise ConfigError(f"model.train_mode must be 'lora' or 'full', got {cfg.train_mode!r}")
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        sample_size = self.unet.config.sample_size
        self.height = cfg.height or sample_size * self.vae_scale_factor
        self.width = cfg.width or sample_size * self.vae_scale_factor
        self.latent_shape = (self.unet.config.in_channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)
        self.register_buffer("timesteps", self.scheduler.timesteps.clone().to(device), persistent=False)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float().to(device), persistent=False)
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)
        self.step_size = self.scheduler.config.num_train_timesteps // cfg.num_steps
        self._embed_cache: dict[str, torch.Tensor] = {}
        # (rank, world): in a multi-process run each process keeps its slice of the global batch's noise
        self.process_slice: tuple[int, int] = (0, 1)

    @classmethod
    def from_pretrained(cls, pretrained: str = "tiny", *, device: str | torch.device = "cpu", **options):
        """Load a pipeline (see ``load_pipeline``) and wrap it. ``options`` are PolicyConfig fields."""
        config = PolicyConfig(pretrained=pretrained, **options)
        pipe = load_pipeline(pretrained, dtype=_DTYPES[config.dtype])
        from diffusers import FlowMatchEulerDiscreteScheduler

        if cls is DiffusionPolicy and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            from rl4diffusion.policies.flow import FlowMatchingPolicy  # a flow-matching model (SD3)

            return FlowMatchingPolicy(pipe, config, device=device)
        if cls is DiffusionPolicy and getattr(pipe, "text_encoder_2", None) is not None and hasattr(pipe, "unet"):
            from rl4diffusion.policies.sdxl import SDXLPolicy  # two text encoders + size conditioning

            return SDXLPolicy(pipe, config, device=device)
        return cls(pipe, config, device=device)

    # ------------------------------------------------------------------ conditioning
    @property
    def device(self) -> torch.device:
        return self.timesteps.device

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [B, L, D] for a list of prompts, computed once per distinct prompt."""
        missing = sorted({p for p in prompts if p not in self._embed_cache})
        if missing:
            embeds, _ = self.pipeline.encode_prompt(missing, self.device, 1, False)
            for p, e in zip(missing, embeds):
                self._embed_cache[p] = e
        return torch.stack([self._embed_cache[p] for p in prompts])

    @property
    def negative_embeds(self) -> torch.Tensor:
        """The unconditional (empty prompt) embedding [L, D] used by classifier-free guidance."""
        return self.encode_prompts([""])[0]

    # ------------------------------------------------------------------ the network
    def _denoiser(self, use_reference: bool) -> nn.Module:
        if use_reference and self._reference_unet is not None:
            return self._reference_unet
        return self.unet

    def predict_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        *,
        guidance_scale: float | None = None,
        use_reference: bool = False,
    ) -> torch.Tensor:
        """Guided model output ε̂ = ε_u + w (ε_c − ε_u) for latents [B, C, h, w] at per-sample timesteps [B]."""
        if use_reference and self._reference_unet is None:  # LoRA: the reference is the adapter switched off
            with self.reference():
                return self.predict_noise(latents, timesteps, prompt_embeds, guidance_scale=guidance_scale)
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        unet = self._denoiser(use_reference)
        dtype = next(unet.parameters()).dtype
        timesteps = timesteps.to(latents.device).expand(latents.shape[0]) if timesteps.dim() == 0 else timesteps
        if w == 1.0:  # no guidance: one network call
            return self._denoise(unet, latents.to(dtype), timesteps, prompt_embeds.to(dtype)).float()
        negative = self.negative_embeds.expand_as(prompt_embeds)
        out = self._denoise(
            unet,
            torch.cat([latents, latents]).to(dtype),  # (2B, C, h, w): unconditional half first, as diffusers does
            torch.cat([timesteps, timesteps]),
            torch.cat([negative, prompt_embeds]).to(dtype),
        ).float()
        uncond, cond = out.chunk(2)
        return uncond + w * (cond - uncond)

    def _denoise(self, unet: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor):
        """One network call (subclasses add model-specific conditioning, e.g. SDXL's)."""
        return unet(latents, timesteps, encoder_hidden_states=embeds).sample

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this block the policy is the frozen pretrained model (the LoRA adapter disabled)."""
        if self.config.train_mode == "full":
            raise RuntimeError("with train_mode='full' use predict_noise(..., use_reference=True) for the reference")
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    # ------------------------------------------------------------------ the step
    def alphas(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ_t, ᾱ_t') for per-sample timesteps [B]."""
        return ddim_alphas(self.alphas_cumprod, self.final_alpha_cumprod, timesteps, self.step_size)

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
        """One stochastic DDIM step from x_t (latents) and the model output; see ``steps.py``."""
        alpha_t, alpha_prev = self.alphas(timesteps.expand(latents.shape[0]) if timesteps.dim() == 0 else timesteps)
        sc = self.scheduler.config
        return ddim_step_with_log_prob(
            model_output,
            latents,
            alpha_t,
            alpha_prev,
            eta=self.config.eta if eta is None else eta,
            prediction_type=sc.prediction_type,
            clip_sample_range=sc.clip_sample_range if sc.clip_sample else None,
            prev_sample=prev_sample,
            noise=noise,
            generator=generator,
            reduction=self.config.log_prob_reduction,
        )

    def predict_from_td(self, td, *, use_reference: bool = False, guidance_scale: float | None = None) -> torch.Tensor:
        """The guided model output for a TensorDict of states (reads the conditioning keys the model needs)."""
        return self.predict_noise(td[keys.LATENTS], td[keys.TIMESTEP], td[keys.PROMPT_EMBEDS],
                                  guidance_scale=guidance_scale, use_reference=use_reference)

    def log_prob(self, td, *, use_reference: bool = False, guidance_scale: float | None = None) -> StepOutput:
        """Recompute the step for a batch of stored transitions (with grad), scoring td["action"]."""
        out = self.predict_from_td(td, use_reference=use_reference, guidance_scale=guidance_scale)
        return self.step(out, td[keys.LATENTS], td[keys.TIMESTEP], prev_sample=td[keys.ACTION])

    def pred_x0(self, latents: torch.Tensor, timesteps: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x̂₀(x_t) = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t) (or its v/x₀-prediction equivalent)."""
        from rl4diffusion.policies.steps import model_output_to_x0_eps

        alpha_t, _ = self.alphas(timesteps.expand(latents.shape[0]) if timesteps.dim() == 0 else timesteps)
        return model_output_to_x0_eps(model_output, latents, alpha_t, self.scheduler.config.prediction_type)[0]

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
        latents = td[keys.LATENTS]
        step = self.step(self.predict_from_td(td), latents, td[keys.TIMESTEP], noise=self.draw_noise(latents.shape, generator))
        td.set(keys.ACTION, step.prev_sample)
        td.set(keys.SAMPLE_LOG_PROB, step.log_prob)
        return td

    # ------------------------------------------------------------------ images
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] → images [B, 3, H, W] in [0, 1] (differentiable)."""
        scale = self.vae.config.scaling_factor
        images = self.vae.decode((latents / scale).to(self.vae.dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] → clean latents x₀ (the posterior mean, scaled)."""
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return dist.mean.float() * self.vae.config.scaling_factor

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
        """Run the whole chain without grad; returns {"latents": x₀ [B,C,h,w], "images": [B,3,H,W]}."""
        embeds = self.encode_prompts(prompts)
        x = self.initial_latents(len(prompts), generator) if latents is None else latents.to(self.device)
        for t in self.timesteps:
            out = self.predict_noise(x, t, embeds, guidance_scale=guidance_scale, use_reference=use_reference)
            x = self.step(out, x, t, generator=generator, eta=eta).prev_sample
        return {"latents": x, "images": self.decode(x)}

    # ------------------------------------------------------------------ parameters and checkpoints
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in diffusers' naming (what ``pipe.load_lora_weights`` reads)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))

    def save_pretrained_lora(self, directory: str | Path) -> None:
        """Save LoRA weights in diffusers format: ``pipe.load_lora_weights(directory)`` loads them."""
        if self.config.train_mode != "lora":
            self.unet.save_pretrained(Path(directory) / "unet")
            return
        type(self.pipeline).save_lora_weights(str(directory), unet_lora_layers=self.lora_state_dict(), safe_serialization=True)
