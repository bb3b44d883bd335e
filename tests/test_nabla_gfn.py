"""Nabla-GFlowNet (residual ∇-DB): the pure scores and losses against independent computations, the
fixed point at the pretrained model, the exact terminal reward gradient, gradient plumbing, the
off-policy data flow and state, start-up refusal of non-differentiable rewards, and training."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rl4diffusion import keys
from rl4diffusion.algorithms import build_algorithm
from rl4diffusion.algorithms.nabla_gfn import (
    _RecordingActor,
    forward_score,
    nabla_gfn_loss,
    reverse_score,
    stratified_steps,
)
from rl4diffusion.data import collect_trajectories
from rl4diffusion.envs import DenoisingEnv
from rl4diffusion.errors import ConfigError
from rl4diffusion.training.optimisation import Updater
from rl4diffusion.training.trainer import run
from tests.conftest import bright_reward, brightness, compose_config

PROMPTS = ["a red circle", "a blue square"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_algo(policy, reward=None, **options):
    options = {"batch_size": 4, "minibatch_size": 4, "use_previous_batch": False, "timestep_fraction": 0.5, **options}
    return build_algorithm("nabla_gfn", options, policy, reward or bright_reward(), seed=0)


def collect(algo, batch=4, seed=0):
    env = DenoisingEnv(algo.policy, algo.reward, PROMPTS, batch_size=batch)
    env.set_seed(seed)
    algo.generator.manual_seed(seed)
    return env, algo.collect(env)


def randomise_lora(policy, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA starts with B = 0 (the reference); move it so policy ≠ reference
        for p in policy.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- pure functions
def test_forward_score_is_the_gaussian_score():
    g = torch.Generator().manual_seed(0)
    mean, x_next = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    std = torch.tensor([0.1, 0.5, 1.3]).view(3, 1, 1, 1)
    s = forward_score(x_next, mean, std)
    torch.testing.assert_close(s, -(x_next - mean) / std**2)
    x = x_next.clone().requires_grad_(True)  # autograd of the Gaussian log-density in x′
    log_density = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).sum()
    torch.testing.assert_close(s, torch.autograd.grad(log_density, x)[0])


def test_reverse_score_is_the_gradient_in_x_with_or_without_graph():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 8, generator=g).requires_grad_(True)  # μ(x) = W x, a toy "network"
    x = torch.randn(2, 8, generator=g).requires_grad_(True)
    x_next, std = torch.randn(2, 8, generator=g), torch.tensor([[0.3], [0.7]])
    mean = x @ weight.T
    r = reverse_score(x, x_next, mean, std)
    torch.testing.assert_close(r, ((x_next - mean) / std**2) @ weight)  # J_μᵀ (x′ − μ)/σ²
    assert r.grad_fn is None  # upstream's choice: a constant for θ
    r2 = reverse_score(x, x_next, x @ weight.T, std, create_graph=True)
    (grad_w,) = torch.autograd.grad(r2.square().sum(), weight)
    assert grad_w.abs().sum() > 0  # create_graph: the reverse loss reaches θ


def test_stratified_steps_terminal_plus_one_per_stratum():
    g = torch.Generator().manual_seed(0)
    steps = stratified_steps(500, 20, 0.1, g)
    assert steps.shape == (500, 3)  # ⌊20·0.1⌋ + 1 per chain
    assert (steps[:, 0] == 19).all()
    assert steps[:, 1].min() == 0 and steps[:, 1].max() == 9  # strata of the 19 non-terminal steps: 0–9, 10–18
    assert steps[:, 2].min() == 10 and steps[:, 2].max() == 18
    assert stratified_steps(4, 50, 0.1, g).shape == (4, 6)  # the paper's 50 steps → 6 transitions
    assert stratified_steps(4, 5, 0.1, g).tolist() == [[4]] * 4  # ⌊0.5⌋ = 0 strata: terminal only
    assert sorted(set(stratified_steps(200, 5, 1.0, g)[:, 1:].flatten().tolist())) == [0, 1, 2, 3]


def test_loss_matches_hand_computation():
    shape = (3, 1, 1, 2)
    score = torch.tensor([1.0, 2.0, 0.0, -1.0, 3.0, 1.0]).view(shape).requires_grad_(True)
    score_ref = torch.tensor([0.5, 1.0, 1.0, 0.0, 2.0, 2.0]).view(shape)
    prior_next = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).view(shape)
    flow_next = torch.tensor([0.2, -0.2, 1.0, 0.0, 0.5, 0.5]).view(shape).requires_grad_(True)
    terminal = torch.tensor([False, False, True])
    reverse, reverse_ref = torch.ones(shape), torch.full(shape, 2.0)
    prior, flow = torch.full(shape, 0.5), torch.full(shape, 0.25)
    out = nabla_gfn_loss(score, score_ref, prior_next, terminal, flow_next=flow_next, reverse=reverse,
                         reverse_ref=reverse_ref, prior=prior, flow=flow, model_output=torch.ones(shape),
                         old_model_output=torch.zeros(shape), reverse_weight=0.5, trust_region_weight=3.0)
    target = torch.tensor([0.5 + 0.2 + 0.1, 1.0 - 0.2 + 0.2, 1.0 + 1.0 + 0.3, 0.0 + 0.0 + 0.4,
                           2.0 + 0.5, 2.0 + 0.6])  # the terminal row drops φ
    torch.testing.assert_close(out["loss_forward"], ((score.detach().flatten() - target) ** 2).mean())
    torch.testing.assert_close(out["loss_reverse"], torch.tensor(0.5 * (1.0 - (2.0 - 0.25 - 0.5)) ** 2))
    torch.testing.assert_close(out["loss_terminal"], torch.tensor((0.5**2 + 0.5**2) / 2))
    torch.testing.assert_close(out["loss_trust_region"], torch.tensor(3.0))
    out["loss_forward"].backward()
    assert flow_next.grad[:2].abs().sum() > 0 and flow_next.grad[2].abs().sum() == 0  # sg on the terminal target
    no_flow = nabla_gfn_loss(score.detach(), score_ref, prior_next, terminal)
    assert set(k for k in no_flow if k.startswith("loss_")) == {"loss_forward"}
    torch.testing.assert_close(no_flow["loss_forward"], ((score.detach() - score_ref - prior_next) ** 2).mean())


# ----------------------------------------------------------------------------- the algorithm
def test_recording_actor_samples_exactly_like_policy_act(make_policy):
    policy = make_policy()
    env = DenoisingEnv(policy, bright_reward(), PROMPTS, batch_size=3)
    runs = []
    for actor in (policy, _RecordingActor(policy)):
        env.set_seed(0)
        runs.append(collect_trajectories(env, actor, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(runs[0][keys.ACTION], runs[1][keys.ACTION], rtol=0, atol=0)
    step = runs[1][:, 2]
    with torch.no_grad():
        embeds = policy.encode_prompts(env.core.prompts_of(step[keys.PROMPT_ID]))
        eps = policy.predict_noise(step[keys.LATENTS], step[keys.TIMESTEP], embeds)
    torch.testing.assert_close(step[keys.SAMPLE_MODEL_OUTPUT], eps)


def test_pretrained_model_is_a_fixed_point(make_policy):
    """φ ≡ 0, β = 0 and a fresh LoRA (policy = reference): every loss term is exactly 0, on terminal
    and non-terminal transitions, including the reverse and trust-region terms."""
    algo = make_algo(make_policy(), reward_scale=0.0, trust_region_weight=10.0)
    _, batch = collect(algo)
    for j in (4, 2, 0):
        terms = algo.transition_terms(batch[:, j])
        losses = {k: v.item() for k, v in terms.items() if k.startswith("loss_")}
        expected = {"loss_forward", "loss_terminal", "loss_trust_region"} | ({"loss_reverse"} if j < 4 else set())
        assert set(losses) == expected and all(v == 0.0 for v in losses.values()), (j, losses)
        assert terms["score_ref_norm"] > 0  # the scores themselves are not trivially zero
    randomise_lora(algo.policy)
    assert algo.transition_terms(batch[:, 2])["loss_forward"] > 0  # …and the test can fail


def test_terminal_prior_is_the_exact_reward_gradient(make_policy):
    algo = make_algo(make_policy(), reward_scale=7.0)
    policy = algo.policy
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(2))
    embeds = policy.encode_prompts(PROMPTS)
    t0 = torch.zeros(2, dtype=torch.long)
    g, rewards = algo.reward_prior(x, t0, embeds, PROMPTS, torch.tensor([True, True]))
    x_leaf = x.clone().requires_grad_(True)
    images = (policy.vae.decode(x_leaf / policy.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    (direct,) = torch.autograd.grad(images.mean(dim=(1, 2, 3)).sum(), x_leaf)
    torch.testing.assert_close(g, 7.0 * direct)  # β·∇_{x₀} R(decode(x₀)), γ(0) = 1, no x̂₀ network call
    torch.testing.assert_close(rewards, images.detach().mean(dim=(1, 2, 3)))
    # a non-terminal state: γ(t) = ᾱ_t and the gradient flows through x̂₀(x, t) = (x − √(1−ᾱ) ε̂(x)) / √ᾱ
    t = policy.timesteps[2].expand(2)
    g_mid, _ = algo.reward_prior(x, t, embeds, PROMPTS, torch.tensor([False, False]))
    a = policy.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_leaf = x.clone().requires_grad_(True)
    x0 = (x_leaf - (1 - a).sqrt() * policy.predict_noise(x_leaf, t, embeds)) / a.sqrt()
    (direct,) = torch.autograd.grad(brightness(policy.decode(x0), PROMPTS).sum(), x_leaf)
    torch.testing.assert_close(g_mid, 7.0 * a * direct)
    # end to end: on a collected terminal transition with policy = reference, T_F − s_θ is exactly β∇R(decode(x₀))
    _, batch = collect(algo, batch=2)
    last = batch[:, -1]
    assert bool(last[keys.NEXT, keys.DONE].all())
    x0 = last[keys.NEXT, keys.LATENTS].clone().requires_grad_(True)
    reward = brightness(policy.decode(x0), [PROMPTS[i] for i in last[keys.PROMPT_ID].tolist()])
    (exact,) = torch.autograd.grad(reward.sum(), x0)
    terms = algo.transition_terms(last)
    torch.testing.assert_close(terms["loss_forward"], ((7.0 * exact) ** 2).mean())
    assert terms["loss_forward"] > 0


def test_gradients_reach_lora_and_flow_only_and_reverse_graph_choice(make_policy):
    policy = make_policy()
    randomise_lora(policy)
    algo = make_algo(policy, reward_scale=50.0, trust_region_weight=1.0, reverse_weight=1.0)
    _, batch = collect(algo)
    trainable = {id(p) for p in policy.trainable_parameters()} | {id(p) for p in algo.flow.parameters()}

    def grads(term, mid=batch[:, 1]):
        policy.zero_grad(set_to_none=True)
        algo.flow.zero_grad(set_to_none=True)
        algo.transition_terms(mid)[term].backward()
        lora = sum(float(p.grad.abs().sum()) for p in policy.trainable_parameters() if p.grad is not None)
        flow = sum(float(p.grad.abs().sum()) for p in algo.flow.parameters() if p.grad is not None)
        return lora, flow

    lora, flow = grads("loss_forward")
    assert lora > 0 and flow > 0
    for p in [*policy.unet.parameters(), *policy.vae.parameters(), *policy.text_encoder.parameters()]:
        assert p.grad is None or id(p) in trainable
    assert grads("loss_reverse")[0] == 0.0 and grads("loss_reverse")[1] > 0  # default: r_θ detached (upstream)
    algo.config.reverse_trains_policy = True
    lora, flow = grads("loss_reverse")
    assert lora > 0 and flow > 0  # create_graph: the reverse loss also trains θ


def test_no_flow_variant_trains_the_forward_loss_only(make_policy):
    algo = make_algo(make_policy(), no_flow=True, reward_scale=50.0)
    assert algo.flow is None and len(algo.trained_modules()) == 1
    _, batch = collect(algo)
    terms = algo.transition_terms(batch[:, 1])
    assert {k for k in terms if k.startswith("loss_")} == {"loss_forward", "loss_trust_region"}
    assert terms["flow_norm"] == 0


def test_update_trains_on_the_previous_batch_and_state_round_trips(make_policy, tmp_path):
    algo = make_algo(make_policy(), use_previous_batch=True, reward_scale=50.0)
    env, first = collect(algo)
    update = Updater(algo)
    assert update(first) == {"train/updated": 0.0}  # the first iteration only stores its chains
    before = [p.detach().clone() for p in algo.policy.trainable_parameters()]
    second = algo.collect(env)
    queries = algo.reward.queries
    metrics = update(second)
    assert metrics["train/updated"] == 1.0 and metrics["diag/data_lag"] == 1.0
    assert all(isinstance(v, float) for v in metrics.values())
    assert {"loss/forward", "loss/reverse", "loss/terminal", "loss/trust_region", "diag/grad_norm",
            "diag/flow_grad_norm", "diag/prior_norm", "diag/residual_norm"} <= set(metrics)
    assert algo.reward.queries - queries == metrics["train/reward_grad_queries"] == 4 * (1 + 2 * 2)  # g(x₀) on the terminal pass, g(x′) and g(x) on 2 others
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.policy.trainable_parameters()))
    assert algo.previous is second
    torch.save(algo.state_dict(), tmp_path / "state.pt")  # what a checkpoint does
    other = make_algo(make_policy(), use_previous_batch=True, reward_scale=50.0)
    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert (other.previous == second).all()
    assert "flow" not in algo.state_dict()  # φ's weights and the optimisers are checkpointed by accelerate
    assert torch.equal(other.generator.get_state(), algo.generator.get_state())


def test_bad_settings_fail_with_config_errors(make_policy):
    with pytest.raises(ConfigError, match="σ_t > 0"):
        make_algo(make_policy(eta=0.0))
    with pytest.raises(ConfigError, match="divide"):
        make_algo(make_policy(), batch_size=6, minibatch_size=4)
    from rl4diffusion.rewards import build_reward

    with pytest.raises(ConfigError, match="nabla_gfn backpropagates through the reward.*shape_alignment"):
        build_algorithm("nabla_gfn", {}, make_policy(), build_reward("jpeg_compressibility"))


def test_cli_refuses_non_differentiable_reward(random_pipeline_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "rl4diffusion.train", "algo=nabla_gfn", "reward=jpeg_compressibility",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "algo=nabla_gfn backpropagates through the reward" in proc.stderr and "not differentiable" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ----------------------------------------------------------------------------- training
def test_nabla_gfn_raises_eval_reward_on_fixed_seeds(random_pipeline_dir, tmp_path, monkeypatch):
    (tmp_path / "bright_rewards_ngfn.py").write_text(
        "def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n\nbrightness.differentiable = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config([
        "algo=nabla_gfn", "reward=bright_rewards_ngfn:brightness", f"model=path:{random_pipeline_dir}",
        "model.num_steps=8", "model.guidance_scale=3.0", "prompts=[a red circle,a blue square]",
        "eval.prompt_sets=[[a red circle,a blue square]]", "eval.samples_per_prompt=8", "eval.every=0", "epochs=6",
        "algo.batch_size=16", "algo.minibatch_size=8", "algo.reward_scale=1e5", "algo.trust_region_weight=1",
        "algo.timestep_fraction=0.25", "algo.lr=1e-2", "algo.flow_lr=1e-2", "progress=false",
    ])
    summary = run(cfg, tmp_path / "run")
    assert summary["final"]["set0"]["reward_mean"] > summary["base"]["set0"]["reward_mean"] + 0.005
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["phase"] == "train"]
    assert [r["train/updated"] for r in train] == [0.0] + [1.0] * 5
    assert all(r["diag/data_lag"] == 1.0 for r in train[1:])
