"""Command-line overrides: the shorthands, group names checked before Hydra runs, and the config composed and
validated once so that bad input exits 2 with one message.

Shorthands:

* ``reward=pkg.module:fn`` → ``reward=custom reward.name=pkg.module:fn``;
* ``model=path:/dir`` → ``model=path model.pretrained=/dir``;
* ``algo=pkg.module:MyAlgo`` imports ``pkg.module`` (its ``@register_algorithm`` runs) and selects the class's
  registered name; an algorithm with no ``conf/algo/<name>.yaml`` on the search path runs its dataclass's
  defaults (``algo=<name>_schema``).

Config files outside rl4diffusion join with Hydra's own override ``'hydra.searchpath=[pkg://my_pkg.conf]'``
(or ``file:///abs/dir``); their ``algo/``, ``model/``, ``reward/`` options are then valid names too.
"""

from __future__ import annotations

import importlib
import importlib.resources
import itertools
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rl4diffusion.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONF_DIR = Path(__file__).parent.parent / "conf"
GROUPS = ("algo", "reward", "model", "suite")
SEARCHPATH_KEY = "hydra.searchpath"


def searchpath_dirs(args: list[str]) -> list:
    """The config directories that ``hydra.searchpath=[…]`` in ``args`` adds (``pkg://`` and ``file://`` entries)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entries = []
    for arg in args:
        if arg.partition("=")[0].lstrip("+~") == SEARCHPATH_KEY:
            value = OverridesParser.create().parse_override(arg).value()
            entries += value if isinstance(value, list) else [value]
    dirs = []
    for entry in entries:
        scheme, sep, location = str(entry).partition("://")
        if not sep:
            scheme, location = "file", str(entry)
        try:
            found = importlib.resources.files(location) if scheme == "pkg" else Path(location).expanduser()
        except ImportError as e:
            raise ConfigError(f"{SEARCHPATH_KEY} entry {entry!r}: cannot import {location!r} ({e}). Put its package on "
                              "PYTHONPATH (or install it), or point at the directory with file:///abs/path.") from None
        if scheme not in ("pkg", "file") or not found.is_dir():
            raise ConfigError(f"{SEARCHPATH_KEY} entry {entry!r} is not a config directory: give pkg://my_pkg.conf "
                              "(a package holding algo/, model/, … folders) or file:///abs/path/to/conf.")
        if scheme == "pkg" and not found.joinpath("__init__.py").is_file():
            raise ConfigError(f"{SEARCHPATH_KEY} entry {entry!r}: Hydra reads pkg:// directories that are packages; add "
                              f"an empty __init__.py to {location.replace('.', '/')}/.")
        dirs.append(found)
    return dirs


def group_options(group: str, extra_dirs: list | None = None) -> list[str]:
    """The selectable options of ``group``: its YAML files here and in ``extra_dirs``, and its ConfigStore nodes
    (without the ``<name>_schema`` nodes the YAML files extend)."""
    from hydra.core.config_store import ConfigStore

    names = set()
    for conf in [CONF_DIR, *(extra_dirs or [])]:
        folder = conf / group
        if folder.is_dir():
            names |= {p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")}
    try:
        names |= {n.removesuffix(".yaml") for n in ConfigStore.instance().list(group)}
    except OSError:  # no node stored in this group
        pass
    return sorted(n for n in names if not n.endswith("_schema"))


def _algorithm_option(choice: str, options: list[str]) -> str:
    """The ``algo`` option for a choice: a YAML or stored option, ``pkg.module:Class``, or a registered name."""
    from rl4diffusion.algorithms import ALGORITHMS

    if ":" in choice:
        module_name, _, attr = choice.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"algo={choice}: could not import module {module_name!r} ({e}). Put its package on "
                              "PYTHONPATH (or install it), then select the class as algo=my_pkg.my_module:MyAlgo.") from None
        cls = getattr(module, attr, None)
        if cls is None:
            raise ConfigError(f"algo={choice}: module {module_name!r} has no attribute {attr!r}.")
        name = getattr(cls, "name", "")  # @register_algorithm sets it
        if ALGORITHMS.get(name) != f"{getattr(cls, '__module__', '')}:{getattr(cls, '__qualname__', '')}":
            raise ConfigError(f"algo={choice}: {attr} is not a registered algorithm. Decorate it with "
                              f"@register_algorithm('my_algo', config=MyConfig) from rl4diffusion.algorithms.base.")
        choice = name
    if choice in options or (choice.endswith("_schema") and choice[: -len("_schema")] in ALGORITHMS):
        return choice
    if choice in ALGORITHMS:  # registered, no conf/algo/<name>.yaml: the dataclass's defaults
        return f"{choice}_schema"
    valid = sorted(set(options) | set(ALGORITHMS))
    raise ConfigError(f"unknown algo {choice!r}. Valid names: {', '.join(valid)}, or your own algorithm as "
                      "algo=my_pkg.my_module:MyAlgo (see the README's \"Add your own algorithm\").")


def rewrite_overrides(args: list[str]) -> list[str]:
    """Expand the CLI's shorthands into plain Hydra overrides and check group names.

    ``reward=pkg.module:fn`` → ``reward=custom reward.name=pkg.module:fn``; ``model=path:/dir`` → ``model=path
    model.pretrained=/dir``; ``algo=pkg.module:MyAlgo`` → ``algo=<its registered name>``. Also puts the schemas
    in Hydra's ConfigStore (``register_configs``), which every composition of ``conf/train.yaml`` needs.
    """
    from rl4diffusion.training.config import register_configs

    register_configs()
    extra_dirs = searchpath_dirs(args)
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
        if group == "model" and value == "path" and not any(a.startswith("model.pretrained=") for a in args):
            raise ConfigError("model=path needs the pipeline's directory: model=path:/dir (a directory holding "
                              "model_index.json, e.g. one written by pipe.save_pretrained).")
        options = group_options(group, extra_dirs)
        if group == "algo":
            out.append(f"{key}={','.join(_algorithm_option(c, options) for c in value.split(','))}")
            continue
        for choice in value.split(","):  # a -m sweep lists several
            if choice not in options:
                extra = {
                    "reward": " or your own function as reward=my_pkg.my_module:my_fn",
                    "model": " or any local diffusers pipeline as model=path:/dir",
                }.get(group, "")
                raise ConfigError(f"unknown {group} {choice!r}. Valid names: {', '.join(options)}{extra}.")
        out.append(arg)
    return out


MAX_SWEEP_JOBS = 64
"""A ``-m`` sweep of up to this many jobs is checked job by job; a larger one checks every value of every swept
key once (the other keys at their first value)."""


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The plain overrides of each job a ``-m`` sweep runs (one job without a sweep), as Hydra's basic sweeper
    expands them: the cartesian product of the swept keys' values, capped (``MAX_SWEEP_JOBS``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in args if not a.startswith("-")]
    fixed, swept = [], []
    for arg, override in zip(plain, OverridesParser.create().parse_overrides(plain)):
        if override.is_sweep_override():
            key = override.get_key_element()
            swept.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            fixed.append(arg)
    if math.prod(len(values) for values in swept) <= MAX_SWEEP_JOBS:
        return [[*fixed, *job] for job in itertools.product(*swept)]
    firsts = [values[0] for values in swept]
    jobs = [[*fixed, *firsts]]
    for i, values in enumerate(swept):
        jobs += [[*fixed, *firsts[:i], value, *firsts[i + 1:]] for value in values[1:]]
    return jobs


def check_config(args: list[str]) -> DictConfig:
    """Compose the config before Hydra runs and validate it, so bad input fails with exit code 2 before a run
    directory exists: keys and types (the schema), every ``validate()`` (training config, model, algorithm),
    the model's files (``check_pipeline_files``: before any weight loads), the prompt files and sets, and a
    weighted reward's weights. A ``-m`` sweep is checked for each of its jobs (``sweep_jobs``) before job 0
    starts. Returns the first job's config (with its ``hydra`` node)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rl4diffusion.schema import config_error

    try:
        jobs = sweep_jobs(args)
    except (HydraException, OmegaConfBaseException) as e:
        raise config_error(e) from None
    first = None
    checked_models: dict[tuple, str | None] = {}
    for job in jobs:
        try:
            cfg = _check_job(job, checked_models)
        except ConfigError as e:
            if len(jobs) == 1:
                raise
            swept = " ".join(o for o in job if o not in args)
            raise ConfigError(f"the sweep's job with {swept} is refused, so no job was started: {e}") from None
        first = first if first is not None else cfg
    return first


