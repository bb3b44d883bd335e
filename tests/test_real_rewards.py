"""Real rewards (aesthetic, clip_score, hpsv2, pickscore) on tiny random models of the real classes.

The pretrained weights are not on CI machines, so each reward is built on a small, randomly
initialised model of the same class — an ``open_clip.CLIP`` from a custom model config, a
``transformers.CLIPModel`` from a ``CLIPConfig`` — saved to disk and loaded through the reward's
own loading path (local checkpoint file / ``save_pretrained`` directory). The checks: output shape,
agreement with the library's own embedding API, batch invariance, a finite non-zero gradient
w.r.t. the pixels, unit-norm embeddings into the aesthetic head, and a fast, teaching
MissingWeightsError when the weights are absent.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from rl4diffusion.errors import MissingWeightsError
from rl4diffusion.rewards import build_reward
from rl4diffusion.rewards.real import (
    _KNOWN_OPEN_CLIP,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AestheticHead,
    ClipScoreReward,
    HPSv2Reward,
    PickScoreReward,
    clip_preprocess,
)

TINY_ARCH = "rl4d-test-tiny-ViT"
PROMPTS = ["a red circle", "a blue square", "a red circle"]


def _images(*shape, seed=0, grad=False):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip CLIP (ViT tower, 768-d embedding like ViT-L-14) registered as TINY_ARCH, saved to a file."""
    import open_clip

    d = tmp_path_factory.mktemp("open_clip")
    cfg = {"embed_dim": 768,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / f"{TINY_ARCH}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH)
    ckpt = d / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return model.eval(), open_clip.get_tokenizer(TINY_ARCH), str(ckpt)


def _check_batch_invariance_and_gradient(reward, shape=(3, 3, 32, 32)):
    images = _images(*shape, grad=True)
    scores = reward(images, PROMPTS)
    assert scores.shape == (shape[0],) and torch.isfinite(scores).all()
    one_by_one = torch.cat([reward(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(shape[0])])
    torch.testing.assert_close(one_by_one, scores, atol=1e-4, rtol=1e-4)
    grad, = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    return scores


def test_clip_preprocess_matches_torchvision_resize_crop_normalize():
    from torchvision import transforms as T

    images = _images(2, 3, 40, 57)
    ours = clip_preprocess(images, resize=24, crop=(24, 24), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    reference = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(24),
                           T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])(images)
    torch.testing.assert_close(ours, reference)


def test_known_open_clip_tags_agree_with_open_clip():
    import open_clip

    for (arch, tag), (hf_hub, url, quick_gelu) in _KNOWN_OPEN_CLIP.items():
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        assert (cfg.get("hf_hub", ""), cfg.get("url", ""), bool(cfg.get("quick_gelu"))) == (hf_hub, url, quick_gelu)


def test_clip_score_loads_a_local_checkpoint_and_matches_open_clip(tiny_open_clip):
    model, tokenizer, ckpt = tiny_open_clip
    reward = build_reward("clip_score", arch=TINY_ARCH, pretrained=ckpt)
    assert reward.differentiable
    scores = _check_batch_invariance_and_gradient(reward)
    # the same number from open_clip's own API (32×32 inputs: no resize, only normalisation)
    images = _images(3, 3, 32, 32)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image((images - mean) / std, normalize=True)
        txt = model.encode_text(tokenizer(PROMPTS), normalize=True)
    torch.testing.assert_close(scores.detach(), (img * txt).sum(-1), atol=1e-5, rtol=1e-4)
    scaled = ClipScoreReward.from_models(model, tokenizer, scale=100.0)
    torch.testing.assert_close(scaled(images, PROMPTS), 100 * scores.detach(), atol=1e-3, rtol=1e-4)
    # non-square images go through resize + centre crop
    assert reward(_images(2, 3, 48, 40), PROMPTS[:2]).shape == (2,)


def test_aesthetic_head_layout_matches_the_published_state_dict():
    published = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    head = AestheticHead()
    assert set(head.state_dict()) == published
    assert [m.out_features for m in head.layers if isinstance(m, torch.nn.Linear)] == [1024, 128, 64, 16, 1]
    assert head.layers[0].in_features == 768


def test_aesthetic_reads_unit_norm_embeddings(tiny_open_clip, tmp_path):
    _, _, ckpt = tiny_open_clip
    torch.manual_seed(1)
    head_path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticHead().state_dict(), head_path)
    reward = build_reward("aesthetic", clip_arch=TINY_ARCH, pretrained=ckpt, head_path=str(head_path))
    norms = []
    reward.fn.head.register_forward_pre_hook(lambda _m, args: norms.append(args[0].detach().norm(dim=-1)))
    _check_batch_invariance_and_gradient(reward, shape=(3, 3, 40, 40))
    assert norms and all(torch.allclose(n, torch.ones_like(n), atol=1e-5) for n in norms)
    torch.testing.assert_close(reward.fn.head.state_dict()["layers.7.weight"],
                               torch.load(head_path, weights_only=True)["layers.7.weight"])
    # a bare checkpoint file gets OpenAI's QuickGELU, which the head's ViT-L/14 was trained with
    from open_clip.transformer import QuickGELU

    assert any(isinstance(m, QuickGELU) for m in reward.fn.clip.model.modules())


