"""One config schema: the dataclasses are the schema, YAML files only override them, and a user's package adds
an algorithm (module + conf/algo/<name>.yaml) without editing rl4diffusion."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rl4diffusion.algorithms import ALGORITHMS, algorithm_classes, build_config
from rl4diffusion.cli.overrides import CONF_DIR, check_config, rewrite_overrides
from rl4diffusion.errors import ConfigError
from rl4diffusion.policies.base import PolicyConfig
from rl4diffusion.training.config import TrainConfig, validate_train_config

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) for group in ("algo", "model", "reward")}
SHORTHAND = {("model", "path"): "model=path:/some/pipeline", ("reward", "custom"): "reward=my_pkg.my_rewards:fn"}


def compose_train(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=rewrite_overrides(overrides))


def validate(cfg) -> None:
    """What the trainer checks before it loads anything: the training config, then the algorithm's options."""
    validate_train_config(cfg)
    options = OmegaConf.to_container(cfg.algo, resolve=True)
    name = options.pop("name")
    build_config(algorithm_classes(name)[1], options, name)


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in OPTIONS.items() for o in opts])
def test_every_option_of_every_group_composes_and_validates(group, option):
    cfg = compose_train([SHORTHAND.get((group, option), f"{group}={option}")])
    validate(cfg)
    if group == "algo":
        assert cfg.algo.name == option


@pytest.mark.parametrize("suite", sorted(p.stem for p in (CONF_DIR / "suite").glob("*.yaml")))
def test_every_suite_composes_a_valid_training_config_for_each_of_its_algorithms(suite, tmp_path):
    from rl4diffusion.cli.bench import run_overrides

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        bench = compose("bench", overrides=[f"suite={suite}"])
    for algo in bench.suite.algos:
        validate(compose_train(run_overrides(bench.suite, algo, 0, tmp_path / algo)))


def node_defaults(cls, name: str | None = None) -> dict:
    """The defaults the schema node of ``cls`` composes to (``name`` first for an algorithm)."""
    from rl4diffusion.schema import hydra_node

    return OmegaConf.to_container(OmegaConf.structured(hydra_node(cls, name)))


def yaml_overrides(path: Path) -> dict:
    """The keys a YAML file sets itself (its defaults list aside)."""
    data = OmegaConf.to_container(OmegaConf.load(path))
    data.pop("defaults", None)
    return data


@pytest.mark.parametrize("name", OPTIONS["algo"])
def test_composed_algo_defaults_are_the_dataclass_defaults_with_the_yaml_over_them(name):
    expected = {**node_defaults(algorithm_classes(name)[1], name), **yaml_overrides(CONF_DIR / "algo" / f"{name}.yaml")}
    assert OmegaConf.to_container(compose_train([f"algo={name}"]).algo) == expected


def test_the_values_that_ran_before_the_schema_still_run():
    """Spot checks of the composed defaults (before the schema, these were the YAML files' values)."""
    algo = {name: compose_train([f"algo={name}"]).algo for name in ("ddpo", "grpo", "dpok", "refl", "sdpo", "dpo_cm")}
    assert algo["ddpo"].lr == 3e-3 and algo["ddpo"].batch_size == 32
    assert (algo["grpo"].lr, algo["grpo"].batch_size, algo["grpo"].group_size) == (3e-3, 32, 4)
    assert (algo["dpok"].lr, algo["dpok"].batch_size, algo["dpok"].value_lr) == (1e-3, 16, 1e-3)
    assert (algo["refl"].reward_target, algo["refl"].loss_scale) == (None, 1.0)  # no target: see refl.py
    assert algo["sdpo"].beta == 400.0 and algo["dpo_cm"].beta == 2000.0  # one dataclass, two algorithms
    default = compose_train([])
    assert default.algo.name == "nabla_gfn" and default.model.num_steps == 20 and default.epochs == 10
    assert compose_train(["model=sd3"]).model.lora_targets[-1] == "to_add_out"


