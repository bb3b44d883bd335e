"""``python -m rl4diffusion.compare``: the command line lives in ``rl4diffusion.cli.compare``."""

from rl4diffusion.cli.compare import main

if __name__ == "__main__":
    main()
