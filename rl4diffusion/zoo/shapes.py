"""The shapes world: seeded procedural 32×32 RGB images of one coloured shape, with captions.

Every image shows one shape (circle, square, triangle or star) in one of six colours on a
plain greyish background, at a random size, position and small rotation; its caption is
"a <colour> <shape>", e.g. "a red circle". Images are drawn at 2× (64×64) as hard masks and
averaged down 2×2, so edges are anti-aliased (2×2 supersampling).

Everything is vectorised torch on the generator's device: a batch of 128 takes a few tens of
milliseconds on a CPU core, so training scripts draw fresh images instead of storing a dataset.

**The split** (DDPO measured generalisation on animals unseen in training; this is the same
idea for colour–shape pairs). Four pairs are held out of every generator training set:

    HELDOUT_PROMPTS = ["a red star", "a green triangle", "a blue square", "a yellow circle"]

Every colour and every shape still appears in training, in other pairs, so a model can in
principle compose them; the held-out pairs measure whether it does. ``TRAIN_PROMPTS`` holds the
other 20 pairs. The judge (``rl4diffusion.zoo.judge``) is trained on all 24 pairs, because it
has to score held-out prompts too.

Example::

    g = torch.Generator().manual_seed(0)
    batch = sample_shapes(8, g, prompts=prompt_set("train"))
    batch.images.shape   # torch.Size([8, 3, 32, 32]), values in [0, 1]
    batch.captions[0]    # e.g. 'a purple square'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
"""Side of the images in pixels."""
_SUPERSAMPLE = 2
"""Images are drawn at IMAGE_SIZE · _SUPERSAMPLE and averaged down for smooth edges."""

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Nominal RGB of each colour in [0, 1]; each image jitters it by up to ±_COLOUR_JITTER per channel.
# Saturated on purpose: the background is always a low-saturation grey, so it never matches.
_RGB = torch.tensor(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.75, 0.20],  # green
        [0.15, 0.30, 0.95],  # blue
        [0.95, 0.88, 0.10],  # yellow
        [0.58, 0.15, 0.80],  # purple
        [1.00, 0.55, 0.05],  # orange
    ]
)
_COLOUR_JITTER = 0.05

ALL_PROMPTS: tuple[str, ...] = tuple(f"a {c} {s}" for c in COLOURS for s in SHAPES)
"""All 24 captions, colour-major: index = colour_idx · len(SHAPES) + shape_idx."""

HELDOUT_PROMPTS: tuple[str, ...] = ("a red star", "a green triangle", "a blue square", "a yellow circle")
"""Colour–shape pairs never shown to the generator in training (a diagonal: one per shape,
distinct colours, so each colour and each shape keeps at least three training pairs)."""

TRAIN_PROMPTS: tuple[str, ...] = tuple(p for p in ALL_PROMPTS if p not in HELDOUT_PROMPTS)
"""The 20 captions the tiny generator is trained on."""

_PROMPT_INDEX = {p: (i // len(SHAPES), i % len(SHAPES)) for i, p in enumerate(ALL_PROMPTS)}


class ShapesBatch(NamedTuple):
    """A batch of the shapes world (a tuple: ``images, colour_idx, shape_idx, captions = batch``)."""

    images: torch.Tensor
    """[N, 3, 32, 32] float in [0, 1]."""
    colour_idx: torch.Tensor
    """[N] int64, index into COLOURS."""
    shape_idx: torch.Tensor
    """[N] int64, index into SHAPES."""
    captions: list[str]
    """N captions "a <colour> <shape>"."""


def prompt_set(name: Literal["train", "heldout", "all"]) -> list[str]:
    """The prompts of a split: ``train`` (20), ``heldout`` (4) or ``all`` (24)."""
    sets = {"train": TRAIN_PROMPTS, "heldout": HELDOUT_PROMPTS, "all": ALL_PROMPTS}
    if name not in sets:
        raise ValueError(f"unknown shapes prompt set {name!r}; choose one of {sorted(sets)}")
    return list(sets[name])


def parse_prompt(prompt: str) -> tuple[int, int]:
    """(colour_idx, shape_idx) of a caption of the shapes world, e.g. "a red circle" → (0, 0).

    Case and surrounding/repeated whitespace are ignored. Raises ValueError for anything else,
    because the judge cannot score a prompt outside its world.
    """
    key = " ".join(str(prompt).lower().split())
    if key not in _PROMPT_INDEX:
        raise ValueError(
            f"prompt {prompt!r} is not in the shapes world: prompts look like 'a <colour> <shape>' with colour in "
            f"{', '.join(COLOURS)} and shape in {', '.join(SHAPES)} (e.g. 'a red circle'). The embedded rewards "
            "and the judge only score these; use another reward for other prompts."
        )
    return _PROMPT_INDEX[key]


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def _star_mask(x: torch.Tensor, y: torch.Tensor, outer: float, inner: float) -> torch.Tensor:
    """Inside test of a regular five-pointed star with one tip pointing up (+y), any shape."""
    # fold the angle into one half-sector: phi in [0, π/5], 0 = a tip, π/5 = an inner corner
    sector = 2 * math.pi / 5
    theta = torch.atan2(x, y)  # 0 along +y, so a tip points up
    phi = torch.remainder(theta + sector / 2, sector) - sector / 2
    phi = phi.abs()
    r = torch.sqrt(x * x + y * y)
    px, py = r * torch.cos(phi), r * torch.sin(phi)  # the point in the folded frame
    # edge from the tip A = (outer, 0) to the inner corner B = (inner cos π/5, inner sin π/5);
    # inside ⇔ the point is on the origin's side of line AB (sign of the 2-D cross product)
    bx, by = inner * math.cos(sector / 2) - outer, inner * math.sin(sector / 2)
    cross_point = bx * py - by * (px - outer)
    cross_origin = bx * 0.0 - by * (0.0 - outer)
    return cross_point * cross_origin >= 0


def render_shapes(colour_idx: torch.Tensor, shape_idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one image per (colour, shape) label; size, position, rotation, background are random.

    Args:
        colour_idx: [N] int, index into COLOURS.
        shape_idx: [N] int, index into SHAPES.
        generator: the torch.Generator every random draw comes from (its device is used).

    Returns:
        images [N, 3, 32, 32] float32 in [0, 1].
    """
    device = generator.device
    colour_idx = colour_idx.to(device=device, dtype=torch.long)
    shape_idx = shape_idx.to(device=device, dtype=torch.long)
    n = colour_idx.shape[0]
    big = IMAGE_SIZE * _SUPERSAMPLE

    # 1. per-image random factors (in units of the 32-pixel image)
    radius = _uniform(n, 6.5, 12.0, generator)  # circumradius of the shape
    margin = radius * 1.1 + 1.0  # keeps rotated corners and star tips inside the frame
    cx = margin + (IMAGE_SIZE - 2 * margin) * torch.rand(n, generator=generator, device=device)
    cy = margin + (IMAGE_SIZE - 2 * margin) * torch.rand(n, generator=generator, device=device)
    angle = _uniform(n, -math.pi / 9, math.pi / 9, generator)  # ±20°: a square stays a square
    fg = _RGB.to(device)[colour_idx] + _uniform(n * 3, -_COLOUR_JITTER, _COLOUR_JITTER, generator).view(n, 3)
    # background: a dark or a light grey with a faint tint — never saturated, so never a shape colour
    light = torch.rand(n, generator=generator, device=device) < 0.5
    level = torch.where(light, _uniform(n, 0.70, 0.95, generator), _uniform(n, 0.05, 0.30, generator))
    bg = level[:, None] + _uniform(n * 3, -0.04, 0.04, generator).view(n, 3)

    # 2. pixel centres of the 2× canvas in 32-pixel units, relative to each shape's centre,
    #    rotated by -angle and divided by the radius: the shape tests below work on a unit shape
    coords = (torch.arange(big, device=device, dtype=torch.float32) + 0.5) / _SUPERSAMPLE  # [big]
    dx = (coords[None, None, :] - cx[:, None, None]) / radius[:, None, None]  # [N, 1, big]
    dy = (cy[:, None, None] - coords[None, :, None]) / radius[:, None, None]  # [N, big, 1]; +y points up
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    x = cos * dx + sin * dy  # [N, big, big]
    y = -sin * dx + cos * dy

    # 3. inside tests of every shape (cheap at this size), then pick each image's own
    circle = x * x + y * y <= 0.85**2  # slightly smaller than the circumcircle: similar area to the others
    square = torch.maximum(x.abs(), y.abs()) <= 0.72
    # equilateral triangle with circumradius 1, a vertex up: inside the three edges' half-planes,
    # whose outward normals point down, lower-right and lower-left; the centroid is shifted down
    # 0.15 so that the triangle's box is centred like the others
    ty = y + 0.15
    triangle = (
        (-ty <= 0.5)
        & (math.cos(math.pi / 6) * x + math.sin(math.pi / 6) * ty <= 0.5)
        & (-math.cos(math.pi / 6) * x + math.sin(math.pi / 6) * ty <= 0.5)
    )
    star = _star_mask(x, y, outer=1.05, inner=0.45)
    masks = torch.stack([circle, square, triangle, star], dim=1).float()  # [N, 4, big, big]
    mask = masks.gather(1, shape_idx.view(n, 1, 1, 1).expand(n, 1, big, big))  # [N, 1, big, big]

    # 4. composite at 2× and average 2×2 blocks down to 32×32 (anti-aliased edges)
    canvas = bg[:, :, None, None] * (1 - mask) + fg[:, :, None, None] * mask  # [N, 3, big, big]
    images = F.avg_pool2d(canvas, _SUPERSAMPLE)  # [N, 3, 32, 32]
    return images.clamp(0.0, 1.0)


