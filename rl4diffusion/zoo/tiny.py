"""The tiny model: a real diffusers ``StableDiffusionPipeline`` trained on the shapes world.

Same classes and the same loading code path as Stable Diffusion 1.5, at toy sizes:

==================  =====================================================================
component           what it is
==================  =====================================================================
tokenizer           ``CLIPTokenizer`` whose vocab.json/merges.txt make every word of the
                    world ("a", the colours, the shapes) one ``word</w>`` token; any other
                    lowercase word falls back to single letters, as CLIP's BPE does
text_encoder        ``CLIPTextModel`` (hidden 64, 2 layers, ~74 k parameters), randomly
                    initialised from a seed and never trained: distinct token embeddings are
                    all the conditioning a model this small needs
vae                 ``AutoencoderKL`` 32×32×3 → 8×8×4 (channels 16/32/64, ~0.68 M parameters),
                    with its measured ``scaling_factor`` in the config
unet                ``UNet2DConditionModel`` (channels 32/64, cross-attention down, mid and up,
                    ~1.1 M parameters), ε-prediction, EMA weights
scheduler           ``DDIMScheduler`` with SD1.5's β schedule (scaled_linear 0.00085–0.012)
==================  =====================================================================

The shipped files live in ``zoo/weights/tiny`` (``TINY_PATH``) and are reproduced by
``python -m rl4diffusion.zoo.train_tiny``. The generator never saw the held-out prompts
(``rl4diffusion.zoo.shapes.HELDOUT_PROMPTS``). It is imperfect on purpose, so that fine-tuning
has room to improve it: see ``RECOMMENDED_GUIDANCE`` and ``benchmarks/results/embedded_world.md``.

The flow-matching counterpart, ``model=tiny_flow``, is a ``StableDiffusion3Pipeline`` on the same
world (``TINY_FLOW_PATH``, ``load_tiny_flow_pipeline``, ``sample_tiny_flow``; its parts and training
are described in ``rl4diffusion.zoo.train_tiny_flow``).

Example::

    pipe = load_tiny_pipeline()
    out = pipe(["a red circle"] * 4, num_inference_steps=20, guidance_scale=RECOMMENDED_GUIDANCE,
               eta=1.0, output_type="pt", generator=torch.Generator().manual_seed(0))
    out.images.shape   # torch.Size([4, 3, 32, 32]), values in [0, 1]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from rl4diffusion.zoo.shapes import COLOURS, SHAPES

TINY_PATH = Path(__file__).resolve().parent / "weights" / "tiny"
"""Directory of the shipped pipeline (``StableDiffusionPipeline.from_pretrained(TINY_PATH)`` loads it)."""

RECOMMENDED_GUIDANCE = 2.0
"""The classifier-free guidance weight recommended as the toolkit's default for this model: at 20
DDIM steps with η = 1 it aligns roughly half of the training prompts' samples, which leaves room
for fine-tuning, while guidance 5 shows the model can do much better (measured numbers in
``benchmarks/results/embedded_world.md``)."""

DEFAULT_STEPS = 20
"""Denoising steps the shipped model is evaluated with."""

WORLD_WORDS: tuple[str, ...] = ("a", *COLOURS, *SHAPES)
"""Words that the tokenizer keeps whole (one token each)."""

MAX_LENGTH = 8
"""Tokenizer and text-encoder length: <start> a colour shape <end> and padding."""

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


# --------------------------------------------------------------------------------------------
# tokenizer: vocab.json + merges.txt that keep every world word whole
# --------------------------------------------------------------------------------------------
def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP-style byte-pair encoding of one lowercase word under merge ``ranks`` (lower = earlier).

    The word starts as characters with ``</w>`` glued to the last one; the pair with the lowest
    rank is merged until no listed pair is left (Sennrich et al. 2016; CLIP's tokenizer).
    """
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        ranked = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
        if not ranked:
            break
        _, i = min(ranked)
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
    return parts


def bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Merges (in priority order) under which BPE turns each of ``words`` into one token.

    Writing "r e", "re d</w>" for "red" naively is not enough: a merge added for one word can
    fire first inside another word and leave it split (the merges are global and ranked). So the
    BPE is simulated: each word is encoded with the merges found so far and, while it is still
    split, one merge of its leftmost remaining pair is appended (lowest priority). Appending
    never changes how earlier words encode, because an appended merge ranks after every merge
    those words use; the caller checks the result with the real tokenizer anyway.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            parts = _bpe(word, ranks)
    return sorted(ranks, key=ranks.get)


def write_tokenizer_files(directory: str | Path, words: Sequence[str] = WORLD_WORDS) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (with its ``#version`` header) into ``directory``.

    The vocabulary holds the two special tokens, every letter/digit with and without ``</w>``
    (so any lowercase word still encodes, letter by letter), and every merge result.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = bpe_merges(words)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*_ALPHABET, *(c + "</w>" for c in _ALPHABET), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, indent=0))
    # the tokenizer skips the first line of merges.txt: it must be the version header
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merges_file


def build_tokenizer(directory: str | Path):
    """A CLIPTokenizer built from freshly written files in ``directory``; checks every world word is one token."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_tokenizer_files(directory)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MAX_LENGTH)
    for word in WORLD_WORDS:
        pieces = tokenizer.tokenize(word)
        if pieces != [word + "</w>"]:
            raise RuntimeError(f"tokenizer splits {word!r} into {pieces}; the generated merges are inconsistent")
    return tokenizer


# --------------------------------------------------------------------------------------------
# the networks (untrained); train_tiny trains the VAE and the UNet
# --------------------------------------------------------------------------------------------
def build_text_encoder(vocab_size: int, *, seed: int):
    """The frozen, randomly initialised CLIPTextModel (hidden 64, 2 layers)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=64,
    )
    torch.manual_seed(seed)  # the text encoder is never trained: its seed *is* its weights
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_vae():
    """AutoencoderKL 32×32×3 → 8×8×4: three blocks (two 2× downsamplings), channels 16/32/64."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def build_unet():
    """UNet2DConditionModel on 8×8×4 latents with cross-attention to the 64-d text tokens."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    )


