"""User mistakes in the config, the arguments, the model, the prompt files and sweeps are user errors.

Every case of ``CASES`` runs through ``python -m rl4diffusion.train``'s ``main`` (all in one process, see
``tests.mistakes.run_cases``) and must end with exit code 2, one ``error:`` paragraph naming the offending key or
file, no traceback, no run directory left behind, and a finished run's directory byte-identical.
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import compose_config
from tests.mistakes import cli_env, run_cases, tree_hash

BASE = ["algo=ddpo", "reward=jpeg_compressibility", "prompts=[a red circle,a blue square]",
        "eval.prompt_sets=[[a red circle]]", "eval.samples_per_prompt=2", "eval.metrics=false", "epochs=1",
        "algo.batch_size=4", "algo.minibatch_size=4", "model.num_steps=2", "progress=false", "threads=1",
        "log_with=[]", "save_lora=false"]

# (family, overrides, fragment of the message). In overrides: {home} is $HOME of the cases, {files} the
# directory of the bad files below, {reference} the finished run. A case runs with hydra.run.dir=<its own
# directory> (hydra.sweep.dir for -m) unless it gives its own, or in Hydra's dated default under the cases'
# working directory when its overrides start with "default-dir".
CASES = [
    # types: the message says what the value must be
    ("types", ["algo.lr=abc"], "algo.lr must be a number (float)"),
    ("types", ["algo.lr="], "algo.lr must be a number (float)"),
    ("types", ["algo.batch_size=abc"], "algo.batch_size must be an integer"),
    ("types", ["algo.batch_size=[4,8]"], "algo.batch_size must be an integer"),
    ("types", ["algo.batch_size=2.5"], "algo.batch_size must be an integer"),
    ("types", ["model.dtype=float8"], "model.dtype must be one of float32, float16, bfloat16"),
    ("types", ["eval.samples_per_prompt=two"], "eval.samples_per_prompt must be an integer"),
    ("types", ["budget.train_seconds=soon"], "budget.train_seconds must be a number (float) or null"),
    ("types", ["checkpoint.every=1.5"], "checkpoint.every must be an integer"),
    ("types", ["progress=maybe"], "progress must be true or false"),
    ("types", ["epochs=[1,2]"], "epochs must be an integer"),
    # arguments: unknown keys list the valid ones; devices, resume, ~
    ("arguments", ["algo.lrr=1e-3"], "algo.lrr is not a key of DDPOConfig (algo). Valid keys: name, lr,"),
    ("arguments", ["model.guidance=3"], "Valid keys: pretrained, num_steps, guidance_scale"),
    ("arguments", ["eval.every_epochs=1"], "eval.every_epochs is not a key of EvalConfig"),
    ("arguments", ["budget.seconds=5"], "Valid keys: reward_queries, train_seconds"),
    ("arguments", ["checkpoint.keep=3"], "Valid keys: every, keep_last"),
    ("arguments", ["epoch=3"], "epoch is not a key of TrainConfig (the training config). Valid keys:"),
    ("arguments", ["+reward.strength=1"], "takes no options, got ['strength']"),
    ("arguments", ["device=cuda:abc"], "device must be auto, cpu, cuda or cuda:N"),
    ("arguments", ["device=gpu0"], "device must be auto, cpu, cuda or cuda:N"),
    ("arguments", ["resume="], "resume= is empty"),
    ("arguments", ["resume=~/no_such_run"], "{home}/no_such_run"),
    ("arguments", ["hydra.run.dir=~/reference"], "{home}/reference already holds a run"),
    # meaning: values of the right type that would break the run
    ("meaning", ["model.guidance_scale=nan"], "model.guidance_scale"),
    ("meaning", ["model.guidance_scale=inf"], "model.guidance_scale (the classifier-free guidance weight) must be "
                                              "a finite number"),
    ("meaning", ["model.eta=0"], "algo=ddpo needs the log-probability of each sampled step, but model.eta=0"),
    ("meaning", ["algo=grpo", "model.eta=0"], "algo=grpo needs the log-probability"),
    ("meaning", ["model.eta=7"], "model.eta (DDIM's η) must be in [0, 1]"),
    ("meaning", ["model.noise_level=nan"], "model.noise_level"),
    ("meaning", ["model.height=7"], "model.height=7 is a size this model cannot generate"),
    ("meaning", ["model.width=20"], "model.width=20 is a size this model cannot generate: its VAE and denoiser "
                                    "take multiples of 8"),
    ("meaning", ["model.height=0"], "model.height (the image height in pixels) must be a number ≥ 1"),
    ("meaning", ["algo.lr=nan"], "algo.lr (a learning rate) must be a finite number > 0, got nan"),
    ("meaning", ["algo.lr=inf"], "algo.lr (a learning rate) must be a finite number > 0, got inf"),
    ("meaning", ["algo.lr=0"], "algo.lr (a learning rate) must be a finite number > 0"),
    ("meaning", ["budget.train_seconds=nan"], "budget.train_seconds (the training wall-clock budget) must be"),
    ("meaning", ["budget.train_cpu_seconds=-1"], "budget.train_cpu_seconds"),
    ("meaning", ["prompts=['']"], "prompts: a prompt list holds an empty prompt (position 0 of 1)"),
    ("meaning", ["prompts=[a red circle,'  ']"], "prompts: a prompt list holds an empty prompt (position 1 of 2)"),
    ("meaning", ["eval.prompt_sets=[]"], "eval.prompt_sets=[] evaluates nothing"),
    ("meaning", ["eval.prompt_sets="], "to train without any evaluation, say so with eval.prompt_sets=null"),
    ("meaning", ["eval.prompt_sets=[[a red circle,'']]"], "eval.prompt_sets: a prompt list holds an empty prompt"),
    ("meaning", ["reward=weighted", "reward.terms.colorfulness=nan"], "reward.terms.colorfulness=nan"),
    ("meaning", ["reward=weighted", "reward.terms.colorfulness=abc"], "reward.terms.colorfulness='abc'"),
    ("meaning", ["algo=refl", "reward=user_rewards:brightness"], "+reward.differentiable=true"),
    ("meaning", ["resume={reference}", "model.eta=7"], "model.eta"),
    # models: read before any weight loads
    ("models", ["model=path:{files}/ddpm"], "{files}/ddpm/model_index.json describes a DDPMPipeline"),
    ("models", ["model=path:{files}/malformed"], "{files}/malformed/model_index.json is not valid JSON"),
    ("models", ["model=path:{files}/listed"], "{files}/listed/model_index.json holds a JSON list"),
    ("models", ["model=path:{files}/a_file"], "{files}/a_file' is a file, not a pipeline directory"),
    # prompt files
    ("prompt files", ["prompts={files}/binary.txt"], "prompt file '{files}/binary.txt' is not UTF-8 text"),
    ("prompt files", ["prompts={files}/latin1.txt"], "prompt file '{files}/latin1.txt' is not UTF-8 text"),
    ("prompt files", ["prompts={files}/empty.txt"], "prompt file '{files}/empty.txt' holds no prompt"),
    ("prompt files", ["prompts={files}/blank.txt"], "prompt file '{files}/blank.txt' holds no prompt"),
    ("prompt files", ["eval.prompt_sets=[{files}/latin1.txt]"], "'{files}/latin1.txt' is not UTF-8"),
    # sweeps: every job checked before job 0 starts
    ("sweeps", ["-m", "seed=0,1", "epochs=1,0"], "the sweep's job with seed=0 epochs=0 is refused"),
    ("sweeps", ["-m", "algo.lr=1e-4,abc"], "job with algo.lr=abc is refused, so no job was started"),
    ("sweeps", ["-m", "model.eta=1,0"], "job with model.eta=0 is refused"),
    ("sweeps", ["-m", "model.height=32,7"], "model.height=7 is a size"),
    ("sweeps", ["-m", "algo.batch_size=4,2.5"], "algo.batch_size must be an integer"),
    ("sweeps", ["-m", "prompts={files}/good.txt,{files}/latin1.txt"], "'{files}/latin1.txt' is not UTF-8"),
    # Hydra's dated default directory: refused before it exists, or removed after a refusal inside the run
    ("default dir", ["default-dir", "model.height=7"], "model.height=7"),
    ("default dir", ["default-dir", "algo=refl", "reward=user_rewards:brightness"], "+reward.differentiable=true"),
    ("default dir", ["default-dir", "+reward.strength=1"], "takes no options"),
]


def _bad_files(files):
    files.mkdir()
    (files / "good.txt").write_text("a red circle\n")
    (files / "binary.txt").write_bytes(b"\xff\xfe\x00\x01binary\x00\n")
    (files / "latin1.txt").write_bytes("caf\xe9 rouge\n".encode("latin-1"))
    (files / "empty.txt").write_text("")
    (files / "blank.txt").write_text("\n   \n\t\n")
    (files / "a_file").write_text("not a pipeline")
    for name, index in [("ddpm", '{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], '
                                 '"scheduler": ["diffusers", "DDPMScheduler"]}'),
                        ("malformed", '{"_class_name": "StableDiffusionPipeline", "unet": ['),
                        ("listed", "[]")]:
        (files / name).mkdir()
        (files / name / "model_index.json").write_text(index)
    (files / "user_rewards.py").write_text("def brightness(images, prompts):\n"
                                           "    return images.mean(dim=(1, 2, 3))\n")


@pytest.fixture(scope="module")
def reference(random_pipeline_dir, tmp_path_factory):
    """A finished tiny run at <home>/reference, which no case may change."""
    from rl4diffusion.training.trainer import run

    home = tmp_path_factory.mktemp("home")
    run_dir = home / "reference"
    summary = run(compose_config([f"model=path:{random_pipeline_dir}", *BASE]), run_dir)
    assert summary and (run_dir / "summary.json").is_file()
    return run_dir


def test_user_mistakes_are_user_errors(reference, random_pipeline_dir, tmp_path):
    home, files, cwd = reference.parent, tmp_path / "files", tmp_path / "cwd"
    _bad_files(files)
    cwd.mkdir()
    before = tree_hash(reference)
    places = {"{home}": str(home), "{files}": str(files), "{reference}": str(reference)}

    def fill(text: str) -> str:
        for place, path in places.items():
            text = text.replace(place, path)
        return text

    jobs, case_dirs = [], []
    for i, (_, overrides, _) in enumerate(CASES):
        argv = [f"model=path:{random_pipeline_dir}", *BASE, *map(fill, overrides)]
        if "default-dir" in argv:
            argv.remove("default-dir")
            case_dirs.append(None)
        elif any(o.startswith("hydra.run.dir=") for o in overrides):  # its own: the reference
            case_dirs.append(None)
        else:
            case_dirs.append(tmp_path / "dirs" / f"case{i}")
            kind = "sweep" if "-m" in argv else "run"
            argv.append(f"hydra.{kind}.dir={case_dirs[-1]}")
        jobs.append(("train", argv))
    # the refusal's advice works: +reward.differentiable=true lets algo=refl train on the same plain function
    declared = tmp_path / "declared"
    jobs.append(("train", [f"model=path:{random_pipeline_dir}", *BASE, "algo=refl", "reward=user_rewards:brightness",
                           "+reward.differentiable=true", "algo.batch_size=2", "algo.minibatch_size=2",
                           f"hydra.run.dir={declared}"]))
    env = cli_env([files], HOME=str(home))
    *outcomes, declared_outcome = run_cases(jobs, tmp_path / "out", cwd=cwd, env=env)

    for (family, overrides, fragment), outcome, case_dir in zip(CASES, outcomes, case_dirs):
        case = f"[{family}] {' '.join(overrides)}"
        assert outcome.code == 2, f"{case}: exit {outcome.code}\n{outcome.text[-3000:]}"
        assert "Traceback" not in outcome.text, f"{case}: a traceback\n{outcome.text[-3000:]}"
        errors = [line for line in outcome.err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, f"{case}: not one error paragraph:\n{outcome.err[-3000:]}"
        assert fill(fragment) in errors[0], f"{case}: {fill(fragment)!r} not in\n{errors[0]}"
        assert case_dir is None or not case_dir.exists(), f"{case}: left {sorted(case_dir.rglob('*'))}"
    assert not (cwd / "runs").exists(), f"the default-dir cases left {sorted((cwd / 'runs').rglob('*'))}"
    assert sorted(p.name for p in home.iterdir()) == ["reference"], "a case wrote into $HOME"
    assert tree_hash(reference) == before, "a case changed the finished run"
    assert declared_outcome.code == 0, declared_outcome.text[-3000:]
    assert json.loads((declared / "run_state.json").read_text())["state"] == "finished"
    assert len(CASES) >= 40 and {c[0] for c in CASES} >= {"types", "meaning", "models", "prompt files", "sweeps",
                                                          "arguments"}


def test_ctrl_c_during_start_up_prints_one_line_and_leaves_no_directory(random_pipeline_dir, tmp_path):
    """SIGINT while the run is starting (here: importing the reward's module, inside Hydra's dated directory)
    exits 3 with one line and no traceback, and removes the directory the start created."""
    files = tmp_path / "files"
    files.mkdir()
    started = tmp_path / "started"
    (files / "slow_rewards.py").write_text(
        f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(120)\n"
        "def score(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    argv = [f"model=path:{random_pipeline_dir}", *BASE, "reward=slow_rewards:score"]
    proc = subprocess.Popen([sys.executable, "-m", "rl4diffusion.train", *argv], cwd=tmp_path, env=cli_env([files]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert started.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert "interrupted" in err and len([line for line in err.splitlines() if "interrupted" in line]) == 1, err
    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))
