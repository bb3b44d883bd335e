"""Make AI-feedback preference pairs: ``python -m rl4diffusion.make_pairs model=… reward=… n=… out=pairs.parquet``.

Samples two images per prompt from the model (its pretrained weights, the sampler settings of
the ``model`` config group), scores both with the reward, and writes the pair in the Pick-a-Pic
v2 parquet layout (caption, jpg_0, jpg_1, label_0, label_1, plus reward_0 / reward_1); the higher
reward wins; exact ties (or, with ``min_margin=…``, reward gaps up to that) are skipped. Train on it with ``algo=diffusion_dpo algo.dataset=pairs.parquet``.

Examples::

    python -m rl4diffusion.make_pairs model=tiny reward=shape_alignment n=512 out=pairs.parquet
    python -m rl4diffusion.make_pairs model=path:/models/sd15 reward=jpeg_compressibility n=64 \\
        out=/data/jpeg_pairs.parquet prompts=animals seed=1 model.guidance_scale=5

Options: ``n`` (pairs, required), ``out`` (parquet path, required), ``prompts`` (a prompt set:
train | heldout | all | animals | a .txt file,
or an inline list ``prompts=[a red circle,a cat]``; default train),
``seed`` (default 0), ``min_margin`` (reward gap at or below which a pair is a tie, default 0), ``batch_size`` (pairs per sampling batch, default 32), ``quality`` (JPEG quality, default 95),
``device`` (auto | cpu | cuda, default auto), ``overwrite`` (replace an existing ``out`` file, default
false: an existing file is refused before anything is sampled); ``model=…``, ``reward=…`` and their fields
(``model.num_steps=…``) as in ``python -m rl4diffusion.train``. Images are stored as JPEG to keep
Pick-a-Pic's layout, so the re-encode is lossy (quality 95, no chroma subsampling).
Bad input — including an ``out`` whose directory cannot be written, checked before sampling — is reported in
one paragraph with exit code 2.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from rl4diffusion.errors import ConfigError

log = logging.getLogger("rl4diffusion.make_pairs")


def boolean(value: str) -> bool:
    """``true``/``false`` (also yes/no, 1/0) as Hydra writes booleans; anything else is a ValueError."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if value.lower() not in words:
        raise ValueError(value)
    return words[value.lower()]


OWN_KEYS = {"n": int, "out": str, "prompts": str, "seed": int, "batch_size": int, "quality": int, "device": str,
            "min_margin": float, "overwrite": boolean}
DEFAULTS = {"prompts": "train", "seed": 0, "batch_size": 32, "quality": 95, "device": "auto", "min_margin": 0.0,
            "overwrite": False}
KINDS = {int: "an integer", float: "a number", boolean: "true or false"}


