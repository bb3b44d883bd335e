"""Nabla-GFlowNet — residual ∇-DB (Liu et al., ICLR 2025, "Efficient Diversity-Preserving Diffusion
Alignment via Gradient-Informed GFlowNets", arXiv 2412.07775). Reference code: lzzcd001/nabla-gfn @6b74d4c
(``train_nablagfn.py``, ``lib/diffusion/inference_step.py``).

The denoising chain is a GFlowNet whose terminal reward is exp(β·R(x₀))·p_ref(x₀): fine-tuning
should sample that tilted distribution, not collapse onto R's mode — hence diversity is kept.
Detailed balance F(x)·p_F(x′|x) = F(x′)·p_B(x|x′), differentiated in x′ (forward) and in x
(reverse), and written *relative to the pretrained model* (which balances its own flow F_ref):

    ∇_{x′} log p_F^θ(x′|x) − ∇_{x′} log p_F^ref(x′|x) = ∇_{x′} log F(x′) − ∇_{x′} log F_ref(x′)
    ∇_x   log p_F^θ(x′|x) − ∇_x   log p_F^ref(x′|x) = −(∇_x log F(x) − ∇_x log F_ref(x))

and the log-flow gradient difference is a prior g plus a learned residual φ:
g(x) = β·γ(t)·∇_x R(decode(x̂₀(x, t))), γ(t) = ᾱ_t (exact at t = 0, where x̂₀ = x), and φ(x, t, c).

Implementation details (numbered as a checklist):
1. Data: full chains from ``collect`` (which also stores the sampling-time guided prediction
   ε̂_old under ``keys.SAMPLE_MODEL_OUTPUT``: the trust region's anchor costs no extra forward).
   ``update`` trains on the chains collected one iteration earlier (upstream's off-policy lag;
   ``use_previous_batch``), read back through the shared torchrl replay buffer; the very first
   update only stores its batch, as upstream's epoch −1 does.
2. Timesteps: each chain trains its terminal step plus one uniformly drawn step in each of
   ⌊N·timestep_fraction⌋ contiguous strata of the N−1 non-terminal steps (upstream's
   "low-variance subsampling"; we stratify the non-terminal steps so no step is drawn twice and
   N need not divide evenly).
3. Per transition x (at t) → x′ (at t′): forward score s_θ = −(x′ − μ_θ(x))/σ_t²; reference
   s_ref = κ·(same with the LoRA adapter disabled); reverse scores r = κ·∇_x log p_F(x′|x) by
   autograd (sum-reduced Gaussian log-density). g(x′) uses the *current* policy's x̂₀ and the
   transition's own prompts (⚠ upstream scores with the previous batch's prompts).
4. ⚠ Upstream builds r_θ without create_graph, so the reverse loss trains φ only. That is our
   default (``reverse_trains_policy=False``: the reverse condition fits the residual flow to the
   current policy, a semi-gradient). ``reverse_trains_policy=True`` keeps the graph (second-order,
   attention falls back to the math SDPA kernel, ~1.6× the cost) so θ is trained by it too.
5. The reverse loss skips terminal transitions (upstream's target 0 there carries no gradient
   because r_θ is detached; with create_graph it would wrongly pull ∇_x log p_F to 0).
6. One optimiser step per minibatch for each of the two AdamW optimisers (LoRA: ``lr``; φ:
   ``flow_lr``), each with its own gradient-norm clip (⚠ upstream steps twice per update).
7. ``no_flow=True``: φ ≡ 0 and only the forward loss (+ trust region) is trained.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.nn import functional as F

from rl4diffusion import keys
from rl4diffusion.algorithms.base import (
    Algorithm,
    OptimisationStep,
    TrainedModule,
    check_minibatch,
    make_optimizer,
    register_algorithm,
)
from rl4diffusion.data import collect_trajectories, make_replay_buffer
from rl4diffusion.errors import ConfigError


@dataclass
class NablaGFNConfig:
    """∇-GFlowNet's options, tuned on the embedded world (tiny model, 20 steps, guidance 2); the paper's SD1.5 values
    in the docstrings."""

    lr: float = 1e-3
    """AdamW learning rate of the policy's LoRA weights (paper: 1e-3 with LoRA rank 8; here the rank is model.lora_rank)."""
    weight_decay: float = 1e-4
    """AdamW weight decay of the LoRA weights."""
    flow_lr: float = 1e-3
    """AdamW learning rate of the residual flow network φ (paper: 1e-3)."""
    flow_weight_decay: float = 1e-2
    """AdamW weight decay of φ (upstream: 1e-2)."""
    batch_size: int = 32
    """Chains sampled per epoch (the environment's batch size; upstream 64 per GPU)."""
    minibatch_size: int = 8
    """Chains per optimiser step; must divide batch_size (upstream 4 × 8 accumulation)."""
    num_inner_epochs: int = 1
    """Passes over each batch of chains."""
    reward_scale: float = 30.0
    """β: the target is p_ref(x₀)·exp(β·R(x₀)) (paper: 1e3–1e4 for SD1.5's aesthetic score). shape_alignment's latent
    gradients are far larger per element (8×8×4 latents). 4-epoch sweep on tiny, paired eval: β 1/10/30 with λ_reg 1
    → Δreward +0.03/+0.11/+0.25; β 100, λ_reg 10 → −0.06; β 1e3, λ_reg 1e3 → −0.61 (the model leaves the base: FID
    vs base 140)."""
    reverse_weight: float = 1.0
    """λ_rev, weight of the reverse (∇_x) matching loss (paper: 1). At timestep_fraction 0.05, λ_rev = 0 (3 reward
    queries per chain) gave +0.29/+0.25/+0.26 train, +0.49/+0.27/+0.13 held-out: within noise of the full loss."""
    trust_region_weight: float = 1.0
    """λ_reg, weight of mean (ε̂_θ(x) − ε̂_old(x))² against the sampling-time prediction (paper: 1e2–2e3, in ε units;
    10 or more freezes the tiny model at β ≤ 100)."""
    pretrained_strength: float = 1.0
    """κ, multiplies the reference scores s_ref and both reverse scores (1 = the pretrained model as prior)."""
    timestep_fraction: float = 0.05
    """Each chain trains its terminal step plus one step in each of ⌊N·fraction⌋ strata (paper: 0.1 of 50 steps →
    6 transitions; 0.05 of 20 steps → 2 transitions, 4 reward queries). A non-terminal transition costs two reward
    gradients, so fewer strata buy more chains per reward query. At 1,536 queries, 8 eval samples per prompt, paired
    Δ train reward vs base over seeds 0/1/2: 0.1 → +0.09/+0.15, 0.05 → +0.16/+0.23/+0.11 (± ~0.09); held-out
    +0.08/+0.33 vs +0.47/+0.42/+0.55."""
    use_previous_batch: bool = True
    """Train on the chains collected one iteration earlier (upstream, off-policy by one update); False = the fresh batch."""
    no_flow: bool = False
    """φ ≡ 0 and forward loss only (the paper's ablation without the residual flow)."""
    reverse_trains_policy: bool = False
    """Build r_θ with create_graph so the reverse loss also trains θ (second order, slower); upstream: False."""
    flow_channels: int = 64
    """Width of φ's convolutional blocks (upstream: a UNet2DConditionModel (64, 128, 256, 256) as φ)."""
    flow_blocks: int = 2
    """Residual blocks in φ."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip, applied separately to the LoRA weights and to φ."""

    def validate(self) -> None:
        check_minibatch(self.batch_size, self.minibatch_size)
        if not 0 <= self.timestep_fraction <= 1:
            raise ConfigError(f"algo.timestep_fraction must be in [0, 1], got {self.timestep_fraction}.")
        if min(self.lr, self.flow_lr, self.max_grad_norm) <= 0 or self.num_inner_epochs < 1:
            raise ConfigError("algo.lr, algo.flow_lr and algo.max_grad_norm must be > 0, algo.num_inner_epochs ≥ 1.")
        if min(self.reward_scale, self.reverse_weight, self.trust_region_weight, self.pretrained_strength) < 0:
            raise ConfigError("algo.reward_scale, reverse_weight, trust_region_weight and pretrained_strength must be ≥ 0.")
        if self.flow_channels < 8 or self.flow_blocks < 0:
            raise ConfigError(f"algo.flow_channels must be ≥ 8 and algo.flow_blocks ≥ 0, got "
                              f"{self.flow_channels} and {self.flow_blocks}.")


