"""The "dreamsim" and "inception" feature spaces, on randomly initialised networks of the real classes.

DreamSim: the ``dreamsim`` package's own loader (``dreamsim.dreamsim``: ``PerceptualModel`` of
``ViTExtractor`` branches, LoRA adapter loaded with peft) runs on a cache directory we fill with a
saved LoRA adapter, while ``ViTExtractor.create_model`` is swapped for tiny dreamsim
``VisionTransformer`` backbones (the real ones are ViT-B, 86 M parameters each, and need the
downloaded checkpoints). Everything after the backbone is built is the package's code.

Inception: torch-fidelity's InceptionV3 has a fixed architecture and always loads weights, so the
test builds the real class (torchmetrics ``NoTrainInceptionV3``) with random weights, saves them,
and loads them back through the feature space's own loading path — covering the weights lookup,
the uint8 protocol and the 2048-d output, but of course not the pretrained numbers.
"""

from __future__ import annotations

import time
from unittest import mock

import pytest
import torch

import rl4diffusion.metrics.dreamsim_space  # noqa: F401  (registers "dreamsim")
import rl4diffusion.metrics.inception_space  # noqa: F401  (registers "inception")
from rl4diffusion.errors import MissingWeightsError
from rl4diffusion.metrics import build_feature_space
from rl4diffusion.metrics.dreamsim_space import REQUIRED_FILES, TORCH_HUB_FILES, DreamSimFeatures
from rl4diffusion.metrics.inception_space import WEIGHTS_FILE, InceptionFeatures


def _images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny_backbone(model_type: str, load_dir: str = ""):
    """Stand-in for ViTExtractor.create_model: a 32-wide dreamsim VisionTransformer (+ CLIP projection for CLIPs)."""
    from dreamsim.feature_extraction.vision_transformer import VisionTransformer

    if "dino" in model_type:  # DreamSim reads DINO's CLS token at block 11, so it needs 12 blocks
        return VisionTransformer(patch_size=16, embed_dim=32, depth=12, num_heads=2, qkv_bias=True)
    vit = VisionTransformer(patch_size=16, embed_dim=32, depth=1, num_heads=2, qkv_bias=True)
    return vit, torch.randn(32, 16) / 32**0.5


@pytest.fixture(scope="module")
def tiny_dreamsim(tmp_path_factory):
    """build_feature_space("dreamsim") over a cache holding a tiny ensemble's LoRA adapter."""
    from dreamsim.config import dreamsim_args
    from dreamsim.feature_extraction.extractor import ViTExtractor
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    cache = tmp_path_factory.mktemp("dreamsim")
    for name in REQUIRED_FILES["ensemble"] + TORCH_HUB_FILES["ensemble"]:  # present, as after the download
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        if "." in name:
            (cache / name).touch()
        else:
            (cache / name).mkdir(exist_ok=True)
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ViTExtractor, "create_model", staticmethod(_tiny_backbone))
        mp.setenv("RL4DIFFUSION_DREAMSIM_DIR", str(cache))
        base = PerceptualModel(**dreamsim_args["model_config"]["ensemble"], device="cpu")
        lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, bias="none", target_modules=["qkv"])
        get_peft_model(base, lora).save_pretrained(str(cache / "ensemble_lora"))
        hub_dir = torch.hub.get_dir()
        space = build_feature_space("dreamsim")
        assert torch.hub.get_dir() == hub_dir
    return space


def test_dreamsim_embeddings_are_unit_norm_batch_invariant_and_give_dreamsim_distance(tiny_dreamsim):
    space = tiny_dreamsim
    assert space.name == "dreamsim"
    images = _images(2, size=40)
    e = space(images)
    assert e.shape == (2, 32 + 16 + 16)  # ensemble: DINO cls ‖ CLIP embedding ‖ OpenCLIP embedding
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(torch.cat([space(images[i:i + 1]) for i in range(2)]), e, atol=1e-5, rtol=1e-5)
    # the package's own distance, 1 − cos, equals the cosine distance of our embeddings
    x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        distance = space.model(x[:1], x[1:2])
    torch.testing.assert_close(distance, 1 - (e[0] * e[1]).sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_dreamsim_from_model_wraps_any_embedder():
    class Mean(torch.nn.Module):
        def embed(self, x):
            return x.mean(dim=(2, 3))

    space = DreamSimFeatures.from_model(Mean(), name="dreamsim:test", image_size=8)
    assert space(_images(2)).shape == (2, 3) and space.name == "dreamsim:test"


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """Random weights of torch-fidelity's FID InceptionV3, saved as the weights file (variance-preserving init)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from torchmetrics.image.fid import NoTrainInceptionV3

    torch.manual_seed(0)
    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    for m in net.modules():  # PyTorch's default conv init shrinks activations ~3× per layer over 90+ layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return str(path)


def test_inception_features_are_fid_pool3_features(random_inception_weights, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setenv("RL4DIFFUSION_INCEPTION_WEIGHTS", random_inception_weights)
    space = build_feature_space("inception")
    assert space.name == "inception"
    images = _images(2)
    # one image at a time (batch_size=1) against torch-fidelity's own network on the uint8 batch:
    # the same features (protocol: ×255, round, uint8, TF1 resize to 299) and batch invariance at once
    one_by_one = InceptionFeatures.from_model(space.net, batch_size=1)(images)
    assert one_by_one.shape == (2, 2048) and torch.isfinite(one_by_one).all() and one_by_one.std(dim=0).mean() > 0
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], random_inception_weights)
    with torch.no_grad():
        batched = reference((images * 255).round().to(torch.uint8))[0]
    torch.testing.assert_close(one_by_one, batched, atol=1e-4, rtol=1e-4)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    for var in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "RL4DIFFUSION_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    for var in ("RL4DIFFUSION_DREAMSIM_DIR", "RL4DIFFUSION_INCEPTION_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("name, key", [("dreamsim", "RL4DIFFUSION_DREAMSIM_DIR="),
                                       ("inception", "RL4DIFFUSION_INCEPTION_WEIGHTS=")])
def test_absent_weights_fail_fast_with_a_teaching_message(empty_caches, name, key):
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        build_feature_space(name)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert key in message and "reward=shape_alignment" in message and "build_feature_space('judge')" in message
    assert "normally downloaded from" in message and "\n" not in message
