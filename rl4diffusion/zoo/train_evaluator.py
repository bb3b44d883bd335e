"""Train the held-out evaluator on the shapes world and write ``zoo/weights/evaluator.safetensors``.

    python -m rl4diffusion.zoo.train_evaluator                 # the shipped recipe (~4 min on one thread)
    python -m rl4diffusion.zoo.train_evaluator --steps 100 --out /tmp/evaluator.safetensors

Independent of the judge on purpose (``rl4diffusion.zoo.evaluator`` says why): another network, another
seed (1; the judge's is 0), other augmentations. The judge's augmentations imitate a generator's
softness — Gaussian blur, a bilinear down/up round trip, pixel noise; the evaluator's are geometric
and tonal instead — a random affine warp (shift, scale, rotation), horizontal flips, a 3×3 box blur or a
blocky nearest-neighbour round trip, a gamma curve, a pull towards grey and uniform pixel noise — all
without changing the hue, which is the label. Fresh images every step from all 24 colour–shape pairs,
AdamW with a one-cycle learning rate, cross-entropy on both heads. Seeded: the same seed and thread
count reproduce the file.

The script prints the held-out accuracy (clean images, and images degraded by either network's
augmentations) and the agreement with the judge, on images drawn with a seed neither trained on.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rl4diffusion.zoo.evaluator import EVALUATOR_PATH, Evaluator
from rl4diffusion.zoo.judge import judge_accuracy, judge_predictions, load_judge
from rl4diffusion.zoo.shapes import sample_shapes

log = logging.getLogger("rl4diffusion.zoo.train_evaluator")

HELDOUT_SEED = 20_000
"""Seed of the held-out test images; the judge trains on 0 and tests on 10 000, the evaluator trains on 1."""


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The evaluator's augmentations of a batch [N, 3, 32, 32] in [0, 1], hue kept (see the module docstring)."""
    n = images.shape[0]
    u = torch.rand(n, 9, generator=generator)

    def per_image(v: torch.Tensor) -> torch.Tensor:
        return v.view(n, 1, 1, 1)

    # 1. affine warp: shift ±3 px, scale ×[0.9, 1.1], rotation ±10°; "border" repeats the plain background
    angle = (u[:, 0] - 0.5) * (2 * math.pi / 18)
    scale = 0.9 + 0.2 * u[:, 1]
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (2 * 3 / 16)  # grid units: 16 px = 1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # [N, 2, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # [N, 32, 32, 2]
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # 2. mirror half of the images left–right (every shape is still the same shape)
    images = torch.where(per_image(u[:, 2] < 0.5), images.flip(-1), images)
    # 3. a 3×3 box blur for a third of the images, or a blocky 2× nearest-neighbour round trip for a sixth
    box = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blocky = F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode="nearest")
    images = torch.where(per_image(u[:, 3] > 5 / 6), blocky, images)
    images = torch.where(per_image(u[:, 3] < 1 / 3), box, images)
    # 4. gamma ×[0.8, 1.25] and up to 20 % towards each pixel's grey (less saturated, same hue)
    gamma = per_image(torch.exp((u[:, 4] - 0.5) * 2 * math.log(1.25)))
    images = images.clamp_min(1e-4) ** gamma
    grey = images.mean(dim=1, keepdim=True)
    images = images + per_image(0.2 * u[:, 5]) * (grey - images)
    # 5. uniform pixel noise of half-width up to 0.12
    noise = (torch.rand(images.shape, generator=generator) * 2 - 1) * per_image(0.12 * u[:, 6])
    return (images + noise).clamp(0.0, 1.0)


def train_evaluator(*, steps: int, batch_size: int, lr: float, seed: int) -> Evaluator:
    """Train an Evaluator from scratch on freshly drawn, augmented shapes (seeded)."""
    torch.manual_seed(seed)  # the initial weights
    data_gen = torch.Generator().manual_seed(seed)
    evaluator = Evaluator()
    optimizer = torch.optim.AdamW(evaluator.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    n_params = sum(p.numel() for p in evaluator.parameters())
    log.info("evaluator: %.3f M parameters; %d steps of batch %d", n_params / 1e6, steps, batch_size)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        images, colour, shape, _ = sample_shapes(batch_size, data_gen)
        colour_logits, shape_logits = evaluator(augment(images, data_gen))
        loss = F.cross_entropy(colour_logits, colour) + F.cross_entropy(shape_logits, shape)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            log.info("step %d/%d  loss %.4f  (%.0f s)", step, steps, loss.item(), time.perf_counter() - start)
    return evaluator.eval()


def held_out_report(evaluator: Evaluator, *, n: int = 4096, seed: int = HELDOUT_SEED) -> dict:
    """Accuracy on ``n`` fresh images of another seed — clean, under the evaluator's augmentations and under the
    judge's — and the fraction of clean and judge-degraded images on which evaluator and judge name the same
    colour and shape."""
    from rl4diffusion.zoo.train_judge import augment as judge_augment

    g = torch.Generator().manual_seed(seed)
    images, colour, shape, _ = sample_shapes(n, g)
    degraded = judge_augment(images, g)
    report = {
        "clean": judge_accuracy(evaluator, images, colour, shape),
        "augmented": judge_accuracy(evaluator, augment(images, g), colour, shape),
        "judge_augmented": judge_accuracy(evaluator, degraded, colour, shape),
    }
    judge = load_judge()
    for kind, batch in (("clean", images), ("judge_augmented", degraded)):
        ours, theirs = judge_predictions(evaluator, batch), judge_predictions(judge, batch)
        same = (ours[0] == theirs[0]) & (ours[1] == theirs[1])
        report[f"agreement_{kind}"] = float(same.float().mean())
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the held-out evaluator (a second colour + shape net).")
    parser.add_argument("--steps", type=int, default=600, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (one-cycle schedule)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the weights and the data (the judge's: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is fastest on a busy machine and fixes the float summation order")
    parser.add_argument("--out", type=Path, default=EVALUATOR_PATH, help="where to write the safetensors file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    evaluator = train_evaluator(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    report = held_out_report(evaluator)
    for kind in ("clean", "augmented", "judge_augmented"):
        acc = report[kind]
        log.info("held-out %s images: colour %.4f  shape %.4f  joint %.4f", kind, acc["colour"], acc["shape"],
                 acc["joint"])
    log.info("agreement with the judge (same colour and shape): %.4f clean, %.4f judge-augmented",
             report["agreement_clean"], report["agreement_judge_augmented"])
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in evaluator.state_dict().items()}, str(args.out))
    args.out.chmod(0o644)  # safetensors writes 0600; an installed package must be readable by every user
    size_mb = args.out.stat().st_size / 1e6
    log.info("wrote %s (%.2f MB) after %.0f s", args.out, size_mb, time.perf_counter() - start)


if __name__ == "__main__":
    main()
