"""The trainer's one optimisation step: accumulation, clipping, the non-finite skip, and the index-draw rule."""

import math

import pytest
import torch

from rl4diffusion.algorithms.base import OptimisationStep
from rl4diffusion.data import make_replay_buffer, minibatches
from rl4diffusion.training.optimisation import Diagnostics, Updater, metric_name


def _ddpo(make_policy, **options):
    from rl4diffusion.algorithms import build_algorithm
    from rl4diffusion.envs import DenoisingEnv

    def reward(images, prompts):
        return images.mean(dim=(1, 2, 3))

    policy = make_policy(num_steps=3, guidance_scale=1.0)
    algo = build_algorithm("ddpo", {"batch_size": 4, "minibatch_size": 2, "lr": 1e-2, **options}, policy, reward, seed=0)
    env = DenoisingEnv(policy, reward, ["a red circle", "a blue square"], batch_size=4)
    env.set_seed(0)
    return algo, env


def test_a_non_finite_step_is_skipped_and_leaves_weights_and_optimiser_untouched(make_policy):
    algo, env = _ddpo(make_policy)
    update = Updater(algo)
    batch = algo.collect(env)
    real_loss_terms = algo.loss_terms
    calls = []

    def poisoned(step):  # the second optimisation step (micro-batches 4–6) gets a NaN loss
        calls.append(1)
        terms = real_loss_terms(step)
        if 4 <= len(calls) <= 6:
            terms["loss_policy"] = terms["loss_policy"] * float("nan")
        return terms

    algo.loss_terms = poisoned
    steps = list(algo.optimisation_steps(batch))
    assert len(steps) == 2 and all(len(s.micro_batches) == 3 for s in steps)  # 2 minibatches × 3 timesteps
    update.skipped = 0
    from rl4diffusion.training.optimisation import run_optimisation_step

    diagnostics = Diagnostics()
    params = algo.policy.trainable_parameters()
    ok = run_optimisation_step(update.accelerator, steps[0], update.modules, update.optimizers, update.sync_modules,
                               algo.loss_terms, diagnostics)
    after_first = [p.detach().clone() for p in params]
    adam_steps = [s["step"].clone() for s in algo.optimizer.state.values()]
    skipped = run_optimisation_step(update.accelerator, steps[1], update.modules, update.optimizers,
                                    update.sync_modules, algo.loss_terms, diagnostics)
    assert ok and not skipped
    assert all(torch.equal(a, p) for a, p in zip(after_first, params))  # the NaN step changed no weight
    assert [s["step"] for s in algo.optimizer.state.values()] == adam_steps  # nor Adam's state
    assert all(p.grad is None for p in params)  # and its gradients were dropped
    means = diagnostics.means()
    assert math.isfinite(means["diag/grad_norm"])  # the skipped step's norm is not averaged in


def test_updater_counts_skipped_steps_and_the_run_aborts_past_the_limit(make_policy):
    algo, env = _ddpo(make_policy)
    update = Updater(algo)
    real = algo.loss_terms
    algo.loss_terms = lambda step: {**real(step), "loss_policy": torch.tensor(float("inf"), requires_grad=True)}
    metrics = update(algo.collect(env))
    assert update.skipped == 2 and "diag/grad_norm" not in metrics


def test_micro_batch_weights_scale_the_gradient(make_policy):
    """Gradients add up over micro-batches: two halves at weight ½ equal the whole at weight 1."""
    algo, env = _ddpo(make_policy, minibatch_size=4)
    update = Updater(algo)
    batch = algo.collect(env)[:, 0]  # (4,) transitions of the first step
    batch["advantage"] = torch.tensor([1.0, -1.0, 0.5, 2.0])

    def grads(step):
        from rl4diffusion.training.optimisation import run_optimisation_step

        captured = {}
        opt = update.optimizers["policy"]
        original = opt.step
        opt.step = lambda *a, **k: captured.update(g=[p.grad.clone() for p in algo.policy.trainable_parameters()])
        try:
            run_optimisation_step(update.accelerator, step, update.modules, update.optimizers, update.sync_modules,
                                  algo.loss_terms, Diagnostics())
        finally:
            opt.step = original
        return captured["g"]

    whole = grads(OptimisationStep([batch], weights=[1.0]))
    halves = grads(OptimisationStep([batch[:2], batch[2:]], weights=[0.5, 0.5]))
    for a, b in zip(whole, halves):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_metric_names():
    assert metric_name("loss_kl") == "loss/kl" and metric_name("approx_kl") == "diag/approx_kl"
    assert metric_name("train/reward_mean") == "train/reward_mean"


def test_minibatches_visit_every_item_once_and_follow_the_generator():
    a = torch.cat(list(minibatches(10, 3, generator=torch.Generator().manual_seed(0))))
    b = torch.cat(list(minibatches(10, 3, generator=torch.Generator().manual_seed(0))))
    assert sorted(a.tolist()) == list(range(10)) and torch.equal(a, b)
    assert [len(i) for i in minibatches(10, 3)] == [3, 3, 3, 1]


def test_index_draws_use_a_generator_on_the_storage_device():
    """The rule: a CPU generator for CPU storage, a CUDA one for CUDA storage — checked, not left to a crash."""
    with pytest.raises(ValueError, match="storage's device"):
        list(minibatches(4, 2, generator=torch.Generator(), device="meta"))
    with pytest.raises(ValueError, match="storage's device"):
        make_replay_buffer(8, 2, device="meta", generator=torch.Generator())
    buffer = make_replay_buffer(8, 2, device="cpu", generator=torch.Generator().manual_seed(0))
    assert buffer._sampler._rng.device.type == "cpu"
