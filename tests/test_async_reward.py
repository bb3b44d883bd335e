"""Scoring a sub-batch on a worker thread while the next one samples (``reward_async``, ``sample_chunks``)."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from rl4diffusion import keys
from rl4diffusion.data import collect_trajectories, terminal_rewards
from rl4diffusion.envs import DenoisingEnv
from rl4diffusion.errors import ConfigError
from rl4diffusion.rewards import Reward
from rl4diffusion.rewards.registry import RewardError
from rl4diffusion.training.trainer import run
from tests.conftest import compose_config

PROMPTS = ["a red circle", "a blue square", "a green star"]


class NoisyBrightness:
    """Mean pixel value plus a little noise from torch's global generator; notes the threads it ran on."""

    def __init__(self):
        self.threads = []

    def __call__(self, images, prompts):
        self.threads.append(threading.current_thread().name)
        return images.mean(dim=(1, 2, 3)) + 1e-3 * torch.rand(len(images))


def collect(policy, *, sample_chunks, reward_async, fn=None, actor=None):
    """One seeded batch of 4 chains; returns (trajectories, reward, draw of the global generator after)."""
    reward = Reward("noisy_brightness", fn or NoisyBrightness(), differentiable=False)
    env = DenoisingEnv(policy, reward, PROMPTS, batch_size=4)
    env.core.sample_chunks, env.core.reward_async = sample_chunks, reward_async
    env.set_seed(0)
    torch.manual_seed(0)
    batch = collect_trajectories(env, actor or policy, generator=torch.Generator().manual_seed(1))
    return batch, reward, torch.rand(1)


def test_scoring_on_the_worker_gives_the_same_trajectories_rewards_queries_and_global_rng(make_policy):
    policy = make_policy(num_steps=3)
    sync, sync_reward, sync_after = collect(policy, sample_chunks=2, reward_async=False)
    asynchronous, async_reward, async_after = collect(policy, sample_chunks=2, reward_async=True)
    assert sync.batch_size == asynchronous.batch_size == (4, 3)
    assert set(sync.keys(True)) == set(asynchronous.keys(True))
    assert (sync == asynchronous).all()
    assert torch.isfinite(terminal_rewards(sync)).all()  # the placeholders were all replaced
    assert sync_reward.queries == async_reward.queries == 4
    assert torch.equal(sync_after, async_after)  # the reward's draws from the global generator, in the same order
    assert sync_reward.fn.threads == ["MainThread"] * 2
    assert async_reward.fn.threads == ["rl4diffusion-reward_0"] * 2


class RecordsModes:
    """Mean pixel value; notes the grad mode and CPU autocast state it was called under (both per thread)."""

    def __init__(self):
        self.modes = []

    def __call__(self, images, prompts):
        self.modes.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return images.float().mean(dim=(1, 2, 3))


def test_the_worker_scores_under_the_callers_grad_mode_and_autocast(make_policy):
    policy = make_policy(num_steps=2)
    recorded = {}
    for reward_async in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, reward, _ = collect(policy, sample_chunks=2, reward_async=reward_async, fn=RecordsModes())
        recorded[reward_async] = reward.fn.modes
    assert recorded[True] == recorded[False] == [(False, True, torch.bfloat16)] * 2


def test_one_chunk_collects_exactly_what_the_plain_path_does_and_chunks_keep_the_starting_states(make_policy):
    policy = make_policy(num_steps=3)
    plain, _, _ = collect(policy, sample_chunks=1, reward_async=False)
    on_worker, _, _ = collect(policy, sample_chunks=1, reward_async=True)
    assert (plain == on_worker).all()
    chunked, _, _ = collect(policy, sample_chunks=2, reward_async=False)
    assert torch.equal(chunked[keys.PROMPT_ID], plain[keys.PROMPT_ID])
    assert torch.equal(chunked[keys.LATENTS][:, 0], plain[keys.LATENTS][:, 0])  # x_T drawn for the whole batch


