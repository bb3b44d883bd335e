"""GPU smoke test: one short epoch of every algorithm on CUDA, in fp32 and bf16, plus SD1.5-size runs.

What runs (each in its own subprocess, so one failure or crash does not stop the others):

* every algorithm of the registry (``rl4diffusion.algorithms.ALGORITHMS``) on the embedded tiny model,
  under ``mixed_precision=no`` (fp32) and ``mixed_precision=bf16``;
* the algorithms that train flow models (``--flow-algos``) on the embedded flow-matching model,
  ``model=tiny_flow``;
* DDPO and ∇-GFlowNet (``--sd15-algos``) on a randomly initialised pipeline with SD1.5's UNet
  (860 M parameters, 64×64×4 latents, 512×512 images), a 2-layer CLIP text encoder of width 768
  and a small 4-channel, 8×-downscaling VAE (``rl4diffusion.testing.make_random_sd15_pipeline``).
  It is built from configs and saved to a temporary directory (no hub), then loaded with
  ``model=path:<dir>``.

Every run is ``python -m rl4diffusion.train``'s own command line with ``epochs=1``, small batches
(``algo.batch_size=4``, ``algo.minibatch_size=2``, 16 AI-feedback pairs for the preference
algorithms), two evaluation prompts and no metrics, LoRA export or intermediate checkpoints.

The table has, per (model, algorithm, precision): pass/fail (the error's last line on failure, also
when an update was skipped for a non-finite loss), the training seconds of the epoch
(``train_wall_s`` of metrics.jsonl: collect + update, evaluation excluded; the first epoch, so it
includes CUDA warm-up), the seconds of the whole subprocess (imports, model load, pair generation,
base and final evaluation included) and the peak memory measured inside the child:
``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on a CPU.

On the GPU machine (Python 3.12, torch 2.11, accelerate, peft, transformers and tensorboard; no network):
first, on any machine with PyPI access, fetch what the image lacks (diffusers, torchrl, tensordict,
hydra-core, omegaconf, gymnasium, torchvision and their dependencies; 24 MB) into
benchmarks/gpu_smoke/wheels/, which git ignores (.git/info/exclude)::

    bash benchmarks/gpu_smoke/download_wheels.sh

then, from the repository root on the GPU machine, with that folder copied along::

    python -m pip install --no-index --find-links benchmarks/gpu_smoke/wheels -r benchmarks/gpu_smoke/requirements.txt
    PYTHONPATH=. python benchmarks/gpu_smoke.py --jobs 4 --out benchmarks/results/gpu_smoke.md

(``python -m pip``: on the GPU image the ``pip`` on PATH belongs to another interpreter than ``python``.)

(``--no-index --find-links`` installs only the packages the image is missing; ``pip install --no-deps
wheels/*.whl`` would also replace the image's own Pillow, requests or typing-extensions.) ``--jobs 4``
runs four subprocesses side by side on the one GPU, each with a quarter of the CPU threads: each
process's peak memory is still its own, but the seconds then include the contention (the markdown
says so). The markdown is rewritten after every run, so a benchmark killed by a time limit keeps the
rows it finished; ``--algos``, ``--precisions`` and ``--sd15-algos ''`` select a subset.

On a CPU (the tiny SD1.5 architecture instead of the real-size one, fp32)::

    python benchmarks/gpu_smoke.py --device cpu --scale tiny --precisions fp32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import logging
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("benchmarks.gpu_smoke")
PRECISIONS = {"fp32": "no", "bf16": "bf16"}
"""Table label → the trainer's ``mixed_precision`` value."""
SMALL_ALGO_OPTIONS = {
    "batch_size": 4,  # chains (or pairs) per epoch
    "minibatch_size": 2,  # two micro-batches per optimiser step: gradient accumulation is exercised
    "group_size": 2,  # GRPO: 2 prompts × 2 samples
    "num_pairs": 16,  # preference algorithms: AI-feedback pairs generated at start-up
    "generation_batch_size": 8,
    "policy_steps": 2,  # DPOK
    "value_steps": 2,
    "value_batch_size": 16,
}
"""Applied to each algorithm whose config dataclass has the key."""
EVAL_PROMPTS = "[[a red circle,a blue square]]"
"""The one evaluation set: the base and final evaluations run, on 2 prompts × 2 samples."""
REQUIRED_MODULES = ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "torchrl",
                    "tensordict", "hydra", "omegaconf", "gymnasium")


