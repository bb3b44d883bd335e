"""The command lines: ``python -m rl4diffusion.train``, ``.bench`` and ``.make_pairs``. Hydra and exit codes only."""
