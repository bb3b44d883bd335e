"""The reference model of every policy class is the pretrained network, whatever training did to the weights.

Under LoRA the reference is the same network with the adapter disabled; under full fine-tuning it is a
frozen copy taken at construction. Each test records the pretrained model's outputs, perturbs every
trainable weight, and checks that each way of asking for the reference (``predict_noise(...,
use_reference=True)``, ``reference_output(td)``, ``sample(..., use_reference=True)``, ``reference()``)
still gives those outputs, while the policy's own outputs moved. Also: every call of the trainable
network goes through the training wrapper set with ``set_training_denoiser``.
"""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from rl4diffusion import keys
from rl4diffusion.policies import FlowMatchingPolicy, PolicyConfig, SDXLPolicy, StableDiffusionPolicy
from rl4diffusion.testing import make_random_sd3_pipeline, make_random_sd_pipeline, make_random_sdxl_pipeline

PROMPTS = ["a red circle", "a blue square"]
KINDS = {
    "sd": (StableDiffusionPolicy, make_random_sd_pipeline, {}),
    "sdxl": (SDXLPolicy, make_random_sdxl_pipeline, {}),
    "flow": (FlowMatchingPolicy, make_random_sd3_pipeline, {"max_sequence_length": 8}),
}
NUM_STEPS = 3


def build(kind: str, train_mode: str):
    cls, make_pipeline, options = KINDS[kind]
    config = PolicyConfig(num_steps=NUM_STEPS, guidance_scale=3.0, train_mode=train_mode, lora_rank=2,
                          **options)
    return cls(make_pipeline(seed=0), config)


def states(policy) -> TensorDict:
    """A batch of states at the second timestep, as the environment writes them."""
    x = torch.randn(len(PROMPTS), *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    return TensorDict({
        keys.LATENTS: x,
        keys.TIMESTEP: policy.timesteps[1].expand(len(PROMPTS)),
        keys.PROMPT_EMBEDS: policy.encode_prompts(PROMPTS),
        **policy.extra_conditioning(PROMPTS),
    }, batch_size=[len(PROMPTS)])


def predict_noise(policy, td, **options) -> torch.Tensor:
    """The tensor-level call, with the pooled embeddings a flow model also needs."""
    extra = {"pooled_prompt_embeds": td[keys.POOLED_PROMPT_EMBEDS]} if policy.extra_conditioning_keys else {}
    x, t, embeds = td[keys.LATENTS], td[keys.TIMESTEP], td[keys.PROMPT_EMBEDS]
    return policy.predict_noise(x, t, embeds, **extra, **options)


def sample(policy, **options) -> torch.Tensor:
    return policy.sample(PROMPTS, generator=torch.Generator().manual_seed(1), **options)["latents"]


@torch.no_grad()
def perturb(policy) -> None:
    g = torch.Generator().manual_seed(2)
    for p in policy.trainable_parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("train_mode", ["lora", "full"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_is_the_pretrained_model_after_the_weights_move(kind, train_mode):
    policy = build(kind, train_mode)
    td = states(policy)
    with torch.no_grad():
        base_output, base_sample = predict_noise(policy, td), sample(policy)
    perturb(policy)
    with torch.no_grad():
        assert_same(predict_noise(policy, td, use_reference=True), base_output)
        assert_same(policy.reference_output(td), base_output)
        assert_same(sample(policy, use_reference=True), base_sample)
        with policy.reference():
            assert_same(policy.predict_from_td(td), base_output)
            assert_same(predict_noise(policy, td, use_reference=True), base_output)  # nested: still it
        # the policy itself moved, and leaving the reference gives it back
        assert not torch.allclose(predict_noise(policy, td), base_output, atol=1e-4)
        assert not torch.allclose(policy.predict_from_td(td), base_output, atol=1e-4)
        assert not torch.allclose(sample(policy), base_sample, atol=1e-4)
    # reference_output is for targets (no graph); use_reference=True keeps gradients to the inputs
    td.set(keys.LATENTS, td[keys.LATENTS].clone().requires_grad_(True))
    assert policy.reference_output(td).grad_fn is None
    assert policy.predict_from_td(td, use_reference=True).grad_fn is not None


def test_reference_output_follows_the_guidance_scale():
    policy = build("sd", "lora")
    td = states(policy)
    with torch.no_grad():
        unguided = predict_noise(policy, td, guidance_scale=1.0)
    perturb(policy)
    assert_same(policy.reference_output(td, guidance_scale=1.0), unguided)


class CallCounter(nn.Module):
    """Stands in for accelerate's DDP wrapper: it holds the network as ``.module`` and counts forwards."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_call_of_the_trainable_network_goes_through_the_training_wrapper(kind):
    policy = build(kind, "lora")
    td = states(policy)
    with torch.no_grad():
        base_output = policy.predict_from_td(td)
    raw = policy.unet
    wrapper = CallCounter(raw)
    policy.set_training_denoiser(wrapper)
    assert policy.unet is raw  # peft and checkpoints keep using the raw module
    trainable = [p for p in raw.parameters() if p.requires_grad]
    assert all(p is q for p, q in zip(policy.trainable_parameters(), trainable, strict=True))
    perturb(policy)
    out = policy.predict_from_td(td)
    out.square().mean().backward()
    assert wrapper.calls == 1 and all(p.grad is not None for p in policy.trainable_parameters())
    assert_same(policy.reference_output(td), base_output)  # LoRA: the adapter is off, the call still wrapped
    assert wrapper.calls == 2
    sample(policy, use_reference=True)
    assert wrapper.calls == 2 + NUM_STEPS
    policy.set_training_denoiser(None)
    policy.reference_output(td)
    assert wrapper.calls == 2 + NUM_STEPS


def test_full_fine_tuning_reference_is_the_frozen_copy_not_the_wrapper():
    policy = build("sd", "full")
    td = states(policy)
    with torch.no_grad():
        base_output = policy.predict_from_td(td)
    wrapper = CallCounter(policy.unet)
    policy.set_training_denoiser(wrapper)
    perturb(policy)
    assert_same(policy.reference_output(td), base_output)
    assert wrapper.calls == 0
    policy.predict_from_td(td)
    assert wrapper.calls == 1


def test_set_training_denoiser_rejects_a_module_that_does_not_wrap_the_denoiser():
    policy = build("sd", "lora")
    with pytest.raises(ValueError, match="wrapper of policy.unet"):
        policy.set_training_denoiser(CallCounter(nn.Linear(2, 2)))
