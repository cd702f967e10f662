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


class TimeLimitReached(Interrupted):
    """``tracetune run --time-limit`` came: the running stage was stopped with SIGTERM
    and saved; re-running continues."""

    def __init__(self, minutes: float, stage: str):
        self.signum = signal.SIGTERM
        RuntimeError.__init__(self, f"the time limit of {minutes:g} min came during stage {stage}, which saved what it "
                                    "had; re-run `tracetune run` with the same options (e.g. in the next session) to continue")
