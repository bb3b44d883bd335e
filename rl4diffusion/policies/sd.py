"""StableDiffusionPolicy: a Stable Diffusion (1.x / 2.x) pipeline as a policy, stepped with stochastic DDIM.

What this class adds to ``DiffusionPolicy`` (which owns guidance, the reference, LoRA and the loop):

* the denoiser call: ``UNet2DConditionModel(x_t, t, encoder_hidden_states=prompt_embeds)``;
* the schedule: DDIM's, built from whatever scheduler the model shipped with, as DDPO does;
* the step: DDIM with η > 0 and its Gaussian log-probability (``steps.ddim_step_with_log_prob``),
  ᾱ_t from the scheduler's ``alphas_cumprod``, and x̂₀ for ε-, v- and x₀-prediction models.

Example::

    from rl4diffusion.testing import make_random_sd_pipeline
    policy = StableDiffusionPolicy(make_random_sd_pipeline(), PolicyConfig(num_steps=4))
    out = policy.sample(["a red circle"], generator=torch.Generator().manual_seed(0))
    out["images"].shape  # torch.Size([1, 3, 32, 32])

Sources: DDIM (Song et al. 2021, eq. 12 and 16); DDPO (Black et al. 2023, kvablack/ddpo-pytorch
``ddim_with_logprob.py``); diffusers' ``StableDiffusionPipeline`` for the conditioning.
"""

from __future__ import annotations

import torch
from torch import nn

from rl4diffusion import keys
from rl4diffusion.errors import ConfigError
from rl4diffusion.policies.base import DiffusionPolicy, PolicyConfig, per_sample_timesteps
from rl4diffusion.policies.steps import (
    StepOutput,
    ddim_alphas,
    ddim_step_with_log_prob,
    model_output_to_x0_eps,
)


class StableDiffusionPolicy(DiffusionPolicy):
    """A diffusers Stable-Diffusion-style pipeline (UNet, VAE, CLIP text encoder) as π_θ(x_{t-1} | x_t, c).

    Args:
        pipeline: a loaded pipeline with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``.
        config: sampling and training options (PolicyConfig; ``eta`` is DDIM's η).
        device: where the policy runs.
    """

    kind = "ddim"
    needs = "a Stable-Diffusion-style pipeline (unet, vae, text_encoder, tokenizer and a diffusion scheduler)"

    @classmethod
    def accepts(cls, pipeline) -> bool:
        from diffusers import FlowMatchEulerDiscreteScheduler

        components = ("unet", "vae", "text_encoder", "tokenizer")
        return (all(getattr(pipeline, name, None) is not None for name in components)
                and not isinstance(getattr(pipeline, "scheduler", None), FlowMatchEulerDiscreteScheduler))

    def _check_config(self, cfg: PolicyConfig) -> None:
        super()._check_config(cfg)
        if cfg.eta < 0:
            raise ConfigError(f"model.eta must be ≥ 0, got {cfg.eta}")

    @property
    def text_encoder(self) -> nn.Module:
        """The (first) CLIP text encoder, frozen."""
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        """The pipeline's (first) tokenizer."""
        return self.pipeline.tokenizer

    # ------------------------------------------------------------------ conditioning and the network
    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
        return {keys.PROMPT_EMBEDS: embeds}

    def _denoise(self, network: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                 conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        return network(latents, timesteps, encoder_hidden_states=conditioning[keys.PROMPT_EMBEDS]).sample

    # ------------------------------------------------------------------ the schedule and the step
    def _set_up_schedule(self, device: str | torch.device) -> None:
        from diffusers import DDIMScheduler

        # The stochastic step is DDIM's whatever scheduler the model shipped with (as DDPO does).
        self.scheduler = DDIMScheduler.from_config(self.pipeline.scheduler.config)
        self.scheduler.set_timesteps(self.config.num_steps)
        self.register_buffer("timesteps", self.scheduler.timesteps.clone().to(device), persistent=False)
        alphas_cumprod = self.scheduler.alphas_cumprod.clone().float().to(device)  # ᾱ_t, t = 0 … T_train − 1
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)
        self.step_size = self.scheduler.config.num_train_timesteps // self.config.num_steps

    def alphas(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ_t, ᾱ_t') for per-sample timesteps [B]."""
        return ddim_alphas(self.alphas_cumprod, self.final_alpha_cumprod, timesteps, self.step_size)

    def _step(self, model_output: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor,
              eta: float | None, action: dict) -> StepOutput:
        """One stochastic DDIM step; ``eta`` overrides η (0 = the deterministic DDIM sampler)."""
        alpha_t, alpha_prev = self.alphas(timesteps)
        sc = self.scheduler.config
        return ddim_step_with_log_prob(
            model_output, latents, alpha_t, alpha_prev,
            eta=self.config.eta if eta is None else eta,
            prediction_type=sc.prediction_type,
            clip_sample_range=sc.clip_sample_range if sc.clip_sample else None,
            **action,
        )

    def pred_x0(self, latents: torch.Tensor, timesteps: torch.Tensor,
                model_output: torch.Tensor) -> torch.Tensor:
        """x̂₀(x_t) = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t) (or its v/x₀-prediction equivalent)."""
        alpha_t, _ = self.alphas(per_sample_timesteps(timesteps, latents))
        prediction_type = self.scheduler.config.prediction_type
        return model_output_to_x0_eps(model_output, latents, alpha_t, prediction_type)[0]
