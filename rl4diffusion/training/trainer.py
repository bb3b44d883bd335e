"""The training loop behind ``python -m rl4diffusion.train``: build the primitives, collect → update, evaluate, checkpoint.

Examples::

    python -m rl4diffusion.train                                   # defaults: the embedded world
    python -m rl4diffusion.train algo=ddpo reward=jpeg_compressibility epochs=20
    python -m rl4diffusion.train reward=my_pkg.my_rewards:sharpness model=path:/models/sd15
    python -m rl4diffusion.train -m algo=ddpo,nabla_gfn seed=0,1    # a Hydra sweep

Every field of the config is overridable. Exit codes of the command line: 0 finished, 2 bad input
(one paragraph, nothing already written touched), 1 a failure, 3 interrupted and checkpointed
(resume it); ``<run>/run_state.json`` records the same (``rundir.py``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rl4diffusion import keys
from rl4diffusion.errors import ConfigError
from rl4diffusion.rewards.registry import in_reward_call
from rl4diffusion.training import rundir
from rl4diffusion.training.checkpoint import latest_checkpoint, remove_stale_files
from rl4diffusion.training.runlog import eval_line, final_line


class TrainingAborted(Exception):
    """Training stopped on purpose (too many non-finite updates); the message says why."""


class WriteFailed(TrainingAborted):
    """A write to the run directory failed for good (a full disk, a file-size limit, a read-only or failing
    disk); the message names the last good checkpoint."""


log = logging.getLogger("rl4diffusion.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_threads(setting: int | str) -> int:
    """Torch CPU threads for ``threads=``: ``auto`` → ``$OMP_NUM_THREADS`` when set, else half the cores this
    process may use (at least one), so that two runs sharing a machine do not oversubscribe it; ``N`` → N;
    0 → torch's default (every core: returned as 0, nothing to set)."""
    if setting != "auto":
        return int(setting)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // 2)


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> rundir.RunDir:
    """Open the directory this run writes to (a fresh one, or the run being resumed) without losing anything.

    1. Read-only checks: a new run refuses a directory that holds a run; a resume refuses another config or
       evaluation protocol.
    2. The lock (main process only; ``rundir.py``): a second run on the directory is refused, naming the pid.
    3. Under the lock: the checks of 1 again (another run may have ended in between), the newest valid
       checkpoint of a resume (none is refused unless ``resume_restart=true``), stale temporary files removed,
       and ``run_state.json`` says "running".
    """
    main = rundir.is_main_process()
    resumed = Path(str(cfg.resume)).expanduser().absolute() if cfg.resume else None
    path = resumed or Path(run_dir)

    def check() -> None:
        if resumed:
            rundir.check_resume_config(cfg, path)
        else:
            rundir.refuse_used_dir(path)

    check()  # before the lock too: a refused run leaves the directory untouched
    lock = rundir.lock_run_dir(path) if main else None
    try:
        check()
        checkpoint = latest_checkpoint(path) if resumed else None
        if resumed and checkpoint is None:
            if not cfg.resume_restart:
                raise ConfigError(f"resume={resumed}: it holds no valid checkpoint to continue from (see "
                                  "the warnings above for the ones skipped). Nothing was changed. To start "
                                  "the run over in the same directory add resume_restart=true (what it holds "
                                  "is moved to before_restart_<time>/), or start a new run.")
            if main:
                aside = rundir.set_aside(path)
                log.warning("resume_restart=true: %s holds no valid checkpoint; starting it over%s", path,
                            f" (its previous files are in {aside})" if aside else "")
        if main:
            removed = remove_stale_files(path)
            if removed:
                log.info("removed what a killed checkpoint left behind: %s", ", ".join(removed))
        opened = rundir.RunDir(path, checkpoint, lock)
        opened.record("running", epoch=int(checkpoint.name[5:]) if checkpoint else 0)
        return opened
    except BaseException:
        if lock is not None:
            rundir.unlock_run_dir(path)
        raise


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run may have logged more).

    A last line cut short (a kill or a full disk in the middle of a write) is dropped with a warning; a
    broken line before it is not a torn write, and is refused rather than dropped.
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ConfigError(f"{path}: line {number} is not JSON ({line[:60]!r}…) and is not the last "
                                  "one, so it is not a torn write. Repair or remove that line, then "
                                  "resume.") from None
            log.warning("%s: dropping its last line, cut short by a kill or a full disk: %r", path, line[:60])
            continue
        if record["step"] <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish the current update, checkpoint and exit cleanly.

    A signal that arrives while a reward is scoring (``rewards.registry.in_reward_call``) stops at once with
    KeyboardInterrupt instead: a reward that hangs would otherwise keep the run alive forever. The run then
    exits 3, and a resume continues from the last checkpoint.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested or in_reward_call():  # a second signal, or one inside a reward call: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: finishing the current update, then checkpointing", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)



