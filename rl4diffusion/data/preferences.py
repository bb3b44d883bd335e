"""Preference datasets: pairs (c, x₀ʷ, x₀ˡ) for Diffusion-DPO, DMPO, DPO-C&M and SDPO.

Two sources, one layout — Pick-a-Pic v2's parquet files (Kirstain et al. 2023):

=========  ========  ==========================================================
column     type      meaning
=========  ========  ==========================================================
caption    string    the prompt
jpg_0      binary    image 0, encoded (JPEG in Pick-a-Pic; any format PIL reads)
jpg_1      binary    image 1
label_0    float     1 if image 0 was preferred, 0 if not, 0.5 for a tie
label_1    float     1 − label_0
=========  ========  ==========================================================

* ``load_preference_pairs(path, policy)`` reads one parquet file or a directory of them
  (pyarrow, streamed in record batches), drops ties, skips corrupt rows (undecodable image,
  missing/NaN label, missing caption) — counting each kind in ``stats`` and logging them,
  never raising — resizes and centre-crops the images to the policy's resolution and
  VAE-encodes them once with ``policy.encode_images``. The latents are cached on disk
  (safetensors, keyed by the file's SHA-256, the VAE's weights and the resolution), so a second
  run reads them back instead of re-encoding.
* ``generate_preference_pairs`` / ``write_pairs_parquet`` make AI-feedback pairs: two samples
  of the base model per prompt, the higher reward wins (exact ties skipped). The command-line
  face is ``python -m rl4diffusion.make_pairs``. Images are stored as JPEG (quality 95,
  no chroma subsampling) to keep Pick-a-Pic's layout: the re-encode is lossy, so the latents
  trained on are those of the *decoded JPEG*, not the sampled x₀.

The pairs become a TensorDict [N] with ``prompt_id`` (into ``captions``), ``latents_w``,
``latents_l`` and ``label`` (always 1: ``latents_w`` is the preferred image);
``PreferenceData.tensordict(policy)`` adds ``prompt_embeds``. Algorithms store the compact
form in the shared replay buffer and attach the (cached) prompt embeddings per sampled batch,
so memory grows with the latents, not with N × 77 × 768 text embeddings.

Example::

    data = load_preference_pairs("pairs.parquet", policy)
    data.stats   # {'rows': 10, 'pairs': 7, 'skipped_tie': 1, 'skipped_bad_image': 1, ...}
    td = data.tensordict(policy)   # [7]: prompt_embeds, latents_w, latents_l, label, prompt_id
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict import TensorDict

from rl4diffusion import keys
from rl4diffusion.errors import ConfigError

log = logging.getLogger(__name__)

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
SKIP_KINDS = ("skipped_tie", "skipped_bad_label", "skipped_missing_caption", "skipped_bad_image")
_CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    """``$RL4DIFFUSION_CACHE`` or ``~/.cache/rl4diffusion``."""
    return Path(os.environ.get("RL4DIFFUSION_CACHE", Path.home() / ".cache" / "rl4diffusion")).expanduser()


@dataclass
class PreferenceData:
    """Encoded preference pairs: ``pairs`` [N] (prompt_id, latents_w, latents_l, label) and the captions."""

    pairs: TensorDict
    captions: list[str]
    """Distinct captions; ``pairs["prompt_id"]`` indexes this list."""
    stats: dict[str, int] = field(default_factory=dict)
    """Rows read, pairs kept, and rows skipped by kind (``skipped_tie``, ``skipped_bad_image``, …)."""

    def __len__(self) -> int:
        return self.pairs.shape[0]

    def prompts_of(self, prompt_ids: torch.Tensor) -> list[str]:
        return [self.captions[i] for i in prompt_ids.tolist()]

    def tensordict(self, policy) -> TensorDict:
        """The pairs with ``prompt_embeds`` [N, L, D] attached (the full preference batch layout)."""
        td = self.pairs.clone()
        td[keys.PROMPT_EMBEDS] = policy.encode_prompts(self.prompts_of(td[keys.PROMPT_ID])).to(td.device)
        return td


# ---------------------------------------------------------------------------------------- reading rows
def parquet_files(path: str | Path) -> list[Path]:
    """The parquet files at ``path`` (a file, or a directory searched non-recursively, sorted)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise ConfigError(f"preference dataset directory {str(p)!r} holds no *.parquet files. Point "
                              "algo.dataset at a Pick-a-Pic-style parquet file or a directory of them.")
        return files
    if not p.is_file():
        raise ConfigError(f"preference dataset {str(p)!r} does not exist. Set algo.dataset to a parquet file (or a "
                          "directory of them) with columns caption, jpg_0, jpg_1, label_0, label_1 — make one with "
                          "`python -m rl4diffusion.make_pairs` — or leave algo.dataset unset to generate "
                          "AI-feedback pairs from the base model and the reward at start-up.")
    return [p]


