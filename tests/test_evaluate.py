"""The fixed harness: exact metrics on hand-written completions, resuming a cut-off
evaluation, and ``tracetune eval`` on the tiny model."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from tracetune.errors import DamagedFile
from tracetune.config import ConfigError, load_config
from tracetune.data import Example, curate_data, held_out_split
from tracetune.evaluate import (
    EvalError,
    domain_of,
    domain_rows,
    domain_summary,
    evaluate,
    problems,
    read_records,
    sample_record,
    score_generation,
    shot_prefix,
    summarize,
    write_summary,
)
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
    assert advanced == [3, 1, 1, 1, 1, 1]  # 3 already scored, then each of the 5 missing as it finishes
    assert [r["completion"] for r in resumed.records] == [r["completion"] for r in whole.records]
    assert resumed.metrics == whole.metrics
    assert [r["id"] for r in read_records(tmp_path / "cut" / "samples.jsonl")] == [e.id for e in examples]  # in order again
    # Nothing left to do: no generation at all.
    again = evaluate(tiny, examples, tmp_path / "cut", config)
    assert again.seconds == 0.0 and again.metrics == whole.metrics


def test_an_evaluation_directory_refuses_other_settings(tmp_path, tiny):
    config = load_config("tiny", ["eval.limit=2"])
    evaluate(tiny, problems(config), tmp_path, config)
    other = load_config("tiny", ["eval.limit=2", "eval.max_new_tokens=50"])
    with pytest.raises(EvalError, match="max_new_tokens: 96 -> 50"):
        evaluate(tiny, problems(other), tmp_path, other)


def test_shots_put_training_traces_before_every_question_and_never_a_held_out_one(tmp_path, tiny, monkeypatch):
    from tracetune.generate import Generator

    config = load_config("tiny", ["eval.limit=3", "eval.shots=2", "eval.split=held-out"])
    prefix = shot_prefix(config)
    shots = curate_data(config.data)[0].train[:2]
    assert prefix == "".join(f"{t.prompt}{t.completion}\n\n" for t in shots)
    assert prefix.count("<answer>") == 2 and prefix.endswith("</answer>\n\n")
    held_out = held_out_split(config.data)[1]
    assert not any(f"Q: {e.question.strip()}\n" in prefix for e in held_out)
    # The prefix reaches the decoder in front of the harness's own prompt.
    seen: list[str] = []
    stream = Generator.stream

    def recording(self, prompts, sampling):
        seen.extend(prompts)
        return stream(self, prompts, sampling)

    monkeypatch.setattr(Generator, "stream", recording)
    examples = problems(config)
    result = evaluate(tiny, examples, tmp_path, config)
    assert seen == [prefix + f"Q: {e.question.strip()}\nA:\n" for e in examples]
    assert result.settings["shots"] == 2
    assert json.loads((tmp_path / "eval.json").read_text())["shots"] == 2
    # Another number of shots is another harness: the directory refuses it.
    plain = load_config("tiny", ["eval.limit=3", "eval.split=held-out"])
    with pytest.raises(EvalError, match="shots: 2 -> 0"):
        evaluate(tiny, problems(plain), tmp_path, plain)


def test_an_evaluation_from_before_shots_resumes_as_zero_shot(tmp_path, tiny):
    config = load_config("tiny", ["eval.limit=2"])
    evaluate(tiny, problems(config), tmp_path, config)
    settings = json.loads((tmp_path / "eval.json").read_text())
    del settings["shots"]
    (tmp_path / "eval.json").write_text(json.dumps(settings))
    assert evaluate(tiny, problems(config), tmp_path, config).seconds == 0.0  # nothing to redo
    shown = load_config("tiny", ["eval.limit=2", "eval.shots=1"])
    with pytest.raises(EvalError, match="shots: 0 -> 1"):
        evaluate(tiny, problems(shown), tmp_path, shown)


def test_more_shots_than_training_traces_is_a_config_error(tmp_path):
    assert shot_prefix(load_config("tiny")) == ""
    with pytest.raises(ConfigError, match=r"eval.shots=1000000, but the training data \('arithmetic'\) gives only"):
        evaluate(None, [], tmp_path / "eval", load_config("tiny", ["eval.shots=1000000"]))
    assert not (tmp_path / "eval").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="eval.limit and eval.shots must be >= 0"):
        load_config("tiny", ["eval.shots=-1"])


def test_a_corrupt_line_inside_samples_names_the_line(tmp_path):
    (tmp_path / "samples.jsonl").write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DamagedFile, match=r"samples.jsonl:2"):
        read_records(tmp_path / "samples.jsonl")


def test_eval_command_writes_samples_metrics_and_prints_the_table(tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "tracetune.cli", "eval", "--model", "tiny", "--preset", "tiny",
                             "--limit", "4", "--shots", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env={"COLUMNS": "200", **__import__("os").environ})
    assert result.returncode == 0, result.stderr
    assert "GSM8K accuracy" in result.stdout and "95% CI" in result.stdout and "1-shot" in result.stdout
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert {"question", "reference", "completion", "answer", "correct", "well_formed", "trace", "composite", "failure"} <= set(records[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["limit"] == 4 and metrics["metrics"]["accuracy"]["n"] == 4
    assert metrics["settings"]["shots"] == 1


# ------------------------------------------------------------------ per domain


def record(id: str, *, domain: str | None, kind: str, well_formed: bool, correct: bool | None, trace: float) -> dict:
    """A samples.jsonl record with only what the per-domain table reads; ``domain``
    None: a record from before domains (no key at all)."""
    out = {"id": id, "question": "q", "reference": "" if kind == "open" else "4", "completion": "c", "answer": None,
           "predicted": None, "lenient_predicted": None, "correct": correct, "lenient_correct": None,
           "well_formed": well_formed, "trace": trace, "composite": None, "kind": kind, "failure": None}
    if domain is not None:
        out["domain"] = domain
    return out


# "writing": 4 open prompts (no reference), 3 well formed, traces 0.2 0.4 0.6 0.8.
# "numeric": 5 GSM8K-style records from before domains (no domain key), 4 right, all well formed.
RECORDS = [record(f"w{i}", domain="writing", kind="open", well_formed=i < 3, correct=None, trace=0.2 * (i + 1)) for i in range(4)]
RECORDS += [record(f"n{i}", domain=None, kind="numeric", well_formed=True, correct=i < 4, trace=1.0) for i in range(5)]
# Judged: w0 4, w1 2, w2 unscored, w3 not chosen; n0 5; "gone" is no record's id.
JUDGEMENTS = [{"id": "w0", "score": 4}, {"id": "w1", "score": 2}, {"id": "w2", "score": None}, {"id": "n0", "score": 5},
              {"id": "gone", "score": 1}]


def test_per_domain_rates_and_means_match_the_hand_computed_intervals():
    writing, numeric = domain_summary(RECORDS, JUDGEMENTS)
    assert (writing.domain, writing.n, numeric.domain, numeric.n) == ("writing", 4, "numeric", 5)  # no domain: its kind
    # Wilson, z = 1.959964, z^2 = 3.841459. Format 3/4: denom = 1 + z^2/4 = 1.960365,
    # centre = (0.75 + z^2/8) / denom = 0.627527, half = z * sqrt(0.75*0.25/4 + z^2/64) / denom = 0.326886.
    assert (writing.format_rate.mean, writing.format_rate.n) == (0.75, 4)
    assert (writing.format_rate.low, writing.format_rate.high) == pytest.approx((0.300641, 0.954413), abs=1e-6)
    # Trace 0.2..0.8: mean 0.5, sd = sqrt((0.09 + 0.01 + 0.01 + 0.09) / 3) = 0.258199, half = z * sd / 2 = 0.253030.
    assert (writing.trace.mean, writing.trace.low, writing.trace.high) == pytest.approx((0.5, 0.246970, 0.753030), abs=1e-6)
    assert writing.accuracy.n == 0  # open prompts: nothing to check
    # Judge 4 and 2 (w2 unscored: left out, counted): mean 3, sd = sqrt(2), half = z * sqrt(2) / sqrt(2) = z.
    assert (writing.judge.mean, writing.judge.low, writing.judge.high, writing.judge.n) == pytest.approx((3.0, 1.040036, 4.959964, 2))
    assert writing.unscored == 1
    # Format 5/5: centre = (1 + z^2/10) / (1 + z^2/5) = 0.782759, half = z * (z/10) / (1 + z^2/5) = 0.217241: low 0.565518.
    assert (numeric.format_rate.mean, numeric.format_rate.low, numeric.format_rate.high) == pytest.approx((1.0, 0.565518, 1.0), abs=1e-6)
    # Accuracy 4/5: centre = (0.8 + z^2/10) / 1.768292 = 0.669655, half = z * sqrt(0.16/5 + z^2/100) / 1.768292 = 0.294121.
    assert (numeric.accuracy.mean, numeric.accuracy.low, numeric.accuracy.high) == pytest.approx((0.8, 0.375535, 0.963776), abs=1e-6)
    assert (numeric.trace.mean, numeric.trace.low, numeric.trace.high) == (1.0, 1.0, 1.0)  # sd 0
    assert (numeric.judge.mean, numeric.judge.n, numeric.unscored) == (5.0, 1, 0)  # n1..n4 not chosen by the judge
    # Without judge.json: no judge column at all.
    assert all(d.judge is None for d in domain_summary(RECORDS))
    header, rows = domain_rows(domain_summary(RECORDS))
    assert header == ["Domain", "n", "Format rate", "Avg trace score", "Accuracy"]
    assert rows[0] == ["writing", "4", "75.0% [30.1, 95.4]", "0.500 [0.247, 0.753]", "—"]
    assert rows[1] == ["numeric", "5", "100.0% [56.6, 100.0]", "1.000 [1.000, 1.000]", "80.0% [37.6, 96.4]"]


def test_one_kind_without_domains_has_no_table_and_old_records_still_load(tmp_path):
    gsm8k = [r for r in RECORDS if "domain" not in r]
    assert domain_summary(gsm8k) == []
    write_summary(tmp_path, gsm8k, {"variant": "old"})
    assert "domains" not in json.loads((tmp_path / "metrics.json").read_text())
    assert "Per domain" not in (tmp_path / "metrics.md").read_text()
    # Older still: no kind either (before task kinds) -> numeric, like SampleScore.from_record.
    ancient = [{k: v for k, v in r.items() if k != "kind"} for r in gsm8k]
    assert domain_summary(ancient) == [] and domain_of(ancient[0]) == "numeric"
    # A second kind is a second group even without domains.
    mixed = gsm8k + [record("o1", domain=None, kind="open", well_formed=True, correct=None, trace=0.5)]
    assert [(d.domain, d.n) for d in domain_summary(mixed)] == [("numeric", 5), ("open", 1)]


def test_the_summary_files_gain_the_judge_column_once_judge_json_is_there(tmp_path):
    write_summary(tmp_path, RECORDS, {"variant": "v"})
    domains = json.loads((tmp_path / "metrics.json").read_text())["domains"]
    assert [(d["domain"], d["n"], d["judge"]) for d in domains] == [("writing", 4, None), ("numeric", 5, None)]
    assert domains[0]["accuracy"]["mean"] is None and domains[0]["accuracy"]["n"] == 0  # NaN written as null
    table = (tmp_path / "metrics.md").read_text()
    assert "| writing | 4 | 75.0% [30.1, 95.4] | 0.500 [0.247, 0.753] | — |" in table and "Judge" not in table
    summary = {"judge_model": "judge-x", "n": 5, "scored": 4, "unscored": 1}
    (tmp_path / "judge.json").write_text(json.dumps({**summary, "judgements": JUDGEMENTS}))
    write_summary(tmp_path, RECORDS, {"variant": "v"})
    writing, numeric = json.loads((tmp_path / "metrics.json").read_text())["domains"]
    assert (writing["judge"]["mean"], writing["judge"]["n"], writing["unscored"]) == (3.0, 2, 1)
    table = (tmp_path / "metrics.md").read_text()
    assert "Judge: judge-x, 4 of 5 rated samples scored (1 unscored)." in table
    assert "| writing | 4 | 75.0% [30.1, 95.4] | 0.500 [0.247, 0.753] | — | 3.00 [1.04, 4.96] | 2 (+1 unscored) |" in table
    assert "| numeric | 5 | 100.0% [56.6, 100.0] | 1.000 [1.000, 1.000] | 80.0% [37.6, 96.4] | 5.00 [5.00, 5.00] | 1 |" in table


def test_a_sample_record_carries_its_domain_and_kind():
    example = replace(EXAMPLE, domain="math")
    out = sample_record(score_generation(example, generation(RIGHT), load_config().rewards), generation(RIGHT), example)
    assert (out["domain"], out["kind"]) == ("math", "numeric")
    plain = sample_record(score_generation(EXAMPLE, generation(RIGHT), load_config().rewards), generation(RIGHT), EXAMPLE)
    assert plain["domain"] == ""


def test_the_held_out_split_is_the_one_grpo_validates_on():
    from types import SimpleNamespace

    from tracetune.evaluate import problems
    from tracetune.grpo import prompt_examples

    config = load_config("cpu-demo", ["eval.split=held-out", "eval.limit=0"])
    _, validation = prompt_examples(config, SimpleNamespace(encode=lambda text: [0]))
    held_out = problems(config)
    assert [e.id for e in held_out] == [e.id for e in validation] and len(held_out) == 374
    test_ids = {e.id for e in problems(load_config("cpu-demo", ["eval.limit=0"]))}
    assert not test_ids & {e.id for e in held_out}  # never the test split
    assert len(problems(load_config("cpu-demo", ["eval.split=held-out", "eval.limit=64"]))) == 64
