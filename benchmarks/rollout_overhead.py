"""Rollout cost through DenoisingEnv + DiffusionPolicy versus a plain diffusers pipeline call.

Same model, batch, steps, guidance and η; the environment's reward is a constant so that only
the MDP machinery is measured. Reports the median of interleaved repeats as a ratio (the machine
is noisy; ratios are what we compare), and the log-probability's own overhead.

    python benchmarks/rollout_overhead.py [--model tiny] [--batch 16] [--steps 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from rl4diffusion.data import collect_trajectories
from rl4diffusion.envs import DenoisingEnv
from rl4diffusion.policies.base import DiffusionPolicy
from rl4diffusion.policies.steps import ddim_step_with_log_prob


def zero_reward(images, prompts):
    return torch.zeros(images.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout_overhead.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    policy = DiffusionPolicy.from_pretrained(args.model, num_steps=args.steps, guidance_scale=args.guidance, eta=1.0)
    pipe = policy.pipeline
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star"] * (args.batch // 4 + 1)
    prompts = prompts[: args.batch]
    env = DenoisingEnv(policy, zero_reward, prompts, batch_size=args.batch)
    ids = torch.arange(args.batch)

    def run_pipeline():
        with torch.no_grad():
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="pt")

    def run_env():
        collect_trajectories(env, policy, prompt_ids=ids, generator=torch.Generator().manual_seed(0))

    # the log-prob's own cost: one step's math with and without the density, on realistic tensors
    x = torch.randn(args.batch, *policy.latent_shape)
    out = torch.randn_like(x)
    a_t, a_prev = policy.alphas(policy.timesteps[5].expand(args.batch))

    def step_math(with_log_prob: bool):
        for _ in range(200):
            s = ddim_step_with_log_prob(out, x, a_t, a_prev, eta=1.0, noise=out)
            if with_log_prob:
                s.log_prob.sum()

    run_pipeline(), run_env()  # warm-up (caches, allocator)
    times = {"pipeline": [], "env": []}
    for _ in range(args.repeats):  # interleaved so drifts in machine load hit both
        for name, fn in (("pipeline", run_pipeline), ("env", run_env)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    pipe_s, env_s = statistics.median(times["pipeline"]), statistics.median(times["env"])
    t0 = time.perf_counter()
    step_math(True)
    lp = time.perf_counter() - t0
    t0 = time.perf_counter()
    step_math(False)
    nolp = time.perf_counter() - t0
    report = (
        f"# Rollout overhead\n\nModel `{args.model}`, batch {args.batch}, {args.steps} DDIM steps, guidance "
        f"{args.guidance}, η = 1, {args.threads} threads, median of {args.repeats} interleaved repeats.\n\n"
        "| path | seconds per batch |\n|---|---|\n"
        f"| diffusers pipeline `__call__` | {pipe_s:.4f} |\n| DenoisingEnv + DiffusionPolicy rollout | {env_s:.4f} |\n\n"
        f"**ratio env / pipeline = {env_s / pipe_s:.3f}** (target ≤ 1.10).\n\n"
        f"Log-probability overhead: the step's math costs {lp / 200 * 1e3:.3f} ms with the density and "
        f"{nolp / 200 * 1e3:.3f} ms without; the density adds {(lp - nolp) / 200 * args.steps * 1e3:.2f} ms per "
        f"rollout ({(lp - nolp) / 200 * args.steps / env_s * 100:.2f} % of it).\n"
    )
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
