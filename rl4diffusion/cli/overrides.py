"""Command-line overrides: the shorthands ``reward=pkg.module:fn`` and ``model=path:/dir``, group names checked
before Hydra runs, and the config composed once so that a bad override exits 2 with one message."""

from __future__ import annotations

from pathlib import Path

from rl4diffusion.errors import ConfigError

CONF_DIR = Path(__file__).parent.parent / "conf"
GROUPS = ("algo", "reward", "model", "suite")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def rewrite_overrides(args: list[str]) -> list[str]:
    """Expand the CLI's shorthands into plain Hydra overrides and check group names.

    ``reward=pkg.module:fn`` → ``reward=custom reward.name=pkg.module:fn``;
    ``model=path:/dir`` → ``model=path model.pretrained=/dir``.
    """
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key.lstrip("+~") not in GROUPS or arg.startswith("-"):
            out.append(arg)
            continue
        group = key.lstrip("+~")
        if group == "reward" and ":" in value:
            out += ["reward=custom", f"reward.name={value}"]
            continue
        if group == "model" and value.startswith("path:"):
            out += ["model=path", f"model.pretrained={value[len('path:'):]}"]
            continue
        for choice in value.split(","):  # a -m sweep lists several
            if choice not in group_options(group):
                extra = {
                    "reward": " or your own function as reward=my_pkg.my_module:my_fn",
                    "model": " or any local diffusers pipeline as model=path:/dir",
                }.get(group, "")
                raise ConfigError(
                    f"unknown {group} {choice!r}. Valid names: {', '.join(group_options(group))}{extra}."
                )
        out.append(arg)
    return out


def check_config(args: list[str]) -> None:
    """Compose the config once before Hydra runs, so bad overrides fail with exit code 2."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    plain = [a for a in args if not a.startswith("-") and "," not in a.partition("=")[2]]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            compose("train", overrides=plain)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]} (see conf/train.yaml and conf/<group>/*.yaml)") from None
