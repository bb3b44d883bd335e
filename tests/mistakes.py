"""Running many command-line cases cheaply, and checking that each is a clean user error.

``run_cases`` starts one Python process that imports torch once and runs every case in it, calling the
entry point's ``main(argv)`` with file descriptors 1 and 2 sent to a file of the case's own, so that every
byte a case prints (Hydra's, the logger's, a traceback) is checked. A case that must be alone in a process
(signals, resource limits) uses ``run_alone``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUNNER = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    import importlib
    jobs, out_dir = json.load(sys.stdin), sys.argv[1]
    codes = []
    saved = os.dup(1), os.dup(2)
    for i, (module, argv, cwd) in enumerate(jobs):
        main = importlib.import_module(module).main
        for fd, name in ((1, "out"), (2, "err")):
            handle = os.open(os.path.join(out_dir, f"{i}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(handle, fd)
            os.close(handle)
        sys.stdout = open(1, "w", closefd=False, buffering=1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        previous = os.getcwd()
        os.chdir(cwd)
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # an escape the entry point should have caught
            import traceback
            traceback.print_exc()
            code = f"raised {type(e).__name__}"
        finally:
            os.chdir(previous)
            sys.stdout.flush(); sys.stderr.flush()
        codes.append(code)
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    print("EXIT CODES " + json.dumps(codes))
""")

MODULES = {"train": "rl4diffusion.cli.train", "bench": "rl4diffusion.cli.bench",
           "make_pairs": "rl4diffusion.cli.make_pairs", "compare": "rl4diffusion.cli.compare"}


@dataclass
class Outcome:
    code: int | str
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def cli_env(extra_paths=(), **extra) -> dict:
    paths = [str(p) for p in extra_paths] + [str(ROOT)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            **extra}


def run_cases(jobs: list[tuple[str, list[str]]], work_dir: Path, *, cwd: Path | None = None, env: dict | None = None,
              timeout: float = 900) -> list[Outcome]:
    """Run ``jobs`` (``("train" | "bench" | "make_pairs", argv)``) in one process; one Outcome each."""
    work_dir.mkdir(parents=True, exist_ok=True)
    payload = [(MODULES[entry], list(argv), str(cwd or work_dir)) for entry, argv in jobs]
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(work_dir)], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=timeout, cwd=str(cwd or work_dir),
                          env=env or cli_env())
    assert "EXIT CODES" in proc.stdout, proc.stderr[-5000:]
    codes = json.loads(proc.stdout.split("EXIT CODES ")[-1])
    read = lambda i, name: (work_dir / f"{i}.{name}").read_text(errors="replace")  # noqa: E731
    return [Outcome(code, read(i, "out"), read(i, "err")) for i, code in enumerate(codes)]


def run_alone(entry: str, argv: list[str], *, cwd: Path, env: dict | None = None, timeout: float = 300,
              preexec_fn=None) -> Outcome:
    """One case in its own process (for signals and resource limits)."""
    proc = subprocess.run([sys.executable, "-m", MODULES[entry], *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd), env=env or cli_env(), preexec_fn=preexec_fn)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def tree_hash(path: Path) -> str:
    """A hash of every file under ``path`` (names and bytes): equal before and after means untouched."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() or p.is_symlink()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(os.readlink(file).encode() if file.is_symlink() else file.read_bytes())
    return digest.hexdigest()


def assert_user_error(outcome: Outcome, *fragments: str, code: int = 2) -> None:
    """Exit ``code`` (2: bad input), no traceback anywhere, and every fragment in the message."""
    assert outcome.code == code, f"exit {outcome.code}, expected {code}:\n{outcome.text[-3000:]}"
    assert "Traceback" not in outcome.text, outcome.text[-3000:]
    for fragment in fragments:
        assert fragment in outcome.err, f"{fragment!r} not in:\n{outcome.err[-3000:]}"
