"""The embedded world: the shapes generator, its split, the judge and the shipped tiny pipeline."""

from __future__ import annotations

import os

import pytest
import torch

from rl4diffusion.zoo import shapes
from rl4diffusion.zoo.shapes import (
    ALL_PROMPTS,
    COLOURS,
    HELDOUT_PROMPTS,
    SHAPES,
    TRAIN_PROMPTS,
    parse_prompt,
    prompt_set,
    render_shapes,
    sample_shapes,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_same_seed_same_images_different_seed_different():
    a = sample_shapes(16, torch.Generator().manual_seed(3))
    b = sample_shapes(16, torch.Generator().manual_seed(3))
    c = sample_shapes(16, torch.Generator().manual_seed(4))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert torch.equal(a.colour_idx, b.colour_idx) and torch.equal(a.shape_idx, b.shape_idx)
    assert not torch.allclose(a.images, c.images)


def test_batch_shapes_range_and_labels_match_captions():
    images, colour, shape, captions = sample_shapes(64, torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert [parse_prompt(c) for c in captions] == list(zip(colour.tolist(), shape.tolist()))
    assert len(set(captions)) > 12  # draws cover the world, not one prompt


def test_background_never_has_a_shape_colour():
    # the corner pixel is always background (shapes keep a margin); it must be a low-saturation grey,
    # while every shape colour is strongly saturated, so the two can never be confused
    images = sample_shapes(256, torch.Generator().manual_seed(1)).images
    corner = images[:, :, 0, 0]  # [N, 3]
    assert (corner.amax(1) - corner.amin(1)).max() < 0.12
    assert (shapes._RGB.amax(1) - shapes._RGB.amin(1)).min() > 0.5


def test_render_draws_the_requested_shape_and_colour():
    colour = torch.arange(len(COLOURS)).repeat_interleave(len(SHAPES))
    shape = torch.arange(len(SHAPES)).repeat(len(COLOURS))
    images = render_shapes(colour, shape, torch.Generator().manual_seed(0))
    # the most saturated pixel of each image is (nearly) its nominal colour
    flat = images.flatten(2)  # [24, 3, 1024]
    saturation = flat.amax(1) - flat.amin(1)  # [24, 1024]
    brightest = flat.gather(2, saturation.argmax(1)[:, None, None].expand(-1, 3, 1))[..., 0]  # [24, 3]
    assert torch.allclose(brightest, shapes._RGB[colour], atol=0.08)


def test_split_is_disjoint_and_covers_every_colour_and_shape():
    assert set(TRAIN_PROMPTS).isdisjoint(HELDOUT_PROMPTS)
    assert set(TRAIN_PROMPTS) | set(HELDOUT_PROMPTS) == set(ALL_PROMPTS)
    assert len(ALL_PROMPTS) == len(COLOURS) * len(SHAPES) >= 24
    seen = [parse_prompt(p) for p in TRAIN_PROMPTS]
    assert {c for c, _ in seen} == set(range(len(COLOURS)))
    assert {s for _, s in seen} == set(range(len(SHAPES)))
    assert prompt_set("train") == list(TRAIN_PROMPTS) and prompt_set("heldout") == list(HELDOUT_PROMPTS)
    drawn = sample_shapes(200, torch.Generator().manual_seed(0), prompts=TRAIN_PROMPTS).captions
    assert not set(drawn) & set(HELDOUT_PROMPTS)


@pytest.mark.parametrize("bad", ["a pink circle", "a red hexagon", "red circle", "a red circle please", ""])
def test_parse_prompt_rejects_prompts_outside_the_world(bad):
    with pytest.raises(ValueError, match="not in the shapes world"):
        parse_prompt(bad)


def test_parse_prompt_roundtrip_and_normalisation():
    for i, p in enumerate(ALL_PROMPTS):
        assert parse_prompt(p) == (i // len(SHAPES), i % len(SHAPES))
    assert parse_prompt("  A Blue   Star ") == (COLOURS.index("blue"), SHAPES.index("star"))
    with pytest.raises(ValueError, match="unknown shapes prompt set"):
        prompt_set("validation")


def test_tokenizer_keeps_every_world_word_whole(tmp_path):
    from rl4diffusion.zoo.tiny import WORLD_WORDS, bpe_merges, build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    assert (tmp_path / "merges.txt").read_text().startswith("#version")
    for prompt in ALL_PROMPTS:
        assert tokenizer.tokenize(prompt) == [w + "</w>" for w in prompt.split()]
    # naive per-word merges would clash: "gree" must reuse "re" from "red", learned first
    assert ("r", "e") in bpe_merges(WORLD_WORDS) and ("g", "re") in bpe_merges(WORLD_WORDS)
    assert tokenizer.tokenize("a dog") == ["a</w>", "d", "o", "g</w>"]  # other words: letters, not <unk>


def test_judge_names_clean_images():
    from rl4diffusion.zoo.judge import judge_accuracy, load_judge

    judge = load_judge()
    assert not any(p.requires_grad for p in judge.parameters()) and not judge.training
    batch = sample_shapes(256, torch.Generator().manual_seed(123))
    acc = judge_accuracy(judge, batch.images, batch.colour_idx, batch.shape_idx)
    assert acc["colour"] >= 0.97 and acc["shape"] >= 0.97
    assert judge.features(batch.images[:4]).shape == (4, judge.feature_dim)


def test_tiny_pipeline_loads_offline_with_plain_from_pretrained():
    from diffusers import StableDiffusionPipeline

    from rl4diffusion.zoo.tiny import TINY_PATH, load_tiny_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_PATH), local_files_only=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.vae.config.scaling_factor != 0.18215  # the measured value was written into the config
    assert pipe.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle", "a blue star"], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 32, 32) and torch.isfinite(out.images).all()
    assert load_tiny_pipeline().unet.config.sample_size == 8


def test_shipped_weights_are_small_safetensors():
    from rl4diffusion.zoo.judge import JUDGE_PATH
    from rl4diffusion.zoo.tiny import TINY_FLOW_PATH, TINY_PATH

    files = [p for p in JUDGE_PATH.parent.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert JUDGE_PATH in weights
    assert any(p.is_relative_to(TINY_PATH) for p in weights) and any(p.is_relative_to(TINY_FLOW_PATH) for p in weights)
    assert sum(p.stat().st_size for p in files) <= 20e6
