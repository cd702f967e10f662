"""Run one side of a benchmark in its own process, so its peak RSS is its own.

The side prints ``RESULT <json>`` on stdout (``report``); the parent reads it back
(``run``). A side that fails stops the benchmark with the end of its stderr.
``sample_rss`` records a process's resident set over time and ``live_rss`` gives
its live part (the memory benches).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PREFIX = "RESULT "


def report(result: dict) -> None:
    print(PREFIX + json.dumps(result), flush=True)


def run(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script *args`` in a new Python process (with ``env`` added to this
    process's environment) and return the result it reported."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env={**os.environ, **env} if env else None)
    if done.returncode != 0:
        sys.exit(f"benchmark side {' '.join(args)} failed: {done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith(PREFIX))[len(PREFIX):])


def worktree(rev: str) -> Path:
    """A detached git worktree of ``rev`` beside this checkout (made once, kept): a
    bench's "before" side runs it with ``env={"PYTHONPATH": str(tree / "src")}``."""
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"tracetune-{commit}"
    if not (path / "src" / "tracetune").is_dir():
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(path), commit], check=True)
    return path


def sample_rss(every: float) -> list[tuple[float, int]]:
    """(``time.perf_counter()``, resident bytes) of this process every ``every``
    seconds, appended by a daemon thread for as long as the process runs."""
    import psutil

    process, samples = psutil.Process(), []

    def sample() -> None:
        while True:
            samples.append((time.perf_counter(), process.memory_info().rss))
            time.sleep(every)

    threading.Thread(target=sample, daemon=True).start()
    return samples


def live_rss() -> int:
    """This process's resident bytes once freed host copies and worker threads have
    settled and glibc has returned its free pages (``memory.release``): live
    memory, not allocator slack."""
    import psutil

    from tracetune import memory

    time.sleep(0.5)
    memory.release()
    return psutil.Process().memory_info().rss


def target(label: str, value: float, bound: float, at_most: bool = False) -> None:
    """One line per target of an issue: the measured value, the bound, met or MISSED."""
    met = value <= bound if at_most else value >= bound
    print(f"target {label}: {value:.2f} against {bound:g}: {'met' if met else 'MISSED'}")
