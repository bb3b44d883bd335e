"""The DDIM step with log-probability against diffusers and against closed-form Gaussians."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from rl4diffusion.policies.steps import ddim_alphas, ddim_step_with_log_prob, gaussian_log_prob


def _scheduler(**kw):
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, **kw)
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_matches_diffusers(prediction_type, eta):
    sched = _scheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        x = torch.randn(3, 4, 8, 8, generator=g)
        out = torch.randn(3, 4, 8, 8, generator=g)
        z = torch.randn(3, 4, 8, 8, generator=g)
        golden = sched.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        a_t, a_prev = ddim_alphas(sched.alphas_cumprod, sched.final_alpha_cumprod, t.expand(3), 100)
        ours = ddim_step_with_log_prob(out, x, a_t, a_prev, eta=eta, prediction_type=prediction_type, noise=z)
        torch.testing.assert_close(ours.prev_sample, golden, rtol=1e-5, atol=1e-5)


def test_log_prob_is_the_gaussian_density_both_reductions():
    sched = _scheduler()
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = sched.timesteps[3].expand(2)
    a_t, a_prev = ddim_alphas(sched.alphas_cumprod, sched.final_alpha_cumprod, t, 100)
    for reduction in ("mean", "sum"):
        step = ddim_step_with_log_prob(out, x, a_t, a_prev, eta=1.0, generator=g, reduction=reduction)
        # independent: σ from the DDIM formula written out, density from torch.distributions
        at, ap = a_t[0].double(), a_prev[0].double()
        sigma = math.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
        x0 = (x.double() - (1 - at).sqrt() * out.double()) / at.sqrt()
        mean = ap.sqrt() * x0 + (1 - ap - sigma**2).sqrt() * out.double()
        dens = torch.distributions.Normal(mean, sigma).log_prob(step.prev_sample.double())
        expected = dens.mean(dim=(1, 2, 3)) if reduction == "mean" else dens.sum(dim=(1, 2, 3))
        torch.testing.assert_close(step.log_prob.double(), expected, rtol=1e-4, atol=1e-4)


def test_log_prob_gradient_flows_through_the_mean_only():
    mean = torch.zeros(1, 2, 2, 2, requires_grad=True)
    action = torch.ones(1, 2, 2, 2, requires_grad=True)
    gaussian_log_prob(action, mean, torch.tensor(0.5)).sum().backward()
    assert action.grad is None and mean.grad is not None
    torch.testing.assert_close(mean.grad, torch.full_like(mean, 4.0 / 8))  # (x − μ)/σ² / 8 elements


def test_zero_std_step_has_zero_log_prob():
    lp = gaussian_log_prob(torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 1))
    assert torch.equal(lp, torch.zeros(2))
