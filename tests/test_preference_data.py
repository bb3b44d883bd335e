"""Preference data: the Pick-a-Pic parquet loader (corrupt rows skipped and counted, latent cache), the
replay-buffer path, and AI-feedback pair generation (library and command line)."""

import io
import math
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rl4diffusion import keys
from rl4diffusion.data import make_replay_buffer
from rl4diffusion.data.preferences import (
    decode_image,
    generate_preference_pairs,
    load_preference_pairs,
    write_pairs_parquet,
)
from rl4diffusion.errors import ConfigError
from rl4diffusion.make_pairs import main as make_pairs_main
from rl4diffusion.rewards.registry import Reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg(color, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


WHITE, BLACK, RED = jpeg((255, 255, 255)), jpeg((0, 0, 0)), jpeg((200, 30, 30), size=(64, 48))
ROWS = [  # caption, jpg_0, jpg_1, label_0, label_1 — and what the loader must do with the row
    ("a white square", WHITE, BLACK, 1.0, 0.0),  # kept: winner image 0
    ("a white square", BLACK, WHITE, 0.0, 1.0),  # kept: winner image 1
    ("a red circle", RED, BLACK, 1.0, 0.0),  # kept: 64×48 resized + centre-cropped to 32×32
    ("a tie", WHITE, BLACK, 0.5, 0.5),  # tie
    ("garbage bytes", b"\xff\xd8not a jpeg at all", BLACK, 1.0, 0.0),  # undecodable image
    ("empty bytes", WHITE, b"", 0.0, 1.0),  # undecodable image
    ("no label", WHITE, BLACK, None, None),  # missing label
    ("nan label", WHITE, BLACK, float("nan"), 1.0),  # NaN label
    (None, WHITE, BLACK, 1.0, 0.0),  # missing caption
]


def write_rows(path, rows, extra_columns=True):
    cols = list(zip(*rows))
    table = {
        "caption": pa.array(cols[0], pa.string()),
        "jpg_0": pa.array(cols[1], pa.binary()),
        "jpg_1": pa.array(cols[2], pa.binary()),
        "label_0": pa.array(cols[3], pa.float64()),
        "label_1": pa.array(cols[4], pa.float64()),
    }
    if extra_columns:  # Pick-a-Pic has more columns; the loader ignores them
        table["best_image_uid"] = pa.array(["x"] * len(rows))
    pq.write_table(pa.table(table), str(path))
    return path


@pytest.fixture
def policy(make_policy):
    return make_policy()


def test_loader_reads_pick_a_pic_layout_and_counts_corrupt_rows(tmp_path, policy):
    path = write_rows(tmp_path / "picks.parquet", ROWS)
    data = load_preference_pairs(path, policy, cache_dir=tmp_path / "cache")
    s = data.stats
    assert (s["rows"], s["pairs"], s["skipped_tie"], s["skipped_bad_image"], s["skipped_bad_label"],
            s["skipped_missing_caption"]) == (9, 3, 1, 2, 2, 1)
    assert data.pairs.batch_size == torch.Size([3]) and data.captions == ["a red circle", "a white square"]
    assert data.prompts_of(data.pairs[keys.PROMPT_ID]) == ["a white square", "a white square", "a red circle"]
    assert torch.equal(data.pairs[keys.LABEL], torch.ones(3))
    # the winner is the image with label 1, VAE-encoded at the policy's resolution
    white = decode_image(WHITE, (32, 32)).float()[None] / 255
    black = decode_image(BLACK, (32, 32)).float()[None] / 255
    with torch.no_grad():
        enc_white, enc_black = policy.encode_images(white), policy.encode_images(black)
    for i in (0, 1):
        torch.testing.assert_close(data.pairs[keys.LATENTS_W][i], enc_white[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(data.pairs[keys.LATENTS_L][i], enc_black[0], atol=1e-5, rtol=1e-4)
    red = decode_image(RED, (32, 32))
    assert red.shape == (3, 32, 32) and abs(red[0].float().mean().item() - 200) < 3
    assert decode_image(b"\x00garbage", (32, 32)) is None and decode_image(None, (32, 32)) is None

    # the full preference layout, through the shared replay buffer
    td = data.tensordict(policy)
    assert td[keys.PROMPT_EMBEDS].shape[:1] == (3,)
    buffer = make_replay_buffer(len(td), 2, without_replacement=True, generator=torch.Generator().manual_seed(0))
    buffer.extend(td)
    batch = buffer.sample()
    assert batch.batch_size == torch.Size([2])
    assert {keys.PROMPT_EMBEDS, keys.LATENTS_W, keys.LATENTS_L, keys.LABEL} <= set(batch.keys())


def test_latent_cache_skips_reencoding_and_is_keyed_by_file_content(tmp_path, policy, monkeypatch):
    path = write_rows(tmp_path / "picks.parquet", ROWS[:4])
    first = load_preference_pairs(path, policy, cache_dir=tmp_path / "cache")
    assert first.stats["cached_files"] == 0 and len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1

    def no_encoding(images):
        raise AssertionError("the second load must read the cache, not re-encode")

    monkeypatch.setattr(policy, "encode_images", no_encoding)
    second = load_preference_pairs(path, policy, cache_dir=tmp_path / "cache")
    assert second.stats["cached_files"] == 1 and second.stats["skipped_tie"] == 1
    assert torch.equal(second.pairs[keys.LATENTS_W], first.pairs[keys.LATENTS_W])
    assert second.captions == first.captions
    write_rows(path, ROWS[:2])  # new content → new key → encodes again
    with pytest.raises(AssertionError, match="re-encode"):
        load_preference_pairs(path, policy, cache_dir=tmp_path / "cache")


def test_directory_of_files_max_pairs_and_bad_inputs(tmp_path, policy):
    directory = tmp_path / "shards"
    directory.mkdir()
    write_rows(directory / "a.parquet", ROWS[:3])
    write_rows(directory / "b.parquet", ROWS[3:], extra_columns=False)
    data = load_preference_pairs(directory, policy, use_cache=False)
    assert data.stats["files"] == 2 and data.stats["rows"] == 9 and data.stats["pairs"] == 3
    assert len(load_preference_pairs(directory, policy, use_cache=False, max_pairs=2)) == 2

    with pytest.raises(ConfigError, match="does not exist"):
        load_preference_pairs(tmp_path / "nope.parquet", policy)
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b""]}), str(tmp_path / "cols.parquet"))
    with pytest.raises(ConfigError, match="lacks the column"):
        load_preference_pairs(tmp_path / "cols.parquet", policy, use_cache=False)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="not a readable parquet"):
        load_preference_pairs(tmp_path / "junk.parquet", policy, use_cache=False)
    write_rows(tmp_path / "allbad.parquet", ROWS[3:])
    with pytest.raises(ConfigError, match="no usable preference pairs"):
        load_preference_pairs(tmp_path / "allbad.parquet", policy, use_cache=False)


