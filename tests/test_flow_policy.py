"""Flow-matching policies: the SDE step against closed forms and diffusers, the SD3 wrapper, and training on it."""

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from rl4diffusion import keys
from rl4diffusion.policies.steps import flow_sde_step_with_log_prob
from rl4diffusion.training.trainer import run
from tests.conftest import compose_config

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads per process oversubscribe a shared 2-core machine badly (10× slower); restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sd3_pipeline_dir(tmp_path_factory):
    """A random tiny StableDiffusion3Pipeline (no T5) saved with save_pretrained."""
    from rl4diffusion.testing import make_random_sd3_pipeline

    path = tmp_path_factory.mktemp("random_sd3")
    make_random_sd3_pipeline(seed=0).save_pretrained(str(path))
    return str(path)


@pytest.fixture
def flow_policy(sd3_pipeline_dir):
    from rl4diffusion.policies.base import DiffusionPolicy

    def build(**options):
        options = {"num_steps": 4, "guidance_scale": 3.0, "max_sequence_length": 8, **options}
        return DiffusionPolicy.from_pretrained(sd3_pipeline_dir, **options)

    return build


def test_sde_log_prob_is_the_closed_form_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64), torch.tensor([0.7, 0.3, 0.0], dtype=torch.float64)
    for reduction in ("mean", "sum"):
        step = flow_sde_step_with_log_prob(v, x, sigma, sigma_next, noise_level=0.7, generator=g, reduction=reduction)
        for i in range(3):
            s, sn = float(sigma[i]), float(sigma_next[i])
            dt = sn - s
            coeff = 0.7 * math.sqrt(s / (1 - s))  # s_t, written out independently
            mean = x[i] + (v[i] + coeff**2 / (2 * s) * (x[i] + (1 - s) * v[i])) * dt
            std = coeff * math.sqrt(-dt)
            density = torch.distributions.Normal(mean, std).log_prob(step.prev_sample[i])
            expected = density.mean() if reduction == "mean" else density.sum()
            torch.testing.assert_close(step.log_prob[i], expected, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(step.mean[i], mean)
            torch.testing.assert_close(step.pred_x0[i], x[i] - s * v[i])
    # a given action is scored, not resampled; gradients flow through the mean only
    v = v.clone().requires_grad_(True)
    again = flow_sde_step_with_log_prob(v, x, sigma, sigma_next, noise_level=0.7, prev_sample=step.prev_sample)
    again.log_prob.sum().backward()
    assert v.grad is not None and torch.equal(again.prev_sample, step.prev_sample)


def test_sigma_cap_keeps_the_first_step_finite():
    x, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    capped = flow_sde_step_with_log_prob(v, x, torch.tensor([1.0]), torch.tensor([0.8]), noise_level=0.7, sigma_cap=0.8,
                                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(capped.prev_sample).all() and torch.isfinite(capped.log_prob).all()
    torch.testing.assert_close(capped.std.flatten(), torch.tensor([0.7 * math.sqrt(1.0 / 0.2) * math.sqrt(0.2)]))


def test_noise_level_zero_is_the_flow_match_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        golden = sched.step(v, t, x).prev_sample
        ours = flow_sde_step_with_log_prob(v, x, sched.sigmas[i].expand(2), sched.sigmas[i + 1].expand(2), noise_level=0.0)
        torch.testing.assert_close(ours.prev_sample, golden, rtol=1e-6, atol=1e-6)
        assert torch.all(ours.log_prob == 0) and torch.all(ours.std == 0)
        x = golden


def test_ode_sampling_reproduces_the_sd3_pipeline(flow_policy, sd3_pipeline_dir):
    from rl4diffusion.policies.flow import FlowMatchingPolicy

    policy = flow_policy()
    assert isinstance(policy, FlowMatchingPolicy) and policy.kind == "flow"
    ours = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0), eta=0.0)["images"]
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, max_sequence_length=8,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the SDE (the training MDP) is stochastic and differs from the ODE
    sde = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))["images"]
    assert not torch.allclose(sde, ours, atol=1e-3)


