"""The TensorDict keys every rl4diffusion component reads and writes, declared once.

A trajectory batch has batch size [B, T] (torchrl convention: step outputs live under
"next"). A preference batch has batch size [B]. The comment beside each key gives its shape per
element and its meaning; the README's "TensorDict keys" section lists the same keys.

The environment's own states (``DenoisingEnv.reset``/``step``, ``env.rollout``) carry
PROMPT_EMBEDS; a stored trajectory (``rl4diffusion.data.collect_trajectories``) keeps only
PROMPT_ID and looks the conditioning up per prompt (TRAJECTORY_KEYS below).
"""

# --- trajectories, batch [B, T] -------------------------------------------------------
LATENTS = "latents"  # [C, H, W]  x_t
TIMESTEP = "timestep"  # []  scheduler timestep t (float: flow models use sigma * 1000)
STEP_INDEX = "step_index"  # []  index i of t in the sampling schedule (0 = noisiest)
PROMPT_ID = "prompt_id"  # []  index into the environment's prompt list
PROMPT_EMBEDS = "prompt_embeds"  # [L, D]  text conditioning (in env states; trajectories keep PROMPT_ID)
ACTION = "action"  # [C, H, W]  x_{t-1} sampled
SAMPLE_LOG_PROB = "sample_log_prob"  # []  log pi_behaviour(x_{t-1} | x_t, c)
REWARD = "reward"  # [1]  r at the last step, 0 elsewhere (under "next")
DONE = "done"  # [1]  True at the last step (under "next")
TERMINATED = "terminated"  # [1]  same as done: the chain always ends at t = 0
ADVANTAGE = "advantage"  # []  written by the algorithm that needs it
NEXT = "next"
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds"  # [P]  pooled text conditioning (SD3-style flow models only)
GROUP_ID = "group_id"  # []  which group of K samples of one prompt a chain belongs to (GRPO)
FINAL_REWARD = "final_reward"  # []  the chain's terminal reward r(x_0, c), copied to each of its transitions
SAMPLE_MODEL_OUTPUT = "sample_model_output"  # [C, H, W]  the guided network output eps_old at sampling time (nabla_gfn trust region)

# --- preference pairs, batch [B] ------------------------------------------------------
LATENTS_W = "latents_w"  # [C, H, W]  clean latents x_0 of the preferred image
LATENTS_L = "latents_l"  # [C, H, W]  clean latents x_0 of the other image
LABEL = "label"  # []  1.0 when latents_w was preferred (always after loading)

# a stored trajectory [B, T]: the conditioning is not copied per step, it is looked up by PROMPT_ID
TRAJECTORY_KEYS = (LATENTS, TIMESTEP, STEP_INDEX, PROMPT_ID, ACTION, SAMPLE_LOG_PROB)
PAIR_KEYS = (PROMPT_EMBEDS, LATENTS_W, LATENTS_L)
