"""notebooks/kaggle_tpu.ipynb runs on CPU with the tiny preset, over two "sessions".

The cells run as written, in order, except those tagged ``install`` (the test's
environment is installed already) and ``kaggle-only`` (the upload to Kaggle);
the ``parameters`` cell runs, then the test's values replace its settings, the way
papermill injects parameters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "kaggle_tpu.ipynb"
SKIPPED_TAGS = {"install", "kaggle-only"}


def cells() -> list[dict]:
    return [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]


def run_notebook(parameters: dict) -> dict:
    """Execute the notebook's code cells in one namespace; return the namespace."""
    namespace: dict = {"__name__": "__main__"}
    for cell in cells():
        tags = set(cell["metadata"].get("tags", []))
        if tags & SKIPPED_TAGS:
            continue
        exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}:{cell['id']}", "exec"), namespace)
        if "parameters" in tags:
            namespace.update(parameters)
    return namespace


def test_the_notebook_has_the_cells_the_test_relies_on():
    tags = [set(c["metadata"].get("tags", [])) for c in cells()]
    assert sum("parameters" in t for t in tags) == 1
    assert any("install" in t for t in tags) and any("kaggle-only" in t for t in tags)
    source = "".join("".join(c["source"]) for c in cells())
    for needle in ('"--mesh", MESH', '"--time-limit"', "kagglehub.model_upload", "copytree", 'PRESET = "recipe-1b"', 'MESH = "v5e-8"'):
        assert needle in source, needle


@pytest.mark.slow
def test_the_notebook_runs_the_recipe_on_cpu_across_two_sessions(tmp_path, capfd):
    """Session 1 hits its time limit mid-run and saves; its output becomes session 2's
    input; session 2 continues (finished stages are not redone) and writes the report."""
    def session(work: Path, minutes: float) -> dict:
        return run_notebook({
            "PRESET": "tiny", "MESH": None, "WORK": str(work), "RUN_DIR": str(work / "runs" / "tiny"),
            "PREVIOUS_OUTPUT": str(tmp_path / "previous-output"), "SESSION_MINUTES": minutes,
            "OVERRIDES": ["eval.limit=32", "grpo.max_steps=10"],
        })

    first = session(tmp_path / "session1", minutes=0.75)
    assert first["FINISHED"] is False
    out = capfd.readouterr().out
    assert "This session's time is used up and the run is saved" in out
    state1 = json.loads((tmp_path / "session1" / "runs" / "tiny" / "pipeline.json").read_text())
    done1 = {k: v for k, v in state1.items() if v["status"] == "done"}
    assert "report" not in done1

    # "Save Version": the output becomes an input of the next session, which starts empty.
    shutil.copytree(tmp_path / "session1", tmp_path / "previous-output")
    second = session(tmp_path / "session2", minutes=60)
    assert second["FINISHED"] is True
    assert "continuing the run from" in capfd.readouterr().out
    state2 = json.loads((tmp_path / "session2" / "runs" / "tiny" / "pipeline.json").read_text())
    assert all(v["status"] in ("done", "skipped") for v in state2.values()) and len(state2) == 8
    for stage, info in done1.items():  # not redone: same record, same finish time
        assert state2[stage] == info, stage
    report = (tmp_path / "session2" / "runs" / "tiny" / "report" / "report.md").read_text()
    assert "SFT + GRPO" in report
    assert (tmp_path / "session2" / "runs" / "tiny" / "grpo" / "export" / "merged").is_dir()
