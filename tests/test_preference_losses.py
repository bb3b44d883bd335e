"""Preference losses against independent computations: Diffusion-DPO, SFT, DMPO, DPO-C&M, SDPO and the
closed-form importance weight; gradient plumbing through the policy and its reference."""

import dataclasses
import math

import pytest
import torch
from tensordict import TensorDict
from torch.distributions import Bernoulli, Normal, kl_divergence

from rl4diffusion import keys
from rl4diffusion.algorithms import algorithm_classes
from rl4diffusion.algorithms.base import build_config
from rl4diffusion.algorithms.diffusion_dpo import (
    SFT,
    DiffusionDPO,
    DiffusionDPOConfig,
    PreferenceConfig,
    diffusion_dpo_loss,
    sft_loss,
)
from rl4diffusion.algorithms.dmpo import DMPO, DMPOConfig, dmpo_loss
from rl4diffusion.algorithms.sdpo import (
    DPOCM,
    SDPO,
    SDPOConfig,
    dpo_cm_loss,
    importance_log_weights,
    sdpo_loss,
)
from rl4diffusion.errors import ConfigError
from rl4diffusion.rewards import build_reward
from rl4diffusion.training.optimisation import Updater

# four pairs of per-sample errors: (model winner, model loser, reference winner, reference loser)
MW = torch.tensor([0.50, 0.30, 0.80, 0.41])
ML = torch.tensor([0.52, 0.28, 0.80, 0.40])
RW = torch.tensor([0.51, 0.29, 0.79, 0.40])
RL = torch.tensor([0.51, 0.29, 0.81, 0.40])
BETA = 100.0


def hand_margins(beta=BETA):
    # u_i = −β/2 · [(mw − ml) − (rw − rl)], written out element by element
    return [-beta / 2 * ((MW[i] - ML[i]).item() - (RW[i] - RL[i]).item()) for i in range(4)]


def test_diffusion_dpo_loss_and_implicit_accuracy_match_hand_computation():
    u = hand_margins()
    assert u == pytest.approx([1.0, -1.0, -1.0, -0.5], abs=1e-5)
    expected = sum(math.log(1 + math.exp(-x)) for x in u) / 4
    out = diffusion_dpo_loss(MW, ML, RW, RL, beta=BETA)
    assert out["loss_dpo"].item() == pytest.approx(expected, rel=1e-5)
    assert out["implicit_accuracy"].item() == pytest.approx(sum(x > 0 for x in u) / 4)
    assert out["margin"].item() == pytest.approx(sum(u) / 4, rel=1e-4, abs=1e-6)
    # policy equal to the reference: u = 0, loss = log 2, accuracy 0
    same = diffusion_dpo_loss(RW, RL, RW, RL, beta=BETA)
    assert same["loss_dpo"].item() == pytest.approx(math.log(2)) and same["implicit_accuracy"].item() == 0.0


def test_dpo_gradient_lowers_the_winner_error_and_raises_the_loser_error():
    mw, ml = MW.clone().requires_grad_(True), ML.clone().requires_grad_(True)
    diffusion_dpo_loss(mw, ml, RW, RL, beta=BETA)["loss_dpo"].backward()
    # ∂L/∂m_w = β/2 · σ(−u) / B > 0 and ∂L/∂m_l = −∂L/∂m_w
    u = torch.tensor(hand_margins())
    torch.testing.assert_close(mw.grad, BETA / 2 * torch.sigmoid(-u) / 4)
    torch.testing.assert_close(ml.grad, -mw.grad)


def test_sft_loss_is_the_mean_winner_error():
    assert sft_loss(MW)["loss_sft"].item() == pytest.approx(MW.mean().item())