def test_no_yaml_line_repeats_its_default_and_every_override_says_why():
    files = [(CONF_DIR / "train.yaml", _flatten(node_defaults(TrainConfig)))]
    files += [(CONF_DIR / "model" / f"{m}.yaml", node_defaults(PolicyConfig)) for m in OPTIONS["model"]]
    files += [(CONF_DIR / "algo" / f"{a}.yaml", node_defaults(algorithm_classes(a)[1], a)) for a in OPTIONS["algo"]]
    for path, defaults in files:
        own = _flatten({k: v for k, v in yaml_overrides(path).items() if k != "hydra"})
        repeats = sorted(k for k, v in own.items() if k in defaults and defaults[k] == v)
        assert not repeats, f"{path.name} repeats the dataclass default of {repeats}"
        unknown = sorted(set(own) - set(defaults))
        assert not unknown, f"{path.name} sets {unknown}, which its schema lacks"
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line and not line[0].isspace() and not line.startswith(("#", "defaults:", "hydra:")):
                assert "#" in line or lines[i - 1].lstrip().startswith("#") or "#" in lines[i - 1], (
                    f"{path.name}: '{line}' overrides a default without a comment giving its reason")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("algo", "reward"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_every_builtin_is_registered_with_a_yaml_that_extends_its_schema():
    for name in OPTIONS["algo"]:
        cls, config_cls = algorithm_classes(name)
        assert cls.name == name and ALGORITHMS[name] == f"{cls.__module__}:{cls.__qualname__}"
        assert dataclasses.is_dataclass(config_cls)
        assert OmegaConf.load(CONF_DIR / "algo" / f"{name}.yaml").defaults[0] == f"{name}_schema"


def test_types_are_checked_while_composing_and_errors_name_the_key_and_its_type():
    cases = [(["algo=ddpo", "algo.lr=abc"], "algo.lr must be a number (float), got 'abc'"),
             (["epochs=ten"], "epochs must be an integer (int), got 'ten'"),
             (["progress=maybe"], "progress must be true or false (bool)"),
             (["algo=ddpo", "algo.no_such_key=1"], "algo.no_such_key is not a key of DDPOConfig (algo). Valid keys: name, lr,"),
             (["algo=ddpo", "+algo.no_such_key=1"], "unknown option(s) for algo=ddpo: no_such_key. Valid options: adv_clip_max"),
             (["model.dtype=float64"], "model.dtype must be one of float32, float16, bfloat16; got 'float64'"),
             (["mixed_precision=fp8"], "mixed_precision must be one of no, fp16, bf16"),
             (["model=path"], "model=path needs the pipeline's directory")]
    for args, message in cases:
        with pytest.raises(ConfigError) as err:
            check_config(rewrite_overrides(args))
        assert message in str(err.value) and "\n" not in str(err.value), (args, str(err.value))


def test_importing_the_registry_does_not_import_torch():
    code = "import sys, rl4diffusion.algorithms as a; assert 'torch' not in sys.modules; print(sorted(a.ALGORITHMS))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "'nabla_gfn'" in proc.stdout


def test_a_name_is_registered_once():
    from rl4diffusion.algorithms.base import register_algorithm
    from rl4diffusion.algorithms.ddpo import DDPO, DDPOConfig

    with pytest.raises(ConfigError, match="'ddpo' is already registered by rl4diffusion.algorithms.ddpo:DDPO"):
        register_algorithm("ddpo", config=DDPOConfig)(type("OtherDDPO", (DDPO,), {}))


# ------------------------------------------------------------------------------------------ a user's algorithm
USER_MODULE = '''
from dataclasses import dataclass

from rl4diffusion import keys
from rl4diffusion.algorithms.base import register_algorithm
from rl4diffusion.algorithms.ddpo import DDPO, DDPOConfig
from rl4diffusion.data import terminal_rewards
from rl4diffusion.errors import ConfigError


@dataclass
class RankDDPOConfig(DDPOConfig):
    rank_scale: float = 1.0
    """Advantages are the rewards' ranks in the batch, spread evenly over [-rank_scale, rank_scale]."""

    def validate(self) -> None:
        super().validate()
        if self.rank_scale <= 0:
            raise ConfigError(f"algo.rank_scale must be > 0, got {self.rank_scale}.")


@register_algorithm("my_rank_ddpo", config=RankDDPOConfig)
class RankDDPO(DDPO):
    """DDPO with rank advantages: only the order of the rewards matters, not their scale."""

    def collect(self, env):
        batch = super().collect(env)  # chains with DDPO's advantages, replaced below
        ranks = terminal_rewards(batch).argsort().argsort().float()  # (B,)
        advantages = self.config.rank_scale * (2 * ranks / max(len(ranks) - 1, 1) - 1)
        batch[keys.ADVANTAGE] = advantages[:, None].expand(batch.shape)  # (B, T): one A per chain
        return batch
'''
USER_YAML = """\
defaults:
  - my_rank_ddpo_schema
  - _self_

rank_scale: 1.7  # ranks in [-1, 1] have std 0.58: 1.7 gives DDPO's normalised advantages' std of 1
"""


@pytest.fixture(scope="module")
def user_package(tmp_path_factory):
    """A package outside rl4diffusion: my_algos/rank.py and my_algos/conf/algo/my_rank_ddpo.yaml."""
    root = tmp_path_factory.mktemp("user")
    (root / "my_algos" / "conf" / "algo").mkdir(parents=True)
    (root / "my_algos" / "__init__.py").write_text("")
    (root / "my_algos" / "conf" / "__init__.py").write_text("")  # pkg:// config directories are packages
    (root / "my_algos" / "rank.py").write_text(textwrap.dedent(USER_MODULE))
    (root / "my_algos" / "conf" / "algo" / "my_rank_ddpo.yaml").write_text(USER_YAML)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def test_a_user_algorithm_is_selected_with_its_yaml_or_its_dataclass_defaults(user_package):
    searchpath = "hydra.searchpath=[pkg://my_algos.conf]"
    assert rewrite_overrides(["algo=my_algos.rank:RankDDPO", searchpath]) == ["algo=my_rank_ddpo", searchpath]
    assert rewrite_overrides(["algo=my_algos.rank:RankDDPO"]) == ["algo=my_rank_ddpo_schema"]  # no YAML: the dataclass's
    assert compose_train(["algo=my_algos.rank:RankDDPO", searchpath]).algo.rank_scale == 1.7
    assert compose_train(["algo=my_algos.rank:RankDDPO"]).algo.rank_scale == 1.0
    assert compose_train(["algo=my_rank_ddpo", f"hydra.searchpath=[file://{user_package}/my_algos/conf]"]).algo.lr == 3e-3
    check_config(rewrite_overrides(["algo=my_algos.rank:RankDDPO", searchpath]))
    with pytest.raises(ConfigError, match="algo.rank_scale must be > 0"):
        check_config(rewrite_overrides(["algo=my_algos.rank:RankDDPO", searchpath, "algo.rank_scale=0"]))
    with pytest.raises(ConfigError, match="RankDDPOConfig"):
        check_config(rewrite_overrides(["algo=my_algos.rank:RankDDPO", "algo.rank_scal=3"]))


def test_a_user_algorithm_trains_from_the_command_line(user_package, random_pipeline_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["algo=my_algos.rank:RankDDPO", "hydra.searchpath=[pkg://my_algos.conf]", f"model=path:{random_pipeline_dir}",
            "model.num_steps=3", "algo.batch_size=4", "algo.minibatch_size=2", "epochs=1", "reward=jpeg_compressibility",
            "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle]]", "eval.metrics=false",
            "progress=false", "save_lora=false", "log_with=[]", "threads=1", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(user_package)])}
    proc = subprocess.run([sys.executable, "-m", "rl4diffusion.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.algo.name == "my_rank_ddpo" and saved.algo.rank_scale == 1.7
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "train"] == [1]