@dataclass
class Run:
    """One (model, algorithm, precision) cell of the table and what its subprocess reported."""

    model: str  # "tiny", "tiny_flow" or "sd15"
    algo: str
    precision: str  # a key of PRECISIONS
    status: str = "not run"  # pass | fail | timeout | not run
    epoch_s: float | None = None
    run_s: float | None = None
    peak_bytes: int | None = None
    error: str = ""
    environment: dict = field(default_factory=dict)  # the child's GPU name and torch version

    @property
    def name(self) -> str:
        return f"{self.model}-{self.algo}-{self.precision}"


def algo_options(algo: str, cache_dir: Path) -> list[str]:
    """``algo.<key>=<small value>`` for each key of SMALL_ALGO_OPTIONS (and cache_dir) the algorithm has."""
    from rl4diffusion.algorithms import algorithm_classes

    config_class = algorithm_classes(algo)[1]  # the algorithm's config dataclass is its schema
    keys = {f.name for f in dataclasses.fields(config_class)}
    out = [f"algo.{k}={v}" for k, v in SMALL_ALGO_OPTIONS.items() if k in keys]
    if "cache_dir" in keys:  # the preference algorithms' pair cache: keep it out of ~/.cache
        out.append(f"algo.cache_dir={cache_dir}")
    return out


def run_overrides(run: Run, *, model_arg: str, device: str, run_dir: Path, cache_dir: Path, epochs: int = 1,
                  threads: int = 0) -> list[str]:
    """The ``python -m rl4diffusion.train`` arguments of one run."""
    return [
        f"algo={run.algo}", model_arg, f"device={device}", f"mixed_precision={PRECISIONS[run.precision]}",
        f"epochs={epochs}", f"threads={threads}", "progress=false", "save_lora=false", "checkpoint.every=0",
        "eval.metrics=false", "eval.samples_per_prompt=2", f"eval.prompt_sets={EVAL_PROMPTS}",
        f"hydra.run.dir={run_dir}", *algo_options(run.algo, cache_dir),
    ]


def plan_runs(algos: list[str], precisions: list[str], sd15_algos: list[str],
              flow_algos: list[str] = ()) -> list[Run]:
    """Every algorithm on the tiny model, the flow-model runs, then the SD1.5-size runs, each under every
    precision."""
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise SystemExit(f"unknown precision(s) {unknown}: choose from {', '.join(PRECISIONS)}")
    runs = [Run("tiny", a, p) for a in algos for p in precisions]
    runs += [Run("tiny_flow", a, p) for a in flow_algos for p in precisions]
    return runs + [Run("sd15", a, p) for a in sd15_algos for p in precisions]


# ---------------------------------------------------------------------------------------------- the child
def child_main(report: Path, overrides: list[str]) -> None:
    """Train through the normal CLI path and write the process's peak memory to ``report`` (JSON)."""
    import torch

    if torch.cuda.is_available() and any(o.startswith("device=cuda") for o in overrides):
        torch.cuda.reset_peak_memory_stats()  # a fresh process starts at zero anyway: this makes it explicit
    code = 0
    try:
        from rl4diffusion.cli.train import main

        main(overrides)
    except SystemExit as e:  # the CLI exits 2 on bad input, 1 on a failure (Hydra may exit too)
        code = e.code if isinstance(e.code, int) else 1
    finally:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        report.write_text(json.dumps({
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "torch": torch.__version__,
        }))
    sys.exit(code)


# --------------------------------------------------------------------------------------------- the parent
def last_error_line(run_dir: Path, output: str) -> str:
    """The most telling line of a failed run: the traceback's last line, else the CLI's ``error:`` line."""
    error_log = run_dir / "error.log"  # written by the CLI for an unexpected exception
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    if error_log.is_file():
        lines = [ln.strip() for ln in error_log.read_text().splitlines() if ln.strip()] or lines
        return lines[-1] if lines else "failed without output"
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line or "Exception" in line:
            return line
    return lines[-1] if lines else "failed without output"


