"""Fine-tune a diffusion model: ``python -m rl4diffusion.train [algo=…] [reward=…] [model=…] [key=value …]``.

Examples::

    python -m rl4diffusion.train                                   # defaults: the embedded world
    python -m rl4diffusion.train algo=ddpo reward=jpeg_compressibility epochs=20
    python -m rl4diffusion.train reward=my_pkg.my_rewards:sharpness model=path:/models/sd15
    python -m rl4diffusion.train algo=my_pkg.my_algos:MyAlgo 'hydra.searchpath=[pkg://my_pkg.conf]'  # your algorithm
    python -m rl4diffusion.train -m algo=ddpo,nabla_gfn seed=0,1    # a Hydra sweep
    torchrun --nproc_per_node 2 -m rl4diffusion.train              # data-parallel (CPU: gloo)
    accelerate launch --config_file my.yaml -m rl4diffusion.train  # DDP / FSDP / DeepSpeed

Every field of conf/train.yaml and of the algo/reward/model groups is overridable. Bad input
is reported in one paragraph with exit code 2; a failure of ours with exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from rl4diffusion.cli.overrides import CONF_DIR, check_config, rewrite_overrides
from rl4diffusion.errors import ConfigError
from rl4diffusion.training.trainer import TrainingAborted, run


def _hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def entry(cfg: DictConfig) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            run(cfg, run_dir)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except TrainingAborted as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except Exception as e:  # a bug, not bad input: keep the traceback in the run directory
            import traceback

            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.log").write_text(traceback.format_exc())
            print(f"error: training failed with {type(e).__name__}: {e}. The full traceback is in "
                  f"{run_dir / 'error.log'}; please include it when reporting the problem.", file=sys.stderr)
            sys.exit(1)

    entry()


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = rewrite_overrides(args)
        if "--help" not in args and "-h" not in args and "--cfg" not in args:
            check_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *args]
    _hydra_main()


if __name__ == "__main__":
    main()
