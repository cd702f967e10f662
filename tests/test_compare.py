"""Paired comparisons: McNemar's exact test and the paired bootstrap, against hand-computed values."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest

from tracetune.compare import RATE_FIELDS, NoSharedProblems, compare, mcnemar, mcnemar_p, paired_bootstrap
from tracetune.scoring import REWARD_METRICS, METRICS, PROPORTIONS, SampleScore, score_sample

from conftest import wrap


@pytest.mark.parametrize("won, lost, p", [
    (8, 2, 0.109375),    # 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * (1 + 10 + 45) / 1024
    (2, 8, 0.109375),    # two-sided: the direction does not matter
    (0, 0, 1.0),         # no discordant pairs: nothing speaks against H0
    (1, 0, 1.0),         # 2 * C(1,0) / 2 = 1: one pair proves nothing
    (5, 0, 0.0625),      # 2 / 2^5
    (6, 0, 0.03125),     # 2 / 2^6: the fewest one-sided wins below 0.05
    (8, 0, 0.0078125),   # 2 / 2^8
    (4, 2, 0.6875),      # 2 * (1 + 6 + 15) / 2^6 = 44 / 64
    (10, 10, 1.0),       # 2 * P(X <= 10 | n=20) > 1: capped
])
def test_mcnemar_exact_p_values(won, lost, p):
    assert mcnemar_p(won, lost) == pytest.approx(p, abs=1e-15)


def test_mcnemar_is_exact_at_sizes_where_floats_would_underflow():
    # n = 1300 discordant pairs: 2^1300 overflows a float, the integer tail does not.
    p = mcnemar_p(700, 600)
    assert 0 < p < 0.01 and math.isfinite(p)
    assert mcnemar_p(650, 650) == 1.0
    with pytest.raises(ValueError, match="won=-1"):
        mcnemar_p(-1, 3)


def test_mcnemar_counts_won_lost_and_ties_per_problem():
    before = [True, True, False, False, False, True]
    after = [True, False, True, True, False, True]
    test = mcnemar("accuracy", before, after)
    # won: problems 2 and 3 (right only after); lost: problem 1; ties: 0, 4, 5
    assert (test.won, test.lost, test.ties) == (2, 1, 3)
    assert test.p == pytest.approx(1.0) and not test.significant  # 2 * (1 + 3) / 8 = 1
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar("accuracy", [True], [True, False])


def test_bootstrap_interval_contains_the_mean_difference_and_is_seeded():
    rng = np.random.default_rng(7)
    before = rng.uniform(0, 1, 250)
    after = before + rng.normal(0.1, 0.2, 250)  # mean difference about 0.1
    d = paired_bootstrap("trace", before, after)
    true_mean = float(np.mean(after - before))
    assert d.n == 250 and d.mean == pytest.approx(true_mean)
    assert d.low < true_mean < d.high and d.excludes_zero
    # The percentile interval is close to the normal one: mean +- 1.96 * sd / sqrt(n).
    half = 1.96 * np.std(after - before, ddof=1) / math.sqrt(250)
    assert d.low == pytest.approx(true_mean - half, abs=0.005) and d.high == pytest.approx(true_mean + half, abs=0.005)
    # The same seed gives the same interval; another seed a (slightly) different one.
    assert paired_bootstrap("trace", before, after) == d
    other = paired_bootstrap("trace", before, after, seed=1)
    assert other != d and other.low == pytest.approx(d.low, abs=0.01)


def test_bootstrap_of_identical_variants_is_zero_and_degenerate_cases_are_explicit():
    same = paired_bootstrap("trace", [0.2, 0.9, 0.5], [0.2, 0.9, 0.5])
    assert (same.mean, same.low, same.high, same.n) == (0.0, 0.0, 0.0, 3) and not same.excludes_zero
    # Every difference equal (+0.25): every resample has that mean.
    shifted = paired_bootstrap("trace", [0.0, 0.5], [0.25, 0.75])
    assert (shifted.low, shifted.high) == (0.25, 0.25)
    one = paired_bootstrap("trace", [0.4], [0.9])  # a single pair
    assert (one.mean, one.low, one.high, one.n) == pytest.approx((0.5, 0.5, 0.5, 1))
    empty = paired_bootstrap("composite", [], [])
    assert empty.n == 0 and math.isnan(empty.mean) and not empty.excludes_zero
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap("trace", [0.1], [])


def test_bootstrap_interval_for_two_values_lies_between_them():
    # diffs {0, 1}: resample means are k/2 for k in 0..2, so the 95% interval is [0, 1].
    d = paired_bootstrap("trace", [0.0, 0.0], [0.0, 1.0])
    assert (d.mean, d.low, d.high) == (0.5, 0.0, 1.0)


def test_every_rate_in_scoring_has_a_per_sample_field():
    # A rate added to scoring.PROPORTIONS without its SampleScore field fails here, by name.
    names = {f.name for f in fields(SampleScore)}
    assert set(RATE_FIELDS) == set(PROPORTIONS)
    assert {RATE_FIELDS[m] for m in PROPORTIONS} <= names
    per_sample = names | set(REWARD_METRICS)  # SampleScore.record() writes each reward under its name
    assert {m for m in METRICS if m not in PROPORTIONS} <= per_sample  # a mean metric's record key has its name


def record(i: int, correct: bool, well_formed: bool = True, logprobs: list[float] | None = (-0.1,)) -> dict:
    """A samples.jsonl row scored by the harness's own scoring (so new metrics appear here too)."""
    answer = "72" if correct else "71"
    completion = wrap(answer, "Step 1: 48 + 24 = 72.\nTherefore, the answer is 72.") if well_formed else f"The answer is {answer}"
    score = score_sample("How many?", "72", completion, list(logprobs) if logprobs is not None else None, id=f"test-{i}")
    return {**score.record(), "failure": None}


