"""The scoring harness: per-sample records and the recipe's aggregate metrics.

Every model variant, and the curated SFT targets themselves (``tracetune validate``),
are scored by ``score_sample`` and ``aggregate``, which call the same parsing and
reward functions that GRPO trains on.

Metrics (each with a 95% confidence interval):
    accuracy          strict accuracy: the <answer> states the reference, read as the
                      row's task kind reads it (the correctness reward); over the
                      rows that have a reference (an open row is judged, not checked)
    lenient_accuracy  numeric rows: the last number anywhere equals the reference
                      (reporting only; other kinds have none)
    sound_accuracy    right, and every ``expr = value`` claim in the completion
                      holds (the ``sound`` reward, ``rewards.soundness``). A small
                      model's right answers are often reached through false steps
                      (the 270M after SFT: 6 of its 9 right answers on 500 GSM8K
                      test problems): luck, not reasoning.
    format_rate       share of completions in the strict trace format
    trace             mean trace reward (trace_structure)
    confidence        mean calibration reward (when answer log-probabilities are given)
    arithmetic        mean arithmetic reward (true claims grounded in the problem)
    composite         mean composite reward (when every weighted component is known)

The reward metrics (trace, confidence, arithmetic, ...) are the registered reward
components but correctness and sound (``rewards.REWARDS``, each in [0, 1]), which are
the accuracy and the sound accuracy: a new component is scored, aggregated and
labelled here without an edit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from statistics import NormalDist
from typing import Any

from tracetune.config import RewardWeights
from tracetune.data import DataError, example_from_row, iter_jsonl
from tracetune.files import atomic_path, json_safe
from tracetune.format import lenient_number, numbers_match, parse_completion, parse_number
from tracetune.rewards import REWARDS, Choices, answer_token_logprobs, available_components, combine, parse_reference

Z95 = NormalDist().inv_cdf(0.975)  # 1.95996...

# Every registered reward is a metric; correctness is the accuracy, sound the sound
# accuracy (rates, with McNemar's test in the comparisons). The judge is
# not scored per sample here: the evaluation's judge (judge.json) rates a seeded
# sample on its own 1-5 scale, and the report shows it beside these.
REWARD_METRICS = tuple(name for name in REWARDS if name not in ("correctness", "sound", "judge"))
METRICS = ("accuracy", "lenient_accuracy", "sound_accuracy", "format_rate", *REWARD_METRICS, "composite")
METRIC_LABELS = {
    "accuracy": REWARDS["correctness"].label,
    "lenient_accuracy": "Lenient accuracy",
    "sound_accuracy": REWARDS["sound"].label,
    "format_rate": "Format rate",
    **{name: REWARDS[name].label for name in REWARD_METRICS},
    "composite": "Avg composite reward",
}
UNIT = (0.0, 1.0)  # the reward components lie in [0, 1]
PROPORTIONS = {"accuracy", "lenient_accuracy", "sound_accuracy", "format_rate"}


@dataclass(frozen=True)
class SampleScore:
    """Everything the harness knows about one completion.

    ``rewards`` holds each reward metric by name (``REWARD_METRICS``: trace,
    confidence, arithmetic, ...), None where the sample lacked its columns (no
    answer log-probabilities: no confidence) or the metric is undefined for its
    kind (an open row's confidence). They read as attributes too
    (``score.trace``), and ``record()`` writes them as top-level keys.

    ``correct`` is None for an open row (nothing to check); ``predicted``,
    ``lenient_predicted`` and ``lenient_correct`` are numbers, and so None for
    every kind but numeric.
    """

    id: str
    question: str
    reference: str
    completion: str
    answer: str | None
    predicted: float | None
    lenient_predicted: float | None
    correct: bool | None
    lenient_correct: bool | None
    well_formed: bool
    rewards: dict[str, float | None]
    composite: float | None
    kind: str = "numeric"
    sound: bool | None = None  # right with no false arithmetic claim (None: an open row)

    def __getattr__(self, name: str) -> float | None:
        rewards = self.__dict__.get("rewards", {})
        if name in rewards:
            return rewards[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def record(self) -> dict[str, Any]:
        """The flat per-sample record (samples.jsonl): every field, the rewards by name."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rewards", "composite")}
        return {**out, **self.rewards, "composite": self.composite}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SampleScore:
        """Back from ``record()``; a reward the record lacks (scored before it was
        registered) is None."""
        names = [f.name for f in fields(cls) if f.name not in ("rewards", "kind", "sound")]
        return cls(**{k: record[k] for k in names}, rewards={name: record.get(name) for name in REWARD_METRICS},
                   kind=record.get("kind", "numeric"),  # records from before task kinds are numeric
                   sound=record.get("sound"))  # None in records from before sound accuracy


