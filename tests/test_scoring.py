from __future__ import annotations

import dataclasses
import json
import math

import pytest

from tracetune.config import RewardWeights
from tracetune.data import DataError
from tracetune.rewards import REWARDS
from tracetune.scoring import (
    METRIC_LABELS,
    METRICS,
    REWARD_METRICS,
    SampleScore,
    aggregate,
    markdown_table,
    mean_ci,
    proportion_ci,
    read_completions,
    score_sample,
    validation_problems,
    write_scores,
)

from conftest import wrap

GOOD = wrap("72", "Step 1: First, 48 / 2 = 24.\nStep 2: Then 48 + 24 = 72.\nTherefore, the answer is 72.")


def test_wilson_interval_known_values():
    # 8 of 10: Wilson 95% interval is [0.4902, 0.9433] (standard tables).
    est = proportion_ci(8, 10)
    assert est.mean == 0.8 and est.low == pytest.approx(0.4902, abs=1e-4) and est.high == pytest.approx(0.9433, abs=1e-4)
    # At 100% the interval stays inside [0, 1] and is not degenerate.
    full = proportion_ci(50, 50)
    assert full.high == 1.0 and 0.92 < full.low < 0.93
    assert math.isnan(proportion_ci(0, 0).mean)


def test_mean_interval():
    est = mean_ci([0.0, 1.0, 0.0, 1.0])
    # mean 0.5, sample sd 0.57735, half-width 1.95996 * 0.57735 / 2 = 0.56579
    assert est.mean == 0.5 and est.high - est.mean == pytest.approx(0.56579, abs=1e-5)
    assert mean_ci([0.3]) .low == 0.3
    # Scores near the top of [0, 1]: the interval stops at 1.
    high = mean_ci([1.0] * 9 + [0.6], (0.0, 1.0))
    assert high.high == 1.0 and high.low < high.mean < 1.0


def test_harness_on_hand_written_completions_gives_exact_metrics():
    samples = [
        ("q1", "72", GOOD, None),  # right, well formed, full trace
        ("q2", "72", wrap("71"), None),  # wrong but well formed
        ("q3", "72", "Sure! " + wrap("72"), None),  # right answer, text outside: not well formed
        ("q4", "72", "I think it is 72.", None),  # no tags: wrong strictly, right leniently
    ]
    scores = [score_sample(q, r, c, lp, id=q) for q, r, c, lp in samples]
    metrics = aggregate(scores)
    assert metrics["accuracy"].mean == 0.5  # q1, q3
    assert metrics["lenient_accuracy"].mean == 0.75  # q1, q3, q4 (q2 says 71)
    assert metrics["format_rate"].mean == 0.5  # q1, q2
    assert metrics["trace"].mean == pytest.approx(sum(s.trace for s in scores) / 4)
    assert scores[0].trace == pytest.approx(1.0)
    assert metrics["composite"].n == 0 and metrics["confidence"].n == 0  # no log-probabilities
    assert [s.predicted for s in scores] == [72.0, 71.0, 72.0, None]


def test_composite_with_answer_logprobs():
    s = score_sample("q", "72", GOOD, [math.log(0.5), math.log(0.5)])
    assert s.confidence == pytest.approx(0.5)
    assert s.composite == pytest.approx(0.6 + 0.25 * 1.0 + 0.15 * 0.5)
    # With the confidence weight at 0, the composite needs no log-probabilities.
    s0 = score_sample("q", "72", GOOD, None, weights=RewardWeights(correctness=0.6, trace=0.25, confidence=0.0))
    assert s0.composite == pytest.approx(0.85)


def test_outputs_json_and_markdown(tmp_path):
    scores = [score_sample("q", "72", GOOD), score_sample("q", "72", wrap("1"))]
    metrics = aggregate(scores)
    paths = write_scores(scores, metrics, tmp_path / "out")
    rows = [json.loads(line) for line in paths["samples"].read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False]
    assert json.loads(paths["metrics"].read_text())["accuracy"]["mean"] == 0.5
    table = markdown_table(metrics)
    assert "| GSM8K accuracy | 50.0% |" in table and "| Avg composite reward | n/a |" in table


def test_validation_problems():
    ok = aggregate([score_sample("q", "72", GOOD)])
    assert validation_problems(ok) == []
    bad = aggregate([score_sample("q", "72", GOOD), score_sample("q", "72", "72")])
    problems = validation_problems(bad)
    assert any("accuracy is 50.00%" in p for p in problems) and any("format rate" in p for p in problems)


def test_read_completions_with_token_logprobs(write_jsonl):
    completion = wrap("72")
    cut = completion.index("72")
    texts = [completion[:cut], "72", completion[cut + 2 :]]
    path = write_jsonl("c.jsonl", [
        {"id": "a", "question": "q", "reference": "72", "completion": completion, "token_texts": texts, "token_logprobs": [-1.0, math.log(0.8), -1.0]},
        {"question": "q", "answer": "... #### 72", "completion": completion, "answer_logprobs": [math.log(0.3)]},
    ])
    rows, skipped = read_completions(path)
    assert not skipped and rows[0].id == "a"
    assert rows[0].answer_logprobs == [pytest.approx(math.log(0.8))]
    assert rows[1].answer_logprobs == [pytest.approx(math.log(0.3))]


