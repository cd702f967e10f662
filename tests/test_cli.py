"""The command line as a user meets it: real processes, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fastapi import FastAPI, Request  # module level: FastAPI resolves the route's annotations here

from conftest import wrap


def tracetune(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tracetune.cli", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200", **(env or {})}, cwd=cwd,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr


def test_validate_passes_on_the_shipped_train_split(tmp_path):
    result = tracetune("validate", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validate passed on 7473 targets" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy"]["mean"] == 1.0 and metrics["format_rate"]["mean"] == 1.0
    assert metrics["trace"]["mean"] >= 0.9


def test_validate_fails_and_lists_a_broken_target(write_jsonl):
    # A reference that disagrees with nothing in the solution is fine; a solution
    # whose annotation is broken cannot be curated and must be listed, not hidden.
    path = write_jsonl("d.jsonl", [
        {"question": "q?", "answer": "Half is 48/2 = <<48/2=24>>24.\nSo 24.\n#### 24"},
        {"question": "r?", "answer": "Half is 48/2 = <<48/2=24 24.\n#### 24"},
    ])
    result = tracetune("validate", "--source", str(path))
    assert result.returncode == 1
    assert "unbalanced calculator annotation" in result.stdout and "d-2" in result.stdout


def test_data_writes_curated_jsonl_and_reports(tmp_path):
    result = tracetune("data", "--out", str(tmp_path), "--split", "test", "--val-fraction", "0.1")
    assert result.returncode == 0, result.stderr
    train = (tmp_path / "train.jsonl").read_text().splitlines()
    val = (tmp_path / "validation.jsonl").read_text().splitlines()
    assert len(train) + len(val) == 1319 and len(val) == 132
    row = json.loads(train[0])
    assert row["prompt"].startswith("Q: ") and row["completion"].startswith("<reasoning>Step 1: ")
    assert "p50" in result.stdout and "validation traces" in result.stdout
    assert "seed: 42" in (tmp_path / "config.yaml").read_text()


def test_malformed_data_is_one_clear_error(write_jsonl, tmp_path):
    path = write_jsonl("bad.jsonl", [json.dumps({"question": "q", "answer": "#### 5"}), '{"question": "q", "answer": '])
    result = tracetune("data", "--source", str(path), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, f"{path}:2", "malformed JSON")
    assert not (tmp_path / "o" / "train.jsonl").exists()  # nothing half-written


def test_skip_invalid_reports_what_it_skipped(write_jsonl, tmp_path):
    path = write_jsonl("bad.jsonl", [json.dumps({"question": "q", "answer": "2+3=5\n#### 5"}), json.dumps({"question": "q"})])
    result = tracetune("data", "--source", str(path), "--out", str(tmp_path / "o"), "--skip-invalid", "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 invalid row" in result.stderr and f"{path}:2: field 'answer': missing" in result.stderr
    assert len((tmp_path / "o" / "train.jsonl").read_text().splitlines()) == 1


def test_unreachable_hugging_face_dataset_is_one_clear_error(tmp_path):
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = tracetune("data", "--source", "no-such-user/no-such-dataset", "--out", str(tmp_path), env=offline)
    assert_one_line_error(result, "no-such-user/no-such-dataset", "cannot load Hugging Face dataset")


def test_unwritable_output_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = tracetune("data", "--split", "test", "--out", str(blocker / "out"))
    assert_one_line_error(result, "cannot write or read", str(blocker))


def test_bad_config_override_is_one_clear_error():
    assert_one_line_error(tracetune("validate", "--set", "data.sed=1"), "unknown field 'sed'")
    assert_one_line_error(tracetune("validate", "--preset", "nope"), "unknown preset 'nope'")


def test_score_command(write_jsonl, tmp_path):
    path = write_jsonl("c.jsonl", [
        {"question": "q", "reference": "72", "completion": wrap("72"), "answer_logprobs": [-0.1]},
        {"question": "q", "reference": "72", "completion": wrap("7"), "answer_logprobs": [-0.1]},
    ])
    result = tracetune("score", str(path), "--out", str(tmp_path / "s"), "--reward-weights", "0.6,0,0.15")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["accuracy"]["mean"] == 0.5 and metrics["composite"]["n"] == 2
    assert json.loads((tmp_path / "s" / "run.json").read_text())["weights"]["trace"] == 0.0


@pytest.mark.parametrize("command", ["data", "validate", "score", "presets", "generate"])
def test_every_option_is_explained(command):
    result = tracetune(command, "--help")
    assert result.returncode == 0
    # Every long option in the help has some explanatory text on its line.
    for line in result.stdout.splitlines():
        stripped = line.strip("│ ")
        if stripped.startswith("--") and "--help" not in stripped:
            assert len(stripped.split()) > 2, f"option without help: {stripped}"


def test_generate_batch_file_with_tiny_model(write_jsonl, tmp_path):
    path = write_jsonl("q.jsonl", [{"id": "a", "question": "What is 2 + 3?"}, {"id": "b", "question": "What is 7 - 4?"}])
    out = tmp_path / "out.jsonl"
    result = tracetune("generate", "--model", "tiny", "--input", str(path), "--output", str(out), "--max-new-tokens", "12",
                       "--temperature", "0.8", "--top-k", "20", "--seed", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    for row in rows:
        assert row["prompt"] == f"Q: {row['question']}\nA:\n"
        assert "".join(row["token_texts"]) == row["completion"]
        assert len(row["token_logprobs"]) == len(row["token_texts"]) <= 12


def test_generate_single_question_prints_prompt_and_trace():
    result = tracetune("generate", "--model", "tiny", "What is 2 + 3?", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Q: What is 2 + 3?" in result.stdout and "completion" in result.stdout


def test_generate_bad_input_row_names_file_line_field(write_jsonl, tmp_path):
    path = write_jsonl("q.jsonl", [{"question": "ok?"}, {"prompt": "no question"}])
    result = tracetune("generate", "--model", "tiny", "--input", str(path), "--output", str(tmp_path / "o.jsonl"))
    assert_one_line_error(result, f"{path}:2", "question")
    assert not (tmp_path / "o.jsonl").exists()


def test_sft_help_explains_every_option():
    result = tracetune("sft", "--help")
    assert result.returncode == 0
    for option in ("--preset", "--set", "--run-dir", "--model", "--max-steps", "resumes"):
        assert option in result.stdout


def test_sft_with_an_impossible_batch_is_one_line_error(tmp_path):
    result = tracetune("sft", "--preset", "tiny", "--run-dir", str(tmp_path), "--set", "sft.micro_batch_size=5")
    assert_one_line_error(result, "sft.batch_size (16) must be a multiple of sft.micro_batch_size (5)")


def scored_judge():
    """A judge endpoint that rates a haiku 4, any other question 2, and an
    "unscorable" one never (a reply without the JSON object, every attempt)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        question = (await request.json())["messages"][-1]["content"].split("Question:\n")[1].split("\n")[0]
        reply = "Score: 4" if "unscorable" in question else '{"score": 4, "rationale": "ok"}' if "haiku" in question else '{"score": 2, "rationale": "no"}'
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}

    return app


