"""Reward backpropagation (ReFL, DRaFT/-K/-LV, AlignProp): the pure losses and samplers, the
gradient plumbing of the differentiable window against a hand-written chain, and training."""

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler
from tensordict import TensorDict

from rl4diffusion import keys
from rl4diffusion.algorithms import build_algorithm
from rl4diffusion.algorithms.alignprop import alignprop_loss, truncation_start
from rl4diffusion.algorithms.backprop import sample_with_grad_window
from rl4diffusion.algorithms.draft import draft_grad_start, draft_loss, lv_renoise
from rl4diffusion.algorithms.refl import refl_loss, refl_start_index
from rl4diffusion.errors import ConfigError
from tests.conftest import bright_reward

PROMPTS = ["a red circle", "a blue square"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- pure functions
def test_refl_loss_matches_hand_computation():
    r = torch.tensor([1.0, 3.0, -1.0], requires_grad=True)
    out = refl_loss(r, target=2.0, scale=0.5)
    torch.testing.assert_close(out["loss_reward"], torch.tensor(0.5 * (1.0 + 0.0 + 3.0) / 3))
    assert out["frac_below_target"].item() == pytest.approx(2 / 3)
    out["loss_reward"].backward()  # ReLU: no gradient for the sample already above the target
    torch.testing.assert_close(r.grad, torch.tensor([-0.5 / 3, 0.0, -0.5 / 3]))
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    out = refl_loss(r.detach(), target=2.0, scale=0.5, reg_prediction=pred, reg_target=target, reg_weight=0.1)
    torch.testing.assert_close(out["loss_pretrain"], torch.tensor(0.1))
    assert "loss_pretrain" not in refl_loss(r.detach(), target=2.0, scale=0.5)


def test_refl_without_a_target_pushes_every_reward_up_whatever_its_scale():
    """The default has no target: a target of 0 gave a reward in [0, 1] no gradient at all."""
    from rl4diffusion.algorithms.refl import ReFLConfig

    assert ReFLConfig().reward_target is None
    for r in (torch.tensor([0.2, 0.9, 1.0], requires_grad=True), torch.tensor([5.1, 6.0, 4.2], requires_grad=True)):
        out = refl_loss(r, target=ReFLConfig().reward_target, scale=0.5)
        torch.testing.assert_close(out["loss_reward"], -0.5 * r.detach().mean())
        out["loss_reward"].backward()
        torch.testing.assert_close(r.grad, torch.full((3,), -0.5 / 3))
    # on a log-probability (≤ 0) it is the old target of 0, value and gradient
    logp = torch.tensor([-0.1, -2.0, -0.7], requires_grad=True)
    hinge = torch.tensor([-0.1, -2.0, -0.7], requires_grad=True)
    refl_loss(logp, target=None, scale=1.0)["loss_reward"].backward()
    refl_loss(hinge, target=0.0, scale=1.0)["loss_reward"].backward()
    torch.testing.assert_close(logp.grad, hinge.grad)


def test_refl_start_index_covers_the_papers_late_steps():
    g = torch.Generator().manual_seed(0)
    draws = {refl_start_index(40, [0.75, 1.0], g) for _ in range(400)}
    assert draws == set(range(30, 40))  # the paper's steps 30–39 of 40
    assert {refl_start_index(5, [0.4, 0.6], g) for _ in range(20)} == {2}


def test_draft_loss_window_and_lv_renoise():
    r = torch.tensor([0.2, 0.6])
    torch.testing.assert_close(draft_loss(r, scale=2.0)["loss_reward"], torch.tensor(-0.8))
    assert draft_grad_start(20, 1) == 19 and draft_grad_start(20, 3) == 17
    assert draft_grad_start(20, 0) == 0 and draft_grad_start(20, None) == 0
    with pytest.raises(ConfigError, match="exceeds the 20 sampling steps"):
        draft_grad_start(20, 21)
    x0 = torch.randn(3, 4, 2, 2, requires_grad=True)
    eps = torch.randn(2, 3, 4, 2, 2)
    out = lv_renoise(x0, 0.81, eps)
    torch.testing.assert_close(out, 0.9 * x0.detach() + (0.19**0.5) * eps)
    assert out.shape == (2, 3, 4, 2, 2) and not out.requires_grad  # sg(x₀): no gradient to the sample


def test_truncation_start_strategies():
    g = torch.Generator().manual_seed(0)
    b = torch.tensor([truncation_start(50, strategy="gaussian", generator=g) for _ in range(3000)], dtype=torch.float)
    g2 = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn((1,), generator=g2) for _ in range(3000)])
    torch.testing.assert_close(b, (42 + 5 * z).round().clamp(1, 49))  # the paper's N(42, 5) of 50, clipped to [1, 49]
    assert abs(b.median().item() - 42) <= 1 and 0.05 < (b == 49).float().mean() < 0.15
    clipped = {truncation_start(10, strategy="gaussian", mean=0.5, std=10.0, generator=g) for _ in range(200)}
    assert {1, 9} <= clipped <= set(range(1, 10))  # clipped to [1, N−1]
    uni = {truncation_start(50, strategy="uniform", low=0.7, high=0.9, generator=g) for _ in range(500)}
    assert uni == set(range(35, 46))
    assert truncation_start(20, strategy="fixed", fixed=0.8, generator=g) == 16
    assert truncation_start(1, strategy="fixed", generator=g) == 0


