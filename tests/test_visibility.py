"""Runs people can see into: captioned, upscaled grids of every prompt (base beside current), the same images in
TensorBoard and wandb, one console line per evaluation and per epoch, the loss in the bar, one short line for the
offline feature-space fallback, and a default run whose console output fits on one screen."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from rl4diffusion.training import grids
from rl4diffusion.training.grids import comparison_pages, page_ranges
from rl4diffusion.training.runlog import EpochLines, RunLogger, epoch_line, progress_postfix
from tests.conftest import compose_config
from tests.mistakes import cli_env

TINY = ["model.num_steps=2", "algo.batch_size=4", "algo.minibatch_size=4", "eval.samples_per_prompt=2", "threads=1"]


def shapes_images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- grids ------------------------------------------------------------------------------------
@pytest.mark.parametrize("count, sizes", [(1, [1]), (16, [16]), (17, [9, 8]), (20, [10, 10]), (33, [11, 11, 11])])
def test_pages_are_balanced_and_cover_every_prompt(count, sizes):
    pages = page_ranges(count)
    assert [len(p) for p in pages] == sizes
    assert [i for p in pages for i in p] == list(range(count))


def test_grid_shows_every_prompt_captioned_upscaled_base_beside_current():
    prompts = [f"prompt number {i}" for i in range(20)]
    samples = 2
    images, base = shapes_images(40, seed=0), shapes_images(40, seed=1)
    rewards, base_rewards = torch.linspace(-1, 1, 40), torch.zeros(40)
    pages = comparison_pages(prompts, images, rewards, samples_per_prompt=samples, label="step 5",
                             base_images=base, base_rewards=base_rewards)
    assert len(pages) == 2
    captions = [c for page in pages for c in page.captions]
    assert len(captions) == 80  # every image of every prompt, base and current
    for p, prompt in enumerate(prompts):  # a row: the base model's two images, then the current model's two
        row = captions[4 * p : 4 * p + 4]
        assert all(c.startswith(prompt + "\n") for c in row)
        assert [c.split("\n")[1].split(":")[0] for c in row] == ["base", "base", "step 5", "step 5"]
        assert row[2].endswith(f"reward {rewards[2 * p].item():.3f}")
    page = pages[0].image
    tile = math.ceil(grids.MIN_TILE / 32) * 32  # 32 px upscaled by a whole factor to ≥ 256
    assert page.width >= 4 * tile and page.height >= 10 * tile
    pixels = np.asarray(page)
    top, left = grids.GAP, grids.GAP
    # the first tile is the first base image, nearest-neighbour upscaled: each source pixel a tile/32 square
    expected = grids.to_uint8(base[:1])[0].repeat(tile // 32, 0).repeat(tile // 32, 1)
    assert np.array_equal(pixels[top : top + tile, left : left + tile], expected)
    band = pixels[top + tile + 1 : top + tile + 40, left : left + tile]
    assert band.min() < 100 and band.max() == 255  # dark text on the white caption band
    # the same grid without captions has a blank band: the text is what differs
    blank = grids.captioned_grid([expected], [""], columns=1)
    assert np.asarray(blank)[top + tile + 1 :, left : left + tile].min() == 255


def test_base_evaluation_grid_has_only_the_base_images_and_large_images_are_shrunk():
    pages = comparison_pages(["a"], torch.rand(2, 3, 600, 600), torch.zeros(2), samples_per_prompt=2, label="base")
    assert len(pages[0].captions) == 2 and pages[0].image.width < 2 * 600
    assert max(grids.resize_tile(np.zeros((600, 300, 3), np.uint8)).shape[:2]) == grids.MAX_TILE


def test_pages_go_to_the_image_trackers(tmp_path):
    """TensorBoard takes a batch (NHWC), wandb a list of images (accelerate wraps them in wandb.Image)."""
    calls = []

    class FakeTracker:
        def __init__(self, name):
            self.name = name

        def log_images(self, values, step=None, **kwargs):
            calls.append((self.name, values, step, kwargs))

    pages = comparison_pages(["a", "b"], shapes_images(4), torch.zeros(4), samples_per_prompt=2, label="base")
    logger = RunLogger(tmp_path, accelerator=SimpleNamespace(trackers=[FakeTracker("tensorboard"),
                                                                       FakeTracker("wandb"), FakeTracker("mlflow")]))
    paths = logger.save_pages(pages, "eval_00003_train", step=3, tag="eval/train/images")
    assert [p.name for p in paths] == ["eval_00003_train_p1.png"] and Image.open(paths[0]).size == pages[0].image.size
    (tb_name, tb_values, tb_step, tb_kwargs), (wandb_name, wandb_values, wandb_step, _) = calls
    assert (tb_name, wandb_name, tb_step, wandb_step) == ("tensorboard", "wandb", 3, 3)
    assert tb_values["eval/train/images_p1"].shape == (1, pages[0].image.height, pages[0].image.width, 3)
    assert tb_kwargs == {"dataformats": "NHWC"}
    assert isinstance(wandb_values["eval/train/images_p1"], list) and len(wandb_values["eval/train/images_p1"]) == 1


# --- console ----------------------------------------------------------------------------------
def test_the_bar_shows_the_loss_of_a_preference_method_and_the_reward_of_others():
    preference = {"step": 3, "phase": "train", "loss/dpo": 0.6931, "loss/sft": 0.1, "diag/margin": 0.2}
    assert progress_postfix(preference) == {"loss": "0.7931"}
    online = {"step": 3, "phase": "train", "reward_mean": -1.25, "loss/policy": 2.0}
    assert progress_postfix(online) == {"reward": "-1.2500", "loss": "2"}
    assert progress_postfix({"reward_mean": math.nan}) == {}
    assert epoch_line(3, 10, {**preference, "reward_queries": 0, "wall_s": 12.3}) == \
        "epoch 3/10: loss 0.7931, 0 reward queries, 12 s"


def test_epoch_lines_every_epoch_of_a_short_run_and_about_ten_of_a_long_one():
    assert [e for e in range(1, 11) if EpochLines(10).due(e)] == list(range(1, 11))
    long = EpochLines(1000, interval_s=1e9)
    assert len([e for e in range(1, 1001) if long.due(e)]) == 10
    assert EpochLines(1000, interval_s=0).due(7)  # a minute without a line: one now


def test_the_offline_feature_space_fallback_is_one_short_line(monkeypatch, caplog):
    from rl4diffusion.errors import MissingWeightsError
    from rl4diffusion.metrics import features
    from rl4diffusion.training.evaluation import EvalMetrics

    def absent(device="cpu"):
        raise MissingWeightsError("a long paragraph about the files that are missing and where they come from\n" * 3)

    absent.setup_hint = "HEAVY_WEIGHTS_DIR"
    monkeypatch.setitem(features._REGISTRY, "heavy_for_test", absent)
    monkeypatch.setitem(features._AUTO_ORDER, "diversity", ("heavy_for_test", "judge"))
    monkeypatch.setitem(features._AUTO_ORDER, "fid", ("heavy_for_test", "judge"))
    with caplog.at_level(logging.DEBUG):
        metrics = EvalMetrics("cpu")
    assert metrics.diversity_space.name == metrics.fid_space.name == "judge"
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(shown) == 1 and shown[0].levelno == logging.INFO, [r.getMessage() for r in shown]
    message = shown[0].getMessage()
    assert "\n" not in message and len(message) < 200, message
    assert "judge" in message and "HEAVY_WEIGHTS_DIR" in message and "weights not on this machine" in message
    assert any("a long paragraph" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


# --- threads ----------------------------------------------------------------------------------
def test_threads_auto_does_not_oversubscribe_and_bad_values_are_refused(monkeypatch):
    from rl4diffusion.errors import ConfigError
    from rl4diffusion.training.config import validate_train_config
    from rl4diffusion.training.trainer import resolve_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert resolve_threads("auto") == 4  # half the cores: two runs on one machine fit
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert resolve_threads("auto") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads("auto") == 3  # torchrun and job schedulers set it: respected
    assert resolve_threads(2) == 2 and resolve_threads(0) == 0
    assert compose_config([]).threads == "auto"
    validate_train_config(compose_config(["threads=2"]))
    for bad in ("threads=abc", "threads=-1", "threads=1.5"):
        with pytest.raises(ConfigError, match="threads must be auto"):
            validate_train_config(compose_config([bad]))


# --- whole runs -------------------------------------------------------------------------------
def test_a_progress_free_run_logs_each_epoch_and_evaluation_and_resumes_with_its_base_images(tmp_path, caplog):
    """progress=false (what the bench uses): one line per epoch and per evaluation; a resumed run samples the base
    model again on the evaluation noise, so its grids still show base beside current."""
    from rl4diffusion.training.trainer import run

    run_dir = tmp_path / "run"
    options = [*TINY, "progress=false", "log_with=[]", "eval.every=1", "eval.prompt_sets=[heldout]",
               "eval.metrics=false", "checkpoint.every=1", "save_lora=false"]
    with caplog.at_level(logging.INFO, logger="rl4diffusion"):
        run(compose_config([*options, "epochs=2"]), run_dir)
    lines = [r.getMessage() for r in caplog.records if r.name == "rl4diffusion.train"]
    assert [x.split(":")[0] for x in lines if x.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert [x.split(":")[0] for x in lines if x.startswith(("base eval", "eval step"))] == \
        ["base eval (step 0)", "eval step 1", "eval step 2"]
    assert sum(x.startswith("final (step 2): heldout reward") for x in lines) == 1

    run(compose_config([*options, "epochs=3", f"resume={run_dir}"]), run_dir)
    images = run_dir / "images"
    assert sorted(p.name for p in images.glob("*.png")) == [f"eval_0000{s}_heldout_p1.png" for s in range(4)]
    base_page = np.asarray(Image.open(images / "eval_00000_heldout_p1.png"))
    resumed_page = np.asarray(Image.open(images / "eval_00003_heldout_p1.png"))
    tile = math.ceil(grids.MIN_TILE / 32) * 32
    base_columns = grids.GAP + 2 * (tile + grids.GAP)  # the two base images of each row, left of the current ones
    assert resumed_page.shape[1] > 2 * base_page.shape[1] - 2 * grids.GAP  # base and current side by side
    assert np.abs(resumed_page[:, :base_columns].astype(int) - base_page[:, :base_columns].astype(int)).mean() < 1


def test_the_default_run_fits_on_one_screen_with_grids_in_tensorboard(tmp_path):
    """The command users learn with (shortened to 2 epochs, an evaluation after each): at most 25 lines on the
    console showing the base model, every evaluation and the result with diversity and win rate; every prompt in
    captioned grid pages; the pages in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    # bytes, not text: text mode would turn the \r with which the bars redraw their line into new lines
    proc = subprocess.run([sys.executable, "-m", "rl4diffusion.train", "epochs=2", "eval.every=1", "model.num_steps=2",
                           "algo.batch_size=4", "algo.minibatch_size=4", f"hydra.run.dir={run_dir}"],
                          capture_output=True, cwd=tmp_path, env=cli_env(), timeout=600)
    text = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, text[-3000:]
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= 25, text
    assert "base eval (step 0): train reward" in text
    for step in (1, 2):  # every evaluation: reward beside the base model's, diversity, win rate, both sets
        line = next(x for x in lines if f"eval step {step}: train reward" in x)
        assert "(base " in line and "diversity" in line and "win rate" in line and "| heldout reward" in line
    final = next(x for x in lines if "final (step 2):" in x)
    assert "→" in final and "diversity" in final and "win rate" in final and "heldout" in final
    assert "WARNING" not in text and "LazyTensorStorage" not in text and "Traceback" not in text
    assert "reward=" in text and "loss=" in text  # the bar

    pages = sorted(p.name for p in (run_dir / "images").glob("eval_00002_*.png"))
    assert pages == ["eval_00002_heldout_p1.png", "eval_00002_train_p1.png", "eval_00002_train_p2.png"]
    assert Image.open(run_dir / "images" / "eval_00002_train_p1.png").width >= 4 * grids.MIN_TILE
    steps = {}  # image tag → the steps it was logged at, over the run's event files
    for path in sorted((run_dir / "tb").rglob("events.out.tfevents*")):
        events = EventAccumulator(str(path), size_guidance={"images": 0}).Reload()
        steps.update({tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]})
    assert {"eval/train/images_p1", "eval/train/images_p2", "eval/heldout/images_p1"} <= set(steps), steps
    assert steps["eval/train/images_p1"] == [0, 1, 2]


def test_a_run_without_evaluation_says_so_in_its_lines():
    from rl4diffusion.training.runlog import eval_line, final_line

    assert eval_line(0, {}, None) == "base eval (step 0): no evaluation (eval.prompt_sets=null)"
    assert final_line(3, {}, {}) == "final (step 3): no evaluation (eval.prompt_sets=null)"