def parse_args(args: list[str]) -> tuple[dict, list[str]]:
    """Split ``key=value`` arguments into this tool's options and model/reward overrides for Hydra."""
    options, overrides = dict(DEFAULTS), []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"argument {arg!r} is not key=value. Usage: python -m rl4diffusion.make_pairs "
                              "model=tiny reward=shape_alignment n=512 out=pairs.parquet [prompts=train seed=0].")
        if key in OWN_KEYS:
            try:
                options[key] = OWN_KEYS[key](value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: {key} must be {KINDS.get(OWN_KEYS[key], 'a string')}.") from None
        elif key.lstrip("+~").split(".")[0] in ("model", "reward"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unknown option {key!r}. make_pairs takes {', '.join(sorted(OWN_KEYS))}, model=… / "
                              "reward=… and their fields (model.num_steps=…, reward.x=…).")
    missing = [k for k in ("n", "out") if k not in options]
    if missing:
        raise ConfigError(f"missing {' and '.join(missing)}: say how many pairs to make and where, e.g. n=512 "
                          "out=pairs.parquet.")
    if options["min_margin"] < 0:
        raise ConfigError(f"min_margin must be ≥ 0 (a reward gap), got {options['min_margin']}.")
    if options["n"] < 1 or options["batch_size"] < 1 or not 1 <= options["quality"] <= 100:
        raise ConfigError(f"n and batch_size must be ≥ 1 and quality in 1..100, got n={options['n']}, "
                          f"batch_size={options['batch_size']}, quality={options['quality']}.")
    if not options["out"].endswith(".parquet"):
        raise ConfigError(f"out={options['out']!r} should be a .parquet file path (the Pick-a-Pic layout).")
    device = options["device"]
    if device not in ("auto", "cpu") and not device.startswith(("cuda", "mps", "xpu")):
        raise ConfigError(f"device={device!r}: use auto, cpu, cuda or cuda:N.")
    return options, overrides


def check_output_path(out: str, overwrite: bool = False) -> Path:
    """Fail before sampling (not after minutes of it) when ``out`` cannot be written: a directory, an existing
    file (unless ``overwrite``), or a directory that cannot be created or does not take a written and synced
    file (no permission, read-only, full, or not a real directory such as /proc)."""
    from rl4diffusion.training.rundir import check_writable, why_unwritable

    path = Path(out).expanduser()
    if path.is_dir():
        raise ConfigError(f"out={out!r} is a directory; give a file path such as {str(path / 'pairs.parquet')!r}.")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ConfigError(f"out={out!r} already exists; nothing was sampled or overwritten. Give another out=… "
                          "path, or add overwrite=true to replace it.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out={out!r}: cannot create the directory {str(path.parent)!r} "
                          f"({why_unwritable(e)}).") from None
    check_writable(path.parent, what=f"out={out!r}: its directory", key="out", example="/some/dir/pairs.parquet")
    return path


def make_pairs(options: dict, overrides: list[str]) -> dict:
    """Compose the model/reward config as train.py does, generate the pairs and write ``options['out']``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rl4diffusion.cli.overrides import CONF_DIR, rewrite_overrides
    from rl4diffusion.training.trainer import resolve_device

    check_output_path(options["out"], options["overwrite"])

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=rewrite_overrides(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]} (see conf/model/*.yaml and conf/reward/*.yaml)") from None

    from rl4diffusion.policies.base import DiffusionPolicy, PolicyConfig, check_pretrained_available
    from rl4diffusion.training.config import validate_train_config

    validate_train_config(cfg)
    check_pretrained_available(str(cfg.model.pretrained))
    import torch

    from rl4diffusion.data.preferences import generate_preference_pairs, write_pairs_parquet
    from rl4diffusion.data.prompts import resolve_prompts
    from rl4diffusion.rewards import build_reward

    device = resolve_device(options["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={options['device']!r} but no CUDA device is available; use device=cpu or auto.")
    reward_options = OmegaConf.to_container(cfg.reward, resolve=True)
    reward = build_reward(reward_options.pop("name"), device=device, **reward_options)
    model_options = OmegaConf.to_container(cfg.model, resolve=True)
    unknown = sorted(set(model_options) - set(PolicyConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(unknown)}. Valid: {', '.join(PolicyConfig.__dataclass_fields__)}.")
    spec = options["prompts"].strip()
    if spec.startswith("[") and spec.endswith("]"):  # an inline list, as train.py accepts: prompts=[a red circle,a cat]
        spec = [p.strip().strip("'\"") for p in spec[1:-1].split(",") if p.strip()]
    prompts = resolve_prompts(spec)
    torch.manual_seed(options["seed"])
    policy = DiffusionPolicy.from_pretrained(device=device, **model_options)
    start = time.perf_counter()
    pairs = generate_preference_pairs(policy, reward, prompts, options["n"], seed=options["seed"],
                                      batch_size=options["batch_size"], min_margin=options["min_margin"])
    try:
        path = write_pairs_parquet(options["out"], pairs, quality=options["quality"])
    except OSError as e:  # disk full, permissions changed while sampling …
        raise ConfigError(f"could not write {options['out']!r}: {e.strerror or e}.") from None
    stats = {**pairs["stats"], "out": str(path), "seconds": round(time.perf_counter() - start, 2)}
    log.info("wrote %d pairs to %s (%d ties skipped, %d reward queries, %.1f s)", stats["pairs"], path,
             stats["ties_skipped"], stats["reward_queries"], stats["seconds"])
    return stats


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from rl4diffusion.training.rundir import interrupt_on_sigterm

    interrupt_on_sigterm()  # SIGTERM stops like Ctrl-C: one line, exit code 3
    try:
        make_pairs(*parse_args(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; no pairs were written (out is written only at the end)", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
