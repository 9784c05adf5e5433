"""Errors a training run stops with: each message says what happened, where, and what to do (docs/fault_tolerance.md).

The ``dsa-train`` entry point prints any :class:`TrainingError` as one line and exits with status 2, instead of a
traceback.
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run cannot go on; the message names the cause and the fix."""


class CheckpointError(TrainingError):
    """A checkpoint directory is missing, incomplete, corrupt or cannot be written (the message says which)."""


class RunDirError(TrainingError):
    """The run directory is held by another run, or holds an old run that a fresh start would mix with."""


class NonFiniteError(TrainingError):
    """Training diverged: too many steps in a row had a non-finite loss or gradient norm, or the weights are."""


class StuckRankError(TrainingError):
    """A collective timed out; the message names the rank(s) that stopped responding."""