@pytest.mark.parametrize("alpha", [0.01, 0.2])
def test_dmpo_equals_kl_between_bernoullis(alpha):
    u = torch.tensor(hand_margins())
    expected = kl_divergence(Bernoulli(probs=torch.sigmoid(u)), Bernoulli(probs=torch.full_like(u, 1 - alpha))).mean()
    out = dmpo_loss(MW, ML, RW, RL, beta=BETA, alpha=alpha)
    torch.testing.assert_close(out["loss_dmpo"], expected)
    assert out["implicit_accuracy"].item() == pytest.approx(0.25)
    # its minimum is at u* = log((1 − α)/α), where the loss is 0
    ustar = math.log((1 - alpha) / alpha)
    at_min = dmpo_loss(torch.tensor([-ustar / 50]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=BETA, alpha=alpha)
    assert at_min["loss_dmpo"].item() == pytest.approx(0.0, abs=1e-6)


def test_dmpo_gradient_direction_agrees_with_dpo_below_the_target_margin_and_reverses_above():
    def grads(loss_fn, mw_value, **kw):
        mw = torch.tensor([mw_value], requires_grad=True)
        ml = torch.tensor([0.5], requires_grad=True)
        out = loss_fn(mw, ml, torch.tensor([0.5]), torch.tensor([0.5]), beta=BETA, **kw)
        next(v for k, v in out.items() if k.startswith("loss_")).backward()
        return mw.grad.item(), ml.grad.item()

    for mw_value in (0.52, 0.5, 0.49):  # u = −1, 0, 0.5: all below u* = log 99 ≈ 4.6
        dpo_w, dpo_l = grads(diffusion_dpo_loss, mw_value)
        dmpo_w, dmpo_l = grads(dmpo_loss, mw_value, alpha=0.01)
        assert dpo_w > 0 and dmpo_w > 0 and dpo_l < 0 and dmpo_l < 0
    dmpo_w, dmpo_l = grads(dmpo_loss, 0.38, alpha=0.01)  # u = 6 > u*: DMPO pulls back, DPO never does
    assert dmpo_w < 0 < dmpo_l and grads(diffusion_dpo_loss, 0.38)[0] > 0


def test_sdpo_and_dpo_cm_reduce_to_diffusion_dpo_with_unit_weights_and_no_mask():
    zeros = torch.zeros(4)
    dpo = diffusion_dpo_loss(MW, ML, RW, RL, beta=BETA)
    for fn, key in ((sdpo_loss, "loss_sdpo"), (dpo_cm_loss, "loss_dpo_cm")):
        for threshold in (0.0, 0.9):  # w = 1 passes a 0.9 threshold
            out = fn(MW, ML, RW, RL, zeros, zeros, beta=BETA, clip_epsilon=0.2, mask_threshold=threshold)
            torch.testing.assert_close(out[key], dpo["loss_dpo"])
            assert out["masked_fraction"].item() == 0.0 and out["clipped_fraction"].item() == 0.0
            assert out["weight_mean"].item() == 1.0 and out["implicit_accuracy"] == dpo["implicit_accuracy"]
        # and the gradients agree too
        mw = MW.clone().requires_grad_(True)
        fn(mw, ML, RW, RL, zeros, zeros, beta=BETA, clip_epsilon=0.2, mask_threshold=0.9)[key].backward()
        mw_ref = MW.clone().requires_grad_(True)
        diffusion_dpo_loss(mw_ref, ML, RW, RL, beta=BETA)["loss_dpo"].backward()
        torch.testing.assert_close(mw.grad, mw_ref.grad)


def test_sdpo_clips_weights_inside_the_sigmoid_and_masks_low_weight_steps():
    lw_w = torch.log(torch.tensor([2.0, 0.95, 0.5, 1.0]))  # clipped to 1.2, kept 0.95, masked (0.5 < 0.9), 1
    lw_l = torch.log(torch.tensor([1.0, 1.05, 1.0, 0.85]))  # pair 3 masked by its loser (0.85 < 0.9)
    out = sdpo_loss(MW, ML, RW, RL, lw_w, lw_l, beta=BETA, clip_epsilon=0.2, mask_threshold=0.9)
    ww, wl = [1.2, 0.95], [1.0, 1.05]
    u = [-BETA / 2 * (ww[i] * (MW[i] - RW[i]).item() - wl[i] * (ML[i] - RL[i]).item()) for i in range(2)]
    expected = sum(math.log(1 + math.exp(-x)) for x in u) / 2  # averaged over the two kept pairs
    assert out["loss_sdpo"].item() == pytest.approx(expected, rel=1e-5)

    cm = dpo_cm_loss(MW, ML, RW, RL, lw_w, lw_l, beta=BETA, clip_epsilon=0.2, mask_threshold=0.9)
    plain = hand_margins()
    pair_w = [min(1.2, math.sqrt(2.0 * 1.0)), math.sqrt(0.95 * 1.05)]
    expected_cm = sum(pair_w[i] * math.log(1 + math.exp(-plain[i])) for i in range(2)) / 2
    assert cm["loss_dpo_cm"].item() == pytest.approx(expected_cm, rel=1e-5)
    # every step masked: the loss is 0 (no update), not NaN
    low = torch.full((4,), math.log(0.1))
    assert sdpo_loss(MW, ML, RW, RL, low, low, beta=BETA, clip_epsilon=0.2, mask_threshold=0.9)["loss_sdpo"].item() == 0.0


def test_weight_diagnostics_match_a_hand_count():
    # raw weights of four pairs: pairs 2 and 3 masked (0.5 and 0.85 < 0.9); 2.0 and 0.5 lie outside 1 ± 0.2
    w_w, w_l = torch.tensor([2.0, 0.95, 0.5, 1.0]), torch.tensor([1.0, 1.05, 1.0, 0.85])
    log_w = torch.log(w_w), torch.log(w_l)
    mean_log_w = sum(math.log(w) for w in [*w_w.tolist(), *w_l.tolist()]) / 8
    sdpo = sdpo_loss(MW, ML, RW, RL, *log_w, beta=BETA, clip_epsilon=0.2, mask_threshold=0.9)
    # SDPO clips each image's weight: 1.2, 0.95, 0.8, 1.0 (winners) and 1.0, 1.05, 1.0, 0.85 (losers)
    assert sdpo["masked_fraction"].item() == 0.5
    assert sdpo["clipped_fraction"].item() == pytest.approx(2 / 8)
    assert sdpo["weight_mean"].item() == pytest.approx((1.2 + 0.95 + 0.8 + 1.0 + 1.0 + 1.05 + 1.0 + 0.85) / 8)
    assert sdpo["log_weight_mean"].item() == pytest.approx(mean_log_w, abs=1e-6)
    # DPO-C&M clips one weight per pair, √(w_w w_l): √2 → 1.2, √0.9975, √0.5 → 0.8, √0.85
    cm = dpo_cm_loss(MW, ML, RW, RL, *log_w, beta=BETA, clip_epsilon=0.2, mask_threshold=0.9)
    assert cm["masked_fraction"].item() == 0.5 and cm["clipped_fraction"].item() == pytest.approx(2 / 4)
    assert cm["weight_mean"].item() == pytest.approx((1.2 + math.sqrt(0.9975) + 0.8 + math.sqrt(0.85)) / 4)
    # unit weights change nothing; a threshold of 0 masks nothing
    zeros = torch.zeros(4)
    unit = sdpo_loss(MW, ML, RW, RL, zeros, zeros, beta=BETA, clip_epsilon=0.2, mask_threshold=0.9)
    assert [unit[k].item() for k in ("masked_fraction", "clipped_fraction", "weight_mean")] == [0.0, 0.0, 1.0]
    low = torch.full((4,), math.log(0.1))
    all_kept = sdpo_loss(MW, ML, RW, RL, low, low, beta=BETA, clip_epsilon=0.2, mask_threshold=0.0)
    assert all_kept["masked_fraction"].item() == 0.0 and all_kept["clipped_fraction"].item() == 1.0
    assert all_kept["weight_mean"].item() == pytest.approx(0.8)


def test_importance_weights_act_at_the_defaults_on_the_tiny_models_own_samples():
    # with the per-dimension mean the weights sat in [0.9, 1.2] at every t > ~5: nothing masked or clipped, and
    # SDPO / DPO-C&M were Diffusion-DPO with another β; the summed (exact) ratio must act
    from rl4diffusion.policies.base import DiffusionPolicy

    policy = DiffusionPolicy.from_pretrained("tiny")
    prompts = ["a red circle", "a blue star", "a green square", "a yellow triangle"]
    with torch.no_grad():
        images = policy.sample(prompts * 4, generator=torch.Generator().manual_seed(0))["images"]
        latents = policy.encode_images(images)  # as the preference pairs reach the algorithm
    pairs = TensorDict({keys.LATENTS_W: latents[:8], keys.LATENTS_L: latents[8:],
                        keys.PROMPT_EMBEDS: policy.encode_prompts(prompts * 2)}, batch_size=[8])

    def diagnostics(cls, **options):
        algo = cls(SDPOConfig(batch_size=8, minibatch_size=8, **options), policy,
                   build_reward("jpeg_compressibility"), seed=0)
        with torch.no_grad():  # four draws of 8 timesteps, the same for every config (same seed)
            terms = [algo.loss_terms(pairs) for _ in range(4)]
        return {k: sum(t[k].item() for t in terms) / 4 for k in ("masked_fraction", "clipped_fraction")}

    assert SDPOConfig().weight_reduction == "sum"
    for cls in (SDPO, DPOCM):
        default = diagnostics(cls)
        assert default["masked_fraction"] >= 0.2 and default["clipped_fraction"] > 0, (cls.name, default)
        per_dimension = diagnostics(cls, weight_reduction="mean")
        assert per_dimension["masked_fraction"] < default["masked_fraction"], (cls.name, per_dimension)
        assert per_dimension["clipped_fraction"] < default["clipped_fraction"], (cls.name, per_dimension)


def test_importance_weight_matches_the_ratio_of_two_normal_densities():
    g = torch.Generator().manual_seed(0)
    b, shape = 5, (5, 4, 3, 3)
    x0, x_t, pred_x0, noise = (torch.randn(shape, generator=g) for _ in range(4))
    alpha_t = torch.tensor([0.05, 0.3, 0.6, 0.9, 0.98])
    alpha_prev = torch.tensor([0.06, 0.33, 0.62, 0.95, 0.99])
    log_w = importance_log_weights(x0, x_t, pred_x0, alpha_t, alpha_prev, noise)
    log_w_sum = importance_log_weights(x0, x_t, pred_x0, alpha_t, alpha_prev, noise, reduction="sum")
    for i in range(b):
        a_t, a_p = alpha_t[i].item(), alpha_prev[i].item()
        beta_t, alpha_step = 1 - a_t / a_p, a_t / a_p
        var = (1 - a_p) / (1 - a_t) * beta_t
        # q's mean in its x₀-coefficient form; the model's mean in DDPM's ε form (Ho et al. eq. 11)
        mean_q = math.sqrt(a_p) * beta_t / (1 - a_t) * x0[i] + math.sqrt(alpha_step) * (1 - a_p) / (1 - a_t) * x_t[i]
        eps_hat = (x_t[i] - math.sqrt(a_t) * pred_x0[i]) / math.sqrt(1 - a_t)
        mean_p = (x_t[i] - beta_t / math.sqrt(1 - a_t) * eps_hat) / math.sqrt(alpha_step)
        x_prev = mean_q + math.sqrt(var) * noise[i]
        ratio = Normal(mean_p, math.sqrt(var)).log_prob(x_prev) - Normal(mean_q, math.sqrt(var)).log_prob(x_prev)
        assert log_w[i].item() == pytest.approx(ratio.mean().item(), rel=1e-4, abs=1e-5)
        assert log_w_sum[i].item() == pytest.approx(ratio.sum().item(), rel=1e-4, abs=1e-4)
    # a perfect prediction (x̂₀ = x₀) gives w = 1; at t = 0 (ᾱ_{t−1} = 1) the step is a point mass: w = 1
    assert importance_log_weights(x0, x_t, x0, alpha_t, alpha_prev, noise).abs().max().item() < 1e-5
    assert importance_log_weights(x0, x_t, pred_x0, alpha_t, torch.ones(b), noise).abs().max().item() == 0.0


def test_preference_configs_reject_bad_values():
    with pytest.raises(ConfigError, match="minibatch_size"):
        DiffusionDPOConfig(batch_size=10, minibatch_size=4).validate()
    with pytest.raises(ConfigError, match="beta"):
        DiffusionDPOConfig(beta=0).validate()
    with pytest.raises(ConfigError, match="clip_epsilon"):
        SDPOConfig(clip_epsilon=1.5).validate()
    with pytest.raises(ConfigError, match="caption_dropout"):
        PreferenceConfig(caption_dropout=1.0).validate()


def _pairs(policy, n=4):
    g = torch.Generator().manual_seed(1)
    return TensorDict({
        keys.LATENTS_W: torch.randn(n, *policy.latent_shape, generator=g),
        keys.LATENTS_L: torch.randn(n, *policy.latent_shape, generator=g),
        keys.PROMPT_EMBEDS: policy.encode_prompts(["a red circle", "a blue square"] * (n // 2)),
    }, batch_size=[n])


@pytest.mark.parametrize("name, cls", [("diffusion_dpo", DiffusionDPO), ("sft", SFT), ("dmpo", DMPO), ("dpo_cm", DPOCM),
                                       ("sdpo", SDPO)])
def test_each_algo_yaml_builds_its_validated_config(name, cls):
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    options = OmegaConf.to_container(compose_config([f"algo={name}"]).algo, resolve=True)
    assert options.pop("name") == name
    found_cls, cfg_cls = algorithm_classes(name)
    cfg = build_config(cfg_cls, options, name)  # every yaml key is a config field and passes validate()
    assert found_cls is cls and cls.name == name
    assert set(options) == {f.name for f in dataclasses.fields(cfg_cls)}  # and every field is in the yaml
    if name == "dmpo":
        assert cfg.alpha == 0.01 and cfg.beta == 2000.0  # the paper's defaults


@pytest.mark.parametrize("cls, cfg_cls", [(DiffusionDPO, DiffusionDPOConfig), (DMPO, DMPOConfig), (DPOCM, SDPOConfig),
                                          (SDPO, SDPOConfig), (SFT, PreferenceConfig)])
def test_update_trains_only_the_adapter_and_the_reference_stays_the_base_model(make_policy, cls, cfg_cls):
    torch.manual_seed(0)
    policy = make_policy()
    # a random UNet on random latents is far from q: the exact (summed) weight masks every pair and nothing would
    # train; the per-dimension weight keeps them, which this plumbing test needs
    weights = {"weight_reduction": "mean"} if cfg_cls is SDPOConfig else {}
    algo = cls(cfg_cls(lr=1e-2, batch_size=4, minibatch_size=4, caption_dropout=0.5, **weights), policy,
               build_reward("jpeg_compressibility"), seed=0)
    pairs = _pairs(policy)
    x, t, c = pairs[keys.LATENTS_W], torch.full((4,), 500), pairs[keys.PROMPT_EMBEDS]
    with policy.reference():
        base_before = policy.predict_noise(x, t, c, guidance_scale=1.0)
    frozen = {n: p.clone() for n, p in policy.unet.named_parameters() if not p.requires_grad}
    lora = {n: p.clone() for n, p in policy.unet.named_parameters() if p.requires_grad}
    if cls is not SFT:  # at initialisation the adapter is the identity: u = 0 exactly
        terms = algo.loss_terms(pairs)
        loss = next(v for k, v in terms.items() if k.startswith("loss_")).item()
        assert terms["margin"].item() == 0.0 and terms["implicit_accuracy"].item() == 0.0
        if cls is DMPO:  # KL(Bern(½) ‖ Bern(1 − α))
            assert loss == pytest.approx(0.5 * math.log(0.5 / 0.99) + 0.5 * math.log(0.5 / 0.01), abs=1e-6)
        elif cls is DPOCM:  # log 2 times the mean clipped pair weight of the kept pairs
            assert terms["masked_fraction"].item() < 1 and 0.8 * math.log(2) - 1e-6 <= loss <= 1.2 * math.log(2) + 1e-6
        else:  # Diffusion-DPO, and SDPO (u = 0 whatever the weights)
            assert loss == pytest.approx(math.log(2), abs=1e-6)
    metrics = Updater(algo)(pairs)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["diag/grad_norm"] > 0
    assert all(torch.equal(p, frozen[n]) for n, p in policy.unet.named_parameters() if n in frozen)
    assert any(not torch.equal(p, lora[n]) for n, p in policy.unet.named_parameters() if n in lora)
    with policy.reference():
        torch.testing.assert_close(policy.predict_noise(x, t, c, guidance_scale=1.0), base_before)
    assert not torch.allclose(policy.predict_noise(x, t, c, guidance_scale=1.0), base_before)
    if cls is not SFT:
        assert "diag/implicit_accuracy" in metrics and "loss/" + cls.name.replace("diffusion_", "") in metrics
    if cls in (DPOCM, SDPO):  # the importance-weight diagnostics are logged
        assert 0 <= metrics["diag/masked_fraction"] <= 1 and 0 <= metrics["diag/clipped_fraction"] <= 1
        assert 0.8 - 1e-6 <= metrics["diag/weight_mean"] <= 1.2 + 1e-6 and "diag/log_weight_mean" in metrics