def _check_job(overrides: list[str], checked_models: dict) -> DictConfig:
    """Compose and check one job's config (``check_config``); ``checked_models`` caches the model checks."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rl4diffusion.algorithms import algorithm_classes
    from rl4diffusion.algorithms.base import build_config, check_sampler_fits
    from rl4diffusion.data.prompts import default_eval_sets, named_prompt_sets, resolve_prompts
    from rl4diffusion.policies.base import PolicyConfig, check_pipeline_files, check_pretrained_available
    from rl4diffusion.schema import config_error
    from rl4diffusion.training.config import validate_train_config

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise config_error(e) from None
    choice = cfg.hydra.runtime.choices.get("algo")
    if OmegaConf.get_type(cfg, "algo") is dict:
        raise ConfigError(f"algo={choice}: its YAML does not extend an algorithm's schema. Start it with "
                          f"'defaults: [<name>_schema, _self_]', where <name> is the name the algorithm is registered "
                          "under (@register_algorithm), so that its keys and types are checked.")
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the run validates again and logs its warnings (train.log): not twice
    try:
        validate_train_config(cfg)
    finally:
        logging.disable(previous)
    options = OmegaConf.to_container(cfg.algo, resolve=True)
    name = options.pop("name")
    algo_cls, config_cls = algorithm_classes(name)
    build_config(config_cls, options, name)

    model = PolicyConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    model_key = (model.pretrained, model.height, model.width)
    if model_key not in checked_models:
        check_pretrained_available(model.pretrained)
        checked_models[model_key] = check_pipeline_files(model)
    check_sampler_fits(algo_cls, model, checked_models[model_key])

    prompts = OmegaConf.to_container(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else cfg.prompts
    resolve_prompts(prompts, key="prompts")
    eval_sets = OmegaConf.to_container(cfg.eval, resolve=True)["prompt_sets"]
    for spec in named_prompt_sets(default_eval_sets(prompts) if eval_sets == "auto" else eval_sets).values():
        resolve_prompts(spec, key="eval.prompt_sets")
    _check_reward_options(OmegaConf.to_container(cfg.reward, resolve=True))
    return cfg


def _check_reward_options(options: dict) -> None:
    """The weights of ``reward=weighted``: a mapping of reward names to finite numbers."""
    if options.get("name") != "weighted":
        return
    terms = options.get("terms")
    if not isinstance(terms, dict) or not terms:
        raise ConfigError(f"reward.terms={terms!r}: reward=weighted needs a mapping of reward names to weights, "
                          "e.g. 'reward.terms={shape_alignment: 1.0, colorfulness: 0.1}'.")
    for name, weight in terms.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"reward.terms.{name}={weight!r}: the weight of each term of reward=weighted must be a "
                              f"finite number, e.g. reward.terms.{name}=0.5.")