class SignallingActor:
    """``policy.act`` that raises ``second_chunk`` when the second sub-batch takes its first step."""

    def __init__(self, policy):
        self.policy, self.calls, self.second_chunk = policy, 0, threading.Event()

    def act(self, td, generator=None):
        self.calls += 1
        if self.calls == self.policy.config.num_steps + 1:
            self.second_chunk.set()
        return self.policy.act(td, generator=generator)


class WaitsForTheNextChunk:
    """A reward that waits (up to ``timeout`` s) for the next sub-batch to start sampling; notes if it did."""

    def __init__(self, actor, timeout):
        self.actor, self.timeout, self.seen = actor, timeout, []

    def __call__(self, images, prompts):
        self.seen.append(self.actor.second_chunk.wait(timeout=self.timeout))  # in place it would wait for itself
        return images.mean(dim=(1, 2, 3))


def test_the_next_sub_batch_samples_while_the_previous_one_is_scored(make_policy):
    policy = make_policy(num_steps=2)
    for reward_async, timeout in ((True, 30.0), (False, 0.2)):
        actor = SignallingActor(policy)
        reward = WaitsForTheNextChunk(actor, timeout)
        collect(policy, sample_chunks=2, reward_async=reward_async, fn=reward, actor=actor)
        assert reward.seen == [reward_async, True]


def test_an_error_on_the_worker_surfaces_as_it_does_in_place(make_policy):
    policy = make_policy(num_steps=2)

    def broken(images, prompts):
        raise ValueError("the scoring server is down")

    for reward_async in (False, True):
        with pytest.raises(RewardError, match="reward 'noisy_brightness' raised ValueError: the scoring server"):
            collect(policy, sample_chunks=2, reward_async=reward_async, fn=broken)


def ddpo_overrides(pipeline_dir, reward_async):
    return ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{pipeline_dir}", "model.num_steps=2",
            "prompts=[a red circle,a blue square]", "eval.samples_per_prompt=2", "eval.every=0", "epochs=2",
            "algo.batch_size=4", "algo.minibatch_size=2", "algo.lr=1e-2", "sample_chunks=2",
            f"reward_async={reward_async}", "threads=1", "progress=false"]


def test_ddpo_with_asynchronous_scoring_matches_synchronous_scoring(random_pipeline_dir, tmp_path):
    runs = {}
    for flag in ("false", "true"):
        summary = run(compose_config(ddpo_overrides(random_pipeline_dir, flag)), tmp_path / flag)
        records = [json.loads(line) for line in (tmp_path / flag / "metrics.jsonl").read_text().splitlines()]
        weights = load_file(str(tmp_path / flag / "lora" / "pytorch_lora_weights.safetensors"))
        runs[flag] = summary, records, weights
    (sync_summary, sync_records, sync_weights), (async_summary, async_records, async_weights) = runs.values()
    train = [r["reward_mean"] for r in sync_records if r["phase"] == "train"]
    assert len(train) == 2 and train == [r["reward_mean"] for r in async_records if r["phase"] == "train"]
    assert sync_summary["final"] == async_summary["final"]
    assert sync_summary["reward_queries"] == async_summary["reward_queries"] == 8
    assert sync_weights.keys() == async_weights.keys() and sync_weights
    assert all(torch.equal(sync_weights[k], async_weights[k]) for k in sync_weights)


def test_sample_chunks_that_do_not_divide_the_batch_are_refused(random_pipeline_dir, tmp_path):
    common = ddpo_overrides(random_pipeline_dir, "true")
    with pytest.raises(ConfigError, match=r"sample_chunks=3 must divide .*\(4, from algo.batch_size\)"):
        run(compose_config([*common, "sample_chunks=3"]), tmp_path / "three")
    with pytest.raises(ConfigError, match=r"sample_chunks .* got 0"):
        run(compose_config([*common, "sample_chunks=0"]), tmp_path / "zero")