def execute(run: Run, overrides: list[str], run_dir: Path, *, cuda: bool, timeout: float, env: dict) -> Run:
    """Run one training in a subprocess and fill in ``run``'s status, seconds and peak memory (GPU or RSS)."""
    report = run_dir.parent / f"{run.name}.report.json"
    log_path = run_dir.parent / f"{run.name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(report), "--", *overrides]
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        try:
            proc = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:  # subprocess.run has killed the child
            code = None
    run.run_s = time.perf_counter() - t0
    output = log_path.read_text(errors="replace")
    if report.is_file():
        reported = json.loads(report.read_text())
        run.peak_bytes = reported["peak_gpu_bytes" if cuda else "peak_rss_bytes"]
        run.environment = {k: reported[k] for k in ("gpu", "torch")}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        train = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        train = [r for r in train if r.get("phase") == "train"]
        if train:  # the training clock (cumulative, evaluations excluded) over the epochs it covers
            seconds = train[-1].get("train_wall_s", train[-1].get("wall_s"))
            run.epoch_s = seconds / len(train) if seconds is not None else None
    summary = run_dir / "summary.json"
    if code is None:
        run.status, run.error = "timeout", f"killed after {timeout:.0f} s"
    elif code != 0:
        run.status, run.error = "fail", f"exit {code}: {last_error_line(run_dir, output)}"
    elif not summary.is_file():
        run.status, run.error = "fail", "exit 0 but no summary.json (interrupted?)"
    elif json.loads(summary.read_text()).get("skipped_updates", 0):
        run.status, run.error = "fail", "an update was skipped: non-finite reward, loss or weights"
    elif cuda and not run.peak_bytes:
        run.status, run.error = "fail", "nothing was allocated on the GPU: the run fell back to the CPU"
    else:
        run.status = "pass"
    return run