# ----------------------------------------------------------------------------- pure functions
def forward_score(next_latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """s = ∇_{x′} log N(x′; μ, σ²I) = −(x′ − μ)/σ²  [B, C, h, w] (the forward score of ∇-DB).

    The gradient flows into θ through μ = μ_θ(x); x′ is data. ``std`` broadcasts ([B, 1, 1, 1]).
    """
    return -(next_latents.detach() - mean) / std**2


def reverse_score(latents: torch.Tensor, next_latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *,
                  create_graph: bool = False, retain_graph: bool = True) -> torch.Tensor:
    """r = ∇_x log N(x′; μ(x), σ²I) by autograd [B, C, h, w] (the reverse term; x must require grad).

        log p = −Σ_CHW (x′ − μ(x))² / (2σ²) − const   ⇒   r = J_μ(x)ᵀ (x′ − μ)/σ²

    With ``create_graph=False`` the result is a constant for θ (upstream); with True it stays differentiable.
    """
    log_p = -(((next_latents.detach() - mean) ** 2) / (2 * std**2)).sum()
    (grad,) = torch.autograd.grad(log_p, latents, create_graph=create_graph, retain_graph=retain_graph)
    return grad


def stratified_steps(num_chains: int, num_steps: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Step indices [M, 1 + K] per chain: the terminal step N−1, then one uniform draw in each of
    K = min(⌊N·fraction⌋, N−1) contiguous strata of the non-terminal steps 0 … N−2."""
    strata = min(int(num_steps * fraction), num_steps - 1)
    bounds = torch.linspace(0, num_steps - 1, strata + 1).round().long()  # (K+1,)
    lo, width = bounds[:-1], bounds[1:] - bounds[:-1]  # (K,)
    u = torch.rand((num_chains, strata), generator=generator, device=generator.device).cpu()
    drawn = lo + (u * width).long().clamp(max=width - 1)  # (M, K)
    return torch.cat([torch.full((num_chains, 1), num_steps - 1), drawn], dim=1)


def nabla_gfn_loss(
    score: torch.Tensor,
    score_ref: torch.Tensor,
    prior_next: torch.Tensor,
    terminal: torch.Tensor,
    *,
    flow_next: torch.Tensor | None = None,
    reverse: torch.Tensor | None = None,
    reverse_ref: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    flow: torch.Tensor | None = None,
    model_output: torch.Tensor | None = None,
    old_model_output: torch.Tensor | None = None,
    reverse_weight: float = 1.0,
    trust_region_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Residual ∇-DB loss on a batch of transitions x → x′ (the paper's residual ∇-DB objective).

    Derivation: ∇_{x′} and ∇_x of log[F(x) p_F(x′|x)] = log[F(x′) p_B(x|x′)], minus the same identity for
    the pretrained model, leave s_θ − s_ref = ∇log F(x′) − ∇log F_ref(x′) and r_θ − r_ref = −(… at x).
    Targets (all [B, C, h, w]; φ ≡ 0 when ``flow_next`` is None):

        T_F = s_ref + φ(x′, t′) + g(x′);   terminal rows: T_F = sg(s_ref + g(x₀))
        T_B = r_ref − φ(x, t) − g(x);       terminal rows excluded (⚠ upstream: T_B = 0, gradient-free there)
        loss_forward     = mean (s_θ − T_F)²
        loss_reverse     = λ_rev · mean over non-terminal rows of (r_θ − T_B)²
        loss_terminal    = mean over terminal rows of mean_CHW φ(x₀, 0)²       (F(x₀) is the reward: φ(x₀) = 0)
        loss_trust_region = λ_reg · mean (ε̂_θ(x) − ε̂_old(x))²

    Args:
        score: s_θ (with grad into θ); score_ref: s_ref; prior_next: g(x′) (detached); terminal: [B] bool.
        flow_next, flow: φ(x′, t′), φ(x, t) (with grad into φ). reverse, reverse_ref, prior: r_θ, r_ref, g(x).
        model_output, old_model_output: ε̂_θ(x) and the sampling-time ε̂_old(x) for the trust region.
    Returns:
        ``loss_*`` terms plus detached diagnostics (norms over C, h, w averaged over the batch).
    """
    mask = terminal.view(-1, *([1] * (score.dim() - 1)))  # (B, 1, 1, 1)
    phi_next = flow_next if flow_next is not None else torch.zeros_like(score_ref)
    target_forward = torch.where(mask, (score_ref + prior_next).detach(), score_ref + phi_next + prior_next)
    out = {"loss_forward": ((score - target_forward) ** 2).mean()}
    n_term, n_mid = terminal.sum(), (~terminal).sum()
    if reverse is not None:
        target_reverse = reverse_ref - flow - prior
        per_row = ((reverse - target_reverse) ** 2).flatten(1).mean(1)  # (B,)
        out["loss_reverse"] = reverse_weight * (per_row * (~terminal)).sum() / n_mid.clamp(min=1)
    if flow_next is not None:
        per_row = (flow_next**2).flatten(1).mean(1)  # (B,)
        out["loss_terminal"] = (per_row * terminal).sum() / n_term.clamp(min=1)
    if trust_region_weight > 0:
        if model_output is None or old_model_output is None:
            raise ValueError("trust_region_weight > 0 needs model_output and old_model_output (keys.SAMPLE_MODEL_OUTPUT)")
        out["loss_trust_region"] = trust_region_weight * ((model_output - old_model_output.detach()) ** 2).mean()

    def norm(v: torch.Tensor) -> torch.Tensor:
        return v.detach().flatten(1).norm(dim=1).mean()

    out.update(score_ref_norm=norm(score_ref), residual_norm=norm(score - score_ref),
               prior_norm=norm(prior_next), flow_norm=norm(phi_next))
    return out


# ----------------------------------------------------------------------------- the residual flow φ
class ResidualFlow(nn.Module):
    """φ(x, t, c): a small conditional conv net giving a latent-shaped field (the residual log-flow gradient).

    Conditioning: a sinusoidal embedding of t and the token-mean of the prompt embeddings, added to
    every residual block. The last convolution starts at zero, so φ ≡ 0 at initialisation.
    """

    def __init__(self, latent_channels: int, text_dim: int, *, channels: int = 64, num_blocks: int = 2):
        super().__init__()
        groups = math.gcd(8, channels)
        self.channels = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.text_proj = nn.Linear(text_dim, channels)
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(_FlowBlock(channels, groups) for _ in range(num_blocks))
        self.norm_out = nn.GroupNorm(groups, channels)
        self.conv_out = nn.Conv2d(channels, latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=latents.device) / half)
        angles = timesteps.float().view(-1, 1) * freqs  # (B, half)
        t_emb = torch.cat([angles.sin(), angles.cos(), angles[:, : self.channels - 2 * half]], dim=1)
        emb = self.time_mlp(t_emb) + self.text_proj(prompt_embeds.float().mean(dim=1))  # (B, ch)
        h = self.conv_in(latents.float())
        for block in self.blocks:
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class _FlowBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(groups, channels), nn.GroupNorm(groups, channels)
        self.conv1, self.conv2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.conv1(F.silu(self.norm1(h))) + self.emb(emb)[:, :, None, None]
        return h + self.conv2(F.silu(self.norm2(z)))


# ----------------------------------------------------------------------------- the algorithm
class _RecordingActor:
    """``policy.act`` (same noise draws) that also stores the sampling-time guided output ε̂_old."""

    def __init__(self, policy):
        self.policy = policy

    @torch.no_grad()
    def act(self, td, generator: torch.Generator | None = None):
        p, latents = self.policy, td[keys.LATENTS]
        out = p.predict_from_td(td)
        step = p.step(out, latents, td[keys.TIMESTEP], noise=p.draw_noise(latents.shape, generator))
        td.set(keys.ACTION, step.prev_sample)
        td.set(keys.SAMPLE_LOG_PROB, step.log_prob)
        td.set(keys.SAMPLE_MODEL_OUTPUT, out)
        return td


@register_algorithm("nabla_gfn", config=NablaGFNConfig)
class NablaGFN(Algorithm):
    requires_differentiable_reward = True

    def __init__(self, config: NablaGFNConfig, policy, reward, *, seed: int = 0):
        super().__init__(policy, reward)
        if getattr(policy, "kind", "ddim") != "ddim":
            raise ConfigError("algo=nabla_gfn needs a DDIM-style (ε/v-prediction) model; flow-matching models are "
                              "not supported yet: the residual ∇-DB carries over to their Gaussian SDE step, but the "
                              "prior's ᾱ_t schedule and its x̂₀ are written for DDIM (README, \"∇-GFlowNet on flow "
                              "models\"). Use model=tiny or a Stable-Diffusion-style pipeline.")
        alpha_t, alpha_prev = policy.alphas(policy.timesteps)
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        if policy.config.eta <= 0 or not bool((variance > 0).all()):
            raise ConfigError(
                f"algo=nabla_gfn matches scores of Gaussian steps, so every step needs σ_t > 0; got model.eta="
                f"{policy.config.eta} and σ_t² = {[round(float(v), 6) for v in variance]}. Use model.eta=1 (and a "
                "scheduler with set_alpha_to_one=False if the last step is deterministic).")
        self.config = config
        self.optimizer = make_optimizer(policy.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.flow: ResidualFlow | None = None
        if not config.no_flow:
            text_dim = policy.encode_prompts([""]).shape[-1]
            with torch.random.fork_rng(devices=[]):  # φ's initial weights from the seed, global RNG untouched
                torch.manual_seed(seed)
                self.flow_net = ResidualFlow(policy.latent_shape[0], text_dim, channels=config.flow_channels,
                                             num_blocks=config.flow_blocks).to(policy.device)
            self.flow = self.flow_net  # the trainer replaces this with the prepared module (whose forward syncs)
            self.flow_optimizer = make_optimizer(self.flow_net.parameters(), lr=config.flow_lr,
                                                 weight_decay=config.flow_weight_decay)
        self.generator = torch.Generator(device=policy.device).manual_seed(seed)
        self.buffer_generator = torch.Generator(device=policy.device).manual_seed(seed + 1)
        self.buffer = make_replay_buffer(config.batch_size, config.minibatch_size, device=policy.device,
                                         generator=self.buffer_generator)
        self.previous: TensorDictBase | None = None
        self.prompts: list[str] = []
        self._epoch_metrics: dict = {}

    def trained_modules(self) -> dict[str, TrainedModule]:
        modules = {"policy": TrainedModule(self.optimizer, self.config.max_grad_norm)}
        if self.flow is not None:  # φ steps with the policy, on the same loss
            modules["flow"] = TrainedModule(self.flow_optimizer, self.config.max_grad_norm, module=self.flow_net,
                                            attribute="flow")
        return modules

    # ---------------------------------------------------------------- pieces
    def reward_prior(self, latents, timesteps, embeds, prompts, terminal, *, model_output=None):
        """g(x) = β·γ(t)·∇_x R(decode(x̂₀(x, t))) with γ(t) = ᾱ_t, detached [B, C, h, w]; terminal rows use
        x̂₀ = x and γ = 1 (the exact reward gradient). ``model_output`` reuses a prediction whose graph
        reaches ``latents``; otherwise the current policy predicts ε̂ at x. Returns (g, R(decode(x̂₀)))."""
        beta = self.config.reward_scale
        if beta == 0:
            return torch.zeros_like(latents), torch.zeros(latents.shape[0], device=latents.device)
        mask = terminal.view(-1, 1, 1, 1)
        with torch.enable_grad():
            x = latents if model_output is not None else latents.detach().requires_grad_(True)
            pred_x0 = x
            if not bool(terminal.all()):
                eps = model_output if model_output is not None else self.policy.predict_noise(x, timesteps, embeds)
                pred_x0 = torch.where(mask, x, self.policy.pred_x0(x, timesteps, eps))
            rewards = self.reward(self.policy.decode(pred_x0), prompts).float()
            (grad,) = torch.autograd.grad(rewards.sum(), x, retain_graph=model_output is not None, allow_unused=True)
        grad = torch.zeros_like(latents) if grad is None else grad
        gamma = torch.where(terminal, torch.ones_like(timesteps, dtype=torch.float32),
                            self.policy.alphas_cumprod[timesteps.long().clamp(min=0)])
        return (beta * gamma.view(-1, 1, 1, 1) * grad).detach(), rewards.detach()

    def transition_terms(self, td: TensorDictBase) -> dict[str, torch.Tensor]:
        """All loss terms and diagnostics of a batch of transitions [M] (keys of ``rl4diffusion.keys``)."""
        cfg, policy, kappa = self.config, self.policy, self.config.pretrained_strength
        td = self.with_conditioning(td)
        t, x_next, t_next = td[keys.TIMESTEP], td[keys.NEXT, keys.LATENTS], td[keys.NEXT, keys.TIMESTEP]
        terminal = td[keys.NEXT, keys.DONE].reshape(-1)
        embeds = td[keys.PROMPT_EMBEDS]
        prompts = [self.prompts[i] for i in td[keys.PROMPT_ID].tolist()]  # this batch's own prompts
        reverse = self.flow is not None and cfg.reverse_weight > 0 and not bool(terminal.all())
        x = td[keys.LATENTS].detach().requires_grad_(reverse)
        # 1. the reference: s_ref, and r_ref = κ ∇_x log p_ref(x′|x) when the reverse loss is on
        with torch.set_grad_enabled(reverse):
            ref = policy.step(policy.predict_noise(x, t, embeds, use_reference=True), x, t, prev_sample=x_next)
            score_ref = kappa * forward_score(x_next, ref.mean, ref.std).detach()
            reverse_ref = kappa * reverse_score(x, x_next, ref.mean, ref.std, retain_graph=False) if reverse else None
        # 2. the policy: s_θ (grad into θ), r_θ (graph kept only if reverse_trains_policy), ε̂_θ for the trust region
        second_order = reverse and cfg.reverse_trains_policy
        with _math_attention() if second_order else contextlib.nullcontext():
            eps = policy.predict_noise(x, t, embeds)
        cur = policy.step(eps, x, t, prev_sample=x_next)
        score = forward_score(x_next, cur.mean, cur.std)
        reverse_pol = kappa * reverse_score(x, x_next, cur.mean, cur.std, create_graph=second_order) if reverse else None
        # 3. the priors g(x′) (current policy's x̂₀, exact at t′ = 0) and g(x) (reusing ε̂_θ(x))
        prior_next, pred_rewards = self.reward_prior(x_next, t_next, embeds, prompts, terminal)
        prior = self.reward_prior(x, t, embeds, prompts, torch.zeros_like(terminal), model_output=eps)[0] if reverse else None
        # 4. the residual flow at x′ and x
        flow_next = self.flow(x_next, t_next, embeds) if self.flow is not None else None
        flow = self.flow(x.detach(), t, embeds) if reverse else None
        terms = nabla_gfn_loss(
            score, score_ref, prior_next, terminal, flow_next=flow_next, reverse=reverse_pol,
            reverse_ref=reverse_ref, prior=prior, flow=flow, model_output=eps,
            old_model_output=td.get(keys.SAMPLE_MODEL_OUTPUT, None), reverse_weight=cfg.reverse_weight,
            trust_region_weight=cfg.trust_region_weight,
        )
        queries = len(prompts) * (2 if reverse else 1) * (cfg.reward_scale > 0)
        return {**terms, "reward_pred_x0": pred_rewards.mean(), "reward_grad_queries": torch.tensor(float(queries))}

    # ---------------------------------------------------------------- the shared interface
    def collect(self, env) -> TensorDictBase:
        """Full chains [B, T] with the sampling-time prediction ε̂_old stored per step."""
        self.prompts = env.prompts
        self.remember_prompts(env.prompts)
        return collect_trajectories(env, _RecordingActor(self.policy), generator=self.generator)

    def optimisation_steps(self, batch: TensorDictBase) -> Iterator[OptimisationStep]:
        """One step (policy and φ together) per minibatch of chains; micro-batches are its sampled transitions."""
        cfg = self.config
        data = self.previous if cfg.use_previous_batch else batch
        self.previous = batch if cfg.use_previous_batch else None
        self._epoch_metrics = {"train/updated": 0.0}
        if data is None:  # the first iteration only stores its chains (upstream's epoch −1)
            return
        self._epoch_metrics = {"train/updated": 1.0, "train/reward_grad_queries": torch.zeros(()),
                               "diag/data_lag": float(data is not batch)}
        num_chains, num_steps = data.shape
        minibatch = cfg.minibatch_size // self.world
        optimizers = ("policy", "flow") if self.flow is not None else ("policy",)
        for _ in range(cfg.num_inner_epochs):
            self.buffer.empty()
            self.buffer.extend(data)  # items are whole chains [T]
            for _ in range(num_chains // minibatch):
                chains = self.buffer.sample(minibatch)  # (M, T)
                steps = stratified_steps(minibatch, num_steps, cfg.timestep_fraction, self.generator)  # (M, 1+K)
                picked = chains[torch.arange(minibatch)[:, None], steps.to(chains.device)]  # (M, 1+K)
                # (M,) transitions per micro-batch, terminal ones first
                yield OptimisationStep([picked[:, j] for j in range(steps.shape[1])], optimizers=optimizers)

    def loss_terms(self, td: TensorDictBase) -> dict[str, torch.Tensor]:
        terms = self.transition_terms(td)
        queries = terms.pop("reward_grad_queries")  # a count, summed over the epoch rather than averaged
        self._epoch_metrics["train/reward_grad_queries"] = self._epoch_metrics["train/reward_grad_queries"] + queries
        return terms

    def end_update(self) -> dict:
        return self._epoch_metrics

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state(), "buffer_generator": self.buffer_generator.get_state()}
        if self.previous is not None:  # the chains the next update trains on
            state.update(previous=self.previous.to_dict(), previous_shape=list(self.previous.shape))
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.buffer_generator.set_state(state["buffer_generator"])
        self.previous = None
        if "previous" in state:
            self.previous = TensorDict(state["previous"], batch_size=state["previous_shape"], device=self.policy.device)


def _math_attention():
    """Second-order gradients through attention need the math SDPA kernel (the fused CPU one has no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
