"""The README runs as written: its Python snippets in order, and every command in it (the docs cannot rot).

Every command the README shows — in a ``bash`` block or inline — is listed below with how it is tested:

- ``RUN_TRAIN``: run through ``python -m rl4diffusion.train``'s own ``main`` with the README's arguments,
  plus ``SHRINK`` appended (one epoch of two denoising steps, base and final evaluation only), so the
  command's names, options, user modules and Hydra sweeps are exercised for real in seconds;
- the few other commands that run offline in seconds are run as written (``test_readme_commands_run``);
- ``CHECKED``: commands that run for hours; their configuration is composed and validated, not run;
- ``COVERED``: run in another form by the named test;
- ``EXEMPT``: need real model weights, a GPU, or minutes to hours, or write the shipped files; each
  with its reason.

A command added to the README without an entry here fails ``test_every_readme_command_is_tested``.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[str]:
    """Every command of the README, whitespace-normalised: each line of a ``bash`` block (continuations
    joined, comments dropped) and each inline span that is a command (``python …``, ``torchrun …``,
    ``accelerate launch …``) or a list of training overrides (``reward=weighted '…'``)."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = "" if line.lstrip().startswith("#") else re.sub(r"\s+#.*$", "", line)
            if line.strip():
                commands.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        is_command = re.match(r"(python3? |torchrun |accelerate launch |PYTHONPATH=\S+ )", span)
        if is_command or re.match(r"[a-z_.]+=\S+ \S", span):
            commands.append(span)
    return commands


TRAIN = "python -m rl4diffusion.train"
SHRINK = ["epochs=1", "model.num_steps=2", "prompts=[a red circle,a blue square]", "eval.prompt_sets=[train]",
          "eval.samples_per_prompt=1", "eval.every=0", "eval.metrics=false", "threads=1", "progress=false",
          "log_with=[]", "save_lora=false"]
RUN_TRAIN = {  # command → the number of runs it makes (a -m sweep makes several)
    TRAIN: 1,
    f"{TRAIN} algo=ddpo reward=jpeg_compressibility epochs=20": 1,
    f"{TRAIN} algo=ddpo algo.lr=1e-3 model.guidance_scale=3": 1,
    f"{TRAIN} algo=ddpo reward=my_pkg.my_rewards:sharpness": 1,  # my_pkg/my_rewards.py written by the test
    f"{TRAIN} model=path:/models/my-sd15-pipeline": 1,  # the path replaced by the test's random tiny pipeline
    f"{TRAIN} -m algo=ddpo seed=0,1,2": 3,
    f"{TRAIN} algo=ddpo optim.ema_decay=0.99 optim.lr_warmup_steps=10 optim.lr_schedule=cosine "
    "optim.grad_accumulation=2 model.negative_prompt=blurry eval.num_steps=40 eval.guidance_scale=4": 1,
    # my_algos/rank.py and my_algos/conf/algo/rank_ddpo.yaml are the README's blocks, written by the test
    f"{TRAIN} algo=my_algos.rank:RankDDPO 'hydra.searchpath=[pkg://my_algos.conf]'": 1,
    f"{TRAIN} algo=my_algos.rank:RankDDPO algo.rank_scale=0.5": 1,
    f"{TRAIN} -m 'algo=my_algos.rank:RankDDPO,ddpo' 'hydra.searchpath=[pkg://my_algos.conf]' seed=0,1": 4,
    f"{TRAIN} reward=shape_alignment": 1,
    f"{TRAIN} reward=shape_alignment_prob": 1,
    f"{TRAIN} reward=colorfulness": 1,
    f"{TRAIN} algo=ddpo reward=jpeg_compressibility": 1,
    f"{TRAIN} algo=my_pkg.rwr:RWR": 1,  # my_pkg/rwr.py is the README's block, written by the test
    # lists of overrides shown inline, run as `python -m rl4diffusion.train <overrides>`
    "reward=weighted 'reward.terms={shape_alignment: 1.0, colorfulness: 0.1}'": 1,
    "reward=weighted 'reward.terms={shape_alignment: 1.0, colorfulness: 0.05}'": 1,
    "reward=shape_alignment model=tiny": 1,
}
MAKE_PAIRS = "python -m rl4diffusion.make_pairs model=tiny reward=shape_alignment n=512 out=pairs.parquet"
REPORT = "python benchmarks/report.py benchmarks/results/shapes"
EQUAL_REWARD = ("PYTHONPATH=. python benchmarks/equal_reward.py benchmarks/results/shapes_queries "
                "--others refl draft ddpo")
TUNED_DEFAULTS = ("PYTHONPATH=. python benchmarks/tuned_defaults.py shapes_4k "
                  "--out benchmarks/results/tuning/shapes_4k/defaults.md")