def build_accelerator(cfg: DictConfig, run_dir: Path):
    """The run's Accelerator: devices, processes, mixed precision and trackers all come from it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    if not AcceleratorState._shared_state.get("distributed_type") or AcceleratorState().num_processes == 1:
        # several runs in one process (tests, the bench) may each ask for another precision or device
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    device = resolve_device(str(cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but this machine has no CUDA device (torch sees none); use "
                          "device=cpu or device=auto.")
    precision = str(cfg.get("mixed_precision", "no"))
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("mixed_precision=fp16 needs a GPU (fp16 autocast with gradient scaling is CUDA's); on a "
                          "CPU use mixed_precision=bf16 or no.")
    trackers = list(cfg.get("log_with") or [])
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision, log_with=trackers or None,
                       project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)))


class Trainer:
    """One training run: ``build`` the primitives, ``fit`` (collect → update), ``evaluate``, ``checkpoint``.

    The trainer owns the optimisation step (``training/optimisation.py``) and accelerate; the algorithm
    owns its data and loss terms. It never names an algorithm.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        # loop state, restored from the checkpoint when resuming (merged over these defaults)
        self.loop = {"epoch": 0, "base": None, "last_eval": None, "last_eval_step": -1, "eval_queries": 0,
                     "eval_seconds": 0.0, "skipped": 0, "wall_before": 0.0, "cpu_before": 0.0,
                     "eval_cpu_seconds": 0.0, "query_evals": 0}
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.opened: rundir.RunDir | None = None  # the run directory, locked, once build has checked it

    # ---------------------------------------------------------------- build
    def build(self) -> None:
        """Reward, prompts, policy, algorithm, environment and accelerate, cheapest checks first."""
        from rl4diffusion.training.config import validate_train_config

        cfg = self.cfg
        validate_train_config(cfg)
        from rl4diffusion.policies.base import check_pretrained_available

        check_pretrained_available(str(cfg.model.pretrained))  # absent weights fail in seconds
        from rl4diffusion.rewards import build_reward
        from rl4diffusion.training.runlog import quiet_libraries

        threads = resolve_threads(cfg.threads)
        if threads:
            torch.set_num_threads(threads)
        quiet_libraries(progress=bool(cfg.progress))  # other libraries' INFO lines and, without progress, their bars
        from rl4diffusion.data.prompts import default_eval_sets

        prompts_spec = OmegaConf.to_container(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else cfg.prompts
        if cfg.eval.prompt_sets == "auto":  # resolved first: config.yaml records the sets, and a resume compares them
            cfg.eval.prompt_sets = default_eval_sets(prompts_spec)
        self.opened = prepare_run_dir(cfg, self.run_dir)
        self.run_dir = self.opened.path
        self.accelerator = build_accelerator(cfg, self.run_dir)
        from rl4diffusion.training.distributed import Distributed

        self.dist = Distributed(self.accelerator)
        device = self.dist.device
        reward_options = OmegaConf.to_container(cfg.reward, resolve=True)
        self.reward = build_reward(reward_options.pop("name"), device=device, **reward_options)

        from rl4diffusion.algorithms import algorithm_classes, build_algorithm
        from rl4diffusion.algorithms.base import build_config, check_reward_compatible
        from rl4diffusion.data.prompts import named_prompt_sets, resolve_prompts
        from rl4diffusion.envs import DenoisingEnv
        from rl4diffusion.policies.base import DiffusionPolicy, PolicyConfig
        from rl4diffusion.training.optimisation import check_grad_accumulation
        from rl4diffusion.training.runlog import RunLogger

        torch.manual_seed(cfg.seed)
        model_options = OmegaConf.to_container(cfg.model, resolve=True)
        unknown = sorted(set(model_options) - set(PolicyConfig.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown model option(s): {', '.join(unknown)}. "
                              f"Valid: {', '.join(PolicyConfig.__dataclass_fields__)}.")
        algo_options = OmegaConf.to_container(cfg.algo, resolve=True)
        self.algo_name = algo_options.pop("name")
        algo_cls, config_cls = algorithm_classes(self.algo_name)
        check_reward_compatible(algo_cls, self.reward)
        check_grad_accumulation(algo_cls, int(cfg.optim.grad_accumulation))
        build_config(config_cls, dict(algo_options), self.algo_name)  # bad algo options fail before the model loads
        self.prompts = resolve_prompts(prompts_spec)
        eval_specs = named_prompt_sets(OmegaConf.to_container(cfg.eval, resolve=True)["prompt_sets"])
        self.eval_sets = {name: resolve_prompts(spec) for name, spec in eval_specs.items()}
        for where, checked in [("training", self.prompts), *[(f"evaluation set {n!r}", p)
                                                             for n, p in self.eval_sets.items()]]:
            problems = self.reward.check_prompts(checked)  # before the model loads, not at the first batch
            if problems:
                raise ConfigError(f"reward {self.reward.name!r} cannot score the {where} prompts: "
                                  f"{' '.join(problems)} Give prompts it scores (prompts=, eval.prompt_sets=) "
                                  "or choose another reward.")
        self.policy = DiffusionPolicy.from_pretrained(device=device, **model_options)
        self.algorithm = build_algorithm(self.algo_name, algo_options, self.policy, self.reward, seed=int(cfg.seed))
        batch_size = int(getattr(self.algorithm.config, "batch_size", 8))
        if self.dist.enabled:  # each process runs its slice of the global batch
            for key in ("batch_size", "minibatch_size"):
                value = getattr(self.algorithm.config, key, None)
                if value is not None and value % self.dist.world:
                    raise ConfigError(f"algo.{key} ({value}) is global and must be divisible by the number of "
                                      f"processes ({self.dist.world}).")
            batch_size //= self.dist.world
            self.policy.process_slice = (self.dist.rank, self.dist.world)
            self.algorithm.distributed = self.dist
        self.env = DenoisingEnv(self.policy, self.reward, self.prompts, batch_size=batch_size)
        self.env.set_seed(int(cfg.seed))
        if batch_size % cfg.sample_chunks:
            raise ConfigError(f"sample_chunks={cfg.sample_chunks} must divide the chains each process samples "
                              f"per epoch ({batch_size}, from algo.batch_size); e.g. sample_chunks=2.")
        self.env.core.sample_chunks, self.env.core.reward_async = int(cfg.sample_chunks), bool(cfg.reward_async)
        self._prepare()
        self.logger = RunLogger(self.run_dir, accelerator=self.accelerator, enabled=self.dist.is_main)

    def _prepare(self) -> None:
        """``accelerator.prepare`` the trainable modules and optimisers; checkpoint only the trainable weights."""
        from rl4diffusion.training.config import OptimConfig
        from rl4diffusion.training.optimisation import Updater

        acc = self.accelerator
        options = OptimConfig(**OmegaConf.to_container(self.cfg.optim, resolve=True))
        self.updater = Updater(self.algorithm, acc, options=options, epochs=int(self.cfg.epochs))
        # accelerate lists the prepared module or, under DDP, the module it wrapped
        denoisers = (self.updater.denoiser, self.policy.unet)

        def save_hook(models, weights, output_dir):
            from rl4diffusion.training.checkpoint import save_trainable

            for i in reversed(range(len(models))):
                if any(models[i] is d for d in denoisers):
                    if acc.is_main_process:
                        save_trainable(self.policy, output_dir)
                    weights.pop(i)  # not the whole network: only what trains

        def load_hook(models, input_dir):
            from rl4diffusion.training.checkpoint import load_trainable

            for i in reversed(range(len(models))):
                if any(models[i] is d for d in denoisers):
                    load_trainable(self.policy, input_dir)
                    models.pop(i)

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    # ---------------------------------------------------------------- clocks and counters
    def train_queries(self) -> int:
        """Reward queries spent on training, summed over processes."""
        return (self.reward.queries - self.loop["eval_queries"]) * self.dist.world

    def wall(self) -> float:
        return self.loop["wall_before"] + time.perf_counter() - self.start

    def cpu(self) -> float:
        """CPU seconds of this process: a budget that other jobs on the machine do not eat."""
        return self.loop["cpu_before"] + time.process_time() - self.cpu_start

    # ---------------------------------------------------------------- evaluate
    def evaluate(self, step: int) -> dict:
        """``_evaluate_sets`` with evaluation's sampler settings (``eval.num_steps``, ``eval.guidance_scale``)
        and, with ``optim.ema_decay`` set, the EMA of the trained weights in the policy."""
        with self.updater.averaged_weights(), self.policy.sampling_settings(**self.eval_sampling()):
            return self._evaluate_sets(step)

    def eval_sampling(self) -> dict:
        """Evaluation's sampler settings, for ``policy.sampling_settings`` (None: training's). An algorithm that
        samples at a guidance of its own (``sampling_guidance``: NFT's CFG-free sampling) is evaluated at it."""
        guidance = self.cfg.eval.guidance_scale
        if guidance is None:
            guidance = getattr(self.algorithm, "sampling_guidance", None)
        return {"num_steps": self.cfg.eval.num_steps, "guidance_scale": guidance}

    def _evaluate_sets(self, step: int) -> dict:
        """Fixed-seed samples of every evaluation prompt set: reward (and diversity, FID, win rate)."""
        from rl4diffusion.training.evaluation import evaluate

        cfg, t0, cpu0 = self.cfg, time.perf_counter(), time.process_time()
        before = self.reward.queries
        results, per_sample = {}, {}
        for name, set_prompts in self.eval_sets.items():
            with self.accelerator.autocast():
                stats, sample_rewards, images = evaluate(
                    self.policy, self.reward, set_prompts, metrics=self.eval_metrics, name=name,
                    samples_per_prompt=cfg.eval.samples_per_prompt, seed=cfg.eval.seed)
            results[name] = stats
            # per-image lists (head-to-head comparisons) stay out of the summary; unrounded: rounding makes false ties
            per_sample[name] = {"sample_rewards": [float(r) for r in sample_rewards],
                                **{key: stats.pop(key) for key in list(stats) if key.startswith("sample_")}}
            self._save_grids(step, name, set_prompts, images, sample_rewards)
        self.loop["eval_queries"] += self.reward.queries - before
        self.loop["eval_seconds"] += time.perf_counter() - t0
        self.loop["eval_cpu_seconds"] += time.process_time() - cpu0
        for name, stats in results.items():
            self.logger.log({"step": step, "phase": "eval", "prompt_set": name, **stats,
                             "reward_queries": self.train_queries(), "wall_s": self.wall(),
                             "train_cpu_s": self.cpu() - self.loop["eval_cpu_seconds"],
                             **per_sample[name]})
        self.loop["last_eval"], self.loop["last_eval_step"] = results, step
        log.info(eval_line(step, results, self.loop["base"]))
        return results

    def _save_grids(self, step: int, name: str, prompts: list[str], images: torch.Tensor,
                    rewards: torch.Tensor) -> None:
        """Captioned grids of every prompt, the base model's images beside these (``training/grids.py``), into
        ``images/`` and the trackers. The first evaluation of a set is the base model's: its images are kept."""
        from rl4diffusion.training.grids import comparison_pages, to_uint8

        first = name not in self.base_samples
        if first:
            self.base_samples[name] = (torch.from_numpy(to_uint8(images)), rewards.detach().float().cpu())
        if not self.logger.enabled:
            return
        base_images, base_rewards = (None, None) if first else self.base_samples[name]
        pages = comparison_pages(prompts, images, rewards, samples_per_prompt=int(self.cfg.eval.samples_per_prompt),
                                 label="base" if first else f"step {step}", base_images=base_images,
                                 base_rewards=base_rewards)
        self.logger.save_pages(pages, f"eval_{step:05d}_{name}", step, tag=f"eval/{name}/images")

    def _set_up_evaluation(self) -> None:
        """Metric networks, and the base model's samples of a resumed run (for FID vs base, win rate and grids)."""
        from rl4diffusion.training.evaluation import EvalMetrics, reference_images, sample_fixed

        cfg = self.cfg
        self.eval_metrics = None
        self.base_samples = {}  # prompt set → the base model's images (uint8, [N, H, W, 3]) and rewards, for grids
        if cfg.eval.metrics:
            refs = {name: reference_images(p, cfg.eval.reference_size, cfg.eval.seed)
                    for name, p in self.eval_sets.items()}
            self.eval_metrics = EvalMetrics(self.dist.device, cfg.eval.feature_space,
                                            {k: v for k, v in refs.items() if v is not None})
        if self.loop["base"] is not None:  # a resumed run: the base model's samples again, on the same noise
            from rl4diffusion.training.grids import to_uint8

            for name, set_prompts in self.eval_sets.items():
                with self.policy.sampling_settings(**self.eval_sampling()):
                    images, flat, _ = sample_fixed(self.policy, set_prompts, use_reference=True,
                                                   samples_per_prompt=cfg.eval.samples_per_prompt, seed=cfg.eval.seed)
                rewards = self.reward.fn(images, flat).float()
                self.base_samples[name] = (torch.from_numpy(to_uint8(images)), rewards.cpu())
                if self.eval_metrics is not None:
                    self.eval_metrics.set_base(name, images, rewards)

    # ---------------------------------------------------------------- checkpoint
    def checkpoint(self) -> None:
        """Write the run's state atomically (accelerate's save_state inside our temporary directory).

        A write that fails for good raises WriteFailed; its temporary directory is gone, and the previous
        checkpoint is still the newest.
        """
        from rl4diffusion.training.checkpoint import save_checkpoint

        self.loop["wall_before"], self.loop["cpu_before"] = self.wall(), self.cpu()
        state = {"algorithm": self.algorithm.state_dict(), "env_rng": self.env.rng.get_state(),
                 "reward_queries": self.reward.queries, "loop": json.dumps(self.loop),
                 "optimisation": self.updater.state_dict()}
        try:
            path = save_checkpoint(self.run_dir, self.loop["epoch"], state, self.policy, self.accelerator,
                                   keep_last=int(self.cfg.checkpoint.keep_last),
                                   lora_weights=self.updater.averaged_weights)
        except Exception as e:
            why = rundir.write_failure(e, self.run_dir)
            if why is None:
                raise
            raise WriteFailed(f"could not write checkpoint step_{self.loop['epoch']:06d}: {why}") from e
        self.opened.checkpoint = path.name
        self.opened.record("running", epoch=self.loop["epoch"])
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def _restore(self) -> Path | None:
        """Resume: the algorithm, environment and loop state now; weights, optimisers and RNGs in ``fit``.

        The checkpoint is the newest valid one, found by ``prepare_run_dir`` (which refuses a run with none).
        """
        from rl4diffusion.training.checkpoint import load_state

        checkpoint = self.opened.resume_from
        if checkpoint is not None:
            saved = load_state(checkpoint)
            self.algorithm.load_state_dict(saved["algorithm"])
            if "optimisation" in saved:  # the learning-rate schedule's step counts, the EMA weights
                self.updater.load_state_dict(saved["optimisation"])
            self.env.rng.set_state(saved["env_rng"])
            self.reward.queries = int(saved["reward_queries"])
            self.loop.update(json.loads(saved["loop"]))
            if self.dist.is_main:
                truncate_metrics(self.run_dir, self.loop["epoch"])
            log.info("resumed %s from %s (epoch %d)", self.run_dir, checkpoint.name, self.loop["epoch"])
        return checkpoint

    # ---------------------------------------------------------------- fit
    def fit(self) -> dict:
        """collect → update for ``cfg.epochs`` epochs (or until a budget is spent); returns the summary."""
        from contextlib import nullcontext

        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        from rl4diffusion.data import terminal_rewards
        from rl4diffusion.training.runlog import EpochLines, epoch_line, progress_postfix

        cfg, loop = self.cfg, self.loop
        checkpoint = self._restore()
        self._set_up_evaluation()
        if self.dist.is_main:
            OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
            self.accelerator.init_trackers("tb", config=_flat_hparams(cfg))
        log.info("run directory: %s", self.run_dir)
        log.info("algo=%s reward=%s model=%s prompts=%d epochs=%d threads=%d", self.algo_name, self.reward.name,
                 cfg.model.pretrained, len(self.prompts), cfg.epochs, torch.get_num_threads())
        if loop["base"] is None:
            loop["base"] = self.evaluate(0)  # logs its line: the base model's reward and diversity
        if checkpoint is not None:  # last, so that nothing above (metric networks, base samples) shifts the RNGs
            self.accelerator.load_state(str(checkpoint / "accelerate"))
        # the training clocks (re)start here: loading, metric set-up and the base samples are not training
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        if loop["epoch"] == 0:
            loop["eval_seconds"] = loop["eval_cpu_seconds"] = 0.0

        interrupted = False
        epoch_lines = EpochLines(int(cfg.epochs))  # without the bar: a line per epoch, ~10 per long run
        # with the bar, log lines (evaluations, warnings) print above it instead of breaking it
        with StopRequest() as stop, logging_redirect_tqdm() if cfg.progress else nullcontext():
            bar = tqdm(range(loop["epoch"] + 1, cfg.epochs + 1), desc=self.algo_name, disable=not cfg.progress,
                       dynamic_ncols=True)
            for epoch in bar:
                with self.accelerator.autocast():
                    batch = self.algorithm.collect(self.env)
                record = {"step": epoch, "phase": "train"}
                is_rollout = keys.NEXT in batch.keys() and batch.batch_dims == 2
                rewards = self.dist.gather(terminal_rewards(batch)) if is_rollout else None
                if rewards is not None:
                    record.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std(unbiased=False)))
                if rewards is not None and not torch.isfinite(rewards).all():
                    log.warning("epoch %d: non-finite reward in the batch; update skipped", epoch)
                    metrics, skipped = {}, 1
                else:
                    metrics = self.updater(batch, epoch=epoch)
                    skipped = self.updater.skipped
                    if skipped:
                        log.warning("epoch %d: %d optimisation step(s) with a non-finite loss or gradient were "
                                    "skipped", epoch, skipped)
                loop["skipped"] += skipped
                if loop["skipped"] > cfg.max_skipped_updates:
                    raise TrainingAborted(f"{loop['skipped']} updates were skipped for non-finite rewards, losses or "
                                          f"gradients (max_skipped_updates={cfg.max_skipped_updates}). Lower the "
                                          "learning rate or check the reward; the last checkpoint is intact.")
                record.update(metrics)
                record.update({"train/skipped_updates": loop["skipped"], "reward_queries": self.train_queries(),
                               "wall_s": self.wall(), "train_wall_s": self.wall() - loop["eval_seconds"],
                               "train_cpu_s": self.cpu() - loop["eval_cpu_seconds"]})
                self.logger.log(record)
                loop["epoch"] = epoch
                bar.set_postfix(progress_postfix(record))
                if not cfg.progress and epoch_lines.due(epoch):
                    log.info(epoch_line(epoch, int(cfg.epochs), record))
                query_evals = record["reward_queries"] // cfg.eval.every_queries if cfg.eval.get("every_queries") else 0
                by_epoch = cfg.eval.every and epoch % cfg.eval.every == 0
                if (by_epoch or query_evals > loop["query_evals"]) and epoch != cfg.epochs:
                    self.evaluate(epoch)
                loop["query_evals"] = query_evals
                spent = {"reward_queries": record["reward_queries"], "train_seconds": record["train_wall_s"],
                         "train_cpu_seconds": record["train_cpu_s"]}
                over = [k for k, limit in cfg.budget.items() if limit is not None and spent[k] >= limit]
                if over and epoch != cfg.epochs:
                    log.info("budget reached (%s) after epoch %d", ", ".join(over), epoch)
                    break
                if stop.requested:
                    self.checkpoint()
                    interrupted = True
                    log.warning("stopped after epoch %d; continue with resume=%s", epoch, self.run_dir)
                    break
                if cfg.checkpoint.every and epoch % cfg.checkpoint.every == 0 and epoch != cfg.epochs:
                    self.checkpoint()
        if interrupted:
            self.close()
            return {}
        final = loop["last_eval"] if loop["last_eval_step"] == loop["epoch"] > 0 else self.evaluate(loop["epoch"])
        self.checkpoint()
        return self._finish(final)

    def _finish(self, final: dict) -> dict:
        cfg, loop = self.cfg, self.loop
        if cfg.save_lora and self.dist.is_main:
            with self.updater.averaged_weights():  # the EMA weights when optim.ema_decay is set
                self.policy.save_pretrained_lora(self.run_dir / "lora")
        base = loop["base"]
        summary = {
            "algo": self.algo_name, "reward": self.reward.name, "model": cfg.model.pretrained, "seed": int(cfg.seed),
            "epochs": int(loop["epoch"]), "reward_queries": self.train_queries(),
            "wall_s": self.wall(), "train_wall_s": self.wall() - loop["eval_seconds"],
            "train_cpu_s": self.cpu() - loop["eval_cpu_seconds"], "skipped_updates": loop["skipped"],
            "eval_seed": int(cfg.eval.seed), "base": base, "final": final,
            "improvement": {k: final[k]["reward_mean"] - base[k]["reward_mean"] for k in final},
        }
        self.logger.write_json("summary.json", summary)
        self.close()
        log.info(final_line(int(loop["epoch"]), final, base))
        return summary

    def close(self) -> None:
        self.logger.close()
        self.accelerator.end_training()


