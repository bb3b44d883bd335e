"""Every documented way into the environments works exactly as written.

- ``import rl4diffusion`` is enough for ``gymnasium.make("rl4diffusion/Denoising-v0")``, and stays cheap;
- the examples in the docstrings (``rl4diffusion``, ``DenoisingEnv``, the Gymnasium env) run as written;
- a torchrl ``Collector`` over ``DenoisingEnv`` with ``policy.act`` yields whole chains, like ``env.rollout``.

The README's own Gymnasium and torchrl snippets run in tests/test_docs.py with the other README blocks.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torchrl.collectors import Collector

import rl4diffusion
from rl4diffusion import keys
from rl4diffusion.envs import DenoisingEnv, gym_env
from rl4diffusion.rewards import build_reward

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square", "a green star"]


def docstring_examples(obj) -> list[str]:
    """The literal blocks (indented lines after a line ending in ``::``) of ``obj``'s docstring, dedented."""
    blocks = re.findall(r"::\n\n((?:[ \t]+\S.*\n|[ \t]*\n)+)", obj.__doc__ + "\n")
    assert blocks, f"{obj.__name__}'s docstring has no example"
    return [textwrap.dedent(b) for b in blocks]


def test_import_rl4diffusion_is_enough_for_gymnasium_make_and_imports_no_torch():
    code = textwrap.dedent("""
        import sys
        import rl4diffusion
        assert "torch" not in sys.modules and "diffusers" not in sys.modules, "importing must stay cheap"
        import gymnasium

        env = gymnasium.make("rl4diffusion/Denoising-v0")
        obs, info = env.reset(seed=0)
        assert set(obs) == {"latents", "timestep", "step_index", "prompt_id"}, set(obs)
        obs, reward, terminated, truncated, info = env.step(obs["latents"])
        assert obs["step_index"] == 1 and not terminated and info["prompt"] in env.unwrapped.prompts
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_the_package_docstring_example_runs():
    """``import gymnasium; import rl4diffusion; env = gymnasium.make(...)``: the embedded world by default."""
    (example,) = docstring_examples(rl4diffusion)
    namespace: dict = {}
    exec(compile(example, rl4diffusion.__file__, "exec"), namespace)
    assert namespace["env"].unwrapped.core.num_steps == 20


def test_the_gymnasium_agent_example_runs():
    (example,) = docstring_examples(gym_env)
    namespace: dict = {}
    exec(compile(example, gym_env.__file__, "exec"), namespace)
    obs = namespace["obs"]
    assert namespace["terminated"] and obs["step_index"] == 20 and obs["timestep"] == 0
    assert namespace["reward"] < 0  # shape_alignment is a log-probability


def test_the_torchrl_rollout_and_collector_examples_run(make_policy):
    """DenoisingEnv's docstring with ``policy`` and ``reward`` given: ``env.rollout`` and a ``Collector``."""
    (example,) = docstring_examples(DenoisingEnv)
    policy = make_policy(num_steps=3)
    reward = build_reward("jpeg_compressibility")
    namespace = {"DenoisingEnv": DenoisingEnv, "policy": policy, "reward": reward}
    exec(compile(example, sys.modules[DenoisingEnv.__module__].__file__, "exec"), namespace)
    td, batch = namespace["td"], namespace["batch"]
    assert td.batch_size == (4, 3) and batch.batch_size == (4, 3)
    assert keys.PROMPT_EMBEDS in td.keys()  # the env's own states keep the conditioning
    assert td[keys.NEXT, keys.DONE][:, -1].all() and not td[keys.NEXT, keys.DONE][:, :-1].any()


def test_a_torchrl_collector_yields_whole_chains_with_the_env_layout(make_policy):
    policy = make_policy(num_steps=3)
    reward = build_reward("jpeg_compressibility")
    env = DenoisingEnv(policy, reward, PROMPTS, batch_size=2)
    env.set_seed(0)
    collector = Collector(env, policy.act, frames_per_batch=2 * 3, total_frames=2 * 2 * 3, trust_policy=True)
    batches = [batch.clone() for batch in collector]
    collector.shutdown()
    assert len(batches) == 2
    for batch in batches:
        assert batch.batch_size == (2, 3)  # (chains, steps): one whole chain per row
        assert torch.equal(batch[keys.STEP_INDEX], torch.arange(3).expand(2, 3))
        assert torch.equal(batch[keys.TIMESTEP], policy.timesteps.expand(2, 3))
        done = batch[keys.NEXT, keys.DONE][..., 0]
        assert done[:, -1].all() and not done[:, :-1].any()
        torch.testing.assert_close(batch[keys.NEXT, keys.LATENTS], batch[keys.ACTION])
        torch.testing.assert_close(batch[keys.LATENTS][:, 1:], batch[keys.ACTION][:, :-1])
        assert torch.equal(batch[keys.NEXT, keys.REWARD][:, :-1], torch.zeros(2, 2, 1))
        prompts = env.core.prompts_of(batch[keys.PROMPT_ID][:, 0])
        expected = reward(policy.decode(batch[keys.NEXT, keys.LATENTS][:, -1]), prompts)
        torch.testing.assert_close(batch[keys.NEXT, keys.REWARD][:, -1, 0], expected)
        torch.testing.assert_close(batch[keys.PROMPT_EMBEDS][:, 0], policy.encode_prompts(prompts))
    # the collector reset the finished chains: the second batch starts from fresh noise, as new trajectories
    assert not torch.allclose(batches[1][keys.LATENTS][:, 0], batches[0][keys.NEXT, keys.LATENTS][:, -1])
    ids = [b["collector", "traj_ids"] for b in batches]
    assert set(ids[0].flatten().tolist()).isdisjoint(ids[1].flatten().tolist())


def test_the_readme_shows_each_entry_point_in_a_block_that_runs():
    """tests/test_docs.py executes every README python block; these are the entry points it must include."""
    from tests.test_docs import python_blocks

    code = "\n".join(python_blocks())
    for snippet in ('gymnasium.make("rl4diffusion/Denoising-v0"', "import rl4diffusion  #",
                    "policy.act, break_when_any_done=False, trust_policy=True)",
                    "Collector(env, policy.act,"):
        assert snippet in code, snippet