def test_generated_pairs_are_labelled_by_reward_and_ties_are_skipped(tmp_path, policy):
    def brightness_unless_tie(images, prompts):
        score = images.mean(dim=(1, 2, 3))
        return torch.where(torch.tensor([p == "tie" for p in prompts]), torch.zeros_like(score), score)

    reward = Reward("bright", brightness_unless_tie, differentiable=False)
    pairs = generate_preference_pairs(policy, reward, ["a red circle", "tie", "a blue square"], 5, seed=0, batch_size=3)
    assert len(pairs["captions"]) == 5 and "tie" not in pairs["captions"] and pairs["stats"]["ties_skipped"] >= 2
    assert (pairs["rewards_0"] != pairs["rewards_1"]).all()
    path = write_pairs_parquet(tmp_path / "pairs.parquet", pairs)
    table = pq.read_table(str(path)).to_pydict()
    for r0, r1, l0, l1 in zip(table["reward_0"], table["reward_1"], table["label_0"], table["label_1"]):
        assert (l0, l1) == ((1.0, 0.0) if r0 > r1 else (0.0, 1.0))
    # the JPEG round trip is lossy but close: mean absolute pixel error of a few levels at quality 95
    back = decode_image(table["jpg_0"][0], (32, 32)).float()
    assert (back - pairs["images_0"][0].float()).abs().mean().item() < 8
    data = load_preference_pairs(path, policy, use_cache=False)
    assert data.stats["pairs"] == 5
    # deterministic given the seed
    again = generate_preference_pairs(policy, reward, ["a red circle", "tie", "a blue square"], 5, seed=0, batch_size=3)
    assert torch.equal(again["images_0"], pairs["images_0"])
    with pytest.raises(ConfigError, match="tied"):
        generate_preference_pairs(policy, reward, ["tie"], 2, seed=0)
    # near-ties: with min_margin, pairs whose reward gap is at most the margin are skipped as ties
    gaps = (pairs["rewards_0"] - pairs["rewards_1"]).abs()
    margin = float(gaps.median())
    wide = generate_preference_pairs(policy, reward, ["a red circle", "tie", "a blue square"], 5, seed=0, batch_size=3,
                                     min_margin=margin)
    assert ((wide["rewards_0"] - wide["rewards_1"]).abs() > margin).all()
    assert wide["stats"]["ties_skipped"] > pairs["stats"]["ties_skipped"]
    assert wide["stats"]["reward_queries"] > pairs["stats"]["reward_queries"]


def test_make_pairs_command_line(tmp_path, random_pipeline_dir, capsys):
    out = tmp_path / "cli_pairs.parquet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rl4diffusion.make_pairs", f"model=path:{random_pipeline_dir}", "model.num_steps=3",
         "reward=jpeg_compressibility", "n=3", f"out={out}", "prompts=[a red circle]", "batch_size=2"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(str(out)).to_pydict()
    assert table["caption"] == ["a red circle"] * 3
    assert all(math.isclose(a + b, 1.0) for a, b in zip(table["label_0"], table["label_1"]))

    directory = tmp_path / "shards.parquet"
    directory.mkdir()
    for args, message in [
        (["n=3"], "missing out"),
        (["n=abc", "out=x.parquet"], "n must be an integer"),
        (["n=3", "out=x.parquet", "colour=red"], "unknown option 'colour'"),
        (["n=3", "out=x.csv"], ".parquet"),
        (["n=3", "out=x.parquet", "device=tpu"], "device='tpu'"),
        (["n=3", f"out={directory}", "reward=jpeg_compressibility"], "is a directory"),
        (["n=3", f"out={out}/sub/x.parquet", "reward=jpeg_compressibility"], "cannot create the directory"),
        (["n=3", "out=x.parquet", "model=no_such_model"], "Valid names"),
        (["n=3", f"out={tmp_path}/y.parquet", "model=path:/definitely/not/here", "reward=jpeg_compressibility",
          "prompts=[a cat]"],
         "does not exist"),
    ]:
        with pytest.raises(SystemExit) as exc:
            make_pairs_main(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err, (args, err)