REWARD_SHAPE = ("PYTHONPATH=. python benchmarks/reward_shape.py "
                "--out benchmarks/results/shapes_4k_bounded/reward_shape.md")
RUN_OTHER = {
    MAKE_PAIRS: "with n=4 model.num_steps=2 appended, in a temporary directory",
    REPORT: "on a copy of benchmarks/results/shapes (it rewrites report.md); it must equal the committed one",
    EQUAL_REWARD: "as written (it only reads)",
    TUNED_DEFAULTS: "writing to a temporary file, which must equal the committed defaults.md",
    REWARD_SHAPE: "writing to a temporary file, which must equal the committed reward_shape.md",
}
CHECKED = {  # command → why it is not run: its suite is composed and every run's training config validated
    "python -m rl4diffusion.bench suite=shapes seeds=3": "12 algorithms × 3 seeds × 180 CPU-s: hours",
    'python -m rl4diffusion.bench suite=shapes "algos=[ddpo,nabla_gfn]" seeds=1': "2 runs of 180 CPU-s and "
    "their evaluations",
    "python -m rl4diffusion.bench suite=shapes_queries": "4 algorithms × 3 seeds, 1,536 queries each: hours",
    "python -m rl4diffusion.bench suite=shapes_4k stage=tune": "15 methods × 6 trials: days of CPU",
    "python -m rl4diffusion.bench suite=shapes_4k": "15 methods × 5 seeds × 4,096 queries: days of CPU",
    "python -m rl4diffusion.bench suite=shapes_4k stage=baselines": "4 guidance scales, then 2 baselines × 5 seeds",
    "python -m rl4diffusion.bench suite=shapes_4k_bounded": "8 methods × 3 seeds × 4,096 queries: days of CPU",
    "python -m rl4diffusion.bench suite=flow stage=tune": "8 methods × 6 trials on the flow model: a day of CPU",
    "python -m rl4diffusion.bench suite=flow": "8 methods × 5 seeds × 4,096 queries on the flow model: days of CPU",
}
COVERED = {
    f"{TRAIN} model=tiny_flow algo=grpo":
        "tests/test_tiny_flow.py::test_tiny_flow_trains_with_grpo_and_refuses_algorithms_that_need_ddim",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m rl4diffusion.train":
        ".ci/run installs the same way; `python -m rl4diffusion.train` is in RUN_TRAIN",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && python -m pytest':
        "test_readme_opens_with_two_self_contained_commands: .ci/run runs it",
    "torchrun --nproc_per_node 2 -m rl4diffusion.train algo=ddpo":
        "tests/test_distributed.py::test_two_processes_match_one_process_with_the_same_global_batch",
    "python -m rl4diffusion.train <same overrides> resume=<run dir>":
        "tests/test_resume.py::test_sigkill_then_resume_reproduces_the_uninterrupted_metrics",
    # compare: run on a real two-algorithm, three-seed sweep and on the committed shapes runs
    "python -m rl4diffusion.compare": "tests/test_compare.py (every test of the command line)",
    "python -m rl4diffusion.compare runs/multirun":
        "tests/test_compare.py::test_runs_of_two_algorithms_give_one_row_each_beside_the_runs",
    "python -m rl4diffusion.compare runs/multirun/2026-01-01_12-00-00":
        "tests/test_compare.py::test_runs_of_two_algorithms_give_one_row_each_beside_the_runs",
    "python -m rl4diffusion.compare benchmarks/results/shapes/runs out=shapes_compare":
        "tests/test_compare.py::test_a_bench_suites_runs_compare_like_its_report (out= a temporary directory)",
}
EXEMPT = {
    "accelerate launch --multi_gpu --num_processes 8 -m rl4diffusion.train model=sd15 reward=aesthetic":
        "8 GPUs and the SD1.5 and aesthetic weights",
    "accelerate launch --multi_gpu --num_machines 2 --machine_rank $RANK --main_process_ip $MASTER "
    "--main_process_port 29500 --num_processes 16 -m rl4diffusion.train model=sd15":
        "two GPU nodes and SD1.5",
    "accelerate launch --config_file fsdp.yaml -m rl4diffusion.train model.train_mode=full …":
        "FSDP/DeepSpeed need GPUs and the user's accelerate config file",
    f"{TRAIN} model=sd15 reward=aesthetic":
        "SD1.5 and aesthetic-predictor weights (the missing-weights message is tested in tests/test_cli.py)",
    f"{TRAIN} model=sd15 reward=pickscore": "SD1.5 and PickScore weights",
    f"{TRAIN} model=sd15 reward=clip_score": "SD1.5 and open_clip weights",
    f"{TRAIN} model=sd15 reward=hpsv2": "SD1.5, the hpsv2 package and its checkpoint",
    "python -m rl4diffusion.zoo.train_tiny": "~35 min, and it rewrites the shipped weights in zoo/weights",
    "python -m rl4diffusion.zoo.train_tiny_flow": "~10–20 min, and it rewrites the shipped weights in zoo/weights",
    "python -m rl4diffusion.zoo.train_judge": "~3 min, and it rewrites the shipped judge in zoo/weights",
    "python -m rl4diffusion.zoo.train_evaluator": "~5 min, and it rewrites the shipped evaluator in zoo/weights",
    "python benchmarks/embedded_world.py": "minutes of sampling; it rewrites its results/embedded_world.md",
    "python benchmarks/throughput.py": "times every algorithm in subprocesses (minutes); rewrites "
    "benchmarks/results/throughput.md",
    "PYTHONPATH=. python benchmarks/preference_winrate.py --jobs 2": "~45 min of training and sampling",
}