def iter_parquet_rows(path: Path, *, batch_rows: int = 256) -> Iterator[tuple]:
    """Yield (caption, jpg_0, jpg_1, label_0, label_1) per row, streaming record batches."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(str(path))
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise ConfigError(f"{str(path)!r} is not a readable parquet file ({type(e).__name__}: {e}).") from None
    missing = [c for c in COLUMNS if c not in reader.schema_arrow.names]
    if missing:
        raise ConfigError(f"{str(path)!r} lacks the column(s) {', '.join(missing)}. A preference file needs the "
                          f"Pick-a-Pic v2 columns {', '.join(COLUMNS)} (it has {', '.join(reader.schema_arrow.names)}).")
    for record_batch in reader.iter_batches(batch_size=batch_rows, columns=list(COLUMNS)):
        columns = [record_batch.column(c).to_pylist() for c in COLUMNS]
        yield from zip(*columns)


def _label_pair(label_0, label_1) -> str | int:
    """0 or 1 (the preferred image), "tie", or "bad" for a missing/non-numeric/NaN label."""
    try:
        a, b = float(label_0), float(label_1)
    except (TypeError, ValueError):
        return "bad"
    if not (math.isfinite(a) and math.isfinite(b)):
        return "bad"
    if a == b:
        return "tie"
    return 0 if a > b else 1


def decode_image(data, size: tuple[int, int]) -> torch.Tensor | None:
    """Encoded image bytes → uint8 [3, H, W] resized (shorter side) and centre-cropped to ``size`` = (H, W).

    Returns None for anything PIL cannot decode (the caller counts it as a corrupt row).
    """
    from PIL import Image, ImageOps

    if isinstance(data, dict):  # the Hugging Face `Image` feature stores {"bytes": ..., "path": ...}
        data = data.get("bytes")
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        return None
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img = img.convert("RGB")
            if img.size != (size[1], size[0]):
                img = ImageOps.fit(img, (size[1], size[0]), method=Image.Resampling.LANCZOS)
            pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except Exception:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError, DecompressionBomb…
        return None
    return pixels.view(size[0], size[1], 3).permute(2, 0, 1).contiguous()  # (3, H, W)


# ---------------------------------------------------------------------------------------- fingerprints
def module_fingerprint(module: torch.nn.Module, *, skip: str = "lora") -> str:
    """A cheap, stable digest of a module's weights: names, shapes and a strided sample of each tensor."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if skip and skip in name:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- loading
