"""Run one side of a benchmark in its own process, so its peak RSS is its own.

The side prints ``RESULT <json>`` on stdout (``report``); the parent reads it back
(``run``). A side that fails stops the benchmark with the end of its stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys

PREFIX = "RESULT "


def report(result: dict) -> None:
    print(PREFIX + json.dumps(result), flush=True)


def run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark side {' '.join(args)} failed: {done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith(PREFIX))[len(PREFIX):])
