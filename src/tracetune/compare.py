"""Paired comparisons of two evaluated variants on the same problems.

Two variants scored by the harness on the same problems are paired by problem id,
which is far more sensitive than comparing their two confidence intervals: 4% and
6% accuracy over 50 problems have overlapping intervals, yet the question "on how
many problems did the new variant turn a wrong answer right, and on how many the
reverse?" has an exact answer.

    rates (scoring.PROPORTIONS)  McNemar's exact test: a two-sided binomial test on
                                 the discordant pairs (won: right only in ``after``,
                                 lost: right only in ``before``)
    means (the other METRICS)    a paired bootstrap percentile interval of the mean
                                 per-problem difference ``after - before``

Example (the arithmetic is written beside it):

    >>> mcnemar_p(8, 2)  # 2 * (C(10,0) + C(10,1) + C(10,2)) / 2**10 = 2 * 56 / 1024
    0.109375
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tracetune.scoring import METRICS, PROPORTIONS

# The per-sample field (SampleScore's name) behind each rate in scoring.PROPORTIONS;
# a mean metric's field has the metric's own name (trace, confidence, composite, ...).
RATE_FIELDS = {"accuracy": "correct", "lenient_accuracy": "lenient_correct", "sound_accuracy": "sound",
               "format_rate": "well_formed"}
RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
SIGNIFICANCE = 0.05


class NoSharedProblems(ValueError):
    """Two evaluations with no problem id in common: nothing to pair."""


@dataclass(frozen=True)
class McNemar:
    """A rate compared on paired problems: ``won`` problems counted only for the
    later variant, ``lost`` only for the earlier one, ``ties`` for both or neither."""

    metric: str
    won: int
    lost: int
    ties: int
    p: float  # exact two-sided; 1.0 when there are no discordant pairs

    @property
    def significant(self) -> bool:
        return self.p < SIGNIFICANCE


@dataclass(frozen=True)
class MeanDifference:
    """Mean of ``after - before`` over the ``n`` problems where both have the metric,
    with its paired bootstrap percentile interval (``level``, e.g. 0.95)."""

    metric: str
    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n > 0 and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Comparison:
    """``after`` against ``before`` on the problems both scored."""

    before: str
    after: str
    shared: int  # problems scored by both: the pairs
    left_out: int  # problems scored by only one of the two
    rates: dict[str, McNemar]
    means: dict[str, MeanDifference]


def mcnemar_p(won: int, lost: int) -> float:
    """McNemar's exact test: under H0 each of the n = won + lost discordant pairs goes
    either way with probability 1/2, so p = 2 * P(Binomial(n, 1/2) <= min(won, lost)),
    capped at 1. No discordant pairs: p = 1 (nothing speaks against H0)."""
    if won < 0 or lost < 0:
        raise ValueError(f"counts must be >= 0, got won={won}, lost={lost}")
    n = won + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(won, lost) + 1))  # exact integers: no underflow at large n
    return min(1.0, 2 * tail / 2**n)


def mcnemar(metric: str, before: Sequence[bool], after: Sequence[bool]) -> McNemar:
    """McNemar's exact test of a rate over paired samples (``before[i]`` and ``after[i]``
    are the same problem)."""
    if len(before) != len(after):
        raise ValueError(f"paired samples differ in length: {len(before)} vs {len(after)}")
    won = sum(1 for b, a in zip(before, after) if a and not b)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    return McNemar(metric, won, lost, len(before) - won - lost, mcnemar_p(won, lost))


def paired_bootstrap(
    metric: str,
    before: Sequence[float],
    after: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> MeanDifference:
    """Percentile bootstrap interval of the mean of ``after - before``: resample
    problems (pairs) with replacement, ``resamples`` times, with a seeded generator
    so the report is the same on every run. No pairs: nan with n = 0; all
    differences equal (one pair, or identical variants): the interval is that value."""
    if len(before) != len(after):
        raise ValueError(f"paired samples differ in length: {len(before)} vs {len(after)}")
    diffs = np.asarray(after, np.float64) - np.asarray(before, np.float64)  # [n]
    n = len(diffs)
    if n == 0:
        return MeanDifference(metric, math.nan, math.nan, math.nan, 0)
    mean = float(np.mean(diffs))
    if np.all(diffs == diffs[0]):  # every resample has this mean
        return MeanDifference(metric, mean, mean, mean, n)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)  # [resamples]
    chunk = max(1, 2_000_000 // n)  # bound the index matrix to ~16 MB at any n
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        index = rng.integers(0, n, size=(rows, n))  # [rows, n]
        means[start : start + rows] = diffs[index].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return MeanDifference(metric, mean, float(low), float(high), n)


def _field(metric: str) -> str:
    return RATE_FIELDS[metric] if metric in PROPORTIONS else metric


def compare(
    before: Sequence[Mapping[str, Any]],
    after: Sequence[Mapping[str, Any]],
    *,
    before_name: str = "before",
    after_name: str = "after",
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Comparison:
    """Compare two evaluations' per-sample records (samples.jsonl rows, keyed by
    ``id``) on the problems both scored, for every metric in scoring.METRICS whose
    field the records have. A mean metric a record lacks or holds as None (no
    composite without a confidence term) is compared over the pairs that have it."""
    first = {r["id"]: r for r in before}
    second = {r["id"]: r for r in after}
    ids = [i for i in first if i in second]  # in ``before``'s order
    if not ids:
        raise NoSharedProblems(f"{before_name} ({len(first)} problems) and {after_name} ({len(second)} problems) "
                               "share no problem id: nothing to compare")
    left_out = len(first) + len(second) - 2 * len(ids)
    pairs = [(first[i], second[i]) for i in ids]
    rates, means = {}, {}
    for metric in METRICS:
        field = _field(metric)
        if metric in PROPORTIONS:
            # over the pairs both have a rate for (an open row has no accuracy: None)
            if all(field in b and field in a for b, a in pairs):
                known = [(b[field], a[field]) for b, a in pairs if b[field] is not None and a[field] is not None]
                rates[metric] = mcnemar(metric, [bool(b) for b, _ in known], [bool(a) for _, a in known])
            continue
        known = [(b[field], a[field]) for b, a in pairs if b.get(field) is not None and a.get(field) is not None]
        if known:
            means[metric] = paired_bootstrap(metric, [b for b, _ in known], [a for _, a in known], resamples=resamples, seed=seed)
    return Comparison(before_name, after_name, len(ids), left_out, rates, means)
