"""User-facing errors: bad input is reported in one paragraph with exit code 2, never a traceback."""

from __future__ import annotations


class ConfigError(Exception):
    """Bad input from the user (config value, CLI override, file, reward, weights).

    The message is the whole explanation: what was wrong and how to fix it. The command-line
    entry points print it and exit with code 2.
    """


class MissingWeightsError(ConfigError):
    """Model or reward weights are absent on this machine (no hub access)."""
