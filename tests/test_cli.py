"""The command line: bad input gets one clear paragraph and exit code 2, never a traceback."""

import os
import subprocess
import sys

import pytest

from rl4diffusion.cli.overrides import rewrite_overrides
from rl4diffusion.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cli(*args, cwd=None, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "rl4diffusion.train", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd or ROOT, env=env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["algo=no_such_algo"], "Valid names: alignprop, ddpo, diffusion_dpo"),
        (["reward=no_such_reward"], "Valid names: "),
        (["model=no_such_model"], "model=path:/dir"),
        (["model=path:/definitely/not/here", "algo=ddpo", "reward=jpeg_compressibility"], "does not exist"),
        (["reward=not_a_module_xyz:fn", "epochs=1"], "could not import module"),
        (["algo.no_such_option=3"], "bad override"),
        (["model=sd15"], "huggingface-cli download stable-diffusion-v1-5"),
        (["epochs=0"], "epochs"),
        (["model.num_steps=abc"], "must be an integer"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message, tmp_path):
    proc = train_cli(*args, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_shorthands_expand_to_hydra_overrides():
    assert rewrite_overrides(["reward=pkg.mod:fn", "model=path:/x/y", "epochs=3"]) == [
        "reward=custom", "reward.name=pkg.mod:fn", "model=path", "model.pretrained=/x/y", "epochs=3"]
    with pytest.raises(ConfigError, match="unknown algo 'nope'"):
        rewrite_overrides(["-m", "algo=ddpo,nope"])