def test_env_carries_pooled_embeds_and_log_prob_recomputes(flow_policy):
    from rl4diffusion.data import collect_trajectories
    from rl4diffusion.data.rollout import conditioning_table
    from rl4diffusion.envs import DenoisingEnv

    policy = flow_policy(noise_level=0.7)
    env = DenoisingEnv(policy, lambda images, prompts: images.mean(dim=(1, 2, 3)), PROMPTS, batch_size=3)
    td = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(0))
    # trajectories store prompt ids, not a copy of the conditioning per step; the table gives it back
    assert td.shape == (3, 4) and keys.POOLED_PROMPT_EMBEDS not in td.keys() and keys.PROMPT_EMBEDS not in td.keys()
    table = conditioning_table(policy, PROMPTS)
    assert table[keys.POOLED_PROMPT_EMBEDS].shape == (len(PROMPTS), 64)
    torch.testing.assert_close(table[keys.POOLED_PROMPT_EMBEDS][td[keys.PROMPT_ID][:, 0]],
                               policy.encode_pooled_prompts(env.core.prompts_of(td[keys.PROMPT_ID][:, 0])))
    torch.testing.assert_close(td[keys.TIMESTEP][0], policy.timesteps)
    # the chain is consistent: each state's latents are the previous action; recomputed log-probs match
    torch.testing.assert_close(td[keys.LATENTS][:, 1:], td[keys.ACTION][:, :-1])
    with torch.no_grad():
        for j in range(4):
            step = td[:, j]
            step.update({key: value[step[keys.PROMPT_ID]] for key, value in table.items()})
            torch.testing.assert_close(policy.log_prob(step).log_prob, td[keys.SAMPLE_LOG_PROB][:, j], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(td[keys.NEXT, keys.REWARD]).all()


def test_flow_lora_reference_gradients_and_diffusers_lora_format(flow_policy, sd3_pipeline_dir, tmp_path):
    policy = flow_policy(lora_rank=2)
    td_x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    t = policy.timesteps[1].expand(2)
    emb, pooled = policy.encode_prompts(PROMPTS), policy.encode_pooled_prompts(PROMPTS)
    base = policy.predict_noise(td_x, t, emb, pooled_prompt_embeds=pooled)
    base.square().mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
    assert all(p.grad is None for p in policy.parameters() if not p.requires_grad)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
        tuned = policy.predict_noise(td_x, t, emb, pooled_prompt_embeds=pooled)
        with policy.reference():
            ref = policy.predict_noise(td_x, t, emb, pooled_prompt_embeds=pooled)
    assert not torch.allclose(tuned, ref, atol=1e-5)
    torch.testing.assert_close(ref, base.detach(), rtol=1e-5, atol=1e-5)  # the reference is the pretrained model
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        policy.predict_noise(td_x, t, emb)
    policy.save_pretrained_lora(tmp_path / "lora")
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=td_x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t).sample
        ours = policy.transformer(hidden_states=td_x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algo", ["grpo", "ddpo"])
def test_grpo_and_ddpo_train_a_flow_matching_model(algo, sd3_pipeline_dir, tmp_path, monkeypatch):
    (tmp_path / "bright_rewards.py").write_text("def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = ["algo.group_size=4"] if algo == "grpo" else []
    cfg = compose_config([
        f"algo={algo}", "reward=bright_rewards:brightness", f"model=path:{sd3_pipeline_dir}", "model.num_steps=3",
        "model.guidance_scale=1.0", "model.max_sequence_length=4", "prompts=[a red circle,a blue square]",
        "eval.prompt_sets=[[a red circle,a blue square]]", "eval.samples_per_prompt=2", "eval.every=0", "epochs=2",
        "algo.batch_size=8", "algo.minibatch_size=8", "algo.lr=1e-2", "progress=false", "threads=1", *extra,
    ])
    summary = run(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["phase"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss/policy"]) for r in train)
    assert summary["skipped_updates"] == 0
    assert summary["final"]["set0"]["reward_mean"] != summary["base"]["set0"]["reward_mean"]  # the policy moved
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_model_sd3_config_builds_a_trainable_flow_policy(sd3_pipeline_dir):
    """The shipped ``model=sd3`` options (bf16 base, LoRA on the joint-attention projections, checkpointing) work on
    an SD3 pipeline; only the weights, the size and the T5 length are swapped for the toy ones."""
    from omegaconf import OmegaConf

    from rl4diffusion.policies.base import DiffusionPolicy
    from rl4diffusion.policies.flow import FlowMatchingPolicy

    cfg = compose_config(["algo=grpo", "model=sd3", f"model.pretrained={sd3_pipeline_dir}", "model.height=null",
                          "model.width=null", "model.max_sequence_length=8"])
    assert (cfg.model.num_steps, cfg.model.noise_level, cfg.model.dtype) == (10, 0.7, "bfloat16")
    policy = DiffusionPolicy.from_pretrained(**OmegaConf.to_container(cfg.model, resolve=True))
    assert isinstance(policy, FlowMatchingPolicy) and policy.transformer.dtype == torch.bfloat16
    adapted = {name.split(".lora_")[0].split(".")[-1] for name, p in policy.transformer.named_parameters() if p.requires_grad}
    assert {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"} <= adapted
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    policy.transformer.train()  # gradient checkpointing is active in training mode
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    t = policy.timesteps[1].expand(2)
    out = policy.predict_noise(x, t, policy.encode_prompts(PROMPTS), pooled_prompt_embeds=policy.encode_pooled_prompts(PROMPTS))
    policy.step(out, x, t, generator=torch.Generator().manual_seed(1)).log_prob.sum().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
