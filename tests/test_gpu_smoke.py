"""The GPU smoke benchmark's CPU path: the random SD1.5-architecture pipeline, the run plan and the script."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_smoke
from rl4diffusion.algorithms import ALGORITHMS
from rl4diffusion.testing import make_random_sd15_pipeline, random_sd15_configs

ROOT = Path(__file__).resolve().parent.parent


def test_full_scale_unet_is_sd15s_published_architecture():
    from diffusers import UNet2DConditionModel

    configs = random_sd15_configs("full")
    with torch.device("meta"):  # no memory: only the parameter count is read
        unet = UNet2DConditionModel(**configs["unet"])
    # SD1.5's unet/config.json (stable-diffusion-v1-5): 859,520,964 parameters
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert unet.config.sample_size == 64 and unet.config.cross_attention_dim == 768
    assert configs["text_encoder"]["hidden_size"] == 768
    vae = configs["vae"]
    assert vae["latent_channels"] == 4 and 2 ** (len(vae["block_out_channels"]) - 1) == 8


def test_tiny_scale_keeps_the_block_structure():
    full, tiny = random_sd15_configs("full")["unet"], random_sd15_configs("tiny")["unet"]
    for key in ("down_block_types", "up_block_types", "layers_per_block", "in_channels"):
        assert tiny[key] == full[key]
    assert len(tiny["block_out_channels"]) == len(full["block_out_channels"])
    with pytest.raises(ValueError, match="scale must be one of"):
        random_sd15_configs("medium")


def test_tiny_sd15_pipeline_loads_through_diffusion_policy_and_samples(tmp_path):
    from diffusers import DDIMScheduler

    from rl4diffusion.policies.base import DiffusionPolicy

    make_random_sd15_pipeline(seed=0, scale="tiny").save_pretrained(str(tmp_path))
    policy = DiffusionPolicy.from_pretrained(str(tmp_path), num_steps=2)
    assert isinstance(policy.scheduler, DDIMScheduler)  # SD1.5 ships PNDM; the policy steps with DDIM
    assert policy.latent_shape == (4, 8, 8) and (policy.height, policy.width) == (64, 64)
    out = policy.sample(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0))
    assert out["images"].shape == (2, 3, 64, 64)
    assert torch.isfinite(out["images"]).all() and out["images"].min() >= 0 and out["images"].max() <= 1


def test_plan_covers_every_algorithm_and_precision_plus_the_sd15_runs():
    runs = gpu_smoke.plan_runs(list(ALGORITHMS), ["fp32", "bf16"], ["ddpo", "nabla_gfn"])
    assert {(r.algo, r.precision) for r in runs if r.model == "tiny"} == {
        (a, p) for a in ALGORITHMS for p in ("fp32", "bf16")}
    assert [(r.algo, r.precision) for r in runs if r.model == "sd15"] == [
        ("ddpo", "fp32"), ("ddpo", "bf16"), ("nabla_gfn", "fp32"), ("nabla_gfn", "bf16")]
    flow = gpu_smoke.plan_runs(["ddpo"], ["fp32"], [], ["grpo", "nft"])
    assert [(r.model, r.algo) for r in flow] == [("tiny", "ddpo"), ("tiny_flow", "grpo"), ("tiny_flow", "nft")]
    with pytest.raises(SystemExit, match="unknown precision"):
        gpu_smoke.plan_runs(["ddpo"], ["fp16"], [])


def test_overrides_shrink_only_the_options_an_algorithm_has(tmp_path):
    def overrides(algo, precision="bf16"):
        return gpu_smoke.run_overrides(gpu_smoke.Run("tiny", algo, precision), model_arg="model=tiny",
                                       device="cuda", run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")

    ddpo = overrides("ddpo")
    for expected in ("algo=ddpo", "device=cuda", "mixed_precision=bf16", "epochs=1", "eval.metrics=false",
                     "eval.samples_per_prompt=2", "progress=false", "save_lora=false", "checkpoint.every=0",
                     f"hydra.run.dir={tmp_path / 'run'}", "algo.batch_size=4", "algo.minibatch_size=2"):
        assert expected in ddpo
    assert not any(o.startswith(("algo.num_pairs", "algo.cache_dir", "algo.group_size")) for o in ddpo)
    assert "mixed_precision=no" in overrides("ddpo", "fp32")
    assert "algo.group_size=2" in overrides("grpo")
    dpo = overrides("diffusion_dpo")
    assert "algo.num_pairs=16" in dpo and f"algo.cache_dir={tmp_path / 'cache'}" in dpo


def test_table_reports_failures_with_their_last_line():
    ok = gpu_smoke.Run("tiny", "ddpo", "fp32", status="pass", epoch_s=1.234, run_s=9.87, peak_bytes=3 * 2**30)
    bad = gpu_smoke.Run("sd15", "nabla_gfn", "bf16", status="fail", run_s=5.0,
                        error="exit 1: ValueError: a|b")
    table = gpu_smoke.format_table([ok, bad], device="cuda", markdown=True).splitlines()
    assert table[0] == ("| model | algorithm | precision | result | s/epoch | run s | peak GPU mem (GiB) "
                        "| error (last line) |")
    assert table[2] == "| tiny | ddpo | fp32 | pass | 1.23 | 9.9 | 3.00 |  |"
    assert table[3] == "| sd15 | nabla_gfn | bf16 | fail | — | 5.0 | n/a | exit 1: ValueError: a\\|b |"
    assert "peak RSS (GiB)" in gpu_smoke.format_table([ok], device="cpu", markdown=False)


def test_one_cpu_run_reports_seconds_and_peak_memory(tmp_path):
    out = tmp_path / "gpu_smoke.md"
    runs = gpu_smoke.main(["--device", "cpu", "--algos", "ddpo", "--sd15-algos", "", "--flow-algos", "", "--workdir",
                           str(tmp_path / "work"), "--out", str(out)])
    assert [(r.model, r.algo, r.precision) for r in runs] == [("tiny", "ddpo", "fp32")]
    assert runs[0].status == "pass", runs[0].error
    assert runs[0].epoch_s > 0 and runs[0].peak_bytes > 2**20  # peak RSS of the child, in bytes
    assert "| tiny | ddpo | fp32 | pass |" in out.read_text()


@pytest.mark.slow
def test_cpu_smoke_script_passes_every_row(tmp_path):
    """The whole CPU-equivalent path: every algorithm on the tiny model, DDPO and ∇-GFN on the tiny SD1.5."""
    out = tmp_path / "gpu_smoke.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py", "--device", "cpu", "--scale", "tiny", "--precisions",
         "fp32", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| tiny ", "| sd15 "))]
    assert len(rows) == len(ALGORITHMS) + 2
    failed = [row for row in rows if "| pass |" not in row]
    assert not failed and proc.returncode == 0, "\n".join(failed) + proc.stdout[-2000:]
