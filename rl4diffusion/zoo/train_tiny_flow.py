"""Train the embedded world's tiny flow-matching model (a StableDiffusion3Pipeline) and write ``zoo/weights/tiny_flow``.

    python -m rl4diffusion.zoo.train_tiny_flow                                  # the shipped files
    python -m rl4diffusion.zoo.train_tiny_flow --snapshot-every 500 --eval-every 1000

SD3's classes at toy sizes (``rl4diffusion.zoo.tiny``), built on the shipped tiny model
(``zoo/weights/tiny``, which ``python -m rl4diffusion.zoo.train_tiny`` makes first):

==================  =====================================================================
component           what it is
==================  =====================================================================
vae                 the tiny model's trained ``AutoencoderKL`` (8×8×4 latents), with SD3's
                    ``shift_factor`` and ``scaling_factor`` measured here: the pipeline
                    decodes z / scaling_factor + shift_factor
text_encoder(_2)    two frozen ``CLIPTextModelWithProjection`` (hidden 64, 2 layers): the first
                    carries the tiny model's random text encoder, the second is a fresh random
                    one; SD3 reads their penultimate hidden states and their pooled projections
tokenizer(_2)       the tiny model's ``CLIPTokenizer`` (every world word one token)
text_encoder_3      none: the pipeline then feeds ``max_sequence_length`` zero "T5" tokens
                    (``tiny.FLOW_T5_LENGTH`` = 1), as SD3 loaded without T5 does
transformer         ``SD3Transformer2DModel``, patch 1, 4 joint blocks of width 96 (~1.3 M
                    parameters), velocity prediction, EMA weights
scheduler           ``FlowMatchEulerDiscreteScheduler`` (shift 1)
==================  =====================================================================

Training (seeded; the same seed and thread count reproduce the files): the rectified-flow loss of
SD3 (Esser et al. 2024, eq. 1–3 with the "rf" forward process x_t = (1 − t)·x₀ + t·ε)

    L = E ‖(ε − x₀) − v_θ(x_t, t, c)‖²,   t ~ logit-normal(0, 1)   (SD3's "rf/lognorm(0.00, 1.00)", §3.1)

on pre-encoded latents of a pool of training-prompt images (a fresh posterior sample z ~ q(z | x)
every time an image is drawn, then x₀ = (z − shift)·scale); the transformer sees the timestep
1000·t, as the pipeline passes it. The caption is replaced by the empty prompt 10 % of the time so
that one network gives both terms of classifier-free guidance (Ho & Salimans 2022); AdamW with a
constant learning rate after a short warm-up (so a snapshot at step k equals a run stopped at k);
EMA of the weights (decay 0.995), and the EMA weights are what is saved.

The held-out prompts (``shapes.HELDOUT_PROMPTS``) are never drawn. The number of steps is chosen
to leave the model imperfect, so that fine-tuning has room (``tiny.FLOW_RECOMMENDED_GUIDANCE``,
``benchmarks/results/embedded_world.md``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rl4diffusion.zoo import tiny
from rl4diffusion.zoo.shapes import HELDOUT_PROMPTS, TRAIN_PROMPTS
from rl4diffusion.zoo.train_tiny import _load_judge_or_none, encode_pool

log = logging.getLogger("rl4diffusion.zoo.train_tiny_flow")


def load_parts(seed: int):
    """The frozen parts: the tiny model's VAE and tokenizer, and the two projection text encoders."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (tiny.TINY_PATH / "model_index.json").is_file():
        raise SystemExit(f"the tiny model is missing ({tiny.TINY_PATH}): run `python -m rl4diffusion.zoo.train_tiny`")
    # fresh modules with the trained weights (from_pretrained would record the source directory in their configs)
    trained_vae = AutoencoderKL.from_pretrained(str(tiny.TINY_PATH / "vae"))
    vae = tiny.build_vae()
    vae.load_state_dict(trained_vae.state_dict())
    vae.eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny.TINY_PATH / "tokenizer"))
    tiny_encoder = CLIPTextModel.from_pretrained(str(tiny.TINY_PATH / "text_encoder"))
    text_encoder = tiny.build_projection_text_encoder(len(tokenizer), seed=seed, weights_from=tiny_encoder)
    text_encoder_2 = tiny.build_projection_text_encoder(len(tokenizer), seed=seed + 1)
    return vae, tokenizer, text_encoder, text_encoder_2


