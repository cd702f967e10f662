"""Shared fixtures. Tests may read ../shared (the CI copy of GSM8K); the product never does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