def _encode(policy, images: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = torch.stack(images[start : start + batch_size]).to(policy.device).float() / 255.0  # (b, 3, H, W)
            out.append(policy.encode_images(chunk).cpu())
    return torch.cat(out) if out else torch.zeros(0, *policy.latent_shape)


def _load_file(path: Path, policy, *, limit: int | None, batch_size: int) -> tuple[list[str], torch.Tensor, torch.Tensor, dict]:
    """Decode, filter and encode one parquet file → (caption per pair, latents_w, latents_l, stats)."""
    stats = {"rows": 0, "pairs": 0, **{k: 0 for k in SKIP_KINDS}}
    size = (policy.height, policy.width)
    captions: list[str] = []
    winners: list[torch.Tensor] = []
    losers: list[torch.Tensor] = []
    lat_w, lat_l = [], []
    for caption, jpg_0, jpg_1, label_0, label_1 in iter_parquet_rows(path):
        if limit is not None and stats["pairs"] >= limit:
            break
        stats["rows"] += 1
        if not isinstance(caption, str) or not caption.strip():
            stats["skipped_missing_caption"] += 1
            continue
        preferred = _label_pair(label_0, label_1)
        if preferred == "bad":
            stats["skipped_bad_label"] += 1
            continue
        if preferred == "tie":
            stats["skipped_tie"] += 1
            continue
        img_0, img_1 = decode_image(jpg_0, size), decode_image(jpg_1, size)
        if img_0 is None or img_1 is None:
            stats["skipped_bad_image"] += 1
            continue
        captions.append(caption)
        winners.append(img_0 if preferred == 0 else img_1)
        losers.append(img_1 if preferred == 0 else img_0)
        stats["pairs"] += 1
        if len(winners) >= 4 * batch_size:  # encode as we go: decoded full-size images are not kept
            lat_w.append(_encode(policy, winners, batch_size))
            lat_l.append(_encode(policy, losers, batch_size))
            winners, losers = [], []
    lat_w.append(_encode(policy, winners, batch_size))
    lat_l.append(_encode(policy, losers, batch_size))
    return captions, torch.cat(lat_w), torch.cat(lat_l), stats


def _cache_path(cache_dir: Path, path: Path, policy, limit: int | None, vae_digest: str) -> Path:
    key = hashlib.sha256(
        json.dumps([_CACHE_VERSION, file_sha256(path), vae_digest, policy.height, policy.width, limit]).encode()
    ).hexdigest()[:20]
    return cache_dir / "preference_latents" / f"{path.stem}-{key}.safetensors"


def load_preference_pairs(
    path: str | Path,
    policy,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    max_pairs: int | None = None,
    batch_size: int = 32,
) -> PreferenceData:
    """Read Pick-a-Pic-style parquet file(s) into encoded preference pairs.

    Args:
        path: a parquet file or a directory of ``*.parquet`` files (read in sorted order).
        policy: the DiffusionPolicy whose VAE encodes the images (``policy.encode_images``) at its resolution.
        cache_dir: where encoded latents are cached (default ``default_cache_dir()``).
        use_cache: read/write the latent cache; False always re-encodes and writes nothing.
        max_pairs: stop after this many valid pairs (None = all).
        batch_size: images per VAE call.

    Returns:
        PreferenceData; ``stats`` counts ``rows``, ``pairs``, ``files`` and each ``skipped_*`` kind.
        A file whose columns are wrong raises ConfigError; a corrupt *row* never does.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = parquet_files(path)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    vae_digest = module_fingerprint(policy.vae) if use_cache else ""
    totals = {"files": len(files), "rows": 0, "pairs": 0, **{k: 0 for k in SKIP_KINDS}, "cached_files": 0}
    all_captions: list[str] = []
    lat_w, lat_l = [], []
    for file in files:
        limit = None if max_pairs is None else max_pairs - totals["pairs"]
        if limit is not None and limit <= 0:
            break
        cached = _cache_path(cache_root, file, policy, limit, vae_digest) if use_cache else None
        if cached is not None and cached.is_file():
            with safe_open(str(cached), framework="pt") as f:
                meta = f.metadata()
                w, lw = f.get_tensor("latents_w"), f.get_tensor("latents_l")
            captions, stats = json.loads(meta["captions"]), json.loads(meta["stats"])
            totals["cached_files"] += 1
        else:
            captions, w, lw, stats = _load_file(file, policy, limit=limit, batch_size=batch_size)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".tmp{os.getpid()}")
                save_file({"latents_w": w.contiguous(), "latents_l": lw.contiguous()}, str(tmp),
                          metadata={"captions": json.dumps(captions), "stats": json.dumps(stats), "source": str(file)})
                os.replace(tmp, cached)  # atomic: a killed run never leaves a half-written cache
        for k in ("rows", "pairs", *SKIP_KINDS):
            totals[k] += int(stats[k])
        all_captions += captions
        lat_w.append(w)
        lat_l.append(lw)
    skipped = {k: totals[k] for k in SKIP_KINDS if totals[k]}
    if skipped:
        log.warning("preference data %s: skipped %s of %d rows (%s)", path, sum(skipped.values()), totals["rows"],
                    ", ".join(f"{k.removeprefix('skipped_')}: {v}" for k, v in skipped.items()))
    log.info("preference data %s: %d pairs from %d file(s) (%d read from the latent cache)", path, totals["pairs"],
             len(files), totals["cached_files"])
    if totals["pairs"] == 0:
        raise ConfigError(f"no usable preference pairs in {str(path)!r}: {totals['rows']} rows read, all skipped "
                          f"({', '.join(f'{k}={v}' for k, v in skipped.items()) or 'the files are empty'}).")
    distinct = sorted(set(all_captions))
    index = {c: i for i, c in enumerate(distinct)}
    n = totals["pairs"]
    pairs = TensorDict(
        {
            keys.PROMPT_ID: torch.tensor([index[c] for c in all_captions], dtype=torch.long),
            keys.LATENTS_W: torch.cat(lat_w).float(),
            keys.LATENTS_L: torch.cat(lat_l).float(),
            keys.LABEL: torch.ones(n),
        },
        batch_size=[n],
    )
    return PreferenceData(pairs=pairs, captions=distinct, stats=totals)


# ---------------------------------------------------------------------------------------- AI feedback
def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def generate_preference_pairs(
    policy, reward, prompts: Sequence[str], n: int, *, seed: int = 0, batch_size: int = 32, min_margin: float = 0.0
) -> dict:
    """Sample two images per prompt from the *base* model (adapter disabled) and label them by ``reward``.

    Prompts are taken in order, cycling through ``prompts``; the higher reward wins. Pairs whose
    rewards differ by at most ``min_margin`` (in the reward's units; 0 = exact ties only) count as
    ties and are skipped, like the ties of human labels: a near-tie's label is the reward's noise,
    not a preference. Sampling continues until ``n`` pairs, at most 4·n + 8 draws.

    Returns:
        {"captions": [n], "images_0"/"images_1": uint8 [n, 3, H, W], "rewards_0"/"rewards_1": [n],
        "stats": {"pairs", "ties_skipped", "reward_queries"}}
    """
    if n < 1:
        raise ConfigError(f"the number of pairs to generate must be ≥ 1, got {n}")
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    captions, im0, im1, r0, r1 = [], [], [], [], []
    ties = drawn = 0
    cursor = 0
    while len(captions) < n:
        if drawn >= 4 * n + 8:
            raise ConfigError(f"reward {getattr(reward, 'name', reward)!r} tied on {ties} of {drawn} generated pairs, "
                              f"so fewer than n={n} pairs could be labelled. Use a reward that separates samples.")
        chunk = min(batch_size, n - len(captions))
        chunk_prompts = [prompts[(cursor + i) % len(prompts)] for i in range(chunk)]
        cursor += chunk
        flat = [p for p in chunk_prompts for _ in range(2)]  # (2·chunk,): samples 2i and 2i+1 share a prompt
        images = policy.sample(list(flat), generator=generator, use_reference=True)["images"]  # the base model
        scores = reward(images, flat).detach().float().cpu()
        drawn += chunk
        pixels = _to_uint8(images)
        for i, prompt in enumerate(chunk_prompts):
            a, b = float(scores[2 * i]), float(scores[2 * i + 1])
            if abs(a - b) <= min_margin:
                ties += 1
                continue
            captions.append(prompt)
            im0.append(pixels[2 * i])
            im1.append(pixels[2 * i + 1])
            r0.append(a)
            r1.append(b)
    return {
        "captions": captions[:n],
        "images_0": torch.stack(im0[:n]),
        "images_1": torch.stack(im1[:n]),
        "rewards_0": torch.tensor(r0[:n]),
        "rewards_1": torch.tensor(r1[:n]),
        "stats": {"pairs": n, "ties_skipped": ties, "reward_queries": 2 * drawn},
    }


def encode_jpeg_bytes(image: torch.Tensor, quality: int = 95) -> bytes:
    """uint8 [3, H, W] → JPEG bytes (4:4:4, no chroma subsampling: 32×32 images lose least that way)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def write_pairs_parquet(path: str | Path, pairs: dict, *, quality: int = 95) -> Path:
    """Write ``generate_preference_pairs`` output in the Pick-a-Pic v2 layout (plus reward_0/reward_1 columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    r0, r1 = pairs["rewards_0"].tolist(), pairs["rewards_1"].tolist()
    table = pa.table({
        "caption": pa.array(pairs["captions"], pa.string()),
        "jpg_0": pa.array([encode_jpeg_bytes(x, quality) for x in pairs["images_0"]], pa.binary()),
        "jpg_1": pa.array([encode_jpeg_bytes(x, quality) for x in pairs["images_1"]], pa.binary()),
        "label_0": pa.array([1.0 if a > b else 0.0 for a, b in zip(r0, r1)], pa.float64()),
        "label_1": pa.array([1.0 if b > a else 0.0 for a, b in zip(r0, r1)], pa.float64()),
        "reward_0": pa.array(r0, pa.float64()),
        "reward_1": pa.array(r1, pa.float64()),
    })
    if "stats" in pairs:  # how the file was made (ties skipped, reward queries spent), kept in the schema metadata
        table = table.replace_schema_metadata({"rl4diffusion": json.dumps(pairs["stats"])})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, str(tmp))
    os.replace(tmp, path)
    return path


def ensure_generated_pairs(
    policy, reward, prompts: Sequence[str], n: int, *, seed: int, cache_dir: str | Path | None = None,
    batch_size: int = 32, min_margin: float = 0.0,
) -> Path:
    """The AI-feedback parquet for (base model, reward, prompts, n, seed, sampler settings), generated once.

    The file lives in ``<cache_dir>/generated_pairs/`` under a key of everything that determines
    it, so a second run (or a resumed one) reuses it.
    """
    cfg = policy.config
    fingerprint = {
        "version": _CACHE_VERSION, "unet": module_fingerprint(policy.unet), "vae": module_fingerprint(policy.vae),
        "reward": getattr(reward, "name", str(reward)),
        "reward_probe": _reward_fingerprint(reward, prompts, (policy.height, policy.width)),
        "prompts": list(prompts), "n": n, "seed": seed, "steps": cfg.num_steps, "cfg": cfg.guidance_scale,
        "eta": cfg.eta, "size": [policy.height, policy.width],
    }
    if min_margin:  # (absent when 0, so files generated before the option keep their key)
        fingerprint["min_margin"] = float(min_margin)
    if getattr(policy, "kind", None) == "flow":  # a flow model's sampler noise (absent for DDIM: keys unchanged)
        fingerprint["noise_level"] = float(cfg.noise_level)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / "generated_pairs" / f"pairs-{key}.parquet"
    if path.is_file():
        log.info("AI-feedback pairs: reusing %s", path)
        return path
    log.info("AI-feedback pairs: generating %d pairs with reward %s (cached at %s)", n, fingerprint["reward"], path)
    pairs = generate_preference_pairs(policy, reward, prompts, n, seed=seed, batch_size=batch_size,
                                      min_margin=min_margin)
    write_pairs_parquet(path, pairs)
    return path


def generation_stats(path: str | Path) -> dict:
    """The stats ``write_pairs_parquet`` stored in a generated file ({} for other files)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(str(path)).metadata or {}
    return json.loads(metadata[b"rl4diffusion"]) if b"rl4diffusion" in metadata else {}


@torch.no_grad()
def _reward_fingerprint(reward, prompts: Sequence[str], size: tuple[int, int]) -> str:
    """A behavioural digest of the reward: its values on 4 fixed random images (so a retrained judge or edited
    reward code invalidates cached pairs). The probe's queries are not counted."""
    probe = torch.rand(4, 3, *size, generator=torch.Generator().manual_seed(0))
    before = getattr(reward, "queries", None)
    values = reward(probe, [prompts[i % len(prompts)] for i in range(4)]).float().cpu()
    if before is not None:
        reward.queries = before
    return hashlib.sha256(values.round(decimals=4).numpy().tobytes()).hexdigest()
