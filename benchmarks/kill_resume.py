"""Kill a short training run with SIGKILL at random moments, resume it, and check nothing is lost.

    python benchmarks/kill_resume.py [--trials 10] [--model /path/to/pipeline]

Each trial: start a run, SIGKILL it after a random delay, resume from its run directory (the
newest valid checkpoint), possibly several times, and finally compare its metrics.jsonl (without
wall-clock fields) with an uninterrupted run of the same config. The delays start at 5 % of a run, so
some kills land in start-up: while the run directory is locked, its run_state.json or Hydra's files are
written, or before the first checkpoint (then the resume starts the run over: ``resume_restart=true``).

Windows too short for a random delay to hit are hit on purpose (``KILL_POINTS``): the run kills itself
with SIGKILL at that point, through a patched function (the process runs ``WRAPPER``). Each trial has
one: trials 0–4 in their first launch, 5–9 in their second, a resume (their first launch is killed as
soon as its first checkpoint exists).

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
KILL_POINTS = {
    "lock": "the lock just taken, its pid not yet written",
    "probe": "the disk check's probe file half-written",
    "state_start": "run_state.json's first write (running) half-done: its temporary file half-written",
    "state_checkpoint": "run_state.json's write after the launch's second checkpoint half-done",
    "state_final": "run_state.json's last write (finished) half-done, summary.json already written",
}
WRAPPER = """
import json, os, signal, sys
from pathlib import Path
from rl4diffusion.training import rundir

point, args = sys.argv[1], sys.argv[2:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "lock":
    take = rundir._holder
    def holder(fd):
        other = take(fd)
        if other is None:
            die()
        return other
    rundir._holder = holder
elif point == "probe":
    def probe(directory, **options):
        with open(Path(directory) / f".write_probe_{os.getpid()}", "wb") as f:
            f.write(bytes(4096))
        die()
    rundir.check_writable = probe
elif point.startswith("state"):
    write, writes = rundir.write_json_atomically, []
    def write_state(path, payload, **options):
        if path.name == rundir.STATE_FILE:
            writes.append(payload["state"])
            if {"state_start": len(writes) == 1, "state_checkpoint": len(writes) == 3,
                    "state_final": payload["state"] == "finished"}[point]:
                path.with_name(f".{path.name}.tmp").write_text(json.dumps(payload)[:25])
                die()
        return write(path, payload, **options)
    rundir.write_json_atomically = write_state
from rl4diffusion.cli.train import main
main(args)
"""


def overrides(model: str) -> list[str]:
    return ["algo=ddpo", "reward=jpeg_compressibility", f"model=path:{model}", "model.num_steps=4",
            "prompts=[a red circle,a blue square]", "eval.prompt_sets=[[a red circle,a blue square]]",
            "eval.samples_per_prompt=2", "eval.every=2", "epochs=6", "algo.batch_size=8", "algo.minibatch_size=4",
            "algo.lr=1e-2", "checkpoint.every=1", "threads=1", "progress=false"]


def launch(args: list[str], cwd: Path, stderr=subprocess.DEVNULL, kill_point: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = ["-c", WRAPPER, kill_point] if kill_point else ["-m", "rl4diffusion.train"]
    return subprocess.Popen([sys.executable, *command, *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=stderr)


def finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run_state.json").read_text())["state"] == "finished"
    except (OSError, ValueError):
        return False


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
    points = list(KILL_POINTS)
    for trial in range(args.trials):
        run_dir = work / f"trial_{trial}"
        kills, early, extra, launches, point_hit = 0, 0, [], 0, False
        point, point_launch = points[trial % len(points)], trial // len(points) % 2
        while not finished(run_dir) and launches < 12:
            with open(work / "stderr.txt", "w+") as err:
                kill_point = point if launches == point_launch else None
                proc = launch([*overrides(model), *extra, f"hydra.run.dir={run_dir}"], work, stderr=err,
                              kill_point=kill_point)
                launches += 1
                killed = False
                if launches <= point_launch and kill_point is None:  # the point's launch must be a resume
                    while proc.poll() is None and not (run_dir / "checkpoints" / "latest").exists():
                        time.sleep(0.02)
                    os.kill(proc.pid, signal.SIGKILL)
                    kills, killed = kills + 1, True
                elif kill_point is None and kills < 3:
                    time.sleep(rng.uniform(0.05, 1.0) * full)
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        kills, killed = kills + 1, True
                        early += not started(run_dir, proc.pid)
                code = proc.wait()
                if kill_point is not None and code == -signal.SIGKILL:  # it reached the point and died there
                    kills, killed, point_hit = kills + 1, True, True
                    early += not started(run_dir, proc.pid)
                if code != 0 and not killed:
                    err.seek(0)
                    sys.exit(f"trial {trial}: a run that was not killed exited {code}:\n{err.read()[-3000:]}")
            if (run_dir / "config.yaml").exists():
                extra = [f"resume={run_dir}", "resume_restart=true"]  # no complete checkpoint yet: start over
        restarts = len(list(run_dir.glob("before_restart_*")))
        state = json.loads((run_dir / "run_state.json").read_text())
        leftovers = [p.name for pattern in (".*tmp*", ".latest_*", ".write_probe_*") for p in run_dir.rglob(pattern)]
        same = (metrics(run_dir) == metrics(reference) and state["state"] == "finished"
                and state["exit_code"] == 0 and not (work / "runs").exists())
        rows.append((trial, f"{point} ({'hit' if point_hit else 'not reached'})", kills, early, restarts,
                     ", ".join(leftovers) or "none", same))
        print(f"trial {trial}: kill point {point} {'hit' if point_hit else 'not reached'}, {kills} kills ({early} "
              f"in start-up), {restarts} restarts, leftovers: {leftovers}, metrics identical: {same}", flush=True)
    ok = sum(row[-1] for row in rows)
    report = ["# Kill and resume", "",
              f"{args.trials} trials of a 6-epoch DDPO run (checkpoint every epoch), each SIGKILLed up to 3 "
              f"times at random moments (uniform over 5–100 % of an uninterrupted run's {full:.0f} s, "
              "start-up included: the lock, run_state.json and Hydra's files) and resumed. *identical*: "
              "metrics.jsonl equals an uninterrupted run's, wall-clock fields aside, run_state.json says "
              "finished with exit code 0, and no other run directory appeared. *in start-up*: kills before "
              "the process had locked the directory, checked it and recorded itself in run_state.json. "
              "*restarts*: resumes that found no complete checkpoint yet and started over "
              "(`resume_restart=true`). *kill point*: besides the random kills, each trial's run kills itself "
              "once at one of these points (trials 0–4 in the first launch, 5–9 in the second, a resume: their "
              "first launch is killed as soon as its first checkpoint exists): " +
              "; ".join(f"`{name}`: {what}" for name, what in KILL_POINTS.items()) + ". *leftovers*: temporary "
              "files still in the finished run directory.", "",
              "| trial | kill point | kills | in start-up | restarts | leftovers | identical |",
              "|---|---|---|---|---|---|---|",
              *["| " + " | ".join(str(x) for x in row) + " |" for row in rows], "",
              f"**{ok}/{args.trials} trials lost nothing.**"]
    out = Path(__file__).parent / "results" / "kill_resume.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
