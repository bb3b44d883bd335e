"""DDPO written by hand with torch + diffusers + peft only: the reference that benchmarks/throughput.py times
rl4diffusion's DDPO against (``python benchmarks/throughput.py --plain``).

It does the arithmetic of one DDPO epoch with the defaults of ``conf/model/tiny.yaml`` and
``conf/algo/ddpo.yaml`` — 32 chains of 20 stochastic DDIM steps (η = 1) with classifier-free guidance
(w = 2), a LoRA adapter of rank 4 on the attention projections, the shape-alignment reward, advantages
from the batch's mean and std, then PPO-clip over minibatches of 8 chains × all 20 timesteps with AdamW
and the gradient norm clipped at 1, one optimiser step per minibatch — and nothing else: no TensorDict,
no environment, no accelerate. Nothing of rl4diffusion is imported but the path of the embedded model and
the reward (which is not what is measured).

Run alone (one epoch, CPU-seconds printed)::

    python benchmarks/plain_loop.py

Sources: DDPO (Black et al. 2023, kvablack/ddpo-pytorch ``scripts/train.py`` and
``ddim_with_logprob.py``); DDIM (Song et al. 2021, eq. 12 and 16).
"""

from __future__ import annotations

import math
import time

import torch


class PlainDDPO:
    """One DDPO epoch at a time: ``collect()`` then ``update(trajectories)``.

    Args:
        prompts: the prompts chains are drawn from (uniformly, with replacement).
        seed: seeds the prompts and the sampling noise (the minibatch order uses the global RNG).
    """

    def __init__(self, prompts: list[str], *, num_chains: int = 32, num_steps: int = 20,
                 guidance: float = 2.0, eta: float = 1.0, minibatch: int = 8, lr: float = 3e-3,
                 weight_decay: float = 1e-4, clip_range: float = 1e-4, adv_clip_max: float = 5.0,
                 max_grad_norm: float = 1.0, lora_rank: int = 4, seed: int = 0):
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from peft import LoraConfig

        from rl4diffusion.rewards import build_reward
        from rl4diffusion.zoo.tiny import TINY_PATH

        pipe = StableDiffusionPipeline.from_pretrained(TINY_PATH)
        pipe.set_progress_bar_config(disable=True)
        self.vae, self.unet = pipe.vae.requires_grad_(False), pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)

        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps  # (T,) noisiest first
        self.alphas_cumprod = scheduler.alphas_cumprod.float()  # ᾱ_t, t = 0 … 999
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self.step_size = scheduler.config.num_train_timesteps // num_steps
        size = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, size, size)

        self.prompts = list(prompts)
        with torch.no_grad():  # the text encoder is frozen: every prompt is encoded once
            self.embeds, _ = pipe.encode_prompt(self.prompts, "cpu", 1, False)  # (P, L, D)
            self.negative, _ = pipe.encode_prompt([""], "cpu", 1, False)  # (1, L, D)
        self.reward = build_reward("shape_alignment")
        self.num_chains, self.guidance, self.eta, self.minibatch = num_chains, guidance, eta, minibatch
        self.clip_range, self.adv_clip_max, self.max_grad_norm = clip_range, adv_clip_max, max_grad_norm
        self.generator = torch.Generator().manual_seed(seed)

    def guided_eps(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """ε̂ = ε_u + w (ε_c − ε_u), both halves in one network call, as diffusers' pipeline does."""
        both = torch.cat([self.negative.expand_as(embeds), embeds])  # (2B, L, D)
        eps = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=both).sample
        uncond, cond = eps.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def ddim_step(self, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                  prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t → x_t' (sampled unless ``prev`` is given) and log N(x_t'; μ, σ²I), its mean over latent
        elements (DDPO's reduction)."""
        # 1. ᾱ_t and ᾱ_t', t' = t − 1000/N (the final alpha past the end)
        prev_t = t - self.step_size
        a_t = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        a_prev = torch.where(prev_t >= 0, self.alphas_cumprod[prev_t.clamp(min=0)],
                             torch.tensor(self.final_alpha_cumprod)).view(-1, 1, 1, 1)
        # 2. x̂₀ from the ε-prediction — DDIM eq. (12)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        # 3. σ_t(η) — DDIM eq. (16)
        std = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        # 4. μ = sqrt(ᾱ_t') x̂₀ + sqrt(1 − ᾱ_t' − σ²) ε̂ — DDIM eq. (12)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
        if prev is None:
            prev = mean + std * torch.randn(x.shape, generator=self.generator)
        # 5. the Gaussian log-density of the action, gradients through μ only
        log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
        return prev, log_prob.mean(dim=(1, 2, 3))

    @torch.no_grad()
    def collect(self) -> dict[str, torch.Tensor]:
        """32 chains: their latents x_T … x_0, the log-probabilities of their steps and their advantages."""
        prompt_ids = torch.randint(len(self.prompts), (self.num_chains,), generator=self.generator)
        embeds = self.embeds[prompt_ids]  # (B, L, D)
        x = torch.randn((self.num_chains, *self.latent_shape), generator=self.generator)
        latents, log_probs = [x], []
        for t in self.timesteps:
            t = t.expand(self.num_chains)
            x, log_prob = self.ddim_step(self.guided_eps(x, t, embeds), x, t)
            latents.append(x)
            log_probs.append(log_prob)
        images = (self.vae.decode(x / self.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        rewards = self.reward(images, [self.prompts[i] for i in prompt_ids.tolist()]).float()
        advantages = ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6))
        return {"embeds": embeds, "latents": torch.stack(latents, dim=1),  # (B, T+1, C, h, w)
                "log_probs": torch.stack(log_probs, dim=1),  # (B, T)
                "advantages": advantages.clamp(-self.adv_clip_max, self.adv_clip_max)}  # (B,)

    def update(self, batch: dict[str, torch.Tensor]) -> None:
        """PPO-clip (DDPO eq. 4) over minibatches of chains; each chain's timesteps in a random order, the
        gradients of all of them summed before one optimiser step per minibatch."""
        num_chains, num_steps = batch["log_probs"].shape
        for index in torch.randperm(num_chains).split(self.minibatch):
            order = torch.rand((len(index), num_steps)).argsort(dim=1)  # (M, T)
            for j in range(num_steps):
                k = order[:, j]  # (M,) each chain's j-th trained step
                x, prev = batch["latents"][index, k], batch["latents"][index, k + 1]  # (M, C, h, w)
                t = self.timesteps[k]
                _, log_prob = self.ddim_step(self.guided_eps(x, t, batch["embeds"][index]), x, t, prev)
                ratio = torch.exp(log_prob - batch["log_probs"][index, k])
                advantages = batch["advantages"][index]
                clipped = ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
                loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
                (loss / num_steps).backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    from rl4diffusion.zoo.shapes import prompt_set

    torch.set_num_threads(1)
    loop = PlainDDPO(prompt_set("train"))
    for label in ("warm-up", "timed"):
        start = time.process_time()
        loop.update(loop.collect())
        print(f"{label} epoch: {time.process_time() - start:.2f} CPU-s")


if __name__ == "__main__":
    main()
