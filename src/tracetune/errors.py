"""Errors of training runs, importable without loading JAX (the CLI catches them)."""

from __future__ import annotations

import signal
from pathlib import Path


class TrainingError(RuntimeError):
    """A run that cannot go on: a non-finite loss, a run directory of another config."""


class Interrupted(RuntimeError):
    """SIGTERM or Ctrl-C: a checkpoint was saved; re-running the command resumes."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in {run_dir}; "
            "re-run the same command to resume"
        )
