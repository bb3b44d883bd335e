"""FlowMatchingPolicy: a flow-matching pipeline (SD3) as a stochastic policy over denoising steps.

Same interface as every ``DiffusionPolicy`` (the algorithms and the environment cannot tell them
apart); guidance, the reference, LoRA, the loop and decoding are the base class's. This class
puts the flow-matching pieces in place of DDIM's:

* the denoiser is an ``SD3Transformer2DModel`` predicting the velocity v = ε − x₀ (what
  ``predict_noise`` returns here), conditioned on the prompt's token embeddings and on its
  pooled embeddings — stored under ``keys.POOLED_PROMPT_EMBEDS`` in states and transitions;
* the schedule is ``FlowMatchEulerDiscreteScheduler``'s: timesteps t = 1000·σ (float),
  σ from 1 (noise) to 0 (data);
* the step is Flow-GRPO's SDE with the ODE's marginals and its Gaussian log-probability
  (``rl4diffusion.policies.steps.flow_sde_step_with_log_prob``), noise level a = ``model.noise_level``.

``DiffusionPolicy.from_pretrained`` returns this class whenever the pipeline has a transformer and
a FlowMatchEulerDiscreteScheduler, so ``model.pretrained=stabilityai/stable-diffusion-3-medium-diffusers``
(or ``model=sd3``) is all a user changes.

Example::

    from rl4diffusion.testing import make_random_sd3_pipeline
    policy = FlowMatchingPolicy(make_random_sd3_pipeline(), PolicyConfig(num_steps=4, max_sequence_length=8))
    out = policy.sample(["a red circle"], generator=torch.Generator().manual_seed(0))
    out["images"].shape  # torch.Size([1, 3, 32, 32])

Sources: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470), Sec. 4.2 "ODE-to-SDE"; rectified flow /
SD3 (Esser et al. 2024); diffusers' StableDiffusion3Pipeline for the conditioning and CFG layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rl4diffusion import keys
from rl4diffusion.errors import ConfigError
from rl4diffusion.policies.base import DiffusionPolicy, PolicyConfig, per_sample_timesteps
from rl4diffusion.policies.steps import StepOutput, flow_sde_step_with_log_prob


class FlowMatchingPolicy(DiffusionPolicy):
    """A diffusers StableDiffusion3Pipeline (transformer, VAE, CLIP ×2 [+ T5], flow-matching scheduler) as π.

    Args:
        pipeline: a loaded pipeline with ``transformer``, ``vae``, ``text_encoder(_2, _3)``, ``scheduler``.
        config: sampling and training options (PolicyConfig; ``noise_level`` and ``max_sequence_length``
            are the flow-specific ones, ``eta`` is not used).
        device: where the policy runs.
    """

    kind = "flow"
    needs = "an SD3-style flow-matching pipeline (a transformer and a FlowMatchEulerDiscreteScheduler)"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    extra_conditioning_keys = (keys.POOLED_PROMPT_EMBEDS,)

    @classmethod
    def accepts(cls, pipeline) -> bool:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return (getattr(pipeline, "transformer", None) is not None
                and isinstance(getattr(pipeline, "scheduler", None), FlowMatchEulerDiscreteScheduler))

    def _check_config(self, cfg: PolicyConfig) -> None:
        super()._check_config(cfg)
        if cfg.num_steps < 2:
            raise ConfigError(f"model.num_steps must be ≥ 2 for a flow-matching model, got {cfg.num_steps}")
        if cfg.noise_level < 0:
            raise ConfigError(f"model.noise_level must be ≥ 0, got {cfg.noise_level}")

    @property
    def unet(self) -> nn.Module:
        """The denoiser (a transformer here), under the UNet's name: checkpoints and adapters work alike."""
        return self.transformer

    # ------------------------------------------------------------------ conditioning
    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token embeddings [B, L, D] (CLIP ×2 padded, then T5); pooled ones [B, P] (the CLIP projections)."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, None, None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.config.max_sequence_length,
        )
        return {keys.PROMPT_EMBEDS: embeds, keys.POOLED_PROMPT_EMBEDS: pooled}

    def encode_pooled_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Pooled embeddings [B, P] (the two CLIP encoders' projections, concatenated)."""
        return self._conditioning(prompts)[keys.POOLED_PROMPT_EMBEDS]

    @property
    def negative_pooled_embeds(self) -> torch.Tensor:
        """The empty prompt's pooled embedding [P] (classifier-free guidance)."""
        return self._negative_conditioning()[keys.POOLED_PROMPT_EMBEDS]

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
        """Guided velocity v̂ = v_u + w (v_c − v_u) for latents [B, C, h, w] at timesteps [B] (t = 1000σ)."""
        if pooled_prompt_embeds is None:
            raise ValueError(
                "a flow-matching (SD3) policy needs pooled_prompt_embeds as well as prompt_embeds: pass "
                "policy.encode_pooled_prompts(prompts), or use policy.predict_from_td(td) on states from the "
                "environment"
            )
        conditioning = {keys.PROMPT_EMBEDS: prompt_embeds, keys.POOLED_PROMPT_EMBEDS: pooled_prompt_embeds}
        return self._guided_output(latents, timesteps, conditioning, guidance_scale=guidance_scale,
                                   use_reference=use_reference)

    def _denoise(self, network: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                 conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        return network(
            hidden_states=latents,
            encoder_hidden_states=conditioning[keys.PROMPT_EMBEDS],
            pooled_projections=conditioning[keys.POOLED_PROMPT_EMBEDS],
            timestep=timesteps.float(),  # as the SD3 pipeline passes them (bf16 would round 1000σ)
        ).sample

    # ------------------------------------------------------------------ the schedule and the step
    def _set_up_schedule(self, device: str | torch.device) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        sc = self.scheduler.config
        mu = None
        if sc.use_dynamic_shifting:  # resolution-dependent shift, as the SD3 pipeline computes it
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = self.transformer.config.patch_size
            mu = calculate_shift((self.latent_shape[1] // patch) * (self.latent_shape[2] // patch),
                                 sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)
        self.scheduler.set_timesteps(self.config.num_steps, mu=mu)
        self.scheduler.init_noise_sigma = 1.0  # x_1 ~ N(0, I): read by code written for DDPM-style schedulers
        timesteps = self.scheduler.timesteps.clone().float().to(device)  # [N], t = 1000σ
        self.register_buffer("timesteps", timesteps, persistent=False)
        sigmas = self.scheduler.sigmas.clone().float().to(device)  # [N + 1]
        self.register_buffer("sigmas", sigmas, persistent=False)
        below_one = self.sigmas[(self.sigmas < 1) & (self.sigmas > 0)]
        # s_t = a·sqrt(σ/(1−σ)) is infinite at σ = 1: cap σ at the schedule's largest σ < 1 (as Flow-GRPO)
        self.sigma_cap = float(below_one.max()) if len(below_one) else None

    def sigmas_of(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, σ_next) for per-sample timesteps [B] of the sampling schedule."""
        t = timesteps.to(self.timesteps.device).float().reshape(-1)
        index = (self.timesteps[None, :] - t[:, None]).abs().argmin(dim=1)  # (B,): position in the schedule
        return self.sigmas[index], self.sigmas[index + 1]

    def sde_time_step(self, timesteps: torch.Tensor) -> torch.Tensor:
        """|Δt| = σ − σ_next [B]: the step's Gaussian std is s_t·√|Δt| (``flow_sde_step_with_log_prob``)."""
        sigma, sigma_next = self.sigmas_of(timesteps)
        return sigma - sigma_next

    def alphas(self, timesteps: torch.Tensor):
        raise NotImplementedError("a flow-matching policy has no ᾱ_t; use policy.sigmas_of(timesteps)")

    def _step(self, model_output: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor,
              eta: float | None, action: dict) -> StepOutput:
        """One SDE step σ → σ_next; ``eta`` overrides the noise level (0: the deterministic Euler step)."""
        sigma, sigma_next = self.sigmas_of(timesteps)
        return flow_sde_step_with_log_prob(
            model_output, latents, sigma, sigma_next,
            noise_level=self.config.noise_level if eta is None else eta, sigma_cap=self.sigma_cap, **action,
        )

    def pred_x0(self, latents: torch.Tensor, timesteps: torch.Tensor,
                model_output: torch.Tensor) -> torch.Tensor:
        """x̂₀ = x_σ − σ v̂ (rectified flow)."""
        sigma, _ = self.sigmas_of(per_sample_timesteps(timesteps, latents))
        return latents - sigma.view(-1, *([1] * (latents.dim() - 1))) * model_output
