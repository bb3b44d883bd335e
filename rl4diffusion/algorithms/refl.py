"""ReFL — Reward Feedback Learning (Xu et al. 2023, "ImageReward", arXiv 2304.05977, Sec. 4).

Sample without grad to a random late step s, take one denoising step with grad, predict the
clean sample x̂₀(x_s) in one shot, decode it and push its reward up through the decoder and
that single UNet call. Reference implementation: THUDM/ImageReward ``ImageReward/ReFL.py``.

Implementation details:
1. s ~ U{⌊lo·N⌋, …, ⌈hi·N⌉ − 1} (``start_range`` = [lo, hi] as fractions of the N steps): the
   paper's steps 30–39 of 40 are [0.75, 1.0]. One s per minibatch, as upstream draws one per batch.
2. Steps 0 … s−1 run under no_grad (``sample_with_grad_window``); step s runs with grad and its
   x̂₀ = (x_s − √(1−ᾱ_s) ε̂_θ)/√ᾱ_s is decoded and scored. On a flow-matching model (SD3, ``model=tiny_flow``)
   the one-step prediction is rectified flow's x̂₀ = x_σ − σ·v̂_θ.
3. Loss = scale · mean(ReLU(target − r)) (the paper's λ = 1e-3, target 2 for the standardised
   ImageReward score). The ReLU stops pushing images whose reward already exceeds the target. The target is
   in the reward's units, so it is off by default (``reward_target: null``, loss = scale · mean(−r), the
   same as any target above every reward): a fixed default silences some reward entirely. A target of 0,
   harmless for a log-probability ≤ 0, gave a reward in [0, 1] (``shape_alignment_prob``) or an aesthetic
   score no gradient at all, only the regulariser's.
4. Optional pre-training regulariser (``reg_weight`` > 0): the denoising loss
   mean‖ε̂_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, c) − ε‖² on real data — in the embedded world, shapes images
   from ``rl4diffusion.zoo.shapes.sample_shapes`` (training captions only, so the held-out pairs stay
   unseen) encoded with ``policy.encode_images``, t ~ U{0…T−1},
   conditional prediction (no CFG); a flow model's is mean‖v̂_θ((1−σ)x₀ + σε, σ, c) − (ε − x₀)‖², σ ~ U(0, 1).
   It is added to the ReFL loss and both take one optimiser step
   (upstream's paper alternates the two losses; the released script omits the regulariser).
5. ⚠ upstream conditions the grad step's UNet on the *index* s (``mid_timestep``) instead of the
   timestep t_s and steps the scheduler with the previous step's t; we use t_s throughout, as the
   paper describes. Upstream trains without CFG; we use the model's guidance like the sampler does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tensordict import TensorDictBase

from rl4diffusion import keys
from rl4diffusion.algorithms.backprop import BackpropConfig, RewardBackprop, extra_conditioning
from rl4diffusion.algorithms.base import register_algorithm
from rl4diffusion.errors import ConfigError


@dataclass
class ReFLConfig(BackpropConfig):
    """ReFL's options (the shared ones are ``BackpropConfig``'s). The paper fine-tunes all of SD1.5 with lr 1e-5,
    AdamW's default weight decay 1e-2, 64 chains per step (2 per GPU × 8 GPUs × 4 accumulation), a gradient clip of
    1.0 and the DDPM sampler; the tiny model's LoRA needs larger steps (lr 1e-3)."""

    start_range: list[float] = field(default_factory=lambda: [0.75, 1.0])
    """[lo, hi]: the grad step s is drawn uniformly from step indices ⌊lo·N⌋ … ⌈hi·N⌉−1 (paper: 30–39 of 40)."""
    reward_target: float | None = None
    """Rewards above this give no gradient (ReLU(target − r)); paper: 2 for ImageReward's standardised score.
    null: no target, every reward is pushed up (loss −r). It is in the reward's units: set it only for a
    reward whose scale you know."""
    loss_scale: float = 1.0
    """λ, the loss multiplier (paper: 1e-3 for ImageReward's standardised score; scale-free under Adam up to the
    gradient clip)."""
    reg_weight: float = 0.0
    """Weight of the pre-training ε-MSE regulariser on the shapes dataset (0 = off)."""
    reg_batch_size: int = 16
    """Images per regulariser batch."""

    def validate(self) -> None:
        super().validate()
        lo, hi = (list(self.start_range) + [None, None])[:2]
        if len(self.start_range) != 2 or not 0 <= lo < hi <= 1:
            raise ConfigError(f"algo.start_range must be [lo, hi] with 0 ≤ lo < hi ≤ 1 (fractions of the steps), "
                              f"got {list(self.start_range)}; the paper's steps 30–39 of 40 are [0.75, 1.0].")
        if self.reg_weight < 0 or self.reg_batch_size < 1:
            raise ConfigError("algo.reg_weight must be ≥ 0 and algo.reg_batch_size ≥ 1.")


