"""Evaluation image grids people can read: every prompt, each image captioned with its prompt and reward, the
base model's sample beside the current model's on the same noise, paged when there are many prompts.

A page is a PIL image: one row per prompt, the base model's ``samples_per_prompt`` images on the left, the
current model's on the right (same seed, so the same noise: what changed is what training did). Small images
(the embedded world's 32 px) are upscaled with nearest-neighbour to at least ``MIN_TILE`` px, so that their
pixels stay sharp; large ones are shrunk to ``MAX_TILE`` px, so that a page stays a few megapixels. Captions use
Pillow's default font (no font file to download).

Example::

    pages = comparison_pages(prompts, images, rewards, samples_per_prompt=2, label="step 5",
                             base_images=base, base_rewards=base_rewards)
    for number, page in enumerate(pages, 1):
        page.image.save(f"eval_00005_train_p{number}.png")
"""

from __future__ import annotations

import functools
import math
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 256
"""Images smaller than this (px, longest side) are upscaled by a whole factor to at least this."""
MAX_TILE = 512
"""Images larger than this (px, longest side) are shrunk to it."""
PROMPTS_PER_PAGE = 16
"""At most this many prompts (rows) on one page; pages are balanced (20 prompts: two pages of 10)."""
PROMPT_LINES = 2
"""Lines of prompt text under an image (a longer prompt ends with …)."""
GAP = 4
"""Pixels between tiles."""
GROUP_GAP = 16
"""Extra pixels between the base model's tiles and the current model's."""


@dataclass
class Page:
    """One grid image and the caption under each of its tiles (in reading order)."""

    image: Image.Image
    captions: list[str]


@functools.cache
def caption_font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (its scalable one needs FreeType and Pillow ≥ 10.1, else the bitmap)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # an older Pillow, or one built without FreeType
        return ImageFont.load_default()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] → uint8 [N, H, W, 3] on the CPU (what PIL and the trackers take); uint8 images are
    taken as converted already (the trainer keeps the base model's so, a quarter of the memory)."""
    if images.dtype == torch.uint8:
        return images.cpu().numpy()
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def resize_tile(image: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upscale of a small image by a whole factor (to ≥ MIN_TILE px), or shrink a large one."""
    height, width = image.shape[:2]
    side = max(height, width)
    if side < MIN_TILE:
        factor = math.ceil(MIN_TILE / side)
        return image.repeat(factor, axis=0).repeat(factor, axis=1)
    if side > MAX_TILE:
        scale = MAX_TILE / side
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return image


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int, max_lines: int) -> list[str]:
    """``text`` in lines that fit ``width`` px (at most ``max_lines``; the last ends with … when cut)."""
    average = draw.textlength("abcdefghij", font=font) / 10
    characters = min(len(text), int(width / max(1.0, average))) + 2  # a guess, narrowed until every line fits
    while True:
        lines = textwrap.wrap(text, width=max(1, characters)) or [""]
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1][:-1] + "…"
        if characters <= 4 or all(draw.textlength(line, font=font) <= width for line in lines):
            return lines
        characters -= 1


def captioned_grid(tiles: list[np.ndarray], captions: list[str], columns: int, group: int | None = None) -> Image.Image:
    """Tiles (uint8 [H, W, 3], resized already, all one size) in rows of ``columns``, each with its caption
    (lines separated by "\\n"; the first line is wrapped to the tile's width) in a white band under it.
    Every ``group`` columns a wider gap sets the groups apart (the base model's from the current one's)."""
    font = caption_font()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tile_height, tile_width = tiles[0].shape[:2]
    line_height = font.getbbox("Ag")[3] + 3
    wrapped = []
    for caption in captions:
        first, *rest = caption.split("\n")
        wrapped.append(_wrap(first, scratch, font, tile_width - 4, PROMPT_LINES) + rest)
    band = max(len(lines) for lines in wrapped) * line_height + GAP
    rows = math.ceil(len(tiles) / columns)
    group = group or columns

    def left_of(column: int) -> int:
        return GAP + column * (tile_width + GAP) + (column // group) * GROUP_GAP

    page = np.full((rows * (tile_height + band + GAP) + GAP, left_of(columns - 1) + tile_width + GAP, 3), 255,
                   np.uint8)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        top, left = GAP + row * (tile_height + band + GAP), left_of(column)
        page[top : top + tile_height, left : left + tile_width] = tile
    image = Image.fromarray(page)
    draw = ImageDraw.Draw(image)
    for index, lines in enumerate(wrapped):
        row, column = divmod(index, columns)
        top = GAP + row * (tile_height + band + GAP) + tile_height + 2
        left = left_of(column) + 2
        for number, line in enumerate(lines):
            draw.text((left, top + number * line_height), line, fill=(0, 0, 0), font=font)
    return image


def page_ranges(count: int, per_page: int = PROMPTS_PER_PAGE) -> list[range]:
    """Balanced pages of at most ``per_page`` prompts: 20 → [0..10), [10..20); 16 → one page."""
    pages = max(1, math.ceil(count / per_page))
    size = math.ceil(count / pages)
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def comparison_pages(prompts: list[str], images: torch.Tensor, rewards: torch.Tensor, *, samples_per_prompt: int,
                     label: str, base_images: torch.Tensor | None = None, base_rewards: torch.Tensor | None = None,
                     per_page: int = PROMPTS_PER_PAGE) -> list[Page]:
    """The pages of one evaluation of one prompt set.

    Args:
        prompts: the set's prompts; ``images`` holds ``samples_per_prompt`` images of each, prompt by prompt
            (as ``evaluation.sample_fixed`` returns them).
        images: [len(prompts) · samples_per_prompt, 3, H, W] in [0, 1]; ``rewards`` their rewards.
        label: what the current model is, under each of its images ("step 5").
        base_images, base_rewards: the base model's images of the same prompts on the same noise (as ``images``,
            or uint8 [N, H, W, 3] from ``to_uint8``), shown on the left of each row (None at the base evaluation
            itself: only ``images``, labelled ``label``).
    """
    columns = [(label, to_uint8(images), rewards.detach().float().cpu().tolist())]
    if base_images is not None:
        columns.insert(0, ("base", to_uint8(base_images), base_rewards.detach().float().cpu().tolist()))
    resized = [[resize_tile(image) for image in pixels] for _, pixels, _ in columns]
    pages = []
    for prompt_range in page_ranges(len(prompts), per_page):
        tiles, captions = [], []
        for p in prompt_range:
            for (name, _, values), column_tiles in zip(columns, resized):
                for i in range(p * samples_per_prompt, (p + 1) * samples_per_prompt):
                    tiles.append(column_tiles[i])
                    captions.append(f"{prompts[p]}\n{name}: reward {values[i]:.3f}")
        grid = captioned_grid(tiles, captions, columns=len(columns) * samples_per_prompt, group=samples_per_prompt)
        pages.append(Page(grid, captions))
    return pages
