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


class ExportError(RuntimeError):
    """An export directory that cannot be carded or published, or an upload that cannot
    go ahead: one line naming the directory or target and what to do. Nothing partial
    is left behind (``tracetune publish`` uploads all of an export or none of it)."""


class DamagedFile(ValueError):
    """A run's own file (metrics, samples, a cache) that is damaged before its last line."""


class DiskFull(OSError):
    """No space left where a run writes: the run stops, what it wrote before stays valid,
    and re-running the same command after freeing space resumes."""

    exit_code = 74  # EX_IOERR: nothing is broken, free space and re-run

    def __init__(self, path: Path | str, needed_bytes: int | None = None, *, reported: bool = False):
        import errno
        import shutil

        self.path, self.needed_bytes, self.reported = Path(path), needed_bytes, reported  # reported: by a stage's process
        probe = self.path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            free = None
        need = f"free at least {_size(needed_bytes)}" if needed_bytes else "free some space"
        have = f" ({_size(free)} free there)" if free is not None else ""
        super().__init__(errno.ENOSPC, f"disk full writing {self.path}{have}: {need}, then re-run the same command to resume")

    def __str__(self) -> str:
        return self.strerror


def _size(n: int | None) -> str:
    """``_size(3 * 2**20)`` -> ``'3.0 MB'``."""
    value = float(n or 0)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