def refl_loss(
    rewards: torch.Tensor,
    *,
    target: float | None,
    scale: float,
    reg_prediction: torch.Tensor | None = None,
    reg_target: torch.Tensor | None = None,
    reg_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """ReFL's loss (ImageReward paper, Sec. 4.2, L_reward = λ E[φ(r(x̂₀))] with φ = ReLU(target − ·)).

        loss_reward   = scale · mean(ReLU(target − r))        (scale · mean(−r) when target is None)
        loss_pretrain = reg_weight · mean((ε̂ − ε)²)          (only when reg_weight > 0)

    Args:
        rewards: r(decode(x̂₀)) [B] with the graph.
        target: the reward above which an image gets no gradient, or None for none.
        reg_prediction, reg_target: the model's prediction and its denoising target on data [M, C, h, w].
    Returns:
        ``loss_reward`` (and ``loss_pretrain``), plus ``frac_below_target`` (detached; 1 without a target).
    """
    if target is None:
        out = {"loss_reward": -scale * rewards.mean(), "frac_below_target": rewards.new_ones(())}
    else:
        out = {
            "loss_reward": scale * torch.relu(target - rewards).mean(),
            "frac_below_target": (rewards < target).float().mean().detach(),
        }
    if reg_weight > 0:
        if reg_prediction is None or reg_target is None:
            raise ValueError("reg_weight > 0 needs reg_prediction and reg_target")
        out["loss_pretrain"] = reg_weight * ((reg_prediction - reg_target) ** 2).mean()
    return out


def refl_start_index(num_steps: int, start_range, generator: torch.Generator) -> int:
    """The grad step s ~ U{⌊lo·N⌋, …, ⌈hi·N⌉ − 1}, clipped into [0, N−1]."""
    lo, hi = start_range
    first = min(int(lo * num_steps), num_steps - 1)
    last = max(first, min(-int(-hi * num_steps) - 1, num_steps - 1))  # ⌈hi·N⌉ − 1
    return int(torch.randint(first, last + 1, (1,), generator=generator, device=generator.device))


@register_algorithm("refl", config=ReFLConfig)
class ReFL(RewardBackprop):
    def __init__(self, config: ReFLConfig, policy, reward, *, seed: int = 0):
        super().__init__(config, policy, reward, seed=seed)
        if config.reg_weight > 0 and (policy.height, policy.width) != (32, 32):
            raise ConfigError(f"algo.reg_weight > 0 regularises with the embedded shapes dataset (32×32 images), but this "
                              f"model makes {policy.height}×{policy.width} images. Use it with model=tiny, or set "
                              "algo.reg_weight=0.")
        self.reg_generator = torch.Generator().manual_seed(seed + 2)  # the regulariser's data and noise (CPU)

    def pretrain_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) of the denoising loss on a batch of shapes images: ε-prediction at t ~ U{0…T−1}, or a
        flow model's velocity at σ ~ U(0, 1) against v = ε − x₀ (its pre-training loss, with uniform rather than SD3's
        logit-normal σ)."""
        from rl4diffusion.zoo.shapes import TRAIN_PROMPTS, sample_shapes

        policy, n, g = self.policy, self.config.reg_batch_size, self.reg_generator
        # the pre-training distribution: training captions only (the held-out pairs stay unseen)
        captions = [TRAIN_PROMPTS[i] for i in torch.randint(len(TRAIN_PROMPTS), (n,), generator=g).tolist()]
        images = sample_shapes(n, generator=g, prompts=captions)[0]
        with torch.no_grad():
            x0 = policy.encode_images(images.to(policy.device))
        embeds = policy.encode_prompts(list(captions))
        if policy.kind == "flow":  # rectified flow: x_σ = (1 − σ)x₀ + σε, target v = ε − x₀, σ ~ U(0, 1)
            sigma = torch.rand(n, generator=g).to(policy.device)
            eps = torch.randn(x0.shape, generator=g).to(policy.device)
            s = sigma.view(-1, 1, 1, 1)
            pooled = policy.encode_pooled_prompts(list(captions))
            timesteps = sigma * policy.scheduler.config.num_train_timesteps  # t = 1000σ
            prediction = policy.predict_noise((1 - s) * x0 + s * eps, timesteps, embeds, pooled_prompt_embeds=pooled,
                                              guidance_scale=1.0)
            return prediction, eps - x0
        t = torch.randint(0, len(policy.alphas_cumprod), (n,), generator=g).to(policy.device)
        eps = torch.randn(x0.shape, generator=g).to(policy.device)
        a = policy.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps  # q(x_t | x₀), DDPM eq. (4)
        prediction_type = policy.scheduler.config.prediction_type
        target = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
        return policy.predict_noise(noisy, t, embeds, guidance_scale=1.0), target

    def loss(self, minibatch: TensorDictBase) -> dict[str, torch.Tensor]:
        cfg = self.config
        s = refl_start_index(self.num_steps, cfg.start_range, self.generator)
        out = self.window(minibatch[keys.LATENTS], minibatch[keys.PROMPT_EMBEDS], grad_start=s, stop=s + 1,
                          conditioning=extra_conditioning(self.policy, minibatch))
        rewards = self.score(out.pred_x0, minibatch[keys.PROMPT_ID])  # r(decode(x̂₀(x_s)))
        prediction, target = self.pretrain_batch() if cfg.reg_weight > 0 else (None, None)
        terms = refl_loss(rewards, target=cfg.reward_target, scale=cfg.loss_scale,
                          reg_prediction=prediction, reg_target=target, reg_weight=cfg.reg_weight)
        return {**terms, "rewards": rewards, "grad_step": torch.tensor(float(s))}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "reg_generator": self.reg_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.reg_generator.set_state(state["reg_generator"])