def format_table(runs: list[Run], *, device: str, markdown: bool) -> str:
    memory = "peak GPU mem (GiB)" if device.startswith("cuda") else "peak RSS (GiB)"
    header = ["model", "algorithm", "precision", "result", "s/epoch", "run s", memory, "error (last line)"]
    rows = []
    for r in runs:
        rows.append([
            r.model, r.algo, r.precision, r.status,
            f"{r.epoch_s:.2f}" if r.epoch_s is not None else "—",
            f"{r.run_s:.1f}" if r.run_s is not None else "—",
            f"{r.peak_bytes / 2**30:.2f}" if r.peak_bytes is not None else "n/a",
            r.error.replace("|", "\\|")[:200] if markdown else r.error[:200],
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    widths[-1] = 0  # the error column is last: no padding
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def write_markdown(path: Path, runs: list[Run], args: argparse.Namespace, started: str) -> None:
    """The table with how it was made; rewritten after every run, so a killed benchmark leaves its rows."""
    done = [r for r in runs if r.status != "not run"]
    passed = sum(r.status == "pass" for r in done)
    gpu = next((r.environment["gpu"] for r in done if r.environment.get("gpu")), None)
    torch_version = next((r.environment["torch"] for r in done if r.environment.get("torch")), "?")
    contention = (f" {args.jobs} runs at a time share the machine: the seconds include that contention."
                  if args.jobs > 1 else "")
    small = ", ".join(f"algo.{k}={v}" for k, v in SMALL_ALGO_OPTIONS.items())
    text = "\n".join([
        "# GPU smoke test", "",
        f"`python benchmarks/gpu_smoke.py {shlex.join(args.argv)}`, started {started}; device "
        f"{gpu or args.device}, torch {torch_version}. {passed}/{len(done)} runs passed"
        f"{f' ({len(runs) - len(done)} not run yet)' if len(done) < len(runs) else ''}.", "",
        f"Each run is `python -m rl4diffusion.train` in its own process: epochs={args.epochs}, {small} "
        "(where the algorithm has the option), 2 evaluation prompts × 2 samples. *tiny* is the embedded "
        "model; *tiny_flow* the embedded flow-matching model; *sd15* a random pipeline with SD1.5's UNet "
        f"(`make_random_sd15_pipeline(scale={args.scale!r})`). "
        "s/epoch is the training clock of the epoch (collect + update, the first epoch: warm-up included); "
        f"run s is the whole process (imports, loading, pair generation, evaluations).{contention}", "",
        format_table(runs, device=args.device, markdown=True), "",
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def check_modules() -> None:
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"missing Python packages: {', '.join(missing)}. On the GPU image install the "
                         "wheels fetched by benchmarks/gpu_smoke/download_wheels.sh: python -m pip install --no-index "
                         "--find-links benchmarks/gpu_smoke/wheels -r benchmarks/gpu_smoke/requirements.txt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from rl4diffusion.algorithms import ALGORITHMS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--scale", choices=("full", "tiny"), default=None,
                   help="size of the SD1.5-architecture model (default: full on cuda, tiny on cpu)")
    p.add_argument("--precisions", default=None, help="comma-separated, of fp32,bf16 (default: both on cuda, "
                   "fp32 on cpu)")
    p.add_argument("--algos", default=",".join(ALGORITHMS),
                   help="comma-separated algorithms on the tiny model (default: all)")
    p.add_argument("--sd15-algos", default="ddpo,nabla_gfn",
                   help="algorithms on the SD1.5-architecture model ('' = none)")
    p.add_argument("--flow-algos", default="grpo,nft,refl,draft,alignprop,diffusion_dpo,dmpo,sft",
                   help="algorithms on the embedded flow-matching model, model=tiny_flow ('' = none)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (the timings then include contention)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    p.add_argument("--workdir", type=Path, default=None, help="where runs and logs go (default: a temporary "
                   "directory, removed at the end)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the markdown's header
    args.scale = args.scale or ("tiny" if args.device == "cpu" else "full")
    args.precisions = args.precisions or ("fp32" if args.device == "cpu" else "fp32,bf16")
    args.algos, args.sd15_algos, args.flow_algos, args.precisions = (
        [x for x in value.split(",") if x]
        for value in (args.algos, args.sd15_algos, args.flow_algos, args.precisions))
    unknown = sorted(set(args.algos + args.sd15_algos + args.flow_algos) - set(ALGORITHMS))
    if unknown:
        p.error(f"unknown algorithm(s) {', '.join(unknown)}; valid: {', '.join(ALGORITHMS)}")
    return args


def main(argv: list[str] | None = None) -> list[Run]:
    check_modules()
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: torch sees no CUDA device here. On a CPU, run the "
                             "CPU-equivalent path: --device cpu --scale tiny.")
    runs = plan_runs(args.algos, args.precisions, args.sd15_algos, args.flow_algos)
    started = time.strftime("%Y-%m-%d %H:%M")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rl4d_gpu_smoke_"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    models = {"tiny": "model=tiny", "tiny_flow": "model=tiny_flow"}
    if args.sd15_algos:
        from rl4diffusion.testing import make_random_sd15_pipeline

        sd15_dir = workdir / f"sd15_{args.scale}"
        t0 = time.perf_counter()
        try:
            make_random_sd15_pipeline(seed=0, scale=args.scale).save_pretrained(str(sd15_dir))
            models["sd15"] = f"model=path:{sd15_dir}"
            seconds = time.perf_counter() - t0
            log.info("built the random SD1.5 pipeline (%s) in %.0f s: %s", args.scale, seconds, sd15_dir)
        except Exception as e:  # the tiny runs still go ahead
            for r in runs:
                if r.model == "sd15":
                    r.status, r.error = "fail", f"building the random SD1.5 pipeline: {type(e).__name__}: {e}"

    todo = [r for r in runs if r.status == "not run"]
    todo.sort(key=lambda r: r.model != "sd15")  # the longest first, when several run at a time
    log.info("%d runs on %s, %d at a time; logs in %s", len(todo), args.device, args.jobs, workdir)

    commands = {}  # built here, in one thread: reading an algorithm's options imports its module
    for run in todo:
        try:
            commands[run.name] = run_overrides(run, model_arg=models[run.model], device=args.device,
                                               run_dir=workdir / run.name, cache_dir=workdir / "cache",
                                               epochs=args.epochs, threads=threads)
        except Exception as e:  # the algorithm's config could not be read: this row fails, the others run
            run.status, run.error = "fail", f"reading the algorithm's options: {type(e).__name__}: {e}"
    todo = [r for r in todo if r.name in commands]

    def one(run: Run) -> Run:
        return execute(run, commands[run.name], workdir / run.name, cuda=args.device.startswith("cuda"),
                       timeout=args.timeout, env=env)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in concurrent.futures.as_completed([pool.submit(one, r) for r in todo]):
            r = future.result()
            outcome = f"{r.epoch_s:.2f} s/epoch" if r.status == "pass" else r.error
            log.info("%s: %s %s", r.name, r.status, outcome)
            if args.out:
                write_markdown(args.out, runs, args, started)
    print()
    print(format_table(runs, device=args.device, markdown=False))
    if args.out:
        write_markdown(args.out, runs, args, started)
        log.info("written to %s", args.out)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's rl4diffusion, installed or not
    if len(sys.argv) > 2 and sys.argv[1] == "--child":  # gpu_smoke.py --child REPORT -- <train overrides>
        child_main(Path(sys.argv[2]), sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = main()
    sys.exit(0 if all(r.status == "pass" for r in runs) else 1)
