"""SDXLPolicy: DiffusionPolicy for Stable Diffusion XL pipelines.

SDXL's UNet needs, besides the token embeddings of its two text encoders, the pooled embedding
of the second encoder and six "size" numbers (original size, crop corner, target size) —
``added_cond_kwargs`` in diffusers. So that every algorithm, buffer and preference batch keeps
passing a single ``prompt_embeds`` tensor, the pooled embedding rides along as one extra token
(zero-padded to the token width) at the end of ``prompt_embeds``; this class packs it in
``encode_prompts`` and unpacks it before each UNet call. The size numbers are constants of the
run (height, width, no crop), as in the diffusers pipeline's default.

Classifier-free guidance uses zeros for the unconditional embeddings when the pipeline's config
says ``force_zeros_for_empty_prompt`` (SDXL base's default), exactly as the pipeline does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rl4diffusion.policies.base import DiffusionPolicy, PolicyConfig


class SDXLPolicy(DiffusionPolicy):
    def __init__(self, pipeline, config: PolicyConfig | None = None, *, device: str | torch.device = "cpu"):
        super().__init__(pipeline, config, device=device)
        encoder_2 = pipeline.text_encoder_2
        encoder_2.requires_grad_(False).eval().to(device)
        if encoder_2.dtype != self.text_encoder.dtype:
            encoder_2.to(dtype=self.text_encoder.dtype)
        self.pooled_dim = encoder_2.config.projection_dim
        # (original h, w, crop top, left, target h, w) — the pipeline's default for an uncropped image
        self.register_buffer("add_time_ids", torch.tensor([self.height, self.width, 0, 0, self.height, self.width],
                                                          dtype=torch.float32, device=device), persistent=False)
        self.zero_negative = bool(pipeline.config.get("force_zeros_for_empty_prompt", True))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, L + 1, D]: the token embeddings of both encoders plus the pooled embedding as a last token."""
        missing = sorted({p for p in prompts if p not in self._embed_cache})
        if missing:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(missing, device=self.device, num_images_per_prompt=1,
                                                               do_classifier_free_guidance=False)
            pooled_token = F.pad(pooled, (0, embeds.shape[-1] - pooled.shape[-1]))[:, None]  # (B, 1, D)
            for p, e in zip(missing, torch.cat([embeds, pooled_token], dim=1)):
                self._embed_cache[p] = e
        return torch.stack([self._embed_cache[p] for p in prompts])

    @property
    def negative_embeds(self) -> torch.Tensor:
        if self.zero_negative:
            return torch.zeros_like(self.encode_prompts([""])[0])
        return self.encode_prompts([""])[0]

    def _denoise(self, unet: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor):
        tokens, pooled = embeds[:, :-1], embeds[:, -1, : self.pooled_dim]  # unpack the pooled token
        time_ids = self.add_time_ids.to(embeds.dtype).expand(embeds.shape[0], -1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return unet(latents, timesteps, encoder_hidden_states=tokens, added_cond_kwargs=added).sample

    def save_pretrained_lora(self, directory) -> None:
        if self.config.train_mode != "lora":
            return super().save_pretrained_lora(directory)
        type(self.pipeline).save_lora_weights(str(directory), unet_lora_layers=self.lora_state_dict(),
                                              safe_serialization=True)
