"""Shared fixtures. Tests may read ../shared (the CI copy of GSM8K); the product never does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# One XLA compilation cache for the whole session, this process and every tracetune
# process a test starts (they inherit the environment): the tiny model's programs are
# the same in dozens of tests, and compiling them again costs each short run a large share.
# Fresh per session, so CI measures the same thing as a first run. Set before anything
# imports JAX. TRACETUNE_TEST_COMPILE_CACHE=0 turns it off.
if os.environ.get("TRACETUNE_TEST_COMPILE_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="tracetune-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


def wrap(answer: str, reasoning: str = "Step 1: 2 + 2 = 4.\nTherefore, the answer is 4.") -> str:
    """A well-formed completion with the given answer content."""
    return f"<reasoning>{reasoning}</reasoning>\n<answer>{answer}</answer>"


@pytest.fixture
def write_jsonl(tmp_path):
    """Write raw lines (str) or objects (dict) to a JSONL file and return its path."""

    def _write(name: str, rows: list) -> Path:
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
        return path

    return _write


# ------------------------------------------------ training runs in real processes


def start_tracetune(command: str, run_dir: Path, *extra: str, settings: list[str], compile_cache: bool = True) -> subprocess.Popen:
    """``tracetune COMMAND --run-dir RUN_DIR EXTRA... --set S...`` as a process that can be killed.
    ``compile_cache=False``: without the session's compilation cache (a test that counts compiles)."""
    args = [sys.executable, "-m", "tracetune.cli", command, "--run-dir", str(run_dir), *extra]
    for item in settings:
        args += ["--set", item]
    env = {**os.environ, "COLUMNS": "200"}
    if not compile_cache:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def wait_for(marker: Path, process: subprocess.Popen, timeout: float) -> None:
    """Until ``marker`` exists (e.g. a checkpoint's commit_success.txt); fails if the process ends first."""
    deadline = time.time() + timeout
    while not marker.exists():
        assert process.poll() is None, finish(process, 60).stderr
        assert time.time() < deadline
        time.sleep(0.05)


def wait_for_save_in_flight(root: Path, step: int, process: subprocess.Popen) -> None:
    """Until orbax is writing ``step`` (its temporary directory exists, not yet
    committed; or, if the save was too quick to see, just committed)."""
    deadline = time.time() + 300
    while not (root.is_dir() and any(p.name.startswith(f"{step}.orbax-checkpoint-tmp") or p.name == str(step) for p in root.iterdir())):
        assert process.poll() is None and time.time() < deadline, finish(process, 60).stderr
        time.sleep(0.002)


def adapter_weights(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "export" / "adapter" / "adapter.safetensors"))
