"""FlowMatchingPolicy: a flow-matching pipeline (SD3) as a stochastic policy over denoising steps.

Same interface as ``DiffusionPolicy`` (the algorithms and the environment cannot tell them
apart), with the flow-matching pieces in place of DDIM's:

* the denoiser is an ``SD3Transformer2DModel`` predicting the velocity v = ε − x₀ (what
  ``predict_noise`` returns here), conditioned on the prompt's token embeddings and on its
  pooled embeddings — stored under ``keys.POOLED_PROMPT_EMBEDS`` in states and transitions;
* the schedule is ``FlowMatchEulerDiscreteScheduler``'s: timesteps t = 1000·σ (float),
  σ from 1 (noise) to 0 (data);
* the step is Flow-GRPO's SDE with the ODE's marginals and its Gaussian log-probability
  (``rl4diffusion.policies.steps.flow_sde_step_with_log_prob``), noise level a = ``model.noise_level``.

``DiffusionPolicy.from_pretrained`` returns this class whenever the pipeline's scheduler is a
FlowMatchEulerDiscreteScheduler, so ``model.pretrained=stabilityai/stable-diffusion-3-medium-diffusers``
(or ``model=sd3``) is all a user changes.

Example::

    from rl4diffusion.testing import make_random_sd3_pipeline
    policy = FlowMatchingPolicy(make_random_sd3_pipeline(), PolicyConfig(num_steps=4, max_sequence_length=8))
    policy.sample(["a red circle"], generator=torch.Generator().manual_seed(0))["images"].shape  # (1, 3, 32, 32)

Sources: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470), Sec. 4.2 "ODE-to-SDE"; rectified flow /
SD3 (Esser et al. 2024); diffusers' StableDiffusion3Pipeline for the conditioning and CFG layout.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rl4diffusion import keys
from rl4diffusion.errors import ConfigError
from rl4diffusion.policies.base import _DTYPES, DiffusionPolicy, PolicyConfig
from rl4diffusion.policies.steps import StepOutput, flow_sde_step_with_log_prob


class FlowMatchingPolicy(DiffusionPolicy):
    """A diffusers StableDiffusion3Pipeline (transformer, VAE, CLIP ×2 [+ T5], flow-matching scheduler) as π_θ.

    Args:
        pipeline: a loaded pipeline with ``transformer``, ``vae``, ``text_encoder(_2, _3)``, ``scheduler``.
        config: sampling and training options (PolicyConfig; ``noise_level`` and ``max_sequence_length``
            are the flow-specific ones, ``eta`` is not used).
    """

    kind = "flow"
    extra_conditioning_keys = (keys.POOLED_PROMPT_EMBEDS,)

    def __init__(self, pipeline, config: PolicyConfig | None = None, *, device: str | torch.device = "cpu"):
        nn.Module.__init__(self)  # DiffusionPolicy's constructor is the UNet/DDIM one
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.config = config or PolicyConfig()
        cfg = self.config
        if cfg.num_steps < 2:
            raise ConfigError(f"model.num_steps must be ≥ 2 for a flow-matching model, got {cfg.num_steps}")
        if cfg.noise_level < 0:
            raise ConfigError(f"model.noise_level must be ≥ 0, got {cfg.noise_level}")
        if cfg.log_prob_reduction not in ("mean", "sum"):
            raise ConfigError(f"model.log_prob_reduction must be 'mean' or 'sum', got {cfg.log_prob_reduction!r}")
        if getattr(pipeline, "transformer", None) is None or not isinstance(
            getattr(pipeline, "scheduler", None), FlowMatchEulerDiscreteScheduler
        ):
            raise ConfigError(
                f"{type(pipeline).__name__} is not an SD3-style flow-matching pipeline (it needs a transformer and a "
                "FlowMatchEulerDiscreteScheduler); load Stable-Diffusion-style models with DiffusionPolicy."
            )
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.text_encoders = nn.ModuleList(
            [e for e in (pipeline.text_encoder, pipeline.text_encoder_2, getattr(pipeline, "text_encoder_3", None)) if e is not None]
        )
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        sample_size = self.transformer.config.sample_size
        self.height = cfg.height or sample_size * self.vae_scale_factor
        self.width = cfg.width or sample_size * self.vae_scale_factor
        self.latent_shape = (self.transformer.config.in_channels, self.height // self.vae_scale_factor,
                             self.width // self.vae_scale_factor)
        mu = None
        if self.scheduler.config.use_dynamic_shifting:  # resolution-dependent shift, as the SD3 pipeline computes it
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = self.transformer.config.patch_size
            sc = self.scheduler.config
            mu = calculate_shift((self.latent_shape[1] // patch) * (self.latent_shape[2] // patch),
                                 sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)
        self.scheduler.set_timesteps(cfg.num_steps, mu=mu)
        self.scheduler.init_noise_sigma = 1.0  # x_1 ~ N(0, I): read by code written for DDPM-style schedulers
        pipeline.scheduler = self.scheduler

        frozen_dtype = _DTYPES[cfg.dtype]
        for frozen in (self.vae, *self.text_encoders):
            frozen.requires_grad_(False).eval().to(device)
            if frozen.dtype != frozen_dtype:
                frozen.to(dtype=frozen_dtype)
        self.transformer.to(device=device)
        if cfg.vae_slicing and hasattr(self.vae, "enable_slicing"):
            self.vae.enable_slicing()
        self._reference_unet = _make_trainable(self.transformer, cfg, frozen_dtype)
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

        self.register_buffer("timesteps", self.scheduler.timesteps.clone().float().to(device), persistent=False)
        self.register_buffer("sigmas", self.scheduler.sigmas.clone().float().to(device), persistent=False)  # [N + 1]
        below_one = self.sigmas[(self.sigmas < 1) & (self.sigmas > 0)]
        # s_t = a·sqrt(σ/(1−σ)) is infinite at σ = 1: cap σ there at the schedule's largest σ < 1 (Flow-GRPO's choice)
        self.sigma_cap = float(below_one.max()) if len(below_one) else None
        self._embed_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.process_slice: tuple[int, int] = (0, 1)

    @property
    def unet(self) -> nn.Module:
        """The denoiser (a transformer here); named like DiffusionPolicy's so checkpoints and adapters work alike."""
        return self.transformer

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def _encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({p for p in prompts if p not in self._embed_cache})
        if missing:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                missing, None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                max_sequence_length=self.config.max_sequence_length,
            )
            for p, e, q in zip(missing, embeds, pooled):
                self._embed_cache[p] = (e, q)
        return (torch.stack([self._embed_cache[p][0] for p in prompts]),
                torch.stack([self._embed_cache[p][1] for p in prompts]))

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token embeddings [B, L, D] (CLIP ×2 padded, then T5), computed once per distinct prompt."""
        return self._encode(prompts)[0]

    def encode_pooled_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Pooled embeddings [B, P] (the two CLIP encoders' projections, concatenated)."""
        return self._encode(prompts)[1]

    def extra_conditioning(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """What the environment stores in each state besides prompt_embeds: the pooled embeddings."""
        return {keys.POOLED_PROMPT_EMBEDS: self.encode_pooled_prompts(prompts)}

    @property
    def negative_pooled_embeds(self) -> torch.Tensor:
        """The empty prompt's pooled embedding [P] (classifier-free guidance)."""
        return self.encode_pooled_prompts([""])[0]

    # ------------------------------------------------------------------ the network
    def predict_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        *,
        pooled_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        use_reference: bool = False,
    ) -> torch.Tensor:
        """Guided velocity v̂ = v_u + w (v_c − v_u) for latents [B, C, h, w] at per-sample timesteps [B] (t = 1000σ)."""
        if pooled_prompt_embeds is None:
            raise ValueError(
                "a flow-matching (SD3) policy needs pooled_prompt_embeds as well as prompt_embeds: pass "
                "policy.encode_pooled_prompts(prompts), or use policy.predict_from_td(td) on states from the environment"
            )
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        net = self._denoiser(use_reference)
        dtype = next(net.parameters()).dtype
        timesteps = timesteps.to(latents.device).expand(latents.shape[0]) if timesteps.dim() == 0 else timesteps
        timesteps = timesteps.float()  # as the SD3 pipeline passes them (bf16 would round 1000σ)
        if w == 1.0:
            return net(hidden_states=latents.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
                       pooled_projections=pooled_prompt_embeds.to(dtype), timestep=timesteps).sample.float()
        negative = self.negative_embeds.expand_as(prompt_embeds)
        negative_pooled = self.negative_pooled_embeds.expand_as(pooled_prompt_embeds)
        out = net(
            hidden_states=torch.cat([latents, latents]).to(dtype),  # (2B, C, h, w): unconditional half first
            encoder_hidden_states=torch.cat([negative, prompt_embeds]).to(dtype),
            pooled_projections=torch.cat([negative_pooled, pooled_prompt_embeds]).to(dtype),
            timestep=torch.cat([timesteps, timesteps]),
        ).sample.float()
        uncond, cond = out.chunk(2)
        return uncond + w * (cond - uncond)

    def predict_from_td(self, td, *, use_reference: bool = False, guidance_scale: float | None = None) -> torch.Tensor:
        return self.predict_noise(td[keys.LATENTS], td[keys.TIMESTEP], td[keys.PROMPT_EMBEDS],
                                  pooled_prompt_embeds=td[keys.POOLED_PROMPT_EMBEDS],
                                  guidance_scale=guidance_scale, use_reference=use_reference)

    # ------------------------------------------------------------------ the step
    def sigmas_of(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, σ_next) for per-sample timesteps [B] of the sampling schedule."""
        t = timesteps.to(self.timesteps.device).float().reshape(-1)
        index = (self.timesteps[None, :] - t[:, None]).abs().argmin(dim=1)  # (B,): position in the schedule
        return self.sigmas[index], self.sigmas[index + 1]

    def alphas(self, timesteps: torch.Tensor):
        raise NotImplementedError("a flow-matching policy has no ᾱ_t; use policy.sigmas_of(timesteps)")

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
        """One SDE step σ → σ_next; ``eta`` overrides the noise level (0 = the deterministic Euler/ODE step)."""
        timesteps = timesteps.expand(latents.shape[0]) if timesteps.dim() == 0 else timesteps
        sigma, sigma_next = self.sigmas_of(timesteps)
        return flow_sde_step_with_log_prob(
            model_output, latents, sigma, sigma_next,
            noise_level=self.config.noise_level if eta is None else eta, sigma_cap=self.sigma_cap,
            prev_sample=prev_sample, noise=noise, generator=generator, reduction=self.config.log_prob_reduction,
        )

    def pred_x0(self, latents: torch.Tensor, timesteps: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x̂₀ = x_σ − σ v̂ (rectified flow)."""
        sigma, _ = self.sigmas_of(timesteps.expand(latents.shape[0]) if timesteps.dim() == 0 else timesteps)
        return latents - sigma.view(-1, *([1] * (latents.dim() - 1))) * model_output

    # ------------------------------------------------------------------ images
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] → images [B, 3, H, W] in [0, 1] (differentiable); SD3's VAE has a shift factor."""
        cfg = self.vae.config
        shift = cfg.shift_factor or 0.0
        images = self.vae.decode((latents / cfg.scaling_factor + shift).to(self.vae.dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return (dist.mean.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def initial_latents(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x at σ = 1: N(0, I) [B, C, h, w], drawn as the SD3 pipeline draws it."""
        return torch.randn((batch_size, *self.latent_shape), generator=generator, device=self.device)

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
        """Run the chain without grad (the SDE at ``model.noise_level``; ``eta=0.0`` gives the ODE sampler)."""
        embeds, pooled = self._encode(prompts)
        x = self.initial_latents(len(prompts), generator) if latents is None else latents.to(self.device)
        for t in self.timesteps:
            out = self.predict_noise(x, t, embeds, pooled_prompt_embeds=pooled, guidance_scale=guidance_scale,
                                     use_reference=use_reference)
            x = self.step(out, x, t, generator=generator, eta=eta).prev_sample
        return {"latents": x, "images": self.decode(x)}

    # ------------------------------------------------------------------ parameters and checkpoints
    def save_pretrained_lora(self, directory: str | Path) -> None:
        """Save LoRA weights in diffusers format: ``StableDiffusion3Pipeline.load_lora_weights(directory)`` reads them."""
        if self.config.train_mode != "lora":
            self.transformer.save_pretrained(Path(directory) / "transformer")
            return
        type(self.pipeline).save_lora_weights(str(directory), transformer_lora_layers=self.lora_state_dict(),
                                              safe_serialization=True)


def _make_trainable(network: nn.Module, cfg: PolicyConfig, frozen_dtype: torch.dtype) -> nn.Module | None:
    """Add the LoRA adapter (returns None: the reference is the adapter disabled) or unfreeze everything
    (returns a frozen copy taken before any update: the reference)."""
    if cfg.train_mode == "lora":
        from peft import LoraConfig

        network.requires_grad_(False)
        if network.dtype != frozen_dtype:
            network.to(dtype=frozen_dtype)
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
            init_lora_weights="gaussian",
            target_modules=list(cfg.lora_targets),
        )
        try:
            network.add_adapter(lora)
        except ValueError as e:
            raise ConfigError(f"model.lora_targets={list(cfg.lora_targets)} do not match the transformer: {e}") from None
        for p in network.parameters():  # LoRA weights train in float32 even when the base is half
            if p.requires_grad:
                p.data = p.data.float()
        return None
    if cfg.train_mode == "full":
        network.requires_grad_(True).float()
        return copy.deepcopy(network).requires_grad_(False).eval()
    raise ConfigError(f"model.train_mode must be 'lora' or 'full', got {cfg.train_mode!r}")