def test_readme_snippets_execute():
    blocks = python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_opens_with_two_self_contained_commands():
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[:2]
    assert "pip install -e ." in commands[0] and "rl4diffusion.train" in commands[0]
    assert 'pip install -e ".[dev]"' in commands[1] and "pytest" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci and "python -m pytest" in ci


def test_every_readme_command_is_tested():
    listed = {**RUN_TRAIN, **RUN_OTHER, **CHECKED, **COVERED, **EXEMPT}
    tables = (RUN_TRAIN, RUN_OTHER, CHECKED, COVERED, EXEMPT)
    assert len(listed) == sum(map(len, tables)), "a command is listed twice"
    found = set(readme_commands())
    unlisted, stale = sorted(found - set(listed)), sorted(set(listed) - found)
    assert not unlisted, (f"README command(s) that no test runs: {unlisted}. Add each to RUN_TRAIN (a "
                          "training command), RUN_OTHER, CHECKED, COVERED or EXEMPT in tests/test_docs.py, "
                          "with its reason.")
    assert not stale, f"tests/test_docs.py lists command(s) the README no longer shows: {stale}; remove them."
    for command, reason in {**EXEMPT, **COVERED, **CHECKED}.items():
        assert reason.strip(), f"{command!r} needs its reason"


def test_every_top_level_document_cited_exists():
    """A document named in capitals, such as README.md, in the README, the package, the benchmarks or the
    tests must be in the repository root (the generated reports in benchmarks/results/ are lower-case)."""
    sources = [README, *ROOT.glob("rl4diffusion/**/*.py"), *ROOT.glob("benchmarks/*.py"),
               *ROOT.glob("tests/*.py")]
    missing = {(name, str(path.relative_to(ROOT))) for path in sources
               for name in re.findall(r"\b[A-Z][A-Z_]*\.md\b", path.read_text())
               if not (ROOT / name).exists()}
    assert not missing, f"cited documents that are not in the repository: {sorted(missing)}"


def test_the_readme_quotes_each_claims_table_verbatim():
    """A verdict the README states is the report's: each block quoted from a suite's claims.md is that file's
    verdict table, line for line (regenerate the report, then copy its table here)."""
    quotes = re.findall(r"<!-- quoted from (\S+) -->\n(.*?)<!-- end of quote -->", README.read_text(), flags=re.S)
    assert quotes, "the README quotes no claims.md"
    for path, block in quotes:
        claims = (ROOT / path).read_text().split("## Evidence")[0]
        table = [line for line in claims.splitlines() if line.startswith("|")]
        assert block.strip().splitlines() == table, f"the README's quote of {path} differs from the file: copy it again"


def test_the_readme_lists_every_tensordict_key():
    from rl4diffusion import keys

    section = README.read_text().split("**TensorDict keys**")[1].split("\n**")[0]
    declared = {v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str) and v != keys.NEXT}
    missing = sorted(v for v in declared if f'"{v}"' not in section)
    assert not missing, f"keys of rl4diffusion/keys.py missing from the README's TensorDict keys: {missing}"


def _block_with(marker: str, language: str = "python") -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)
    blocks = [b for b in blocks if marker in b]
    assert len(blocks) == 1, f"the README should have one {language} block with {marker!r}"
    return blocks[0]


