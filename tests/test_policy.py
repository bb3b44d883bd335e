"""DiffusionPolicy: pipeline equivalence, caching, LoRA, reference, checkpoints and the choice of class."""

import ast
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from rl4diffusion.errors import ConfigError
from rl4diffusion.policies import DiffusionPolicy, FlowMatchingPolicy, SDXLPolicy, StableDiffusionPolicy

PROMPTS = ["a red circle", "a blue square"]


def test_eta0_sampling_reproduces_the_diffusers_pipeline(make_policy, random_pipeline_dir):
    policy = make_policy(eta=0.0, num_steps=6, guidance_scale=4.0)
    ours = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))["images"]
    pipe = StableDiffusionPipeline.from_pretrained(random_pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, num_inference_steps=6, guidance_scale=4.0, eta=0.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_prompt_cache_and_shapes(make_policy):
    policy = make_policy()
    e1 = policy.encode_prompts(PROMPTS)
    assert e1.shape[0] == 2 and set(PROMPTS) <= set(policy._embed_cache)
    e2 = policy.encode_prompts(PROMPTS[::-1])
    torch.testing.assert_close(e2, e1.flip(0))
    out = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert out["images"].shape == (2, 3, policy.height, policy.width)
    assert out["latents"].shape == (2, *policy.latent_shape)
    assert 0 <= out["images"].min() and out["images"].max() <= 1


def test_lora_trains_only_adapter_and_reference_is_the_base(make_policy):
    policy = make_policy(lora_rank=2)
    names = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    t = policy.timesteps[1].expand(2)
    emb = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
        tuned = policy.predict_noise(x, t, emb)
        with policy.reference():
            ref = policy.predict_noise(x, t, emb)
        again = policy.predict_noise(x, t, emb)
    assert not torch.allclose(tuned, ref, atol=1e-5)
    torch.testing.assert_close(again, tuned)
    # the reference equals a freshly loaded base model: no second copy, same numbers
    base = make_policy(lora_rank=2)
    with torch.no_grad():
        torch.testing.assert_close(base.predict_noise(x, t, emb), ref, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_trainable_parameters(make_policy):
    policy = make_policy()
    x = torch.randn(2, *policy.latent_shape)
    out = policy.predict_noise(x, policy.timesteps[0].expand(2), policy.encode_prompts(PROMPTS))
    out.square().mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_full_finetune_reference_is_frozen_copy(make_policy):
    policy = make_policy(train_mode="full")
    x = torch.randn(1, *policy.latent_shape)
    t, emb = policy.timesteps[0].expand(1), policy.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.mul_(1.01)
        reference = policy.predict_noise(x, t, emb, use_reference=True)
        assert not torch.allclose(policy.predict_noise(x, t, emb), reference)


def test_lora_checkpoint_loads_with_diffusers(make_policy, random_pipeline_dir, tmp_path):
    policy = make_policy(lora_rank=2)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.save_pretrained_lora(tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(random_pipeline_dir, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x = torch.randn(1, *policy.latent_shape)
    t = policy.timesteps[2].expand(1)
    emb = policy.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        ours = policy.unet(x, t, encoder_hidden_states=emb).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_from_pretrained_picks_the_most_specific_class_that_fits(random_pipeline_dir, tmp_path):
    from rl4diffusion.testing import make_random_sd_pipeline, make_random_sdxl_pipeline

    assert type(DiffusionPolicy.from_pretrained(random_pipeline_dir, num_steps=2)) is StableDiffusionPolicy
    assert type(StableDiffusionPolicy.from_pretrained(random_pipeline_dir)) is StableDiffusionPolicy
    make_random_sdxl_pipeline().save_pretrained(str(tmp_path / "sdxl"))
    assert type(StableDiffusionPolicy.from_pretrained(str(tmp_path / "sdxl"), num_steps=2)) is SDXLPolicy
    with pytest.raises(ConfigError, match="FlowMatchingPolicy needs an SD3-style"):
        FlowMatchingPolicy.from_pretrained(random_pipeline_dir, num_steps=2)
    with pytest.raises(ConfigError, match="shared base class"):
        DiffusionPolicy(make_random_sd_pipeline())

    class Custom(StableDiffusionPolicy):  # declares no accepts(): never picked in place of its parent
        pass

    assert type(DiffusionPolicy.from_pretrained(random_pipeline_dir, num_steps=2)) is StableDiffusionPolicy
    assert type(Custom.from_pretrained(random_pipeline_dir, num_steps=2)) is Custom


def test_the_base_module_does_not_import_its_subclasses():
    """The subclasses register themselves by subclassing; base.py importing them would be circular."""
    import rl4diffusion.policies.base as base

    tree = ast.parse(Path(base.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {f"rl4diffusion.policies.{name}" for name in ("sd", "sdxl", "flow")}
