"""Errors clframe raises for bad input. Each message names the problem and how to fix it.

The ``clframe`` command prints them as one paragraph (no traceback) and exits with status 2.
"""

from __future__ import annotations


class ClframeError(ValueError):
    """Base class: bad input (configuration, data, checkpoint) rather than a bug."""


class ConfigError(ClframeError):
    """An argument of a strategy, trainer or callback is out of range or inconsistent."""


class NonFiniteLossError(ClframeError, ArithmeticError):
    """The training loss became NaN or infinite."""


class CheckpointError(ClframeError):
    """A checkpoint cannot be used to resume this run."""