def test_eval_prints_the_per_domain_table_and_again_with_the_judge(write_jsonl, tmp_path):
    from tracetune.serve import running_server  # imports JAX: only this test needs it

    source = write_jsonl("mixed.jsonl", [
        {"id": "w1", "domain": "writing", "kind": "open", "question": "Write a haiku about rain."},
        {"id": "w2", "domain": "writing", "kind": "open", "question": "Write a haiku about snow."},
        {"id": "w3", "domain": "writing", "kind": "open", "question": "Write an unscorable limerick."},
        {"id": "m1", "domain": "math", "question": "What is 2 + 2?", "answer": "4"},
        {"id": "m2", "domain": "math", "question": "What is 3 + 3?", "answer": "6"},
    ])
    out = tmp_path / "eval"
    with running_server(scored_judge()) as base_url:
        result = tracetune("eval", "--model", "tiny", "--preset", "tiny", "--set", f"data.source={source}", "--set", "eval.max_new_tokens=16",
                           "--out", str(out), "--judge", "--judge-url", base_url, "--judge-model", "judge-x")
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.split("judge judge-x:")
    assert "Per domain (2), 95% intervals" in before and "Judge (1-5)" not in before
    assert "Per domain, judged by judge-x (4 of 5 rated samples scored)" in after
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]] for line in after.splitlines() if line.count("│") > 5}
    # writing: 3 prompts, judged 4 and 4 (the limerick unscored); no reference, so no accuracy.
    assert lines["writing"][1] == "3" and lines["writing"][4] == "—" and lines["writing"][5:] == ["4.00 [4.00, 4.00]", "2 (+1 unscored)"]
    assert lines["math"][1] == "2" and lines["math"][4] != "—" and lines["math"][5:] == ["2.00 [2.00, 2.00]", "2"]
    domains = json.loads((out / "metrics.json").read_text())["domains"]
    assert [(d["domain"], d["judge"]["n"], d["unscored"]) for d in domains] == [("writing", 2, 1), ("math", 2, 0)]
    assert "Judge: judge-x, 4 of 5" in (out / "metrics.md").read_text()
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # the harness reads a source with domains round-robin over them (a limit sees each)
    assert [(r["id"], r["domain"], r["kind"]) for r in records] == [
        ("w1", "writing", "open"), ("m1", "math", "numeric"), ("w2", "writing", "open"), ("m2", "math", "numeric"),
        ("w3", "writing", "open")]
