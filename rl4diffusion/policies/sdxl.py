"""SDXLPolicy: StableDiffusionPolicy for Stable Diffusion XL pipelines.

Only the conditioning differs from Stable Diffusion: SDXL's UNet needs, besides the token
embeddings of its two text encoders, the pooled embedding of the second encoder and six "size"
numbers (original size, crop corner, target size) — ``added_cond_kwargs`` in diffusers. So that
every algorithm, buffer and preference batch keeps passing a single ``prompt_embeds`` tensor, the
pooled embedding rides along as one extra token (zero-padded to the token width) at the end of
``prompt_embeds``: ``_encode_text`` packs it and ``_denoise`` unpacks it before each UNet call.
The size numbers are constants of the run (height, width, no crop), as in the diffusers
pipeline's default. The DDIM step, guidance, the reference and LoRA are StableDiffusionPolicy's.

Classifier-free guidance uses zeros for the unconditional embeddings when the pipeline's config
says ``force_zeros_for_empty_prompt`` (SDXL base's default), exactly as the pipeline does.

Sources: SDXL (Podell et al. 2023, Sec. 2.2 "micro-conditioning"); diffusers'
``StableDiffusionXLPipeline`` (``encode_prompt``, ``_get_add_time_ids``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rl4diffusion import keys
from rl4diffusion.policies.base import PolicyConfig
from rl4diffusion.policies.sd import StableDiffusionPolicy


class SDXLPolicy(StableDiffusionPolicy):
    """A diffusers StableDiffusionXLPipeline as π_θ (two text encoders, pooled and size conditioning)."""

    needs = "a Stable Diffusion XL pipeline (Stable Diffusion's components plus text_encoder_2)"
    text_encoder_names = ("text_encoder", "text_encoder_2")

    @classmethod
    def accepts(cls, pipeline) -> bool:
        return super().accepts(pipeline) and getattr(pipeline, "text_encoder_2", None) is not None

    def __init__(self, pipeline, config: PolicyConfig | None = None, *, device: str | torch.device = "cpu"):
        super().__init__(pipeline, config, device=device)
        self.pooled_dim = pipeline.text_encoder_2.config.projection_dim
        # (original h, w, crop top, left, target h, w) — the pipeline's default for an uncropped image
        time_ids = torch.tensor([self.height, self.width, 0, 0, self.height, self.width], dtype=torch.float32)
        self.register_buffer("add_time_ids", time_ids.to(device), persistent=False)
        self.zero_negative = bool(pipeline.config.get("force_zeros_for_empty_prompt", True))

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """[B, L + 1, D]: the token embeddings of both encoders plus the pooled embedding as a last token."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        pooled_token = F.pad(pooled, (0, embeds.shape[-1] - pooled.shape[-1]))[:, None]  # (B, 1, D)
        return {keys.PROMPT_EMBEDS: torch.cat([embeds, pooled_token], dim=1)}

    def _negative_conditioning(self) -> dict[str, torch.Tensor]:
        negative = super()._negative_conditioning()
        if self.zero_negative and not self.config.negative_prompt:  # as diffusers: a negative prompt is encoded
            return {key: torch.zeros_like(value) for key, value in negative.items()}
        return negative

    def _denoise(self, network: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                 conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        embeds = conditioning[keys.PROMPT_EMBEDS]
        tokens, pooled = embeds[:, :-1], embeds[:, -1, : self.pooled_dim]  # unpack the pooled token
        time_ids = self.add_time_ids.to(embeds.dtype).expand(embeds.shape[0], -1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return network(latents, timesteps, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
