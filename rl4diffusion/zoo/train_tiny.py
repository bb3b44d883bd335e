"""Train the embedded world's tiny StableDiffusionPipeline and write ``zoo/weights/tiny``.

    python -m rl4diffusion.zoo.train_tiny                       # judge → vae → unet: the shipped files
    python -m rl4diffusion.zoo.train_tiny --stage judge         # = python -m rl4diffusion.zoo.train_judge
    python -m rl4diffusion.zoo.train_tiny --stage vae           # VAE → <workdir>/vae
    python -m rl4diffusion.zoo.train_tiny --stage unet --snapshot-every 250 --eval-every 250

Stages (each seeded; the same seed and thread count reproduce the files):

1. **judge** — the colour/shape CNN (``train_judge``); the later stages use it only to log quality.
2. **vae** — ``AutoencoderKL`` on images of the training prompts: MSE + 1e-6·KL (the KL keeps
   the latent space smooth without blurring, as in LDM's "KL-reg" autoencoders, Rombach et al.
   2022 §3), cosine learning rate. Then the latent scale is measured, scaling_factor = 1 / std(z)
   over posterior samples (LDM §4.3.2 / SD's 0.18215), and written into the VAE config so the
   pipeline scales latents itself.
3. **unet** — ``UNet2DConditionModel`` on pre-encoded latents of a pool of training-prompt images
   (a fresh posterior sample z ~ q(z | x) every time an image is drawn): the ε-prediction loss
   ‖ε − ε_θ(√ᾱ_t z + √(1−ᾱ_t) ε, t, c)‖² of DDPM (Ho et al. 2020, eq. 14) with t ~ U{0..999};
   the caption is replaced by the empty prompt 10 % of the time so that one network gives both
   terms of classifier-free guidance (Ho & Salimans 2022); AdamW with a constant learning rate
   after a short warm-up (so a snapshot at step k equals a run stopped at k); EMA of the weights
   (decay 0.995), and the EMA weights are what is saved. Finally the pipeline (frozen random text
   encoder, tokenizer, VAE, EMA UNet, DDIM scheduler) is written with ``save_pretrained``.

The held-out prompts (``shapes.HELDOUT_PROMPTS``) are never drawn by the VAE or UNet stages.
The number of UNet steps is chosen to leave the model imperfect (see ``tiny.RECOMMENDED_GUIDANCE``);
``--snapshot-every`` writes loadable pipelines on the way, ``--eval-every`` logs their judge
accuracy at several guidance scales.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rl4diffusion.zoo import tiny
from rl4diffusion.zoo.shapes import HELDOUT_PROMPTS, TRAIN_PROMPTS, sample_shapes

log = logging.getLogger("rl4diffusion.zoo.train_tiny")


def _load_judge_or_none():
    from rl4diffusion.zoo.judge import JUDGE_PATH, load_judge

    return load_judge() if JUDGE_PATH.is_file() else None


# --------------------------------------------------------------------------------------------
# stage 2: the VAE
# --------------------------------------------------------------------------------------------
def train_vae(args) -> None:
    from rl4diffusion.zoo.judge import judge_accuracy

    torch.manual_seed(args.seed)  # initial weights
    gen = torch.Generator().manual_seed(args.seed + 1)  # data and posterior noise
    vae = tiny.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    warmup = 100

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.vae_steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    log.info("vae: %.3f M parameters; %d steps of batch %d", sum(p.numel() for p in vae.parameters()) / 1e6,
             args.vae_steps, args.vae_batch_size)
    start = time.perf_counter()
    for step in range(1, args.vae_steps + 1):
        images = sample_shapes(args.vae_batch_size, gen, prompts=TRAIN_PROMPTS).images * 2 - 1  # VAE space [-1, 1]
        posterior = vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)  # reparameterised
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, images)
        kl = posterior.kl().mean()  # KL(q(z|x) ‖ N(0, I)) summed over latent elements, mean over the batch
        loss = mse + args.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.vae_steps:
            log.info("vae step %d/%d  mse[0,1] %.5f  kl %.1f  (%.0f s)", step, args.vae_steps, mse.item() / 4,
                     kl.item(), time.perf_counter() - start)
    vae.eval().requires_grad_(False)

    # the latent scale, measured on posterior samples of 4096 training images
    stats_gen = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        samples = []
        for _ in range(8):
            images = sample_shapes(512, stats_gen, prompts=TRAIN_PROMPTS).images * 2 - 1
            posterior = vae.encode(images).latent_dist
            samples.append(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=stats_gen))
        scaling_factor = float(1.0 / torch.cat(samples).std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log.info("vae scaling_factor = %.4f (1 / std of posterior samples)", scaling_factor)

    # reconstruction quality on fresh training-prompt images and on held-out pairs
    judge = _load_judge_or_none()
    for name, prompts in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
        batch = sample_shapes(1024, torch.Generator().manual_seed(args.seed + 3), prompts=prompts)
        with torch.no_grad():
            recon = (vae.decode(vae.encode(batch.images * 2 - 1).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1)
        message = f"vae reconstructions ({name} prompts): mse[0,1] {F.mse_loss(recon, batch.images).item():.5f}"
        if judge is not None:
            acc = judge_accuracy(judge, recon, batch.colour_idx, batch.shape_idx)
            message += f"  judge colour {acc['colour']:.4f} shape {acc['shape']:.4f} joint {acc['joint']:.4f}"
        log.info(message)
    vae.save_pretrained(str(args.workdir / "vae"))
    log.info("wrote %s after %.0f s", args.workdir / "vae", time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# stage 3: the UNet
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_pool(vae, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean and std [n, 4, 8, 8] and prompt index [n] (into TRAIN_PROMPTS) of n fresh images."""
    index = {p: i for i, p in enumerate(TRAIN_PROMPTS)}
    means, stds, ids = [], [], []
    for start in range(0, n, 512):
        batch = sample_shapes(min(512, n - start), gen, prompts=TRAIN_PROMPTS)
        posterior = vae.encode(batch.images * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        ids.append(torch.tensor([index[c] for c in batch.captions]))
    return torch.cat(means), torch.cat(stds), torch.cat(ids)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompt embeddings [P, L, D] exactly as StableDiffusionPipeline computes them (last hidden state)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return text_encoder(tokens.input_ids)[0]


def alignment_rates(pipe, judge, *, guidance_scales, samples_per_prompt: int, seed: int) -> dict:
    """Judge joint accuracy of pipeline samples (20 steps, η = 1) per prompt set and guidance scale."""
    from rl4diffusion.zoo.judge import judge_accuracy
    from rl4diffusion.zoo.shapes import parse_prompt

    rates = {}
    for name, prompts in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
        flat = [p for p in prompts for _ in range(samples_per_prompt)]
        labels = torch.tensor([parse_prompt(p) for p in flat])  # [N, 2]
        for w in guidance_scales:
            images = tiny.sample_tiny(pipe, flat, guidance_scale=w, seed=seed)
            rates[f"{name}@{w:g}"] = judge_accuracy(judge, images, labels[:, 0], labels[:, 1])["joint"]
    return rates


def save_pipeline(pipe, out: Path, tokenizer_dir: Path) -> None:
    """``save_pretrained`` with safetensors, plus the tokenizer's vocab.json/merges.txt and readable permissions.

    Recent transformers save a tokenizer as tokenizer.json only; older ones (4.x) load a
    CLIPTokenizer from vocab.json + merges.txt, so both are shipped. safetensors writes its files
    with mode 0600, which an installed package shared by several users could not read: 0644.
    """
    import shutil

    pipe.save_pretrained(str(out), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir / name, out / "tokenizer" / name)
    for path in out.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def train_unet(args) -> None:
    from diffusers import AutoencoderKL

    vae_dir = args.workdir / "vae"
    if not (vae_dir / "config.json").is_file():
        raise SystemExit(f"no trained VAE in {vae_dir}: run `python -m rl4diffusion.zoo.train_tiny --stage vae` first")
    # a fresh VAE with the trained weights (from_pretrained would record the work directory in its config)
    trained = AutoencoderKL.from_pretrained(str(vae_dir))
    vae = tiny.build_vae()
    vae.load_state_dict(trained.state_dict())
    scaling_factor = trained.config.scaling_factor
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.eval().requires_grad_(False)
    tokenizer = tiny.build_tokenizer(args.workdir / "tokenizer")
    text_encoder = tiny.build_text_encoder(len(tokenizer), seed=args.seed)
    scheduler = tiny.build_scheduler()
    torch.manual_seed(args.seed + 10)  # the UNet's initial weights
    unet = tiny.build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    judge = _load_judge_or_none() if args.eval_every else None

    # 1. conditioning and data, computed once: the text encoder and the VAE are frozen
    cond = encode_text(tokenizer, text_encoder, list(TRAIN_PROMPTS))  # [20, L, 64]
    uncond = encode_text(tokenizer, text_encoder, [""])  # [1, L, 64]: the pipeline's default negative prompt
    data_gen = torch.Generator().manual_seed(args.seed + 11)
    start = time.perf_counter()
    pool_mean, pool_std, pool_ids = encode_pool(vae, args.pool_size, data_gen)
    log.info("unet: encoded a pool of %d training images to latents in %.0f s", args.pool_size, time.perf_counter() - start)
    alphas_cumprod = scheduler.alphas_cumprod  # ᾱ_t, [1000]

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    log.info("unet: %.3f M parameters; %d steps of batch %d; EMA %.3f; caption dropout %.2f",
             sum(p.numel() for p in unet.parameters()) / 1e6, args.unet_steps, args.batch_size, args.ema_decay,
             args.caption_dropout)

    start = time.perf_counter()
    for step in range(1, args.unet_steps + 1):
        # 2. a batch: a posterior sample of pooled images, its caption (or the empty one), noise and t
        idx = torch.randint(args.pool_size, (args.batch_size,), generator=data_gen)
        z0 = pool_mean[idx] + pool_std[idx] * torch.randn(pool_mean[idx].shape, generator=data_gen)
        z0 = z0 * scaling_factor  # the pipeline divides by scaling_factor before decoding
        drop = torch.rand(args.batch_size, generator=data_gen) < args.caption_dropout
        text = torch.where(drop[:, None, None], uncond, cond[pool_ids[idx]])  # [B, L, 64]
        t = torch.randint(0, len(alphas_cumprod), (args.batch_size,), generator=data_gen)
        eps = torch.randn(z0.shape, generator=data_gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps  # q(z_t | z_0), DDPM eq. (4)

        # 3. the ε-prediction loss, DDPM eq. (14)
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=text).sample, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # EMA: θ̄ ← d·θ̄ + (1 − d)·θ
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1.0 - args.ema_decay)

        if step % 50 == 0 or step == args.unet_steps:
            log.info("unet step %d/%d  loss %.4f  (%.0f s)", step, args.unet_steps, loss.item(),
                     time.perf_counter() - start)
        snapshot = args.snapshot_every and step % args.snapshot_every == 0
        evaluate = args.eval_every and judge is not None and step % args.eval_every == 0
        if snapshot or evaluate or step == args.unet_steps:
            pipe = tiny.assemble_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                          unet=copy.deepcopy(ema), scheduler=tiny.build_scheduler())
            if snapshot:
                save_pipeline(pipe, args.workdir / "snapshots" / f"step_{step:05d}", args.workdir / "tokenizer")
            if evaluate:
                t0 = time.perf_counter()
                rates = alignment_rates(pipe, judge, guidance_scales=(1.0, 2.0, 3.0, 5.0), samples_per_prompt=4,
                                        seed=1234)
                log.info("unet step %d  joint alignment %s  (eval %.0f s)", step,
                         "  ".join(f"{k} {v:.3f}" for k, v in rates.items()), time.perf_counter() - t0)
            if step == args.unet_steps:
                save_pipeline(pipe, args.out, args.workdir / "tokenizer")
                log.info("wrote the pipeline to %s (%.0f s of UNet training)", args.out, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded tiny StableDiffusionPipeline (and its judge).")
    parser.add_argument("--stage", choices=["all", "judge", "vae", "unet"], default="all",
                        help="which stage to run; 'all' runs judge, vae, unet in order")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is fastest on a busy machine and fixes the float summation order")
    parser.add_argument("--workdir", type=Path, default=Path("runs/zoo_tiny"),
                        help="intermediate files: the trained VAE, the tokenizer files, UNet snapshots")
    parser.add_argument("--out", type=Path, default=tiny.TINY_PATH, help="where the final pipeline is saved")
    parser.add_argument("--vae-batch-size", type=int, default=32, help="images per VAE step")
    parser.add_argument("--vae-steps", type=int, default=1600, help="VAE optimisation steps")
    parser.add_argument("--vae-lr", type=float, default=2e-3, help="VAE peak learning rate (cosine schedule)")
    parser.add_argument("--vae-kl-weight", type=float, default=1e-6, help="weight of the KL term of the VAE loss")
    parser.add_argument("--unet-steps", type=int, default=1500,
                        help="UNet optimisation steps; the shipped model stops early on purpose (room for RL)")
    parser.add_argument("--batch-size", type=int, default=64, help="latents per UNet step")
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="UNet learning rate (constant after warm-up)")
    parser.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the saved UNet weights")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="probability of the empty caption (CFG)")
    parser.add_argument("--pool-size", type=int, default=32768, help="training images pre-encoded to latents")
    parser.add_argument("--snapshot-every", type=int, default=0, help="save a pipeline every N UNet steps (0 = off)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="log judge alignment at guidance 1/2/3/5 every N UNet steps (0 = off)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    if args.stage in ("all", "judge"):
        from rl4diffusion.zoo import train_judge

        train_judge.main([f"--seed={args.seed}", f"--threads={args.threads}"])
    if args.stage in ("all", "vae"):
        train_vae(args)
    if args.stage in ("all", "unet"):
        train_unet(args)
    log.info("stage %s done in %.1f min", args.stage, (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
