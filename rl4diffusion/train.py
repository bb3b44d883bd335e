"""``python -m rl4diffusion.train``: the command line lives in ``rl4diffusion.cli.train``."""

from rl4diffusion.cli.train import main

if __name__ == "__main__":
    main()