def score_sample(
    question: str,
    reference: str,
    completion: str,
    answer_logprobs: Sequence[float] | None = None,
    *,
    weights: RewardWeights | None = None,
    id: str = "",
    solution: str = "",
    kind: str = "numeric",
    choices: Choices | None = None,
) -> SampleScore:
    """Score one completion with every registered reward its inputs allow.

    Without answer log-probabilities there is no confidence term, and then no
    composite unless the confidence weight is 0. The judge's weight is left out
    (the composite is that of the other weighted terms). ``solution`` (GSM8K's worked
    solution) tells the arithmetic reward how many calculations the problem needs.
    ``kind`` and ``choices`` are the row's task kind and a choice row's options.
    """
    weights = weights if weights is not None else RewardWeights()
    parsed = parse_completion(completion)
    numeric = kind == "numeric"
    ref = parse_reference(reference) if numeric else None
    lenient = lenient_number(completion) if numeric else None
    columns: dict[str, list[Any]] = {"reference": [reference], "question": [question], "solution": [solution],
                                     "kind": [kind], "choices": [dict(choices or {})]}
    if answer_logprobs is not None:
        columns["answer_logprobs"] = [answer_logprobs]
    components = available_components([question], [completion], **columns)
    # The judge term is I/O, not a per-sample score here (judge.json rates a sample
    # apart): the harness's composite is the rest of the formula.
    rest = {**weights.as_dict(), "judge": 0.0}
    weights = RewardWeights(rest) if any(rest.values()) else None
    weighted = weights is not None and all(name in components for name, w in weights.as_dict().items() if w)
    correct = components["correctness"][0]
    sound = components["sound"][0]
    return SampleScore(
        id=id,
        question=question,
        reference=reference,
        completion=completion,
        answer=parsed.answer,
        predicted=parse_number(parsed.answer) if numeric else None,
        lenient_predicted=lenient,
        correct=None if correct is None else correct == 1.0,
        lenient_correct=numbers_match(lenient, ref) if numeric else None,
        well_formed=parsed.strict,
        rewards={name: components[name][0] if name in components else None for name in REWARD_METRICS},
        composite=combine(components, weights)[0] if weighted else None,
        kind=kind,
        sound=None if sound is None else sound == 1.0,
    )


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% confidence interval over n samples."""

    mean: float
    low: float
    high: float
    n: int


def proportion_ci(successes: int, n: int) -> Estimate:
    """Wilson score interval: unlike the normal approximation it stays inside [0, 1]
    and is sensible at 0% and 100%, which format rates often are."""
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return Estimate(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)), n)  # never past p by an ulp


def mean_ci(values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf)) -> Estimate:
    """Normal-approximation interval of a mean (sample standard deviation), cut to
    ``bounds`` when the values have them (a mean of scores in [0, 1] cannot exceed 1)."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = math.fsum(values) / n
    if n == 1:
        return Estimate(mean, mean, mean, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return Estimate(mean, max(bounds[0], mean - half), min(bounds[1], mean + half), n)


def aggregate(scores: Sequence[SampleScore]) -> dict[str, Estimate]:
    """The results table's metrics. A reward metric (confidence without
    log-probabilities) and the composite are over the samples that have them, and
    the accuracies over those with a reference to check (their n says how many)."""
    checked = [s.correct for s in scores if s.correct is not None]
    lenient = [s.lenient_correct for s in scores if s.lenient_correct is not None]
    sound = [s.sound for s in scores if s.sound is not None]
    return {
        "accuracy": proportion_ci(sum(checked), len(checked)),
        "lenient_accuracy": proportion_ci(sum(lenient), len(lenient)),
        "sound_accuracy": proportion_ci(sum(sound), len(sound)),
        "format_rate": proportion_ci(sum(s.well_formed for s in scores), len(scores)),
        **{name: mean_ci([v for s in scores if (v := s.rewards.get(name)) is not None], UNIT) for name in REWARD_METRICS},
        "composite": mean_ci([s.composite for s in scores if s.composite is not None]),  # weights may sum past 1
    }


def _fmt(estimate: Estimate, metric: str) -> tuple[str, str]:
    if estimate.n == 0:
        return "n/a", ""
    if metric in PROPORTIONS:
        return f"{100 * estimate.mean:.1f}%", f"[{100 * estimate.low:.1f}, {100 * estimate.high:.1f}]"
    return f"{estimate.mean:.3f}", f"[{estimate.low:.3f}, {estimate.high:.3f}]"


def estimate_cell(estimate: Estimate, metric: str) -> str:
    """One cell, the value and its 95% interval: ``"85.0% [64.0, 94.8]"`` for a rate,
    ``"0.812 [0.780, 0.840]"`` for a mean; "n/a" without samples."""
    value, ci = _fmt(estimate, metric)
    return f"{value} {ci}" if ci else value


def metrics_rows(metrics: dict[str, Estimate]) -> list[tuple[str, str, str, str]]:
    """(label, value, 95% CI, n) per metric, for Markdown and terminal tables."""
    return [(METRIC_LABELS[m], *_fmt(metrics[m], m), str(metrics[m].n)) for m in METRICS if m in metrics]


def markdown_table(metrics: dict[str, Estimate]) -> str:
    lines = ["| Metric | Value | 95% CI | n |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {value} | {ci} | {n} |" for label, value, ci, n in metrics_rows(metrics)]
    return "\n".join(lines) + "\n"


def metrics_json(metrics: dict[str, Estimate]) -> dict[str, Any]:
    return {name: asdict(estimate) for name, estimate in metrics.items()}


def write_scores(scores: Iterable[SampleScore], metrics: dict[str, Estimate], out_dir: Path) -> dict[str, Path]:
    """Per-sample JSONL, metrics JSON and the Markdown table, written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"samples": out_dir / "samples.jsonl", "metrics": out_dir / "metrics.json", "table": out_dir / "metrics.md"}
    contents = {
        "samples": "".join(json.dumps(s.record(), ensure_ascii=False) + "\n" for s in scores),
        "metrics": json.dumps(json_safe(metrics_json(metrics)), indent=2, allow_nan=False) + "\n",
        "table": markdown_table(metrics),
    }
    for key, path in paths.items():
        with atomic_path(path) as tmp:
            tmp.write_text(contents[key], encoding="utf-8")
    return paths


# ------------------------------------------------------------------ file input


@dataclass(frozen=True)
class CompletionRow:
    """A completion to score, as read from a JSONL file."""

    id: str
    question: str
    reference: str
    completion: str
    answer_logprobs: list[float] | None = None
    kind: str = "numeric"
    choices: tuple[tuple[str, str], ...] = ()


def completion_from_row(row: Any, source: str, line: int) -> CompletionRow:
    """Validate a row with ``question``, ``reference`` (or a GSM8K ``answer``),
    ``completion`` and optionally ``answer_logprobs`` or ``token_texts`` +
    ``token_logprobs``; DataError names the field at fault. A row of another task
    kind says so in its ``kind`` field (with ``choices`` for a choice row; an open
    row needs no reference), as a data row does (``data.example_from_row``)."""
    if isinstance(row, dict) and "reference" in row:
        example = example_from_row(row, source, line, "question", "reference")
    else:
        example = example_from_row(row, source, line, "question", "answer")
    completion = row.get("completion")
    if not isinstance(completion, str):
        raise DataError(source, line, "completion", "missing" if completion is None else "must be a string")

    def floats(name: str) -> list[float]:
        value = row[name]
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise DataError(source, line, name, "must be a list of numbers")
        return [float(v) for v in value]

    answer_logprobs = None
    if row.get("answer_logprobs") is not None:
        answer_logprobs = floats("answer_logprobs")
    elif row.get("token_logprobs") is not None:
        texts = row.get("token_texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DataError(source, line, "token_texts", "must be a list of strings beside token_logprobs")
        try:
            answer_logprobs = answer_token_logprobs(completion, texts, floats("token_logprobs")) or []
        except ValueError as error:
            raise DataError(source, line, "token_texts", str(error)) from None
    row_id = row.get("id")
    return CompletionRow(
        id=str(row_id) if row_id is not None else example.id,
        question=example.question,
        reference=example.reference,
        completion=completion,
        answer_logprobs=answer_logprobs,
        kind=example.kind,
        choices=example.choices,
    )


def read_completions(path: Path, skip_invalid: bool = False) -> tuple[list[CompletionRow], list[Exception]]:
    """Rows of a completions file; invalid rows raise, or are skipped and returned."""
    rows, skipped = [], []
    for line, value in iter_jsonl(path):
        try:
            if isinstance(value, DataError):
                raise value
            rows.append(completion_from_row(value, str(path), line))
        except DataError as error:
            if not skip_invalid:
                raise
            skipped.append(error)
    if not rows:
        raise DataError(str(path), None, None, f"no valid rows to score ({len(skipped)} skipped)")
    return rows, skipped


# Thresholds of ``tracetune validate``: the recipe's sanity check of the evaluation.
VALIDATE_MIN_TRACE = 0.9


def validation_problems(metrics: dict[str, Estimate]) -> list[str]:
    """Why the curated targets fail the sanity check (empty when they pass)."""
    problems = []
    if metrics["accuracy"].mean < 1.0:
        problems.append(f"accuracy is {100 * metrics['accuracy'].mean:.2f}%, expected 100%")
    if metrics["format_rate"].mean < 1.0:
        problems.append(f"format rate is {100 * metrics['format_rate'].mean:.2f}%, expected 100%")
    if not metrics["trace"].mean >= VALIDATE_MIN_TRACE:
        problems.append(f"average trace score is {metrics['trace'].mean:.3f}, expected >= {VALIDATE_MIN_TRACE}")
    return problems