def test_alignprop_loss():
    r = torch.tensor([2.0, 4.0])
    torch.testing.assert_close(alignprop_loss(r, scale=0.01)["loss_reward"], torch.tensor(-0.03))
    torch.testing.assert_close(alignprop_loss(r, scale=0.01, target=3.0)["loss_reward"], torch.tensor(0.01))


# ----------------------------------------------------------------------------- gradient plumbing
def make_algo(make_policy, name, reward=None, policy_options=None, **options):
    policy = make_policy(**(policy_options or {}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA starts with B = 0: set every adapter weight (seeded) so all get a gradient
        for p in policy.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    algo = build_algorithm(name, options, policy, reward or bright_reward(), seed=0)
    algo.prompts = PROMPTS
    return algo


def start_states(policy, batch=2, seed=3):
    x_T = torch.randn(batch, *policy.latent_shape, generator=torch.Generator().manual_seed(seed))
    ids = torch.arange(batch) % len(PROMPTS)
    return TensorDict({keys.LATENTS: x_T, keys.PROMPT_ID: ids,
                       keys.PROMPT_EMBEDS: policy.encode_prompts([PROMPTS[i] for i in ids])}, batch_size=[batch])


def grads_of(algo, minibatch, seed=0):
    """Parameter gradients of the algorithm's loss with its generator at ``seed``."""
    algo.generator.manual_seed(seed)
    algo.policy.zero_grad(set_to_none=True)
    terms = algo.loss(minibatch)
    sum(v for k, v in terms.items() if k.startswith("loss_")).backward()
    return [p.grad.clone() for p in algo.policy.trainable_parameters()], terms


def hand_eps(policy, x, t, embeds):
    """The raw UNet with classifier-free guidance, written out."""
    w = policy.config.guidance_scale
    neg = policy.negative_embeds.expand_as(embeds)
    out = policy.unet(torch.cat([x, x]), t.expand(2 * x.shape[0]),
                      encoder_hidden_states=torch.cat([neg, embeds])).sample
    u, c = out.chunk(2)
    return u + w * (c - u)


def hand_decode_brightness(policy, x0):
    images = policy.vae.decode(x0 / policy.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1).mean(dim=(1, 2, 3))


def fresh_scheduler(policy):
    scheduler = DDIMScheduler.from_config(policy.pipeline.scheduler.config)
    scheduler.set_timesteps(policy.config.num_steps)
    return scheduler


def test_draft_k1_gradient_equals_hand_computed_one_step_gradient(make_policy):
    algo = make_algo(make_policy, "draft", k=1, checkpointing=True)
    policy, mb = algo.policy, start_states(algo.policy)
    ours, terms = grads_of(algo, mb, seed=7)

    # the same chain with diffusers' own DDIMScheduler.step and the same noise (drawn in the same order)
    scheduler, eta = fresh_scheduler(policy), policy.config.eta
    g = torch.Generator().manual_seed(7)
    noise = [torch.randn(mb[keys.LATENTS].shape, generator=g) for _ in policy.timesteps]
    x, embeds = mb[keys.LATENTS], mb[keys.PROMPT_EMBEDS]
    policy.zero_grad(set_to_none=True)
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i == len(scheduler.timesteps) - 1):  # only the last step carries grad
            x = scheduler.step(hand_eps(policy, x, t, embeds), t, x, eta=eta, variance_noise=noise[i]).prev_sample
    reward = hand_decode_brightness(policy, x)
    (-reward.mean()).backward()
    theirs = [p.grad for p in policy.trainable_parameters()]

    torch.testing.assert_close(terms["rewards"].detach(), reward.detach(), rtol=1e-5, atol=1e-6)
    assert sum(t.abs().sum() for t in theirs) > 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_refl_gradient_is_through_x0_prediction_of_one_step(make_policy):
    algo = make_algo(make_policy, "refl", start_range=[0.4, 0.6], reward_target=2.0, loss_scale=1.0)  # s = 2 of 5
    policy, mb = algo.policy, start_states(algo.policy)
    ours, terms = grads_of(algo, mb, seed=5)
    assert terms["grad_step"].item() == 2

    scheduler, eta = fresh_scheduler(policy), policy.config.eta
    g = torch.Generator().manual_seed(5)
    torch.randint(2, 3, (1,), generator=g)  # the draw of s (one value from the algorithm's generator)
    x, embeds = mb[keys.LATENTS], mb[keys.PROMPT_EMBEDS]
    policy.zero_grad(set_to_none=True)
    for i, t in enumerate(scheduler.timesteps[:3]):
        z = torch.randn(x.shape, generator=g)
        with torch.set_grad_enabled(i == 2):
            out = scheduler.step(hand_eps(policy, x, t, embeds), t, x, eta=eta, variance_noise=z)
        x = out.prev_sample
    reward = hand_decode_brightness(policy, out.pred_original_sample)
    torch.relu(2.0 - reward).mean().backward()
    for a, b in zip(ours, (p.grad for p in policy.trainable_parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def unet_grad_modes(algo, mb):
    """Whether grad was enabled at each UNet call of one forward pass (before backward)."""
    modes = []
    handle = algo.policy.unet.register_forward_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    try:
        algo.generator.manual_seed(0)
        algo.loss(mb)
    finally:
        handle.remove()
    return modes


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("draft", {"k": 2}, [False, False, False, True, True]),
        ("draft", {"k": 0}, [True] * 5),
        ("draft", {"k": 1, "lv": True}, [False] * 5 + [True]),  # one batched call for both re-noisings
        ("alignprop", {"truncation": "fixed", "trunc_fixed": 0.6}, [False, False, False, True, True]),
        ("refl", {"start_range": [0.4, 0.6]}, [False, False, True]),
    ],
)
def test_steps_before_the_window_run_without_grad(make_policy, name, options, expected):
    algo = make_algo(make_policy, name, **options)
    assert unet_grad_modes(algo, start_states(algo.policy)) == expected


def test_pre_window_steps_get_no_gradient(make_policy):
    """Perturbing the pre-window chain's graph changes nothing: the window's gradient only depends on x_b's value."""
    policy = make_algo(make_policy, "draft").policy
    mb = start_states(policy)
    noise = torch.randn(5, *mb[keys.LATENTS].shape, generator=torch.Generator().manual_seed(0))
    x, e = mb[keys.LATENTS], mb[keys.PROMPT_EMBEDS]

    def grads(**kw):
        policy.zero_grad(set_to_none=True)
        out = sample_with_grad_window(policy, kw.pop("x", x), e, noise=kw.pop("noise", noise), **kw)
        hand_decode_brightness(policy, out.latents).sum().backward()
        return [p.grad.clone() for p in policy.trainable_parameters()]

    whole = grads(grad_start=3)
    with torch.no_grad():
        x3 = sample_with_grad_window(policy, x, e, grad_start=3, stop=3, noise=noise[:3]).latents
    window_only = grads(x=x3, start=3, grad_start=3, noise=noise[3:])
    for a, b in zip(whole, window_only):
        torch.testing.assert_close(a, b)
    # the check has teeth: letting the first three steps carry grad changes the gradient
    full = grads(grad_start=0)
    assert max((a - b).abs().max() for a, b in zip(full, whole)) > 1e-3 * max(a.abs().max() for a in full)


def test_checkpointing_gives_the_same_gradients(make_policy):
    """Same gradients with and without checkpointing — and checkpointing really happens: each of the N
    UNet calls runs again during backward (its activations were recomputed, not stored)."""
    mb = None
    results, calls = [], []
    for ckpt in (True, False):
        algo = make_algo(make_policy, "draft", k=0, checkpointing=ckpt)  # the full chain
        mb = mb if mb is not None else start_states(algo.policy)
        count = []
        # a pre-hook: the recomputation stops early, once the last saved tensor is rebuilt (before forward hooks)
        handle = algo.policy.unet.register_forward_pre_hook(lambda *_, c=count: c.append(1))
        try:
            results.append(grads_of(algo, mb, seed=11)[0])
        finally:
            handle.remove()
        calls.append(len(count))
    assert calls == [2 * 5, 5]  # on: forward + recomputation in backward; off: forward only
    assert sum(a.abs().sum() for a in results[0]) > 0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_lv_estimator_is_the_mean_of_single_renoising_gradients(make_policy):
    algo = make_algo(make_policy, "draft", k=1, lv=True, lv_n=2)
    policy, mb = algo.policy, start_states(algo.policy)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, *policy.latent_shape, generator=g)
    eps, z = torch.randn(2, 2, *policy.latent_shape, generator=g), torch.randn(2, 2, *policy.latent_shape, generator=g)
    args = (x0, mb[keys.PROMPT_EMBEDS], mb[keys.PROMPT_ID])

    def grads(e, zz):
        policy.zero_grad(set_to_none=True)
        draft_loss(algo.lv_rewards(*args, e, zz))["loss_reward"].backward()
        return [p.grad.clone() for p in policy.trainable_parameters()]

    both = grads(eps, z)
    singles = [grads(eps[j : j + 1], z[j : j + 1]) for j in range(2)]
    for a, b0, b1 in zip(both, *singles):
        torch.testing.assert_close(a, (b0 + b1) / 2, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(singles[0][0], singles[1][0])  # the two re-noisings really differ

    # one re-noising by hand: x̃ = √ᾱ x₀ + √(1−ᾱ) ε at the last timestep, one diffusers step with grad
    scheduler, t = fresh_scheduler(policy), policy.timesteps[-1]
    a = scheduler.alphas_cumprod[t]
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps[0]
    x = scheduler.step(hand_eps(policy, noisy, t, mb[keys.PROMPT_EMBEDS]), t, noisy, eta=policy.config.eta,
                       variance_noise=z[0]).prev_sample
    policy.zero_grad(set_to_none=True)
    (-hand_decode_brightness(policy, x).mean()).backward()
    for a_, b_ in zip(singles[0], (p.grad for p in policy.trainable_parameters())):
        torch.testing.assert_close(a_, b_, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- configuration and start-up
def test_bad_options_fail_with_config_errors(make_policy):
    with pytest.raises(ConfigError, match="defined for K = 1"):
        make_algo(make_policy, "draft", k=2, lv=True)
    with pytest.raises(ConfigError, match="exceeds the 5 sampling steps"):
        make_algo(make_policy, "draft", k=6)
    with pytest.raises(ConfigError, match="start_range"):
        make_algo(make_policy, "refl", start_range=[0.9, 0.5])
    with pytest.raises(ConfigError, match="truncation"):
        make_algo(make_policy, "alignprop", truncation="beta")
    with pytest.raises(ConfigError, match="divide"):
        make_algo(make_policy, "alignprop", batch_size=6, minibatch_size=4)


@pytest.mark.parametrize("name", ["refl", "alignprop"])
def test_non_differentiable_reward_is_refused(make_policy, name):
    from rl4diffusion.rewards import build_reward

    with pytest.raises(ConfigError, match="not differentiable.*shape_alignment"):
        build_algorithm(name, {}, make_policy(), build_reward("jpeg_compressibility"))


def test_cli_refuses_non_differentiable_reward_before_loading_the_model(random_pipeline_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rl4diffusion.train", "algo=draft", "reward=jpeg_compressibility",
         f"model=path:{random_pipeline_dir}", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "algo=draft backpropagates through the reward" in proc.stderr and "reward=shape_alignment" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_state_dict_round_trip(make_policy):
    algo = make_algo(make_policy, "refl")
    algo.generator.manual_seed(123)
    state = algo.state_dict()
    other = make_algo(make_policy, "refl")
    other.load_state_dict(state)
    assert torch.equal(other.generator.get_state(), algo.generator.get_state())
    assert torch.equal(other.reg_generator.get_state(), algo.reg_generator.get_state())


def test_refl_pretraining_regulariser_is_the_denoising_loss_on_shapes(make_policy):
    from rl4diffusion.zoo.shapes import TRAIN_PROMPTS, sample_shapes

    algo = make_algo(make_policy, "refl", loss_scale=0.0, reg_weight=0.5, reg_batch_size=3)
    policy, mb = algo.policy, start_states(algo.policy)
    ours, terms = grads_of(algo, mb)
    assert terms["loss_reward"].item() == 0 and terms["loss_pretrain"].item() > 0

    g = torch.Generator().manual_seed(2)  # the regulariser's generator (seed + 2), drawn in the same order
    captions = [TRAIN_PROMPTS[i] for i in torch.randint(len(TRAIN_PROMPTS), (3,), generator=g).tolist()]
    images = sample_shapes(3, generator=g, prompts=captions)[0]
    x0 = policy.vae.encode(images * 2 - 1).latent_dist.mean * policy.vae.config.scaling_factor
    t = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = policy.pipeline.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    pred = policy.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=policy.encode_prompts(captions)).sample
    policy.zero_grad(set_to_none=True)
    loss = 0.5 * ((pred - eps) ** 2).mean()
    loss.backward()
    torch.testing.assert_close(terms["loss_pretrain"], loss.detach(), rtol=1e-5, atol=1e-7)
    for a_, b_ in zip(ours, (p.grad for p in policy.trainable_parameters())):
        torch.testing.assert_close(a_, b_, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("algo, extra", [("draft", []), ("refl", ["algo.reward_target=1.0"]), ("alignprop", [])])
def test_training_raises_a_differentiable_reward_on_the_random_pipeline(random_pipeline_dir, tmp_path, monkeypatch,
                                                                         algo, extra):
    from rl4diffusion.training.trainer import run
    from tests.conftest import compose_config

    (tmp_path / "bright_rewards_backprop.py").write_text(
        "def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n\nbrightness.differentiable = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config([
        f"algo={algo}", "reward=bright_rewards_backprop:brightness", f"model=path:{random_pipeline_dir}", "model.num_steps=6",
        "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
        "eval.samples_per_prompt=4", "eval.every=0", "epochs=3", "algo.batch_size=4", "algo.minibatch_size=4",
        "algo.lr=3e-2", "progress=false", "threads=1", "save_lora=false", *extra,
    ])
    summary = run(cfg, tmp_path / "run")
    assert summary["final"]["set0"]["reward_mean"] > summary["base"]["set0"]["reward_mean"] + 0.01
    train = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["phase"] == "train"]
    assert len(train) == 3 and train[-1]["reward_queries"] == 3 * 4
    assert {"loss/reward", "train/reward_mean", "diag/grad_norm"} <= set(train[-1])


def test_resume_continues_exactly(random_pipeline_dir, tmp_path, monkeypatch):
    """2 epochs + resume to 3 = 3 epochs straight: optimiser, generators (chain noise, the ReFL step, the
    regulariser's data) and the buffer's order are all in the checkpoint."""
    from rl4diffusion.training.trainer import run
    from tests.conftest import compose_config

    (tmp_path / "bright_rewards_backprop.py").write_text(
        "def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n\nbrightness.differentiable = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["algo=refl", "reward=bright_rewards_backprop:brightness", f"model=path:{random_pipeline_dir}", "model.num_steps=4",
            "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle]]", "eval.samples_per_prompt=2",
            "eval.every=0", "algo.batch_size=4", "algo.minibatch_size=2", "algo.lr=1e-2", "algo.reward_target=1.0",
            "algo.reg_weight=0.1", "algo.reg_batch_size=2", "checkpoint.every=1", "threads=1", "progress=false",
            "save_lora=false"]
    run(compose_config([*base, "epochs=3"]), tmp_path / "straight")
    run(compose_config([*base, "epochs=2"]), tmp_path / "resumed")
    run(compose_config([*base, "epochs=3", f"resume={tmp_path / 'resumed'}"]), tmp_path / "resumed")

    def train_metrics(run_dir):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "wall" not in k and k != "train_cpu_s"} for r in lines if r["phase"] == "train"]

    straight, resumed = train_metrics(tmp_path / "straight"), train_metrics(tmp_path / "resumed")
    assert len(straight) == 3 and straight == resumed


@pytest.mark.slow
@pytest.mark.parametrize("algo", [["algo=refl"], ["algo=draft"], ["algo=draft", "algo.lv=true"], ["algo=alignprop"]],
                         ids=["refl", "draft-1", "draft-lv", "alignprop"])
def test_each_method_raises_shape_alignment_on_the_tiny_model(tmp_path, algo):
    """The acceptance run: the configured defaults raise the eval reward on the embedded world in CPU-minutes
    (base and final evaluated on the same seeds)."""
    from rl4diffusion.training.trainer import run
    from tests.conftest import compose_config

    cfg = compose_config([*algo, "reward=shape_alignment", "model=tiny", "epochs=20", "eval.every=0",
                          "eval.prompt_sets=[train]", "eval.samples_per_prompt=2", "eval.metrics=false", "threads=1",
                          "progress=false", "save_lora=false"])
    summary = run(cfg, tmp_path / "run")
    base, final = summary["base"]["train"]["reward_mean"], summary["final"]["train"]["reward_mean"]
    assert final > base + 0.05, (base, final)
