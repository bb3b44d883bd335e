"""Kill a short training run with SIGKILL at random moments, resume it, and check nothing is lost.

    python benchmarks/kill_resume.py [--trials 10] [--model /path/to/pipeline]

Each trial: start a run, SIGKILL it after a random delay, resume from its run directory (the
newest valid checkpoint), possibly several times, and finally compare its metrics.jsonl (without
wall-clock fields) with an uninterrupted run of the same config. The delays start at 5 % of a run, so
some kills land in start-up: while the run directory is locked, its run_state.json or Hydra's files are
written, or before the first checkpoint (then the resume starts the run over: ``resume_restart=true``).
Every run that was not killed must exit 0, the finished run's run_state.json must say so, and no run may
leave a directory of Hydra's own. Writes benchmarks/results/kill_resume.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOLATILE = {"wall_s", "train_wall_s", "train_cpu_s"}


def overrides(model: str) -> list[str]:
    return ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{model}", "model.num_steps=4",
            "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
            "eval.samples_per_prompt=2", "eval.every=2", "epochs=6", "algo.batch_size=8", "algo.minibatch_size=4",
            "algo.lr=1e-2", "checkpoint.every=1", "threads=1", "progress=false"]


def launch(args: list[str], cwd: Path, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "rl4diffusion.train", *args], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=stderr)


def started(run_dir: Path, pid: int) -> bool:
    """Whether process ``pid`` got past its start-up (the lock, the checks) and recorded itself as running."""
    try:
        return json.loads((run_dir / "run_state.json").read_text())["pid"] == pid
    except (OSError, ValueError):
        return False


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE} for x in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--model", default=None, help="a diffusers pipeline dir (default: a random tiny one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="rl4d_kill_"))
    model = args.model
    if model is None:
        from rl4diffusion.testing import make_random_sd_pipeline

        model = str(work / "pipeline")
        make_random_sd_pipeline().save_pretrained(model)
    reference = work / "reference"
    subprocess.run([sys.executable, "-m", "rl4diffusion.train", *overrides(model), f"hydra.run.dir={reference}"],
                   check=True, capture_output=True, cwd=work)
    t0 = time.time()
    launch([*overrides(model), f"hydra.run.dir={work / 'timing'}"], work).wait()
    full = time.time() - t0
    rows = []
    for trial in range(args.trials):
        run_dir = work / f"trial_{trial}"
        kills, early, extra = 0, 0, []
        while not (run_dir / "summary.json").exists():
            with open(work / "stderr.txt", "w+") as err:
                proc = launch([*overrides(model), *extra, f"hydra.run.dir={run_dir}"], work, stderr=err)
                killed = False
                if kills < 3:
                    time.sleep(rng.uniform(0.05, 1.0) * full)
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        kills, killed = kills + 1, True
                        early += not started(run_dir, proc.pid)
                if proc.wait() != 0 and not killed:
                    err.seek(0)
                    sys.exit(f"trial {trial}: a run that was not killed exited {proc.returncode}:\n"
                             f"{err.read()[-3000:]}")
            if (run_dir / "config.yaml").exists():
                extra = [f"resume={run_dir}", "resume_restart=true"]  # no complete checkpoint yet: start over
        restarts = len(list(run_dir.glob("before_restart_*")))
        state = json.loads((run_dir / "run_state.json").read_text())
        same = (metrics(run_dir) == metrics(reference) and state["state"] == "finished"
                and state["exit_code"] == 0 and not (work / "runs").exists())
        rows.append((trial, kills, early, restarts, same))
        print(f"trial {trial}: {kills} kills ({early} in start-up), {restarts} restarts, metrics identical: "
              f"{same}", flush=True)
    ok = sum(same for *_, same in rows)
    report = ["# Kill and resume", "",
              f"{args.trials} trials of a 6-epoch DDPO run (checkpoint every epoch), each SIGKILLed up to 3 "
              f"times at random moments (uniform over 5–100 % of an uninterrupted run's {full:.0f} s, "
              "start-up included: the lock, run_state.json and Hydra's files) and resumed. *identical*: "
              "metrics.jsonl equals an uninterrupted run's, wall-clock fields aside, run_state.json says "
              "finished with exit code 0, and no other run directory appeared. *in start-up*: kills before "
              "the process had locked the directory, checked it and recorded itself in run_state.json. "
              "*restarts*: resumes that found no complete checkpoint yet and started over "
              "(`resume_restart=true`).", "",
              "| trial | kills | in start-up | restarts | identical |", "|---|---|---|---|---|",
              *[f"| {t} | {k} | {e} | {r} | {s} |" for t, k, e, r, s in rows], "",
              f"**{ok}/{args.trials} trials lost nothing.**"]
    out = Path(__file__).parent / "results" / "kill_resume.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