def _write_user_packages(root: Path) -> None:
    """The user code the README's commands import: its own blocks as files, and a reward of ours."""
    files = {
        "my_algos/__init__.py": "",
        "my_algos/rank.py": _block_with("class RankDDPO("),
        "my_algos/conf/__init__.py": "",
        "my_algos/conf/algo/rank_ddpo.yaml": _block_with("rank_ddpo_schema", "yaml"),
        "my_pkg/__init__.py": "",
        "my_pkg/rwr.py": _block_with("class RWR("),
        "my_pkg/my_rewards.py": textwrap.dedent('''
            def sharpness(images, prompts):
                """Mean absolute difference of horizontally adjacent pixels."""
                return (images[..., 1:] - images[..., :-1]).abs().mean(dim=(1, 2, 3))
        '''),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


RUNNER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from rl4diffusion.cli import make_pairs, train
    codes = []
    for entry, argv in json.load(sys.stdin):
        try:
            {"train": train.main, "make_pairs": make_pairs.main}[entry](argv)
            codes.append(0)
        except SystemExit as e:
            codes.append(e.code)
    print("EXIT CODES " + json.dumps(codes))
""")


def test_readme_commands_run(random_pipeline_dir, tmp_path):
    """Every command of RUN_TRAIN and RUN_OTHER, in one fresh process (user modules register once)."""
    _write_user_packages(tmp_path)
    jobs, run_dirs = [], []
    for i, command in enumerate(RUN_TRAIN):
        args = shlex.split(command.replace("/models/my-sd15-pipeline", random_pipeline_dir))
        args = args[3:] if command.startswith(TRAIN) else args
        run_dirs.append(tmp_path / "runs" / str(i))
        hydra_dirs = [f"hydra.run.dir={run_dirs[-1]}", f"hydra.sweep.dir={run_dirs[-1]}"]
        jobs.append(("train", [*args, *SHRINK, *hydra_dirs]))
    jobs.append(("make_pairs", [*shlex.split(MAKE_PAIRS)[3:], "n=4", "model.num_steps=2"]))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(jobs), capture_output=True,
                          text=True, timeout=900, cwd=tmp_path, env=env)
    assert "EXIT CODES" in proc.stdout, proc.stderr[-5000:]
    codes = json.loads(proc.stdout.split("EXIT CODES ")[-1])
    failed = [(command, code) for command, code in zip([*RUN_TRAIN, MAKE_PAIRS], codes) if code != 0]
    assert not failed, f"{failed}\n{proc.stderr[-5000:]}"
    for (command, runs), run_dir in zip(RUN_TRAIN.items(), run_dirs):
        assert len(list(run_dir.rglob("summary.json"))) == runs, command
    import pyarrow.parquet as pq

    assert pq.read_table(str(tmp_path / "pairs.parquet")).num_rows == 4

    # the benchmark scripts, from the repository root as the README says
    shutil.copytree(ROOT / "benchmarks" / "results" / "shapes", tmp_path / "shapes",
                    ignore=shutil.ignore_patterns("runs", "*.png"))
    (tmp_path / "shapes" / "report.md").unlink()
    defaults_md = "benchmarks/results/tuning/shapes_4k/defaults.md"
    reward_shape_md = "benchmarks/results/shapes_4k_bounded/reward_shape.md"
    for command in (REPORT.replace("benchmarks/results/shapes", str(tmp_path / "shapes")), EQUAL_REWARD,
                    TUNED_DEFAULTS.replace(defaults_md, str(tmp_path / "defaults.md")),
                    REWARD_SHAPE.replace(reward_shape_md, str(tmp_path / "reward_shape.md"))):
        argv = shlex.split(command)
        extra = dict(a.split("=", 1) for a in argv if re.match(r"[A-Z_]+=", a))
        argv = [sys.executable if a == "python" else a for a in argv if not re.match(r"[A-Z_]+=", a)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **extra})
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
    committed = (ROOT / "benchmarks" / "results" / "shapes" / "report.md").read_text()
    assert (tmp_path / "shapes" / "report.md").read_text() == committed
    assert (tmp_path / "defaults.md").read_text() == (ROOT / defaults_md).read_text(), \
        f"{defaults_md} is not what tuned_defaults.py writes from the committed results: run the README's command"
    assert (tmp_path / "reward_shape.md").read_text() == (ROOT / reward_shape_md).read_text(), \
        f"{reward_shape_md} is not what reward_shape.py writes from the committed results: run the README's command"


@pytest.mark.parametrize("command", sorted(CHECKED))
def test_hour_long_bench_commands_compose_and_their_runs_validate(command, tmp_path):
    from hydra import compose, initialize_config_dir

    from rl4diffusion.cli.bench import BASELINE_ALGO, CONF_DIR, grid_settings, guidance_setting, run_overrides
    from rl4diffusion.cli.overrides import check_config, rewrite_overrides

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=shlex.split(command)[3:])
    tuning = cfg.stage == "tune"
    for algo in cfg.algos or cfg.suite.algos:  # every trial of a tuning stage
        for setting in grid_settings(cfg.suite, algo) if tuning else [[]]:
            check_config(rewrite_overrides(run_overrides(cfg.suite, algo, 0, tmp_path / algo, setting=setting,
                                                         tuning=tuning)))
    if cfg.stage == "baselines":
        for g in cfg.suite.baselines.guidance:
            check_config(rewrite_overrides(run_overrides(cfg.suite, BASELINE_ALGO, 0, tmp_path / "base",
                                                         setting=guidance_setting(g), tuning=True)))
