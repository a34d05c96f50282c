"""The pipeline's exceptions that the CLI maps to exit statuses (kept free of heavy imports)."""
from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """Raised on every rank when any rank sees a NaN/inf loss or gradient (exit status 1)."""


class TrainingInterrupted(RuntimeError):
    """Training stopped early (SIGTERM); the checkpoint of the last finished step is kept (exit status 143)."""
