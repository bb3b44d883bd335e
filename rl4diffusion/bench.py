"""``python -m rl4diffusion.bench``: the command line lives in ``rl4diffusion.cli.bench``."""

from rl4diffusion.cli.bench import main

if __name__ == "__main__":
    main()
