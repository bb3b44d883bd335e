"""GRPO's options: the KL scale (Flow-GRPO's and the exact one), windowed sampling (Flow-GRPO-Fast / MixGRPO) and
DanceGRPO's shared initial noise."""

import math
from dataclasses import replace

import pytest
import torch

from rl4diffusion import keys
from rl4diffusion.algorithms.grpo import GRPO, GRPOConfig
from rl4diffusion.envs import DenoisingEnv
from rl4diffusion.errors import ConfigError
from rl4diffusion.training.optimisation import Updater

PROMPTS = ["a red circle", "a blue square"]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def sd3_pipeline_dir(tmp_path_factory):
    from rl4diffusion.testing import make_random_sd3_pipeline

    path = tmp_path_factory.mktemp("random_sd3_windowed")
    make_random_sd3_pipeline(seed=0).save_pretrained(str(path))
    return str(path)


@pytest.fixture
def policy_of(make_policy, sd3_pipeline_dir):
    """A fresh DDIM (UNet) or flow-matching (SD3) policy of ``num_steps`` steps, without guidance."""
    from rl4diffusion.policies.base import DiffusionPolicy

    def build(kind: str, num_steps: int = 3):
        if kind == "ddim":
            return make_policy(num_steps=num_steps, guidance_scale=1.0)
        return DiffusionPolicy.from_pretrained(sd3_pipeline_dir, num_steps=num_steps, guidance_scale=1.0,
                                               max_sequence_length=8)

    return build