def build_scheduler():
    """DDIMScheduler with Stable Diffusion 1.5's training β schedule and ε-prediction."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def assemble_pipeline(*, vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline from the parts, without safety checker or feature extractor."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------
# loading and sampling the shipped model
# --------------------------------------------------------------------------------------------
def load_tiny_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped tiny StableDiffusionPipeline, loaded offline with ``from_pretrained``.

    Raises MissingWeightsError when the files are absent (they ship with the package).
    """
    from diffusers import StableDiffusionPipeline

    from rl4diffusion.errors import MissingWeightsError

    if not (TINY_PATH / "model_index.json").is_file():
        raise MissingWeightsError(
            f"the embedded tiny model is missing ({TINY_PATH}). It ships with the package; regenerate it with "
            "`python -m rl4diffusion.zoo.train_tiny` (about 25 minutes on a 2-core CPU)."
        )
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_PATH), local_files_only=True, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def sample_tiny(
    pipe,
    prompts: Sequence[str],
    *,
    guidance_scale: float = RECOMMENDED_GUIDANCE,
    num_steps: int = DEFAULT_STEPS,
    eta: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for ``prompts`` (one image each) through the pipeline's own __call__.

    The noise is fixed by ``seed`` so that two models (or two guidance scales) are compared on
    the same draws.
    """
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        out = pipe(chunk, num_inference_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                   generator=generator, output_type="pt")
        images.append(out.images.float().cpu())
    return torch.cat(images)


# --------------------------------------------------------------------------------------------
# the flow-matching model: a StableDiffusion3Pipeline on the same world (train_tiny_flow)
# --------------------------------------------------------------------------------------------
TINY_FLOW_PATH = Path(__file__).resolve().parent / "weights" / "tiny_flow"
"""Directory of the shipped flow-matching pipeline (``StableDiffusion3Pipeline.from_pretrained`` loads it)."""

FLOW_RECOMMENDED_GUIDANCE = 3.0
"""The classifier-free guidance weight of ``model=tiny_flow`` (measured in ``benchmarks/results/embedded_world.md``)."""

FLOW_DEFAULT_STEPS = 10
"""Denoising steps ``model=tiny_flow`` samples with (Flow-GRPO trains SD3 with 10)."""

FLOW_T5_LENGTH = 1
"""``max_sequence_length`` of the tiny flow pipeline. There is no T5 encoder (``text_encoder_3=None``), so the
pipeline appends this many all-zero "T5" tokens to the CLIP tokens; the transformer was trained with exactly
one, so pass ``max_sequence_length=FLOW_T5_LENGTH`` when calling the pipeline yourself (its default, 256,
would dilute the attention over the prompt)."""


def build_projection_text_encoder(vocab_size: int, *, seed: int, weights_from=None):
    """A frozen ``CLIPTextModelWithProjection`` (hidden 64, 2 layers) as SD3's pipeline needs: it reads the
    pooled projection as well as the penultimate hidden states.

    ``weights_from``: a CLIPTextModel of the same size (the tiny model's) whose transformer weights are
    copied; only the 64 → 64 projection is then drawn from ``seed``.
    """
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)  # never trained: the seed (and the copied weights) *are* its weights
    model = CLIPTextModelWithProjection(build_text_encoder(vocab_size, seed=seed).config)
    if weights_from is not None:
        # transformers ≥ 5 keeps CLIPTextModel's layers at the top level, older versions under .text_model
        source = getattr(weights_from, "text_model", weights_from)
        model.text_model.load_state_dict(source.state_dict())
    return model.eval().requires_grad_(False)


def build_flow_transformer():
    """SD3Transformer2DModel on 8×8×4 latents: patch 1 (64 image tokens), 4 joint blocks of width 96 (3 heads
    of 32), text tokens of 128 = the two 64-d CLIP encoders side by side, pooled projection 128."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=3, joint_attention_dim=128, caption_projection_dim=96, pooled_projection_dim=128,
        pos_embed_max_size=8,
    )


def build_flow_scheduler():
    """FlowMatchEulerDiscreteScheduler with shift 1: SD3's shift 3 is for 1024² images (more pixels keep more
    signal at a given σ, Esser et al. 2024 §5.3.2); 8×8 latents need none."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def assemble_flow_pipeline(*, vae, text_encoder, text_encoder_2, tokenizer, transformer, scheduler):
    """A StableDiffusion3Pipeline from the parts: both CLIP slots use the tiny tokenizer; no T5."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_tiny_flow_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped tiny StableDiffusion3Pipeline, loaded offline with ``from_pretrained``.

    Raises MissingWeightsError when the files are absent (they ship with the package).
    """
    from diffusers import StableDiffusion3Pipeline

    from rl4diffusion.errors import MissingWeightsError

    if not (TINY_FLOW_PATH / "model_index.json").is_file():
        raise MissingWeightsError(
            f"the embedded tiny flow model is missing ({TINY_FLOW_PATH}). It ships with the package; regenerate "
            "it with `python -m rl4diffusion.zoo.train_tiny_flow` (10–20 minutes on a 2-core CPU)."
        )
    # without T5, as SD3 is loaded without it: the absent components are passed as None
    pipe = StableDiffusion3Pipeline.from_pretrained(str(TINY_FLOW_PATH), local_files_only=True, dtype=dtype,
                                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def sample_tiny_flow(
    pipe,
    prompts: Sequence[str],
    *,
    guidance_scale: float = FLOW_RECOMMENDED_GUIDANCE,
    num_steps: int = FLOW_DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for ``prompts`` through the pipeline's own __call__ (the Euler ODE sampler).

    The noise is fixed by ``seed`` so that two models (or two guidance scales) are compared on the same draws.
    """
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        out = pipe(chunk, num_inference_steps=num_steps, guidance_scale=guidance_scale, generator=generator,
                   max_sequence_length=FLOW_T5_LENGTH, output_type="pt")
        images.append(out.images.float().cpu())
    return torch.cat(images)