def test_compare_pairs_by_id_on_the_shared_problems():
    before = [record(i, correct=i < 3) for i in range(6)]  # right on 0, 1, 2
    after = [record(i, correct=i in (1, 2, 3, 4), well_formed=i != 5) for i in reversed(range(2, 8))]  # 2..7, another order
    c = compare(before, after, before_name="SFT only", after_name="SFT + GRPO", resamples=500)
    # shared: 2, 3, 4, 5; problems 0, 1 (before only) and 6, 7 (after only) are left out
    assert (c.shared, c.left_out) == (4, 4)
    acc = c.rates["accuracy"]
    assert (acc.won, acc.lost, acc.ties) == (2, 0, 2) and acc.p == 0.5  # 2 / 2^2
    fmt = c.rates["format_rate"]
    assert (fmt.won, fmt.lost, fmt.ties) == (0, 1, 3) and fmt.p == 1.0
    assert set(c.rates) == set(PROPORTIONS)
    # every mean metric of scoring.METRICS that the records carry, read from the list, not hard-coded
    assert set(c.means) == {m for m in METRICS if m not in PROPORTIONS and before[0].get(m) is not None}
    assert {"trace", "composite"} <= set(c.means)
    by_id = {r["id"]: r for r in after}
    expected = np.mean([by_id[f"test-{i}"]["trace"] - before[i]["trace"] for i in (2, 3, 4, 5)])
    assert expected != 0  # the malformed completion of problem 5 scores a lower trace
    assert c.means["trace"].mean == pytest.approx(expected)


def test_a_mean_metric_is_compared_over_the_pairs_that_have_it():
    # Without answer log-probabilities there is no confidence term and no composite.
    before = [record(0, True), record(1, False, logprobs=None), record(2, False)]
    after = [record(0, True), record(1, True), record(2, True)]
    c = compare(before, after, resamples=200)
    assert c.means["composite"].n == 2 and c.means["trace"].n == 3


def test_no_shared_problem_is_a_clear_error():
    with pytest.raises(NoSharedProblems, match=r"zero-shot \(2 problems\) and sft \(1 problems\) share no problem id"):
        compare([record(0, True), record(1, True)], [record(9, True)], before_name="zero-shot", after_name="sft")