def alignment_rates(pipe, judge, *, guidance_scales, num_steps: int, samples_per_prompt: int, seed: int) -> dict:
    """Judge joint accuracy of pipeline samples (Euler ODE) per prompt set and guidance scale."""
    from rl4diffusion.zoo.judge import judge_accuracy
    from rl4diffusion.zoo.shapes import parse_prompt

    rates = {}
    for name, prompts in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
        flat = [p for p in prompts for _ in range(samples_per_prompt)]
        labels = torch.tensor([parse_prompt(p) for p in flat])  # [N, 2]
        for w in guidance_scales:
            images = tiny.sample_tiny_flow(pipe, flat, guidance_scale=w, num_steps=num_steps, seed=seed)
            rates[f"{name}@{w:g}"] = judge_accuracy(judge, images, labels[:, 0], labels[:, 1])["joint"]
    return rates


def save_pipeline(pipe, out: Path) -> None:
    """``save_pretrained`` with safetensors, plus vocab.json/merges.txt and readable permissions (as train_tiny).

    save_pretrained leaves the absent T5 out of model_index.json, and a plain
    ``StableDiffusion3Pipeline.from_pretrained`` then refuses the directory for missing components: they
    are written as ``[null, null]``, diffusers' entry for a component that is deliberately None.
    """
    import json
    import shutil

    pipe.save_pretrained(str(out), safe_serialization=True)
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update({name: [None, None] for name in ("text_encoder_3", "tokenizer_3") if name not in index})
    index_file.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    for folder in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tiny.TINY_PATH / "tokenizer" / name, out / folder / name)
    for path in out.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def train(args) -> None:
    vae, tokenizer, text_encoder, text_encoder_2 = load_parts(args.seed)
    torch.manual_seed(args.seed + 10)  # the transformer's initial weights
    transformer = tiny.build_flow_transformer()
    ema = copy.deepcopy(transformer).requires_grad_(False)
    pipe = tiny.assemble_flow_pipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                       tokenizer=tokenizer, transformer=ema, scheduler=tiny.build_flow_scheduler())
    judge = _load_judge_or_none() if args.eval_every else None

    # 1. conditioning and data, computed once: the text encoders and the VAE are frozen
    with torch.no_grad():
        cond, _, cond_pooled, _ = pipe.encode_prompt(list(TRAIN_PROMPTS), None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=tiny.FLOW_T5_LENGTH)  # [20, L, 128], [20, 128]
        uncond, _, uncond_pooled, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False,
                                                         max_sequence_length=tiny.FLOW_T5_LENGTH)
    data_gen = torch.Generator().manual_seed(args.seed + 11)
    start = time.perf_counter()
    pool_mean, pool_std, pool_ids = encode_pool(vae, args.pool_size, data_gen)
    # SD3's latent normalisation x₀ = (z − shift)·scale, measured on posterior samples of the pool
    with torch.no_grad():
        z = pool_mean + pool_std * torch.randn(pool_mean.shape, generator=data_gen)
        shift_factor = float(z.mean())
        scaling_factor = float(1.0 / (z - shift_factor).std())
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    log.info("encoded a pool of %d training images in %.0f s; latent shift_factor %.4f, scaling_factor %.4f",
             args.pool_size, time.perf_counter() - start, shift_factor, scaling_factor)

    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=1e-2)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    log.info("transformer: %.3f M parameters; %d steps of batch %d; EMA %.3f; caption dropout %.2f",
             sum(p.numel() for p in transformer.parameters()) / 1e6, args.steps, args.batch_size, args.ema_decay,
             args.caption_dropout)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        # 2. a batch: a posterior sample of pooled images, its caption (or the empty one), noise and t
        idx = torch.randint(args.pool_size, (args.batch_size,), generator=data_gen)
        z0 = pool_mean[idx] + pool_std[idx] * torch.randn(pool_mean[idx].shape, generator=data_gen)
        x0 = (z0 - shift_factor) * scaling_factor  # the pipeline decodes x / scaling_factor + shift_factor
        drop = torch.rand(args.batch_size, generator=data_gen) < args.caption_dropout
        text = torch.where(drop[:, None, None], uncond, cond[pool_ids[idx]])  # [B, L, 128]
        pooled = torch.where(drop[:, None], uncond_pooled, cond_pooled[pool_ids[idx]])  # [B, 128]
        t = torch.sigmoid(torch.randn(args.batch_size, generator=data_gen))  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=data_gen)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps  # the rectified-flow path

        # 3. the rectified-flow loss: the velocity ε − x₀ of the straight path
        v = transformer(hidden_states=x_t, encoder_hidden_states=text, pooled_projections=pooled,
                        timestep=1000 * t).sample
        loss = F.mse_loss(v, eps - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # EMA: θ̄ ← d·θ̄ + (1 − d)·θ
            for p_ema, p in zip(ema.parameters(), transformer.parameters()):
                p_ema.lerp_(p, 1.0 - args.ema_decay)

        if step % 50 == 0 or step == args.steps:
            log.info("step %d/%d  loss %.4f  (%.0f s)", step, args.steps, loss.item(), time.perf_counter() - start)
        snapshot = args.snapshot_every and step % args.snapshot_every == 0
        evaluate = args.eval_every and judge is not None and step % args.eval_every == 0
        if snapshot or evaluate or step == args.steps:
            pipe = tiny.assemble_flow_pipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                transformer=copy.deepcopy(ema), scheduler=tiny.build_flow_scheduler())
            if snapshot:
                save_pipeline(pipe, args.workdir / "snapshots" / f"step_{step:05d}")
            if evaluate:
                t0 = time.perf_counter()
                rates = alignment_rates(pipe, judge, guidance_scales=(1.0, 2.0, 3.0, 5.0),
                                        num_steps=tiny.FLOW_DEFAULT_STEPS, samples_per_prompt=4, seed=1234)
                log.info("step %d  joint alignment %s  (eval %.0f s)", step,
                         "  ".join(f"{k} {v:.3f}" for k, v in rates.items()), time.perf_counter() - t0)
            if step == args.steps:
                save_pipeline(pipe, args.out)
                log.info("wrote the pipeline to %s (%.0f s of training)", args.out, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded tiny flow-matching StableDiffusion3Pipeline.")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is fastest on a busy machine and fixes the float summation order")
    parser.add_argument("--workdir", type=Path, default=Path("runs/zoo_tiny_flow"), help="snapshots go here")
    parser.add_argument("--out", type=Path, default=tiny.TINY_FLOW_PATH, help="where the final pipeline is saved")
    parser.add_argument("--steps", type=int, default=1500,
                        help="optimisation steps; the shipped model stops early on purpose (room for RL)")
    parser.add_argument("--batch-size", type=int, default=64, help="latents per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (constant after warm-up)")
    parser.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the saved weights")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="probability of the empty caption (CFG)")
    parser.add_argument("--pool-size", type=int, default=16384, help="training images pre-encoded to latents")
    parser.add_argument("--snapshot-every", type=int, default=0, help="save a pipeline every N steps (0 = off)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="log judge alignment at guidance 1/2/3/5 every N steps (0 = off)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train(args)
    log.info("done in %.1f min", (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
