"""The denoising MDP: torchrl specs, Gymnasium's checker, trajectory keys and determinism."""

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from rl4diffusion import keys
from rl4diffusion.data import collect_trajectories, final_latents, terminal_rewards
from rl4diffusion.data.rollout import conditioning_table
from rl4diffusion.envs import ENV_ID, DenoisingEnv
from rl4diffusion.rewards import build_reward

PROMPTS = ["a red circle", "a blue square", "a green star"]


def _env(policy, batch_size=4):
    return DenoisingEnv(policy, build_reward("jpeg_compressibility"), PROMPTS, batch_size=batch_size)


def test_torchrl_specs_and_trajectory_layout(make_policy):
    policy = make_policy(num_steps=4)
    env = _env(policy)
    check_env_specs(env)
    env.set_seed(0)
    td = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(0))
    assert td.batch_size == (4, 4)
    for key in keys.TRAJECTORY_KEYS:
        assert key in td.keys(), key
    # the action of step i is the state of step i + 1 (deterministic transition)
    torch.testing.assert_close(td[keys.ACTION][:, :-1], td[keys.LATENTS][:, 1:])
    torch.testing.assert_close(td[keys.NEXT, keys.LATENTS], td[keys.ACTION])
    assert torch.equal(td[keys.TIMESTEP][0], policy.timesteps)
    # reward only at the terminal step, where done is set
    done = td[keys.NEXT, keys.DONE][..., 0]
    assert done[:, -1].all() and not done[:, :-1].any()
    assert torch.equal(td[keys.NEXT, keys.REWARD][:, :-1], torch.zeros(4, 3, 1))
    prompts = env.core.prompts_of(td[keys.PROMPT_ID][:, 0])
    expected = build_reward("jpeg_compressibility")(policy.decode(final_latents(td)), prompts)
    torch.testing.assert_close(terminal_rewards(td), expected)


def test_seeded_rollouts_are_reproducible_and_prompts_can_be_given(make_policy):
    policy = make_policy(num_steps=3)
    env = _env(policy, batch_size=3)
    runs = []
    for _ in range(2):
        env.set_seed(7)
        runs.append(collect_trajectories(env, policy, prompt_ids=torch.tensor([2, 2, 0]),
                                         generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(runs[0][keys.ACTION], runs[1][keys.ACTION])
    assert runs[0][keys.PROMPT_ID][:, 0].tolist() == [2, 2, 0]
    env.set_seed(8)
    other = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(other[keys.LATENTS][:, 0], runs[0][keys.LATENTS][:, 0])


def test_sampled_log_probs_are_recomputed_exactly(make_policy):
    policy = make_policy(num_steps=4)
    env = _env(policy)
    td = collect_trajectories(env, policy, generator=torch.Generator().manual_seed(0))
    assert keys.PROMPT_EMBEDS not in td.keys()  # stored once per prompt in the policy's cache, not per step
    embeds = conditioning_table(policy, PROMPTS)[keys.PROMPT_EMBEDS]
    with torch.no_grad():
        for j in range(4):
            step = td[:, j].set(keys.PROMPT_EMBEDS, embeds[td[keys.PROMPT_ID][:, j]])
            torch.testing.assert_close(policy.log_prob(step).log_prob, td[keys.SAMPLE_LOG_PROB][:, j])


def test_gymnasium_registration_passes_check_env(make_policy):
    policy = make_policy(num_steps=3)
    env = gymnasium.make(ENV_ID, policy=policy, reward=build_reward("jpeg_compressibility"), prompts=PROMPTS)
    check_env(env.unwrapped, skip_render_check=False)
    obs, info = env.reset(seed=0)
    assert info["prompt"] in PROMPTS
    total, steps, terminated = 0.0, 0, False
    while not terminated:
        obs, r, terminated, truncated, _ = env.step(env.action_space.sample() * 0)
        total, steps = total + r, steps + 1
    assert steps == 3 and total < 0  # compressibility is a negative size
    assert env.render().shape == (policy.height, policy.width, 3)


def test_gymnasium_observation_carries_the_timestep_and_the_prompt(make_policy):
    policy = make_policy(num_steps=3)
    env = gymnasium.make(ENV_ID, policy=policy, reward=build_reward("jpeg_compressibility"), prompts=PROMPTS)
    assert set(env.observation_space.spaces) == {keys.LATENTS, keys.TIMESTEP, keys.STEP_INDEX, keys.PROMPT_ID}
    obs, info = env.reset(seed=0, options={"prompt_id": 2})
    seen = []
    for i in range(3):
        assert env.observation_space.contains(obs)
        assert obs[keys.TIMESTEP] == int(policy.timesteps[i]) and obs[keys.STEP_INDEX] == i
        assert obs[keys.PROMPT_ID] == 2 and info["prompt"] == PROMPTS[2] == env.unwrapped.prompts[2]
        seen.append(obs[keys.TIMESTEP])
        obs, _, terminated, _, info = env.step(obs[keys.LATENTS])
    assert terminated and obs[keys.TIMESTEP] == 0 and env.observation_space.contains(obs)
    assert seen == policy.timesteps.tolist()
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(obs[keys.LATENTS])


def test_an_agent_with_the_models_copy_acts_from_the_gymnasium_observation_alone(make_policy):
    """The observation is enough to act like the model: same chain as the batched env's, step for step."""
    policy = make_policy(num_steps=3)
    env = gymnasium.make(ENV_ID, policy=policy, reward=build_reward("jpeg_compressibility"), prompts=PROMPTS)
    obs, info = env.reset(seed=1)
    start = obs[keys.LATENTS]
    agent_noise, actions = torch.Generator().manual_seed(5), []
    terminated = False
    while not terminated:
        state = TensorDict({keys.LATENTS: torch.as_tensor(obs[keys.LATENTS])[None],
                            keys.TIMESTEP: torch.as_tensor(obs[keys.TIMESTEP])[None],
                            keys.PROMPT_EMBEDS: policy.encode_prompts([info["prompt"]])}, batch_size=[1])
        actions.append(policy.act(state, generator=agent_noise)[keys.ACTION][0])
        obs, reward, terminated, _, info = env.step(actions[-1].numpy())
    batched = _env(policy, batch_size=1)
    prompt_ids = torch.tensor([PROMPTS.index(info["prompt"])])
    td = collect_trajectories(batched, policy, prompt_ids=prompt_ids, latents=torch.as_tensor(start)[None],
                              generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(torch.stack(actions), td[keys.ACTION][0])
    assert reward == pytest.approx(float(terminal_rewards(td)[0]), rel=1e-5)


def test_float_timesteps_give_a_box_and_integer_ones_a_discrete_space():
    from gymnasium import spaces

    from rl4diffusion.envs.gym_env import DenoisingGymEnv

    box = DenoisingGymEnv._timestep_space(torch.tensor([1000.0, 500.0, 0.0]))
    assert isinstance(box, spaces.Box) and box.contains(np.asarray(1000.0, dtype=np.float32))
    assert DenoisingGymEnv._timestep_space(torch.tensor([951, 1])) == spaces.Discrete(952)