def sample_shapes(n: int, generator: torch.Generator, prompts: Sequence[str] | None = None) -> ShapesBatch:
    """Draw ``n`` labelled images of the shapes world.

    Args:
        n: number of images.
        generator: a seeded torch.Generator; the same seed gives the same batch (on one device).
        prompts: the captions to draw from, uniformly and independently per image. ``None``
            means all 24 pairs (the whole world, as the judge needs). Pass ``prompt_set("train")``
            when training a generator, so that held-out pairs stay unseen.

    Returns:
        ShapesBatch(images [n,3,32,32] in [0,1], colour_idx [n], shape_idx [n], captions).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = list(ALL_PROMPTS if prompts is None else prompts)
    if not pool:
        raise ValueError("prompts is empty: pass None (the whole world) or a non-empty list such as prompt_set('train')")
    labels = torch.tensor([parse_prompt(p) for p in pool], dtype=torch.long, device=generator.device)  # [P, 2]
    pick = torch.randint(len(pool), (n,), generator=generator, device=generator.device)
    colour_idx, shape_idx = labels[pick, 0], labels[pick, 1]
    images = render_shapes(colour_idx, shape_idx, generator)
    captions = [ALL_PROMPTS[int(c) * len(SHAPES) + int(s)] for c, s in zip(colour_idx.tolist(), shape_idx.tolist())]
    return ShapesBatch(images, colour_idx, shape_idx, captions)
