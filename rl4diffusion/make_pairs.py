"""``python -m rl4diffusion.make_pairs``: the command line lives in ``rl4diffusion.cli.make_pairs``."""

from rl4diffusion.cli.make_pairs import main

if __name__ == "__main__":
    main()
