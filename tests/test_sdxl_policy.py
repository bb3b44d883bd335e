"""SDXL through the same policy: pooled + size conditioning, equal to the diffusers pipeline at η = 0."""

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from rl4diffusion.policies.base import DiffusionPolicy
from rl4diffusion.policies.sdxl import SDXLPolicy
from rl4diffusion.testing import make_random_sdxl_pipeline


def test_sdxl_policy_reproduces_the_pipeline_and_trains(tmp_path):
    make_random_sdxl_pipeline().save_pretrained(str(tmp_path / "sdxl"))
    policy = DiffusionPolicy.from_pretrained(str(tmp_path / "sdxl"), num_steps=4, guidance_scale=3.0, eta=0.0)
    assert isinstance(policy, SDXLPolicy)
    prompts = ["a red circle", "a blue square"]
    ours = policy.sample(prompts, generator=torch.Generator().manual_seed(0))["images"]

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "sdxl"), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, eta=0.0, height=32, width=32,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # gradients reach the LoRA weights through the packed conditioning
    x = torch.randn(2, *policy.latent_shape)
    out = policy.predict_noise(x, policy.timesteps[0].expand(2), policy.encode_prompts(prompts))
    out.square().mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
