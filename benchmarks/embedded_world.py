"""The embedded world's numbers: judge accuracy, the tiny model's alignment, diversity, FID and speed.

    python benchmarks/embedded_world.py [--samples-per-prompt 16] [--threads 1]

Measures and writes ``benchmarks/results/embedded_world.md``:

1. the judge's colour / shape accuracy on freshly generated held-out images (another seed than
   its training data), clean and degraded, and on reconstructions by the shipped VAE;
2. the tiny pipeline (20 DDIM steps, η = 1, the toolkit's sampler defaults) at guidance 1, 2, 3, 5
   on the training and the held-out prompts: judge joint (colour *and* shape) alignment rate, mean
   ``shape_alignment`` reward, per-prompt diversity and FID against dataset images of the same
   prompts, both in the judge's feature space (the dataset's own values are the reference row);
3. the tiny flow-matching model (``model=tiny_flow``: 10 Euler ODE steps, the pipeline's own sampler)
   at the same guidance scales, with the same columns;
4. speed: import, ``from_pretrained`` load, and a batch of 16 at 20 steps with guidance;
5. the size of the shipped weights.

``--only tiny_flow`` measures part 3 alone and puts it into the existing result file in place of
its previous version (the other parts stay as they were measured).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger("benchmarks.embedded_world")

GUIDANCE_SCALES = (1.0, 2.0, 3.0, 5.0)
FLOW_SECTION = "## Tiny flow model"


def model_rows(sample, name: str, prompts, n: int, judge, reward, space, g, *, dataset_row: bool) -> list[str]:
    """Table rows (alignment, reward, diversity, FID) of ``sample(prompts, guidance)`` at each guidance scale."""
    from rl4diffusion.metrics import frechet_distance, mean_pairwise_distance
    from rl4diffusion.zoo.judge import judge_accuracy
    from rl4diffusion.zoo.shapes import parse_prompt, sample_shapes

    flat = [p for p in prompts for _ in range(n)]
    groups = torch.arange(len(prompts)).repeat_interleave(n)
    labels = torch.tensor([parse_prompt(p) for p in flat])  # [N, 2]
    data_images = torch.cat([sample_shapes(n, g, prompts=[p]).images for p in prompts])  # same prompts and order
    data_images_2 = torch.cat([sample_shapes(n, g, prompts=[p]).images for p in prompts])
    data_feats = space(data_images)
    rows = []
    if dataset_row:
        with torch.no_grad():
            data_reward = float(reward(data_images, flat).mean())
        data = judge_accuracy(judge, data_images, labels[:, 0], labels[:, 1])
        rows.append(f"| {name} | dataset | {data['joint']:.3f} | {data_reward:.3f} | "
                    f"{mean_pairwise_distance(data_feats, groups):.4f} | "
                    f"{frechet_distance(data_feats, space(data_images_2)):.2f} |")
    for w in GUIDANCE_SCALES:
        t = time.perf_counter()
        images = sample(flat, w)
        feats = space(images)
        with torch.no_grad():
            r = float(reward(images, flat).mean())
        acc = judge_accuracy(judge, images, labels[:, 0], labels[:, 1])
        rows.append(f"| {name} | {w:g} | {acc['joint']:.3f} | {r:.3f} | {mean_pairwise_distance(feats, groups):.4f} | "
                    f"{frechet_distance(feats, data_feats):.2f} |")
        log.info("%s (%.0f s)", rows[-1], time.perf_counter() - t)
    return rows


def flow_section(args, judge, reward, space) -> list[str]:
    """Part 3: the tiny flow-matching model at each guidance scale (10 Euler ODE steps)."""
    from rl4diffusion.zoo.shapes import HELDOUT_PROMPTS, TRAIN_PROMPTS
    from rl4diffusion.zoo.tiny import (
        FLOW_DEFAULT_STEPS,
        FLOW_RECOMMENDED_GUIDANCE,
        load_tiny_flow_pipeline,
        sample_tiny_flow,
    )

    pipe = load_tiny_flow_pipeline()
    g = torch.Generator().manual_seed(args.seed + 1)  # the dataset reference images

    def sample(prompts, w):
        return sample_tiny_flow(pipe, prompts, guidance_scale=w, num_steps=FLOW_DEFAULT_STEPS, seed=args.seed)

    n = args.samples_per_prompt
    lines = [f"{FLOW_SECTION}: {FLOW_DEFAULT_STEPS} Euler (ODE) steps", "",
             f"`model=tiny_flow`, sampled by the pipeline's own __call__; {n} samples per prompt on fixed noise (seed "
             f"{args.seed}); columns as above (the dataset rows are there). Recommended default guidance: "
             f"**{FLOW_RECOMMENDED_GUIDANCE:g}**.", "",
             "| prompts | guidance | alignment | reward | diversity | FID |", "|---|---|---|---|---|---|"]
    for name, prompts in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
        lines += model_rows(sample, name, prompts, n, judge, reward, space, g, dataset_row=False)
    return [*lines, ""]


def replace_flow_section(text: str, section: list[str]) -> str:
    """``text`` (a result file) with its tiny-flow section replaced by ``section`` (or added before the speed part)."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith(FLOW_SECTION)]
    if starts:
        end = next((i for i in range(starts[0] + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        return "\n".join([*lines[: starts[0]], *section, *lines[end:]])
    speed = next((i for i, line in enumerate(lines) if line.startswith("## Speed")), len(lines))
    return "\n".join([*lines[:speed], *section, *lines[speed:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples-per-prompt", type=int, default=16, help="images per prompt and guidance scale")
    parser.add_argument("--seed", type=int, default=1234, help="noise seed of the samples (same for every guidance)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "embedded_world.md")
    parser.add_argument("--only", choices=["tiny_flow"], default=None,
                        help="measure only the tiny flow model and replace its section of the existing --out file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.only == "tiny_flow":
        from rl4diffusion.metrics import build_feature_space
        from rl4diffusion.rewards import build_reward
        from rl4diffusion.zoo.judge import load_judge

        section = flow_section(args, load_judge(), build_reward("shape_alignment"), build_feature_space("judge"))
        args.out.write_text(replace_flow_section(args.out.read_text(), section))
        print("\n".join(section))
        return

    t0 = time.perf_counter()
    from diffusers import StableDiffusionPipeline  # noqa: F401  (timed: the import is part of a cold start)

    import_s = time.perf_counter() - t0
    from rl4diffusion.metrics import build_feature_space
    from rl4diffusion.rewards import build_reward
    from rl4diffusion.zoo.judge import JUDGE_PATH, judge_accuracy, load_judge
    from rl4diffusion.zoo.shapes import HELDOUT_PROMPTS, TRAIN_PROMPTS, sample_shapes
    from rl4diffusion.zoo.tiny import (
        RECOMMENDED_GUIDANCE,
        TINY_FLOW_PATH,
        TINY_PATH,
        load_tiny_pipeline,
        sample_tiny,
    )
    from rl4diffusion.zoo.train_judge import augment

    lines = ["# The embedded world", "",
             f"`python benchmarks/embedded_world.py --samples-per-prompt {args.samples_per_prompt} "
             f"--threads {args.threads}` (CPU; torch threads = {args.threads}).", ""]

    # 1. the judge
    judge = load_judge()
    g = torch.Generator().manual_seed(args.seed)
    test = sample_shapes(4096, g)
    clean = judge_accuracy(judge, test.images, test.colour_idx, test.shape_idx)
    degraded = judge_accuracy(judge, augment(test.images, g), test.colour_idx, test.shape_idx)
    t_load = time.perf_counter()
    pipe = load_tiny_pipeline()
    load_s = time.perf_counter() - t_load
    vae_rows = []
    for name, prompts in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
        batch = sample_shapes(1024, g, prompts=prompts)
        with torch.no_grad():
            latents = pipe.vae.encode(batch.images * 2 - 1).latent_dist.mode()
            recon = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        acc = judge_accuracy(judge, recon, batch.colour_idx, batch.shape_idx)
        mse = float(torch.nn.functional.mse_loss(recon, batch.images))
        vae_rows.append(f"| VAE reconstructions, {name} prompts (1024) | {acc['colour']:.4f} | {acc['shape']:.4f} | "
                        f"{acc['joint']:.4f} | MSE {mse:.5f} |")
    lines += ["## Judge", "", "| images | colour | shape | joint | |", "|---|---|---|---|---|",
              f"| generated, held-out seed, all 24 prompts (4096) | {clean['colour']:.4f} | {clean['shape']:.4f} | "
              f"{clean['joint']:.4f} | clean |",
              f"| same, degraded (blur, noise, contrast) | {degraded['colour']:.4f} | {degraded['shape']:.4f} | "
              f"{degraded['joint']:.4f} | augmentations of training |", *vae_rows, ""]
    log.info("judge: clean %s, degraded %s", clean, degraded)

    # 2. the tiny model at several guidance scales
    reward = build_reward("shape_alignment")
    space = build_feature_space("judge")
    n = args.samples_per_prompt
    lines += ["## Tiny model: 20 DDIM steps, η = 1",
              "",
              f"{n} samples per prompt on fixed noise (seed {args.seed}); alignment = the judge names both the "
              "prompted colour and shape; reward = mean `shape_alignment`; diversity = mean pairwise cosine distance "
              "among one prompt's samples and FID against as many dataset images of the same prompts, both in "
              f"feature space `{space.name}`. Recommended default guidance: **{RECOMMENDED_GUIDANCE:g}**.",
              "",
              "| prompts | guidance | alignment | reward | diversity | FID |",
              "|---|---|---|---|---|---|"]

    def sample(prompts, w):
        return sample_tiny(pipe, prompts, guidance_scale=w, num_steps=20, eta=1.0, seed=args.seed)

    for name, prompts in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
        lines += model_rows(sample, name, prompts, n, judge, reward, space, g, dataset_row=True)
    lines.append("")
    lines += flow_section(args, judge, reward, space)

    # 4. speed: load and a batch of 16 at 20 steps with guidance (median of 5, after one warm-up)
    prompts16 = [TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)] for i in range(16)]
    sample_tiny(pipe, prompts16, guidance_scale=RECOMMENDED_GUIDANCE, seed=0)
    times = []
    for i in range(5):
        t = time.perf_counter()
        sample_tiny(pipe, prompts16, guidance_scale=RECOMMENDED_GUIDANCE, seed=i)
        times.append(time.perf_counter() - t)
    loads = []
    for _ in range(3):
        t = time.perf_counter()
        load_tiny_pipeline()
        loads.append(time.perf_counter() - t)
    sizes = {p.relative_to(JUDGE_PATH.parent): p.stat().st_size for p in JUDGE_PATH.parent.rglob("*") if p.is_file()}
    weight_mb = sum(s for p, s in sizes.items() if p.suffix == ".safetensors") / 1e6
    total_mb = sum(sizes.values()) / 1e6
    tiny_mb = sum(s for p, s in sizes.items() if TINY_PATH.name in p.parts) / 1e6
    flow_mb = sum(s for p, s in sizes.items() if TINY_FLOW_PATH.name in p.parts) / 1e6
    lines += ["## Speed and size", "", "| | |", "|---|---|",
              f"| `import diffusers` (cold start of this process) | {import_s:.2f} s |",
              f"| `load_tiny_pipeline()` first / median of 3 more | {load_s:.2f} s / {statistics.median(loads):.2f} s |",
              f"| 16 samples, 20 steps, guidance {RECOMMENDED_GUIDANCE:g} (median of 5) | "
              f"{statistics.median(times):.2f} s |",
              f"| shipped files: tiny pipeline / tiny flow pipeline / judge / all (safetensors only) | {tiny_mb:.2f} MB"
              f" / {flow_mb:.2f} MB / "
              f"{sizes[Path(JUDGE_PATH.name)] / 1e6:.2f} MB / {total_mb:.2f} MB ({weight_mb:.2f} MB of weights) |", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