def test_read_completions_errors_name_the_field(write_jsonl):
    path = write_jsonl("c.jsonl", [
        {"question": "q", "reference": "72", "completion": "x"},
        {"question": "q", "reference": "72"},
        {"question": "q", "reference": "72", "completion": "x", "answer_logprobs": "high"},
        {"question": "q", "reference": "72", "completion": "x", "token_logprobs": [-1.0], "token_texts": ["y"]},
    ])
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'completion': missing"):
        read_completions(path)
    rows, skipped = read_completions(path, skip_invalid=True)
    assert len(rows) == 1
    assert [(e.line, e.field) for e in skipped] == [(2, "completion"), (3, "answer_logprobs"), (4, "token_texts")]


NATALIA_Q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips in all?"
NATALIA_SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether."


def test_every_registered_reward_is_a_metric_with_a_label():
    # correctness is the accuracy, sound the sound accuracy; every other component is its own metric.
    assert REWARD_METRICS == ("trace", "confidence", "arithmetic", "progress")  # the judge rates a sample apart (judge.json)
    assert METRICS == ("accuracy", "lenient_accuracy", "sound_accuracy", "format_rate", "trace", "confidence", "arithmetic",
                       "progress", "composite")
    assert all(METRIC_LABELS[name] == REWARDS[name].label for name in REWARD_METRICS)
    # A record holds the rewards beside the score's own fields: no name may be both.
    assert not set(REWARD_METRICS) & {f.name for f in dataclasses.fields(SampleScore)}


def test_the_arithmetic_reward_is_scored_and_aggregated():
    right = score_sample(NATALIA_Q, "72", GOOD, solution=NATALIA_SOLUTION)
    wrong = score_sample(NATALIA_Q, "72", wrap("72", "Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 73.\nSo the answer is 72."),
                         solution=NATALIA_SOLUTION)
    assert (right.arithmetic, wrong.arithmetic) == (1.0, 0.25)  # (1/2) * (1/2): one of two claims false
    metrics = aggregate([right, wrong])
    assert metrics["arithmetic"].mean == pytest.approx(0.625) and metrics["arithmetic"].n == 2
    assert "| Avg arithmetic reward | 0.625 |" in markdown_table(metrics)
    # Its weight puts it in the composite: R = 0.6 * 1 + 0.4 * 0.25 (no trace, no confidence).
    weighted = score_sample(NATALIA_Q, "72", wrong.completion, weights=RewardWeights(correctness=0.6, trace=0, confidence=0,
                                                                                      arithmetic=0.4), solution=NATALIA_SOLUTION)
    assert weighted.composite == pytest.approx(0.7)


def test_records_are_flat_and_round_trip():
    score = score_sample(NATALIA_Q, "72", GOOD, [math.log(0.5)] * 2, id="a", solution=NATALIA_SOLUTION)
    record = score.record()
    assert {k: record[k] for k in ("trace", "confidence", "arithmetic")} == {"trace": pytest.approx(1.0),
                                                                            "confidence": pytest.approx(0.5), "arithmetic": 1.0}
    assert "rewards" not in record and list(record)[-1] == "composite"
    assert SampleScore.from_record(record) == score
    # A record written before the arithmetic reward existed reads with no arithmetic score.
    old = {k: v for k, v in record.items() if k != "arithmetic"}
    assert SampleScore.from_record(old).arithmetic is None
    assert aggregate([SampleScore.from_record(old)])["arithmetic"].n == 0


def test_sound_accuracy_counts_right_answers_whose_claims_all_hold():
    """A right answer reached through a false step is luck: right, not sound."""
    lucky = wrap("72", "Step 1: 48 / 2 = 20.\nStep 2: 48 + 24 = 72.\nTherefore, the answer is 72.")
    scores = [score_sample(NATALIA_Q, "72", c, id=str(i)) for i, c in enumerate([GOOD, lucky, wrap("71")])]
    assert [(s.correct, s.sound) for s in scores] == [(True, True), (True, False), (False, False)]
    metrics = aggregate(scores)
    assert (metrics["accuracy"].mean, metrics["sound_accuracy"].mean) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert "| Sound accuracy | 33.3% |" in markdown_table(metrics)
    # Records written before it read with no sound accuracy, and the metric has no n.
    old = {k: v for k, v in scores[0].record().items() if k != "sound"}
    assert SampleScore.from_record(old).sound is None and aggregate([SampleScore.from_record(old)])["sound_accuracy"].n == 0
    # An open row (nothing to check) has none either.
    assert score_sample("Why?", "", wrap("because"), kind="open").sound is None