def test_hpsv2_scores_cosine_with_the_open_clip_model(tiny_open_clip):
    model, tokenizer, _ = tiny_open_clip
    hps = HPSv2Reward.from_models(model, tokenizer)
    clip = ClipScoreReward.from_models(model, tokenizer)
    images = _images(3, 3, 32, 32)
    torch.testing.assert_close(hps(images, PROMPTS), clip(images, PROMPTS))
    _check_batch_invariance_and_gradient(hps)


@pytest.fixture(scope="module")
def tiny_pickscore_dir(tmp_path_factory):
    """A tiny transformers CLIPModel + tokenizer + preprocessor_config.json saved like PickScore_v1 and its processor."""
    from transformers import CLIPConfig, CLIPModel

    from rl4diffusion.testing import make_char_tokenizer

    d = tmp_path_factory.mktemp("pickscore")
    tokenizer = make_char_tokenizer(d / "tok", model_max_length=32)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "eos_token_id": 1, "bos_token_id": 0,
                     "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}))
    return str(d)


def test_pickscore_loads_a_local_directory_and_matches_transformers(tiny_pickscore_dir):
    reward = build_reward("pickscore", model_path=tiny_pickscore_dir, processor_path=tiny_pickscore_dir)
    scores = _check_batch_invariance_and_gradient(reward)
    fn = reward.fn
    images = _images(3, 3, 32, 32)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():  # PickScore's published formula with the model's own feature functions
        img = fn.model.get_image_features(pixel_values=(images - mean) / std)
        txt = fn.model.get_text_features(**fn.tokenizer(PROMPTS, padding=True, return_tensors="pt"))
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))  # transformers 5 returns an output object
        expected = fn.model.logit_scale.exp() * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    torch.testing.assert_close(scores.detach(), expected, atol=1e-4, rtol=1e-4)
    same = PickScoreReward.from_models(fn.model, fn.tokenizer)
    torch.testing.assert_close(same(images, PROMPTS), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point every weight cache at an empty directory, so the test means the same on a machine with weights."""
    import huggingface_hub.constants

    for var in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "RL4DIFFUSION_CACHE", "HPS_ROOT"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name, options, key", [
    ("aesthetic", {}, "reward.head_path=/path/to/sac+logos+ava1-l14-linearMSE.pth"),
    ("aesthetic", {"head_path": "/nonexistent/head.pth"}, "reward.head_path="),
    ("clip_score", {}, "reward.pretrained="),
    ("clip_score", {"pretrained": "/nonexistent/ViT-B-32.pt"}, "reward.pretrained="),
    ("pickscore", {}, "reward.model_path="),
    ("pickscore", {"model_path": "/nonexistent/PickScore_v1"}, "reward.model_path="),
    ("hpsv2", {}, "reward.checkpoint_path="),
])
def test_absent_weights_fail_fast_with_a_teaching_message(empty_caches, name, options, key):
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        build_reward(name, **options)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert key in message and "reward=shape_alignment" in message
    assert "\n" not in message  # one paragraph
    if name == "hpsv2":
        assert "pip install hpsv2" in message or "xswu/HPSv2" in message
    else:
        assert "normally downloaded from" in message


def test_download_refuses_when_the_hub_is_offline(empty_caches):
    from rl4diffusion.errors import ConfigError

    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        build_reward("clip_score", download=True)


def test_hpsv2_with_the_package_finds_its_checkpoint_in_hps_root(empty_caches, tiny_open_clip, tmp_path, monkeypatch):
    """Where ``hpsv2`` is installed: the checkpoint is looked up in $HPS_ROOT and loaded into open_clip's ViT-H-14."""
    import importlib.util

    import rl4diffusion.rewards.real as real

    model, tokenizer, _ = tiny_open_clip
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "hpsv2" else find_spec(name, *a))
    with pytest.raises(MissingWeightsError, match="reward.checkpoint_path=/path/to/HPS_v2.1_compressed.pt"):
        build_reward("hpsv2")
    (tmp_path / "hps_root").mkdir(exist_ok=True)
    (tmp_path / "hps_root" / "HPS_v2.1_compressed.pt").touch()
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hps_root"))
    calls = []
    monkeypatch.setattr(real, "_load_open_clip", lambda arch, pretrained, ckpt, **kw: calls.append((arch, ckpt, kw))
                        or (model, tokenizer))  # the real ViT-H-14 has ~1 B parameters
    reward = build_reward("hpsv2")
    assert calls[0][0] == "ViT-H-14" and calls[0][1].endswith("HPS_v2.1_compressed.pt")
    assert calls[0][2]["quick_gelu"] is False
    assert reward(_images(2, 3, 32, 32), PROMPTS[:2]).shape == (2,)
