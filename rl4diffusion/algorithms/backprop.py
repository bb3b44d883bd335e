"""Reward backpropagation: the differentiable sampling window shared by ReFL, DRaFT and AlignProp.

These methods need a differentiable reward r(image, c) and maximise it by backpropagating
∇r through the VAE decoder and (part of) the sampling chain into the denoiser's weights.
They differ only in *which* denoising steps carry the gradient:

    ReFL        no grad to a random late step s, one step with grad, reward on x̂₀(x_s)
    DRaFT       grad through the whole chain (all N steps)
    DRaFT-K     stop-gradient before the last K steps (K = 1 works best in the paper)
    DRaFT-LV    x₀ sampled without grad, re-noised n times to the last timestep, one step with grad
    AlignProp   grad through the steps after a random truncation start b

Notation (the chain has N steps indexed i = 0 … N−1, timesteps t_0 > t_1 > … > t_{N−1}):
    x_i      latents *before* step i (x_0 = x_T the initial noise, x_N = the sample x₀)
    ε̂_θ      the guided noise prediction ``policy.predict_noise`` (CFG as the model config says)
    step     ``policy.step``: x_{i+1} = μ_θ(x_i) + σ_i z_i — reparameterised, so the graph flows
             through μ (hence through ε̂_θ and x_i); the noise z_i is data.
    window   steps i ∈ [grad_start, stop) run with grad; steps before it run under
             ``torch.no_grad`` and their output is detached — the stop-gradient of DRaFT-K /
             AlignProp. Steps before the window therefore cost no activation memory at all.

Flow-matching models (SD3, ``model=tiny_flow``) run the same window: ε̂_θ is then the guided velocity
v̂_θ(x_σ, 1000σ, c, pooled c) — the transformer also takes the prompt's pooled embeddings, passed through
``conditioning`` — and the step is Flow-GRPO's SDE step (``flow_sde_step_with_log_prob``) at the model's
noise level a (``model.noise_level``, or ``algo.eta`` here): μ = x + [v̂ + s_t²/(2σ)·(x + (1 − σ)v̂)]·Δt with
Δt = σ_next − σ, which at a = 0 (``algo.eta=0``) is the ODE's Euler step x_next = x + (σ_next − σ)·v̂. The
one-step clean prediction is x̂₀ = x_σ − σ·v̂ (rectified flow, x_σ = (1 − σ)x₀ + σε).

Each UNet call inside the window can be wrapped in ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``: activations are recomputed during backward instead of stored, so memory
grows with the window length by only one latent per step (``benchmarks/backprop_memory.py``).
The gradients are identical with and without it.

Data flow: ``collect`` draws the starting states (prompts and x_T) from the environment's reset —
a [B] TensorDict — and ``optimisation_steps`` splits them into minibatches; for each, ``loss``
runs the algorithm's chain with grad, decodes and scores. The whole batch is one optimiser step
(the trainer accumulates the minibatches' gradients), so ``minibatch_size`` only trades memory
for time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from tensordict import TensorDictBase
from torch.utils.checkpoint import checkpoint

from rl4diffusion import keys
from rl4diffusion.algorithms.base import Algorithm, OptimisationStep, check_minibatch
from rl4diffusion.errors import ConfigError


@dataclass
class BackpropConfig:
    """Options every reward-backpropagation method shares (each method's config extends this)."""

    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    batch_size: int = 8
    """Chains per epoch; the whole batch is one optimiser step."""
    minibatch_size: int = 8
    """Chains per forward/backward pass (gradients accumulate over batch_size / minibatch_size passes); must divide batch_size."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip before the optimiser step."""
    checkpointing: bool = True
    """Wrap every UNet call that carries a gradient in torch.utils.checkpoint (less memory, ~1 extra forward)."""
    eta: float | None = None
    """DDIM η of the differentiable chain (a flow model's SDE noise level; 0 = the ODE); None uses the model's
    (model.eta, or model.noise_level for a flow model)."""

    def validate(self) -> None:
        check_minibatch(self.batch_size, self.minibatch_size)
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise ConfigError(f"algo.lr ({self.lr}) and algo.max_grad_norm ({self.max_grad_norm}) must be > 0.")
        if self.eta is not None and self.eta < 0:
            raise ConfigError(f"algo.eta must be ≥ 0 or null (the model's), got {self.eta}.")


class WindowOutput(NamedTuple):
    latents: torch.Tensor  # x_stop: the latents after the last step run [B, C, h, w] (x₀ when stop = N)
    pred_x0: torch.Tensor  # x̂₀ predicted by the last step run [B, C, h, w]
    grad_steps: int  # how many steps carried a gradient


def predict_noise(policy, latents, timestep, prompt_embeds, *, checkpointing: bool,
                  conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """ε̂_θ(x_t, t, c) (a flow model's v̂_θ), wrapped in a non-reentrant activation checkpoint when it carries a
    gradient. ``conditioning``: the denoiser's keyword inputs beyond prompt_embeds (``extra_conditioning``)."""
    conditioning = conditioning or {}
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(policy.predict_noise, latents, timestep, prompt_embeds, use_reentrant=False, **conditioning)
    return policy.predict_noise(latents, timestep, prompt_embeds, **conditioning)


def extra_conditioning(policy, states: TensorDictBase) -> dict[str, torch.Tensor]:
    """What the denoiser takes beyond prompt_embeds, read from states by key (``policy.extra_conditioning_keys``:
    an SD3-style flow model's ``pooled_prompt_embeds``; nothing for Stable Diffusion). The keys are
    ``predict_noise``'s keyword names."""
    return {key: states[key] for key in policy.extra_conditioning_keys}


def chain_noise(policy, num: int, shape, generator: torch.Generator | None) -> torch.Tensor:
    """``num`` step noises z [num, B, C, h, w], drawn one step at a time with ``policy.draw_noise``
    (so a multi-process run keeps its slice of the global batch's noise)."""
    if num == 0:
        return torch.empty((0, *shape), device=policy.device)
    return torch.stack([policy.draw_noise(shape, generator) for _ in range(num)])


def sample_with_grad_window(
    policy,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    grad_start: int,
    start: int = 0,
    stop: int | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eta: float | None = None,
    checkpointing: bool = True,
    conditioning: dict[str, torch.Tensor] | None = None,
) -> WindowOutput:
    """Run steps [start, stop) of the chain from ``latents`` (= x_start), with grad only for steps ≥ grad_start.

    1. steps start … grad_start−1 under ``torch.no_grad`` (the stop-gradient: no graph, no memory);
    2. steps grad_start … stop−1 with grad, each UNet call optionally checkpointed; the graph runs
       through μ_θ of every window step and through the latents linking them (DRaFT eq. 3).

    Args:
        latents: x_start [B, C, h, w] (x_T when start = 0).
        prompt_embeds: [B, L, D].
        grad_start: first step index with grad; start ≤ grad_start ≤ stop (= stop: no grad at all).
        stop: one past the last step to run (default N, i.e. down to x₀).
        noise: the step noises z [stop − start, B, C, h, w]; drawn from ``generator`` when None.
        eta: DDIM η, or a flow model's noise level (None = the model's).
        conditioning: the denoiser's keyword inputs beyond prompt_embeds, e.g. a flow model's
            ``{"pooled_prompt_embeds": [B, P]}`` (``extra_conditioning``).
    Returns:
        WindowOutput(latents=x_stop, pred_x0=x̂₀ of the last step run, grad_steps).

    Example::

        out = sample_with_grad_window(policy, x_T, embeds, grad_start=len(policy.timesteps) - 1)  # DRaFT-1
        reward(policy.decode(out.latents), prompts).mean().backward()
    """
    num_steps = len(policy.timesteps)
    stop = num_steps if stop is None else stop
    if not 0 <= start <= grad_start <= stop <= num_steps or start == stop:
        raise ValueError(f"need 0 ≤ start ({start}) ≤ grad_start ({grad_start}) ≤ stop ({stop}) ≤ N ({num_steps}), start < stop")
    if noise is not None and noise.shape[0] != stop - start:
        raise ValueError(f"noise must hold one z per step run: [{stop - start}, B, ...], got {tuple(noise.shape)}")
    x, pred_x0, conditioning = latents, None, conditioning or {}
    for i in range(start, stop):
        t = policy.timesteps[i]
        z = noise[i - start] if noise is not None else policy.draw_noise(x.shape, generator)
        if i < grad_start:
            with torch.no_grad():  # before the window: the stop-gradient
                out = policy.step(policy.predict_noise(x, t, prompt_embeds, **conditioning), x, t, noise=z, eta=eta)
            x, pred_x0 = out.prev_sample.detach(), out.pred_x0.detach()
        else:
            eps = predict_noise(policy, x, t, prompt_embeds, checkpointing=checkpointing, conditioning=conditioning)
            out = policy.step(eps, x, t, noise=z, eta=eta)  # x_{i+1} = μ_θ(x_i) + σ_i z_i keeps the graph
            x, pred_x0 = out.prev_sample, out.pred_x0
    return WindowOutput(x, pred_x0, stop - grad_start)


class RewardBackprop(Algorithm):
    """The shared data flow of the family: starting states → ``loss`` per minibatch → one accumulated
    optimiser step per batch. Subclasses implement ``loss(minibatch)``."""

    requires_differentiable_reward = True
    supports_grad_accumulation = False  # one step per batch already; algo.minibatch_size sets its micro-batches

    def __init__(self, config: BackpropConfig, policy, reward, *, seed: int = 0):
        super().__init__(policy, reward, config)
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self.prompts: list[str] = []
        self.num_steps = len(policy.timesteps)
        self._rewards: list[torch.Tensor] = []

    # ---------------------------------------------------------------- pieces for subclasses
    def score(self, latents: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """r(decode(latents), c) [B] with the graph. Images go to the reward once, in [0, 1]."""
        images = self.policy.decode(latents)  # [B, 3, H, W] in [0, 1]
        return self.reward(images, [self.prompts[i] for i in prompt_ids.tolist()]).float()

    def window(self, latents, prompt_embeds, *, grad_start: int, **kwargs) -> WindowOutput:
        """``sample_with_grad_window`` with the algorithm's generator, η and checkpointing; pass a flow model's
        pooled embeddings as ``conditioning`` (``extra_conditioning(policy, minibatch)``)."""
        return sample_with_grad_window(self.policy, latents, prompt_embeds, grad_start=grad_start,
                                       generator=self.generator, eta=self.config.eta,
                                       checkpointing=self.config.checkpointing, **kwargs)

    def loss(self, minibatch: TensorDictBase) -> dict[str, torch.Tensor]:
        """``loss_*`` terms (with grad) plus ``rewards`` [M] and detached diagnostics for one minibatch."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the shared interface
    def collect(self, env) -> TensorDictBase:
        """The batch's starting states [B]: prompt ids, their embeddings (a flow model's pooled ones too) and x_T
        (from ``env.reset``)."""
        self.prompts = env.prompts
        return env.reset().select(keys.PROMPT_ID, keys.PROMPT_EMBEDS, keys.LATENTS,
                                  *self.policy.extra_conditioning_keys)

    def optimisation_steps(self, batch: TensorDictBase) -> Iterator[OptimisationStep]:
        """The whole batch is one optimiser step; its minibatches, in order, are the micro-batches.

        (No shuffling: the step sees every chain whatever the order, and in order each chain keeps
        the sampling noise of its position in the global batch, so N processes sample what one would.)
        """
        self._rewards = []
        size = max(1, self.config.minibatch_size // self.world)  # sizes are global: each process holds its share
        yield OptimisationStep([batch[start : start + size] for start in range(0, batch.shape[0], size)])

    def loss_terms(self, minibatch: TensorDictBase) -> dict[str, torch.Tensor]:
        terms = self.loss(minibatch)
        self._rewards.append(terms.pop("rewards").detach())
        return terms

    def end_update(self) -> dict[str, torch.Tensor]:
        r = self.gather(torch.cat(self._rewards))
        return {"train/reward_mean": r.mean(), "train/reward_std": r.std(unbiased=False)}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