def _flat_hparams(cfg: DictConfig) -> dict:
    """The config as flat scalar hyper-parameters (what TensorBoard / wandb / mlflow trackers accept)."""
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(name + ".", v)
            elif isinstance(v, (int, float, str, bool)):
                flat[name] = v
            elif v is not None:
                flat[name] = str(v)

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return flat


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train as ``cfg`` says and write the run directory; returns the summary (``{}`` if interrupted).

    The run directory is locked while it runs, and ``<run>/run_state.json`` ends as "finished", "interrupted"
    or "failed" with the exit code the command line gives (``rundir.py`` lists them). SIGTERM during
    start-up raises KeyboardInterrupt, as SIGINT does; a KeyboardInterrupt leaves with a one-line message
    that says how to continue. A write that fails for good (a full disk, …) is raised as WriteFailed naming
    the last good checkpoint, with a torn last line of ``metrics.jsonl`` cut off.
    """
    trainer = Trainer(cfg, run_dir)
    # a full disk also breaks train.log's handler: drop its lines rather than print a traceback for each
    logging_raised = logging.raiseExceptions
    logging.raiseExceptions = False
    try:
        with rundir.sigterm_interrupts():
            trainer.build()
            summary = trainer.fit()
    except BaseException as e:
        error = _write_failed(trainer, e) or (_interrupted(trainer) if isinstance(e, KeyboardInterrupt) else e)
        if trainer.opened is not None:
            if isinstance(error, KeyboardInterrupt):  # a second signal: stopped at once; resumable all the same
                state, code = "interrupted", rundir.EXIT_INTERRUPTED
            elif isinstance(error, ConfigError):
                state, code = "failed", rundir.EXIT_BAD_INPUT
            else:
                state, code = "failed", rundir.EXIT_FAILED
            try:
                trainer.opened.record(state, epoch=trainer.loop["epoch"], exit_code=code)
            except OSError as write_error:  # a full disk, say: report the first error, not this one
                log.warning("could not record the run's state: %s", write_error)
        if error is e:
            raise
        raise error from (e if isinstance(error, WriteFailed) else None)
    else:
        finished = bool(summary)  # {} when a signal stopped it after a checkpoint
        state = "finished" if finished else "interrupted"
        code = rundir.EXIT_FINISHED if finished else rundir.EXIT_INTERRUPTED
        trainer.opened.record(state, epoch=trainer.loop["epoch"], exit_code=code)
    finally:
        logging.raiseExceptions = logging_raised
        if trainer.opened is not None:
            trainer.opened.close()
    return summary


def _write_failed(trainer: Trainer, error: BaseException) -> WriteFailed | None:
    """``error`` as a WriteFailed that names the last good checkpoint, when it is a write that failed for good."""
    if isinstance(error, WriteFailed):
        what = str(error)
    elif isinstance(error, Exception) and (why := rundir.write_failure(error)) is not None:
        what = f"could not write to the run directory {trainer.run_dir}: {why}"
    else:
        return None
    rundir.drop_torn_line(trainer.run_dir / "metrics.jsonl")
    checkpoint = trainer.opened.checkpoint if trainer.opened is not None else None
    if checkpoint:
        then = (f"The last good checkpoint is {checkpoint} ({trainer.run_dir / 'checkpoints' / checkpoint}); once "
                f"the disk takes writes again, continue from it with resume={trainer.run_dir}.")
    else:
        then = "There is no checkpoint yet: once the disk takes writes again, start the run again."
    return WriteFailed(f"{what}. {then} Nothing half-written was left.")


def _interrupted(trainer: Trainer) -> KeyboardInterrupt:
    """A KeyboardInterrupt whose message says where a resume would continue."""
    checkpoint = trainer.opened.checkpoint if trainer.opened is not None else None
    if checkpoint:
        return KeyboardInterrupt(f"interrupted; continue from its last checkpoint ({checkpoint}) with "
                                 f"resume={trainer.run_dir}")
    if trainer.opened is not None:
        return KeyboardInterrupt(f"interrupted before its first checkpoint; start it over with "
                                 f"resume={trainer.run_dir} resume_restart=true, or start a new run")
    return KeyboardInterrupt("interrupted while starting, before training began; nothing to continue from")
