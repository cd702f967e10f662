"""The fixed harness: exact metrics on hand-written completions, resuming a cut-off
evaluation, and ``tracetune eval`` on the tiny model."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest

from tracetune.errors import DamagedFile
from tracetune.config import load_config
from tracetune.data import Example
from tracetune.evaluate import EvalError, evaluate, problems, read_records, sample_record, score_generation, summarize
from tracetune.generate import Generation
from tracetune.rewards import trace_structure

RIGHT = "<reasoning>Step 1: 6 * 4 = 24.\nStep 2: 24 + 6 = 30.\nTherefore, the answer is 30.</reasoning>\n<answer>30</answer>"
FALSE_CLAIM = "<reasoning>Step 1: 6 * 4 = 26.\nStep 2: 26 + 6 = 32.\nTherefore, the answer is 32.</reasoning>\n<answer>32</answer>"
MALFORMED = "Step 1: 6 * 4 = 24. Step 2: 24 + 6 = 30. So 30"
EXAMPLE = Example("p-1", "Tom has 6 bags of 4 apples and 6 more apples. How many apples?", "30", "6*4=<<6*4=24>>24\n24+6=<<24+6=30>>30")


def generation(text: str, logprob: float = -0.1) -> Generation:
    """A completion as the generator returns it: token texts that rebuild the text
    (here 4 characters each) with one log-probability per token."""
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    return Generation("prompt", text, list(range(len(pieces))), pieces, [logprob] * len(pieces), "eos")


def test_the_harness_scores_hand_written_completions_exactly():
    texts = [RIGHT, FALSE_CLAIM, MALFORMED, RIGHT]
    records = [sample_record(score_generation(EXAMPLE, generation(t), load_config().rewards), generation(t), EXAMPLE) for t in texts]
    metrics, rows = summarize(records)
    assert (metrics["accuracy"].mean, metrics["format_rate"].mean, metrics["lenient_accuracy"].mean) == (0.5, 0.75, 0.75)
    assert metrics["accuracy"].n == 4
    # Confidence: p = exp(-0.1) for each answer token; right -> p, wrong -> 1 - p, no answer -> 0.
    p = math.exp(-0.1)
    expected_conf = [p, 1 - p, 0.0, p]
    assert [r["confidence"] for r in records] == pytest.approx(expected_conf)
    expected_composite = [0.6 * c + 0.25 * trace_structure(t) + 0.15 * k for t, c, k in zip(texts, (1, 0, 0, 1), expected_conf)]
    assert [r["composite"] for r in records] == pytest.approx(expected_composite)
    assert metrics["composite"].mean == pytest.approx(sum(expected_composite) / 4)
    assert metrics["trace"].mean == pytest.approx(sum(map(trace_structure, texts)) / 4)
    # Right answers have no failure; the wrong ones one category each, with evidence.
    assert [r["failure"] and r["failure"]["category"] for r in records] == [None, "calculation_error", "format_failure", None]
    assert "6 * 4 = 26" in records[1]["failure"]["evidence"]
    assert {row.category: row.count for row in rows} == {"calculation_error": 1, "format_failure": 1}
    assert records[2]["answer"] is None and records[1]["predicted"] == 32.0


@pytest.fixture(scope="module")
def tiny():
    from tracetune.models.registry import load_model

    return load_model("tiny")


def test_a_cut_off_evaluation_resumes_and_matches_an_uninterrupted_one(tmp_path, tiny):
    config = load_config("tiny", ["eval.limit=8", "eval.batch_size=4"])
    examples = problems(config)
    whole = evaluate(tiny, examples, tmp_path / "whole", config)
    assert len(whole.records) == 8 and (tmp_path / "whole" / "metrics.md").exists()
    # Keep 3 records and half of the 4th, as a kill during a write would.
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    lines = (tmp_path / "cut" / "samples.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut" / "samples.jsonl").write_text("".join(lines[:3]) + lines[3][:40])
    advanced = []
    resumed = evaluate(tiny, examples, tmp_path / "cut", config, progress=advanced.append)
    assert advanced == [3, 4, 1]  # 3 already scored, then the 5 missing in batches of 4
    assert [r["completion"] for r in resumed.records] == [r["completion"] for r in whole.records]
    assert resumed.metrics == whole.metrics
    assert len(read_records(tmp_path / "cut" / "samples.jsonl")) == 8
    # Nothing left to do: no generation at all.
    again = evaluate(tiny, examples, tmp_path / "cut", config)
    assert again.seconds == 0.0 and again.metrics == whole.metrics


def test_an_evaluation_directory_refuses_other_settings(tmp_path, tiny):
    config = load_config("tiny", ["eval.limit=2"])
    evaluate(tiny, problems(config), tmp_path, config)
    other = load_config("tiny", ["eval.limit=2", "eval.max_new_tokens=50"])
    with pytest.raises(EvalError, match="max_new_tokens: 96 -> 50"):
        evaluate(tiny, problems(other), tmp_path, other)


def test_a_corrupt_line_inside_samples_names_the_line(tmp_path):
    (tmp_path / "samples.jsonl").write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DamagedFile, match=r"samples.jsonl:2"):
        read_records(tmp_path / "samples.jsonl")


def test_eval_command_writes_samples_metrics_and_prints_the_table(tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "tracetune.cli", "eval", "--model", "tiny", "--preset", "tiny",
                             "--limit", "4", "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env={"COLUMNS": "200", **__import__("os").environ})
    assert result.returncode == 0, result.stderr
    assert "GSM8K accuracy" in result.stdout and "95% CI" in result.stdout
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert {"question", "reference", "completion", "answer", "correct", "well_formed", "trace", "composite", "failure"} <= set(records[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["limit"] == 4 and metrics["metrics"]["accuracy"]["n"] == 4