def _perturb(policy, seed=0):
    """Move the adapter off its zero init so that the policy's mean differs from the reference's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_full_window_is_the_sde_sampler_and_empty_window_the_ode_sampler(kind, policy_of):
    policy = policy_of(kind)
    num_steps = len(policy.timesteps)

    def sample(**options):
        return policy.sample(PROMPTS, generator=torch.Generator().manual_seed(7), **options)["latents"]

    sde, ode = sample(), sample(eta=0.0)
    assert not torch.allclose(sde, ode)  # the comparison below can tell the two samplers apart
    with policy.sde_window(range(0, num_steps)):
        assert torch.equal(sample(), sde)
    with policy.sde_window(range(0)):
        assert torch.equal(sample(), ode)
    with policy.sde_window(range(1, 2)):  # a window in between is neither
        middle = sample()
    assert not torch.allclose(middle, sde) and not torch.allclose(middle, ode)
    assert policy.sde_steps is None  # the block restores the plain sampler


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_only_the_window_carries_log_probs_and_enters_the_loss(kind, policy_of):
    policy = policy_of(kind, num_steps=4)
    algo = GRPO(GRPOConfig(batch_size=4, group_size=2, minibatch_size=4, window_size=2, window_start=1),
                policy, brightness, seed=0)
    env = DenoisingEnv(policy, brightness, PROMPTS, batch_size=4)
    batch = algo.collect(env)
    assert algo.window == range(1, 3)
    log_probs = batch[keys.SAMPLE_LOG_PROB]  # (B, T)
    assert torch.all(log_probs[:, [0, 3]] == 0) and torch.all(log_probs[:, 1:3] != 0)
    # outside the window the action is the deterministic step: x_{t−1} is the step's mean exactly
    step = batch[:, 0]
    out = policy.predict_from_td(algo.with_conditioning(step))
    ode = policy.step(out, step[keys.LATENTS], step[keys.TIMESTEP], eta=0.0)
    torch.testing.assert_close(step[keys.ACTION], ode.prev_sample)
    trained = {int(t) for update in algo.optimisation_steps(batch) for micro in update.micro_batches
               for t in micro[keys.TIMESTEP]}
    assert trained == {int(policy.timesteps[1]), int(policy.timesteps[2])}


def test_windowed_grpo_trains(policy_of):
    policy = policy_of("ddim", num_steps=3)
    algo = GRPO(GRPOConfig(batch_size=4, group_size=2, minibatch_size=4, window_size=1, window_start=None, lr=1e-2),
                policy, brightness, seed=0)
    env = DenoisingEnv(policy, brightness, PROMPTS, batch_size=4)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    metrics = Updater(algo)(algo.collect(env))
    assert math.isfinite(metrics["loss/policy"]) and "diag/window_start" in metrics
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.trainable_parameters()))


def test_mixgrpo_window_moves_by_the_stride_and_stops_at_the_end(policy_of):
    policy = policy_of("ddim", num_steps=4)
    algo = GRPO(GRPOConfig(batch_size=4, group_size=2, minibatch_size=4, window_size=2, window_start=0,
                           window_stride=1, window_every=2), policy, brightness, seed=0)
    starts = []
    for iteration in range(7):
        algo.iteration = iteration
        starts.append(algo.sde_window().start)
    assert starts == [0, 0, 1, 1, 2, 2, 2]  # the last window [2, 4) ends at the chain's end
    drawn = GRPO(GRPOConfig(batch_size=4, group_size=2, minibatch_size=4, window_size=1, window_start=None),
                 policy, brightness, seed=0)
    assert {drawn.sde_window().start for _ in range(40)} == {0, 1, 2, 3}  # Flow-GRPO-Fast: any position


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_upstream_kl_is_the_exact_kl_times_the_step_length(kind, policy_of):
    policy = policy_of(kind)
    _perturb(policy)
    algo = GRPO(GRPOConfig(batch_size=4, group_size=2, minibatch_size=4), policy, brightness, seed=0)
    assert algo.config.kl_scale == "upstream"  # the default: Flow-GRPO's scale
    batch = algo.collect(DenoisingEnv(policy, brightness, PROMPTS, batch_size=4))

    def kl(step, scale):
        algo.config = replace(algo.config, kl_scale=scale)
        return algo.loss_terms(step)["kl"]

    for position in range(batch.shape[1]):
        step = batch[:, position]
        upstream, exact = kl(step, "upstream"), kl(step, "exact")
        assert exact > 0
        if kind == "flow":  # Flow-GRPO's code leaves out the step's |Δt| = σ − σ_next
            dt = float(policy.sigmas[position] - policy.sigmas[position + 1])
            torch.testing.assert_close(upstream, exact * dt, rtol=1e-5, atol=0)
            assert dt < 1
        else:  # DDIM's σ_t(η) already is the step's Gaussian std: the two scales agree
            torch.testing.assert_close(upstream, exact, rtol=1e-6, atol=0)


def test_shared_noise_gives_each_group_one_initial_noise(policy_of):
    policy = policy_of("ddim", num_steps=2)
    algo = GRPO(GRPOConfig(batch_size=8, group_size=4, minibatch_size=8, shared_noise=True), policy, brightness, seed=0)
    batch = algo.collect(DenoisingEnv(policy, brightness, PROMPTS, batch_size=8))
    start = batch[keys.LATENTS][:, 0]  # x_T of each chain
    groups = batch[keys.GROUP_ID][:, 0]
    for group in groups.unique():
        members = start[groups == group]
        assert torch.equal(members, members[:1].expand_as(members))
    assert not torch.equal(start[groups == groups[0]][0], start[groups != groups[0]][0])
    final = batch[keys.ACTION][:, -1]  # the sampling noise still makes the K samples differ
    assert not torch.allclose(final[0], final[1])
    plain = GRPO(GRPOConfig(batch_size=8, group_size=4, minibatch_size=8), policy, brightness, seed=0)
    start = plain.collect(DenoisingEnv(policy, brightness, PROMPTS, batch_size=8))[keys.LATENTS][:, 0]
    assert not torch.equal(start[0], start[1])  # without the option every chain draws its own


@pytest.mark.parametrize("options, message", [
    ({"kl_scale": "paper"}, "is not a KL scale"),
    ({"window_size": 0}, "at least one"),
    ({"window_size": 2, "window_every": 0}, "window_every ≥ 1"),
])
def test_bad_window_and_kl_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig(batch_size=4, group_size=2, minibatch_size=4, **options).validate()


def test_a_window_outside_the_chain_is_a_config_error(policy_of):
    policy = policy_of("ddim", num_steps=3)
    with pytest.raises(ConfigError, match="does not fit in the chain of model.num_steps=3"):
        GRPO(GRPOConfig(batch_size=4, group_size=2, minibatch_size=4, window_size=2, window_start=2), policy,
             brightness, seed=0)
