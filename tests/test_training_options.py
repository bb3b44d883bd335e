"""The shared training options: gradient accumulation, the learning-rate schedule, EMA, negative prompts and
evaluation's own sampler settings."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rl4diffusion import keys
from rl4diffusion.data.rollout import collect_trajectories, conditioning_table
from rl4diffusion.errors import ConfigError
from rl4diffusion.training.config import OptimConfig, validate_train_config
from rl4diffusion.training.optimisation import Updater, check_grad_accumulation
from tests.conftest import compose_config

PROMPTS = ["a red circle", "a blue square"]
VOLATILE = {"wall_s", "train_wall_s", "train_cpu_s"}


def _ddpo(make_policy, **options):
    from rl4diffusion.algorithms import build_algorithm
    from rl4diffusion.envs import DenoisingEnv

    def reward(images, prompts):
        return images.mean(dim=(1, 2, 3))

    torch.manual_seed(0)  # the LoRA's initial weights: every call builds the same policy
    policy = make_policy(num_steps=3, guidance_scale=1.0)
    algo = build_algorithm("ddpo", {"batch_size": 4, "lr": 1e-2, **options}, policy, reward, seed=0)
    env = DenoisingEnv(policy, reward, PROMPTS, batch_size=4)
    env.set_seed(0)
    return algo, env


def _gradients_at_each_optimiser_step(algo, batch, **optim) -> list[list[torch.Tensor]]:
    update = Updater(algo, options=OptimConfig(**optim))
    algo.remember_prompts(PROMPTS)  # the batch may come from another algorithm's collect
    seen = []
    algo.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([p.grad.clone() for p in algo.policy.trainable_parameters()]))
    torch.manual_seed(1)  # DDPO orders the chains with the global RNG
    update(batch.clone())
    return seen


# ---------------------------------------------------------------- gradient accumulation
def test_two_accumulated_minibatches_give_the_gradient_of_one_step_over_both(make_policy):
    algo, env = _ddpo(make_policy, minibatch_size=4)
    batch = algo.collect(env)
    whole = _gradients_at_each_optimiser_step(algo, batch)
    halves = _gradients_at_each_optimiser_step(_ddpo(make_policy, minibatch_size=2)[0], batch)
    merged = _gradients_at_each_optimiser_step(_ddpo(make_policy, minibatch_size=2)[0], batch, grad_accumulation=2)
    assert (len(whole), len(halves), len(merged)) == (1, 2, 1)
    whole, first_half, merged = (torch.cat([g.flatten() for g in step]) for step in (whole[0], halves[0], merged[0]))
    assert whole.abs().max() > 0 and not torch.allclose(first_half, whole)  # one minibatch alone: another gradient
    torch.testing.assert_close(merged, whole, rtol=1e-4, atol=1e-7)


def test_algorithms_whose_steps_cannot_be_merged_refuse_accumulation():
    from rl4diffusion.algorithms import algorithm_classes

    for name in ("dpok", "refl", "draft", "alignprop", "nft"):
        with pytest.raises(ConfigError, match=f"algo={name} cannot merge"):
            check_grad_accumulation(algorithm_classes(name)[0], 2)
        check_grad_accumulation(algorithm_classes(name)[0], 1)
    for name in ("ddpo", "grpo", "nabla_gfn", "diffusion_dpo", "sft", "dmpo"):
        check_grad_accumulation(algorithm_classes(name)[0], 4)


# ---------------------------------------------------------------- learning-rate schedule
def test_the_learning_rate_warms_up_then_follows_the_cosine_over_epochs(make_policy):
    algo, env = _ddpo(make_policy, minibatch_size=2)  # two optimiser steps per epoch
    update = Updater(algo, options=OptimConfig(lr_warmup_steps=3, lr_schedule="cosine"), epochs=4)
    seen = []
    algo.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    batch = algo.collect(env)
    logged = [update(batch.clone(), epoch=epoch)["diag/lr"] for epoch in range(1, 5)]
    epochs = [1, 1, 2, 2, 3, 3, 4, 4]
    expected = [1e-2 * min(1.0, k / 3) * 0.5 * (1 + math.cos(math.pi * (e - 1) / 4))
                for k, e in enumerate(epochs, start=1)]
    assert seen == pytest.approx(expected, rel=1e-9)
    assert logged == pytest.approx([(a + b) / 2 for a, b in zip(expected[::2], expected[1::2])], rel=1e-6)
    assert update.state_dict()["lr_schedule"] == {"steps": {"policy": 8}}


def test_a_constant_schedule_without_warm_up_leaves_the_learning_rate_alone(make_policy):
    algo, env = _ddpo(make_policy, minibatch_size=2)
    update = Updater(algo, options=OptimConfig(), epochs=3)
    metrics = update(algo.collect(env), epoch=2)
    assert algo.optimizer.param_groups[0]["lr"] == 1e-2 and "diag/lr" not in metrics


# ---------------------------------------------------------------- EMA
def test_the_ema_follows_each_optimiser_step_and_is_swapped_in_only_inside_the_block(make_policy):
    algo, env = _ddpo(make_policy, minibatch_size=2)
    update = Updater(algo, options=OptimConfig(ema_decay=0.5))
    params = algo.policy.trainable_parameters()
    after_each_step = []
    algo.optimizer.register_step_post_hook(
        lambda opt, args, kwargs: after_each_step.append([p.detach().clone() for p in params]))
    expected = [p.detach().clone() for p in params]
    update(algo.collect(env))
    for n, weights in enumerate(after_each_step, start=1):  # EMA after step n, with diffusers' decay ramp
        decay = update.ema.get_decay(n)
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    raw = [p.detach().clone() for p in params]
    with update.averaged_weights():
        inside = [p.detach().clone() for p in params]
    for e, i, r, p in zip(expected, inside, raw, params):
        torch.testing.assert_close(i, e)
        assert torch.equal(p, r)  # the raw weights are back, bit for bit
    assert not all(torch.equal(i, r) for i, r in zip(inside, raw))


# ---------------------------------------------------------------- negative prompts
def test_a_negative_prompt_changes_guided_samples_as_diffusers_does(make_policy, random_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    policy = make_policy(eta=0.0, num_steps=4, guidance_scale=4.0, negative_prompt="blurry")
    plain = make_policy(eta=0.0, num_steps=4, guidance_scale=4.0)
    ours = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))["images"]
    default = plain.sample(PROMPTS, generator=torch.Generator().manual_seed(0))["images"]
    pipe = StableDiffusionPipeline.from_pretrained(random_pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=4, guidance_scale=4.0, eta=0.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (ours - default).abs().max() > 1e-3


def test_training_scores_actions_with_the_negative_prompt_they_were_sampled_with(make_policy):
    from rl4diffusion.envs import DenoisingEnv

    policy = make_policy(num_steps=3, guidance_scale=3.0, negative_prompt="blurry")
    env = DenoisingEnv(policy, lambda images, prompts: images.mean(dim=(1, 2, 3)), PROMPTS, batch_size=2)
    env.set_seed(0)
    td = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(0))
    embeds = conditioning_table(policy, PROMPTS)[keys.PROMPT_EMBEDS]
    step = td[:, 1].set(keys.PROMPT_EMBEDS, embeds[td[keys.PROMPT_ID][:, 1]])
    with torch.no_grad():
        torch.testing.assert_close(policy.log_prob(step).log_prob, td[keys.SAMPLE_LOG_PROB][:, 1])
        policy.config.negative_prompt = ""  # scored against the empty prompt's guidance, the action is another
        assert not torch.allclose(policy.log_prob(step).log_prob, td[keys.SAMPLE_LOG_PROB][:, 1])


# ---------------------------------------------------------------- evaluation's sampler settings
def test_sampling_settings_sample_as_a_policy_built_with_them_and_then_restore(make_policy):
    torch.manual_seed(0)
    policy = make_policy(num_steps=2, guidance_scale=2.0)
    torch.manual_seed(0)
    other = make_policy(num_steps=5, guidance_scale=1.0)
    with policy.sampling_settings(num_steps=5, guidance_scale=1.0):
        inside = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))["images"]
    expected = other.sample(PROMPTS, generator=torch.Generator().manual_seed(0))["images"]
    torch.testing.assert_close(inside, expected)
    assert len(policy.timesteps) == 2 and policy.config.guidance_scale == 2.0 and policy.step_size == 500


@pytest.mark.parametrize("override, fragment", [
    ("optim.grad_accumulation=0", "optim.grad_accumulation"),
    ("optim.lr_warmup_steps=-1", "optim.lr_warmup_steps"),
    ("optim.lr_schedule=linear", "optim.lr_schedule must be one of constant, cosine"),
    ("optim.ema_decay=1.0", "optim.ema_decay"),
    ("eval.num_steps=0", "eval.num_steps"),
    ("eval.guidance_scale=-1", "eval.guidance_scale"),
])
def test_bad_training_options_are_refused_naming_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        validate_train_config(compose_config([override]))


# ---------------------------------------------------------------- the options in a run, and its exact resume
def _overrides(pipeline_dir):
    return ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{pipeline_dir}", "model.num_steps=2",
            "model.negative_prompt=blurry", "prompts=[a red circle,a blue square]",
            "eval.prompt_sets=[[a red circle,a blue square]]", "eval.samples_per_prompt=2", "eval.metrics=false",
            "eval.every=1", "eval.num_steps=3", "eval.guidance_scale=1.0", "epochs=3", "algo.batch_size=4",
            "algo.minibatch_size=2", "algo.lr=1e-2", "optim.ema_decay=0.5", "optim.lr_warmup_steps=2",
            "optim.lr_schedule=cosine", "optim.grad_accumulation=2", "checkpoint.every=1", "checkpoint.keep_last=3",
            "threads=1", "progress=false", "log_with=[]"]


def _lora_file(directory) -> dict[str, torch.Tensor]:
    """A saved adapter by the names of ``policy.lora_state_dict()`` (the file prefixes them with ``unet.``)."""
    return {k.removeprefix("unet."): v for k, v in load_file(str(directory / "pytorch_lora_weights.safetensors")).items()}


def _metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in lines]


def test_a_run_evaluates_and_exports_the_ema_with_evaluation_settings_and_resumes_exactly(random_pipeline_dir,
                                                                                          tmp_path):
    from rl4diffusion.training.trainer import Trainer, run

    reference = tmp_path / "reference"
    trainer = Trainer(compose_config(_overrides(random_pipeline_dir)), reference)
    trainer.build()
    policy, evaluated = trainer.policy, []
    sample = policy.sample

    def spy(prompts, **options):  # what evaluation samples with
        if not options.get("use_reference"):
            evaluated.append((len(policy.timesteps), policy.config.guidance_scale,
                              [p.detach().clone() for p in policy.trainable_parameters()]))
        return sample(prompts, **options)

    policy.sample = spy
    try:
        summary = trainer.fit()
    finally:
        trainer.opened.close()
    assert summary and len(evaluated) >= 4  # base, epochs 1 and 2, final
    assert {(steps, guidance) for steps, guidance, _ in evaluated} == {(3, 1.0)}
    assert len(policy.timesteps) == 2 and policy.config.guidance_scale == 2.0  # training's settings are back
    records = _metrics(reference)
    assert [r["diag/lr"] for r in records if r["phase"] == "train"][0] == pytest.approx(0.5e-2)  # warm-up step 1

    raw = [p.detach().clone() for p in policy.trainable_parameters()]
    ema = [s.clone() for s in trainer.updater.ema.shadow_params]
    for final, shadow in zip(evaluated[-1][2], ema):
        torch.testing.assert_close(final, shadow)  # the final evaluation sampled the EMA weights
    assert not all(torch.equal(s, w) for s, w in zip(ema, raw))
    with trainer.updater.averaged_weights():
        exported = {k: v.clone() for k, v in policy.lora_state_dict().items()}  # views of the weights: copy
    saved = _lora_file(reference / "lora")
    last = reference / "checkpoints" / "step_000003"
    in_checkpoint = _lora_file(last / "lora")
    assert saved.keys() == exported.keys()
    for name, value in exported.items():
        torch.testing.assert_close(saved[name], value)  # lora/ holds the EMA weights,
        torch.testing.assert_close(in_checkpoint[name], value)  # and so does a checkpoint's lora/
    trainable = load_file(str(last / "accelerate" / "trainable.safetensors"))
    named = {name: p for name, p in policy.unet.named_parameters() if p.requires_grad}
    assert trainable.keys() == named.keys()
    for name, value in trainable.items():
        assert torch.equal(value, named[name])  # while a resume loads the raw weights

    resumed = tmp_path / "resumed"  # as if killed after the checkpoint of epoch 2
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000003")
    shutil.rmtree(resumed / "lora")
    (resumed / "summary.json").unlink()
    with pytest.raises(ConfigError, match=r"eval\.num_steps"):
        run(compose_config([*_overrides(random_pipeline_dir), "eval.num_steps=4", f"resume={resumed}"]), resumed)
    with pytest.raises(ConfigError, match="'optim'"):
        run(compose_config([*_overrides(random_pipeline_dir), "optim.ema_decay=0.9", f"resume={resumed}"]), resumed)
    summary_resumed = run(compose_config([*_overrides(random_pipeline_dir), f"resume={resumed}"]), resumed)
    assert _metrics(resumed) == records
    assert summary_resumed["final"] == summary["final"]
    again = _lora_file(resumed / "lora")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
