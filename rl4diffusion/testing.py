"""Tiny randomly-initialised pipelines built from configs — for tests and benchmarks, no network.

They have the real classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
DDIMScheduler) at toy sizes, so every code path that loads SD1.5 runs on them.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Literal

import torch


def make_char_tokenizer(directory: str | Path | None = None, model_max_length: int = 16):
    """A CLIPTokenizer over single characters (empty merges): every word splits into letters."""
    from transformers import CLIPTokenizer

    if directory is None:  # the tokenizer reads its files once: build it in a directory that is then removed
        with tempfile.TemporaryDirectory(prefix="rl4d_tok_") as tmp:
            return make_char_tokenizer(tmp, model_max_length)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=model_max_length
    )


def make_random_sd_pipeline(seed: int = 0, *, sample_size: int = 8, cross_attention_dim: int = 32):
    """A StableDiffusionPipeline with random weights: 32×32 images, 8×8×4 latents, ~0.5 M parameters."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = make_char_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, eos_token_id=1, bos_token_id=0,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=4, sample_size=sample_size * 4,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_random_sd3_pipeline(seed: int = 0, *, sample_size: int = 8, clip_dim: int = 32):
    """A StableDiffusion3Pipeline with random weights: 32×32 images, 8×8×16 latents, flow matching.

    SD3's classes at toy sizes: SD3Transformer2DModel (patch 2 → 16 image tokens), AutoencoderKL
    with SD3's shift/scaling factors, two CLIPTextModelWithProjection encoders with character
    tokenizers, FlowMatchEulerDiscreteScheduler (shift 3, as SD3). The T5 encoder is left out
    (``text_encoder_3=None``): the pipeline then uses zeros for the T5 tokens, as it does for SD3
    loaded without T5.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizers = [make_char_tokenizer(), make_char_tokenizer()]
    encoders = [
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizers[0]), hidden_size=clip_dim, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, projection_dim=clip_dim, max_position_embeddings=tokenizers[0].model_max_length,
                eos_token_id=1, bos_token_id=0, pad_token_id=1,
            )
        )
        for _ in range(2)
    ]
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=2 * clip_dim, caption_projection_dim=32,
        pooled_projection_dim=2 * clip_dim, pos_embed_max_size=sample_size,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=4, sample_size=sample_size * 4, shift_factor=0.0609,
        scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0],
        text_encoder_2=encoders[1], tokenizer_2=tokenizers[1], text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_random_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline with random weights: two tiny CLIP encoders, size conditioning."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = make_char_tokenizer(), make_char_tokenizer()
    common = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=tokenizer.model_max_length, eos_token_id=1, bos_token_id=0, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **common))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=4, sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD15_SCALES = ("full", "tiny")


def random_sd15_configs(scale: Literal["full", "tiny"] = "full") -> dict[str, dict]:
    """Constructor arguments of the components of ``make_random_sd15_pipeline`` at ``scale``.

    ``"full"``: the UNet is SD1.5's published UNet2DConditionModel (block_out_channels
    (320, 640, 1280, 1280), two layers per block, attention_head_dim 8 — diffusers' legacy name for
    8 heads —, cross-attention width 768, 64×64×4 latents; 859,520,964 parameters, as SD1.5's). The
    text encoder keeps SD1.5's width 768 (the UNet cross-attends to it) and its 77 positions but
    has 2 layers instead of 12 and an MLP of 1536 instead of 3072; its tokenizer is
    ``make_char_tokenizer``'s (one token per character), not CLIP's BPE. The VAE keeps SD1.5's 4
    latent channels, 8× downscale (4 blocks → 512×512 images) and scaling factor 0.18215, at widths
    (32, 64, 64, 64) with one layer per block instead of (128, 256, 512, 512) × 2: a real VAE
    decode costs far more than a smoke test needs.

    ``"tiny"``: the same block types and depth at toy widths (8×8 latents, 64×64 images) for a CPU.

    Returns:
        {"unet": ..., "text_encoder": ..., "vae": ..., "scheduler": ..., "tokenizer": ...}: keyword
        arguments of UNet2DConditionModel, CLIPTextConfig (minus the tokenizer-dependent ids),
        AutoencoderKL, PNDMScheduler (SD1.5's scheduler config) and ``make_char_tokenizer``.
    """
    if scale not in SD15_SCALES:
        raise ValueError(f"scale must be one of {SD15_SCALES}, got {scale!r}")
    full = scale == "full"
    width = 768 if full else 32  # text encoder width = the UNet's cross_attention_dim
    max_length = 77 if full else 32  # character tokens: "a yellow triangle" is 17 with BOS and EOS
    return {
        "unet": dict(
            sample_size=64 if full else 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280) if full else (16, 16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=width, attention_head_dim=8 if full else 2, norm_num_groups=32 if full else 8,
        ),
        "text_encoder": dict(
            hidden_size=width, intermediate_size=1536 if full else 64, num_hidden_layers=2 if full else 1,
            num_attention_heads=12 if full else 2, max_position_embeddings=max_length,
            hidden_act="quick_gelu", projection_dim=width,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=(32, 64, 64, 64) if full else (8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=32 if full else 4, sample_size=512 if full else 64,
            scaling_factor=0.18215,
        ),
        "scheduler": dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
        ),
        "tokenizer": dict(model_max_length=max_length),
    }


def make_random_sd15_pipeline(seed: int = 0, *, scale: Literal["full", "tiny"] = "full"):
    """A StableDiffusionPipeline with random weights and SD1.5's UNet (sizes: ``random_sd15_configs``).

    ``scale="full"`` builds the real-size UNet (~860 M parameters, 3.4 GB in float32: build it
    where that fits); ``scale="tiny"`` the same architecture at toy widths, for tests on a CPU. The
    scheduler is SD1.5's PNDMScheduler config, which ``DiffusionPolicy`` turns into DDIM as it
    does for the real model.

    Example::

        pipe = make_random_sd15_pipeline(scale="tiny")
        pipe.save_pretrained("/tmp/sd15_tiny")  # python -m rl4diffusion.train model=path:/tmp/sd15_tiny
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = random_sd15_configs(scale)
    torch.manual_seed(seed)
    tokenizer = make_char_tokenizer(**configs["tokenizer"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), eos_token_id=1, bos_token_id=0, pad_token_id=1,
                       **configs["text_encoder"])
    )
    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**configs["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
