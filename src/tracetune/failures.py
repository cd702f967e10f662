"""Failure analysis: one category, with evidence, for every failed sample.

A sample fails when it is wrong or not in the strict format (``is_failure``). Each
failure gets the first category that applies, in this order, and a short evidence
string quoting what was found::

    format_failure        not in the strict trace format (or the <answer> holds no
                          number), so no answer can be read properly
    calculation_error     a shown calculation is false: "`60 / 1.5 = 45` is false (60 / 1.5 = 40)"
    unit_confusion        the answer is off by a unit factor (x60, x100, ...) or the
                          conclusion names another unit than the question asks for
    premature_conclusion  far fewer steps than the reference solution, or the answer
                          is one of the reference's intermediate results
    verbose_reasoning     far more steps than the reference, or a step repeated
    wrong_answer          (choice and text rows) a readable answer that is not the reference
    other                 none of the above

The categories between format_failure and verbose_reasoning read numbers: they
apply to numeric rows only. A choice or text row that fails is a format failure
(its <answer> also names no single option / states nothing), verbose reasoning (a
step repeated), or else a wrong answer, with the answer and the reference as its
evidence. An open row has no reference: it fails only on format.

Why this order: the most objective evidence wins. A malformed completion cannot be
read at all; a false ``a op b = c`` is a fact about the trace alone; a unit factor
needs the reference and a heuristic; step counts and repeats are the weakest signs
of what went wrong, and an answer that is the reference's own intermediate result
says more than a long trace does, so premature comes before verbose.

The heuristics' thresholds are module constants: ``UNIT_FACTORS`` (shared with the
arithmetic reward, in ``arithmetic``), ``VERBOSE_FACTOR`` and ``VERBOSE_MIN_EXTRA``,
``PREMATURE_FACTOR`` and ``PREMATURE_MIN_MISSING``. Claims are read and checked by
``arithmetic.arithmetic_claims``, the one evaluator the arithmetic reward uses too.

>>> categorize("How far?", "40", "<reasoning>Step 1: 60 / 1.5 = 45\\nTherefore, the answer is 45."
...            "</reasoning>\\n<answer>45</answer>").evidence
'`60 / 1.5 = 45` is false (60 / 1.5 = 40)'
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tracetune.arithmetic import CALCULATOR, UNIT_FACTORS, arithmetic_claims
from tracetune.data import CurationError, solution_steps
from tracetune.format import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    REASONING_CLOSE,
    REASONING_OPEN,
    TAGS,
    find_numbers,
    numbers_match,
    parse_completion,
    parse_number,
    read_answer,
)
from tracetune.rewards import CONCLUSION_CUES, Choices, correctness, parse_reference, split_steps

CATEGORIES: tuple[str, ...] = (
    "format_failure",
    "calculation_error",
    "unit_confusion",
    "premature_conclusion",
    "verbose_reasoning",
    "wrong_answer",
    "other",
)
CATEGORY_LABELS: dict[str, str] = {
    "format_failure": "Format failure",
    "calculation_error": "Calculation error",
    "unit_confusion": "Unit confusion",
    "premature_conclusion": "Premature conclusion",
    "verbose_reasoning": "Verbose reasoning",
    "wrong_answer": "Wrong answer",
    "other": "Other",
}


@dataclass(frozen=True)
class Failure:
    """The category of one failed sample and the evidence for it."""

    category: str
    evidence: str


# ----------------------------------------------------------------- the evidence


def _fmt(value: float) -> str:
    """40.0 -> "40", 2.5 -> "2.5", 1/3 -> "0.3333"."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _quote(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


# What an <answer> block lacks when it states nothing its kind can read.
_UNREADABLE = {"numeric": "holds no number", "choice": "names no single option"}


def _format_problem(completion: str, kind: str = "numeric", choices: Choices | None = None) -> str | None:
    """What keeps ``completion`` from the strict format, or None if it is strict."""
    parsed = parse_completion(completion)
    if parsed.strict:
        if read_answer(parsed.answer, kind, choices) is None:
            return f"the <answer> block {_UNREADABLE.get(kind, 'states nothing')}: '{_quote(parsed.answer or '')}'"
        return None
    counts = {tag: completion.count(tag) for tag in TAGS}
    problems = []
    missing = [tag for tag in TAGS if counts[tag] == 0]
    if missing:
        problems.append(f"no {', '.join(missing)} tag{'s' if len(missing) > 1 else ''}")
    problems += [f"{n} {tag} tags" for tag, n in counts.items() if n > 1]
    if not problems:  # every tag exactly once, yet not strict
        if parsed.reasoning is None or parsed.answer is None:
            problems.append("tags out of order or nested")
        elif completion.find(ANSWER_OPEN) < completion.find(REASONING_OPEN):
            problems.append("<answer> comes before <reasoning>")
        elif parsed.outside.strip():
            problems.append(f"text outside the tags: '{_quote(parsed.outside.strip(), 40)}'")
        else:
            problems.append("empty <answer> block")
    if counts[REASONING_CLOSE] == 0:  # the reasoning ran on: how far, and did it stop?
        start = completion.find(REASONING_OPEN)
        _, n_markers = split_steps(completion[start + len(REASONING_OPEN) :] if start >= 0 else completion)
        last_tag = max(TAGS, key=completion.rfind)  # an opening tag last: generation stopped inside it
        cut_off = completion.rfind(last_tag) >= 0 and last_tag in (REASONING_OPEN, ANSWER_OPEN)
        problems.append(f"{n_markers} 'Step' markers" + (", text cut off" if cut_off else ""))
    elif counts[ANSWER_CLOSE] == 0 and counts[ANSWER_OPEN] > 0:
        problems.append("text cut off in <answer>")
    return "; ".join(problems)


# ------------------------------------------------------------------------ units

# Units of one dimension, canonical name -> the words that name it.
UNIT_WORDS: dict[str, dict[str, str]] = {
    "time": {
        "seconds": r"seconds?|secs?",
        "minutes": r"minutes?|mins?",
        "hours": r"hours?|hrs?",
        "days": r"days?",
        "weeks": r"weeks?",
        "months": r"months?",
        "years": r"years?",
    },
    "money": {"cents": r"cents?", "dollars": r"dollars?"},
    "length": {
        "inches": r"inch(?:es)?",
        "feet": r"feet|foot",
        "yards": r"yards?",
        "miles": r"miles?",
        "centimeters": r"centimet(?:er|re)s?|cm",
        "meters": r"met(?:er|re)s?",
        "kilometers": r"kilomet(?:er|re)s?|km",
    },
    "weight": {
        "grams": r"grams?",
        "kilograms": r"kilograms?|kg",
        "pounds": r"pounds?|lbs?",
        "ounces": r"ounces?|oz",
    },
    "volume": {
        "milliliters": r"millilit(?:er|re)s?|ml",
        "liters": r"lit(?:er|re)s?",
        "gallons": r"gallons?",
        "quarts": r"quarts?",
    },
}
_UNIT = {unit: re.compile(rf"\b(?:{words})\b", re.IGNORECASE) for group in UNIT_WORDS.values() for unit, words in group.items()}
_GROUP = {unit: group for group, units in UNIT_WORDS.items() for unit in units}
_ALL_UNITS = "|".join(words for group in UNIT_WORDS.values() for words in group.values())
# "how many (more) minutes", "how long, in minutes,", "how much in dollars".
_ASKED_UNIT = re.compile(
    rf"\bhow many (?:more |fewer |less |total |extra )?({_ALL_UNITS})\b|\bin ({_ALL_UNITS})\b", re.IGNORECASE
)
FACTOR_REL_TOL = 0.01  # "0.33 hours" for 20 minutes is 20 / 60 rounded


def _asked_unit(question: str) -> str | None:
    """The unit the question's final sentence asks for, e.g. "minutes"."""
    sentence = re.split(r"(?<=[.!])\s+", question.strip())[-1]
    match = _ASKED_UNIT.search(sentence)
    if match is None:
        return None
    word = match.group(1) or match.group(2)
    return next(unit for unit, pattern in _UNIT.items() if pattern.fullmatch(word))


def _unit_confusion(question: str, completion: str, predicted: float, reference: float, conclusion: str) -> str | None:
    """Evidence that the answer is in another unit than the reference, or None.

    First a unit factor between answer and reference (within 1%, or the converted
    reference rounded to 2 decimals), then the words: the question asks for one
    unit and the conclusion names another of the same dimension, never the asked one.
    """
    if predicted != 0 and reference != 0:
        context = f"{question}\n{completion}"
        for factor, units, words in UNIT_FACTORS:
            for target, direction in ((reference * factor, "x"), (reference / factor, "/")):
                close = math.isclose(predicted, target, rel_tol=FACTOR_REL_TOL) or round(target, 2) == predicted
                if close and all(re.search(word, context, re.IGNORECASE) for word in words):
                    return (
                        f"answer {_fmt(predicted)} vs reference {_fmt(reference)}: off by a factor of {factor} "
                        f"(answer = reference {direction} {factor}; {units}?)"
                    )
    asked = _asked_unit(question)
    if asked is None or _UNIT[asked].search(conclusion):
        return None
    for unit, pattern in _UNIT.items():
        if unit != asked and _GROUP[unit] == _GROUP[asked] and (match := pattern.search(conclusion)):
            return f"question asks for {asked}; the conclusion says '{match.group()}'"
    return None


# ------------------------------------------------------------------ step counts

# "Far more" steps: more than twice the reference and at least 3 more (4 vs 2 is
# still a reasonable trace). "Far fewer": at most half and at least 2 fewer.
VERBOSE_FACTOR, VERBOSE_MIN_EXTRA = 2.0, 3
PREMATURE_FACTOR, PREMATURE_MIN_MISSING = 0.5, 2


def _trace_steps(reasoning: str) -> list[str]:
    """The marked steps, or the non-empty lines of a trace without step markers."""
    segments, n_markers = split_steps(reasoning)
    if n_markers:
        return segments
    return [line for line in reasoning.splitlines() if line.strip()]


def _reference_steps(solution: str) -> list[str]:
    """The reference solution's steps; none when it is missing or not GSM8K-shaped."""
    solution = solution.partition("####")[0]
    if not solution.strip():
        return []
    try:
        return solution_steps(solution)
    except CurationError:
        return []


def _intermediate_results(solution: str, reference: float) -> dict[float, int]:
    """Each result the reference computes before its final answer -> its step (1-based).

    Results are the ``<<a*b=c>>`` annotations' c, and a line's number after its last
    "=". Lines are counted as ``solution_steps`` counts them: those with visible text.
    """
    found: dict[float, int] = {}
    lines = [line for line in solution.partition("####")[0].splitlines() if CALCULATOR.sub("", line).strip()]
    for step, line in enumerate(lines, start=1):
        results = [value for inner in CALCULATOR.findall(line) for value in find_numbers(inner.rpartition("=")[2])[:1]]
        visible = CALCULATOR.sub("", line)
        if "=" in visible:
            results += find_numbers(visible.rpartition("=")[2])[:1]
        for value in results:
            if not numbers_match(value, reference):
                found.setdefault(value, step)
    return found


def _conclusion(reasoning: str) -> str:
    """From the last conclusion cue ("Therefore", "So", ...) on, else the last line."""
    cue = None
    for cue in CONCLUSION_CUES.finditer(reasoning):
        pass
    if cue is not None:
        return reasoning[cue.start() :]
    lines = [line for line in reasoning.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _normalised(step: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", step.lower()))


def _most_repeated(steps: Sequence[str]) -> tuple[str, int] | None:
    """The most repeated step (its first wording) and its count, if any repeats."""
    keys = [_normalised(step) for step in steps]
    counts = Counter(key for key in keys if key)
    if not counts:
        return None
    key, count = counts.most_common(1)[0]
    return (steps[keys.index(key)], count) if count >= 2 else None


# ------------------------------------------------------------------- categorize


def is_failure(correct: bool | None, well_formed: bool) -> bool:
    """A sample needs a category unless it is both right and in the strict format
    (an open row, ``correct`` None, has nothing to be wrong about: format only)."""
    return not (correct is not False and well_formed)


def categorize(question: str, reference: str, completion: str, solution: str = "", kind: str = "numeric",
               choices: Choices | None = None) -> Failure:
    """The category of a failed sample and the evidence for it (see the module docstring).

    ``reference`` is the canonical number string (a numeric row's; else the row's
    reference of its ``kind``); ``solution`` the GSM8K reference solution (the text
    before ``####``; "" skips the step-count comparisons). A sample that is right
    and well formed is no failure: ValueError.
    """
    if kind != "numeric":
        return _categorize_other(reference, completion, kind, choices)
    ref = parse_reference(reference)
    if (problem := _format_problem(completion)) is not None:
        return Failure("format_failure", problem)

    parsed = parse_completion(completion)
    reasoning, answer = parsed.reasoning or "", parsed.answer or ""
    predicted = parse_number(answer)
    assert predicted is not None  # _format_problem rejects answers without a number
    if numbers_match(predicted, ref):
        raise ValueError("the sample is right and well formed: not a failure")

    claims = arithmetic_claims(completion)
    if (false := next((c for c in claims if not c.holds), None)) is not None:
        return Failure("calculation_error", f"`{false.text}` is false ({false.expression} = {_fmt(false.actual)})")

    steps = _trace_steps(reasoning)
    conclusion = f"{_conclusion(reasoning)}\n{answer}"
    if (unit := _unit_confusion(question, completion, predicted, ref, conclusion)) is not None:
        return Failure("unit_confusion", unit)

    # Without a usable reference solution (none, or not GSM8K-shaped) there is nothing
    # to compare steps or intermediate results with.
    reference_steps = _reference_steps(solution)
    counts = f"{_plural(len(steps), 'step')} vs {len(reference_steps)} in the reference" if reference_steps else ""
    too_few = bool(reference_steps) and (
        len(steps) <= PREMATURE_FACTOR * len(reference_steps)
        and len(reference_steps) - len(steps) >= PREMATURE_MIN_MISSING
    )
    intermediates = _intermediate_results(solution, ref) if reference_steps else {}
    intermediate = next((step for value, step in intermediates.items() if numbers_match(predicted, value)), None)
    if too_few or intermediate is not None:
        facts = [counts] if counts else []
        if intermediate is not None:
            facts.append(f"answer {_fmt(predicted)} is the reference's intermediate result from step {intermediate}")
        return Failure("premature_conclusion", "; ".join(facts))

    too_many = bool(reference_steps) and (
        len(steps) > VERBOSE_FACTOR * len(reference_steps) and len(steps) - len(reference_steps) >= VERBOSE_MIN_EXTRA
    )
    repeated = _most_repeated(steps)
    if too_many or repeated is not None:
        facts = [counts] if too_many else []
        if repeated is not None:
            step, count = repeated
            facts.append(f"step '{_quote(step)}' repeated {count} times")
        return Failure("verbose_reasoning", "; ".join(facts))

    checked = f"{_plural(len(claims), 'arithmetic claim')}, none false" if claims else "no arithmetic claims to check"
    return Failure("other", f"answer {_fmt(predicted)} vs reference {_fmt(ref)}; {checked}")


def _categorize_other(reference: str, completion: str, kind: str, choices: Choices | None) -> Failure:
    """``categorize`` for a choice, text or open row: format, a repeated step, or the wrong answer."""
    if (problem := _format_problem(completion, kind, choices)) is not None:
        return Failure("format_failure", problem)
    if correctness(completion, reference, kind, choices) != 0.0:  # 1.0, or None: an open row has no wrong answer
        raise ValueError(f"the sample is {'right' if kind != 'open' else 'an open row'} and well formed: not a failure")
    parsed = parse_completion(completion)
    if (repeated := _most_repeated(_trace_steps(parsed.reasoning or ""))) is not None:
        step, count = repeated
        return Failure("verbose_reasoning", f"step '{_quote(step)}' repeated {count} times")
    answer = _quote(parsed.answer or "")
    if kind == "choice":
        return Failure("wrong_answer", f"answer names option {read_answer(parsed.answer, kind, choices)} ('{answer}') vs reference {reference}")
    return Failure("wrong_answer", f"answer '{answer}' vs reference '{_quote(reference)}' (after normalising case, punctuation and articles)")


# ------------------------------------------------------------------- the table


@dataclass(frozen=True)
class FailureRow:
    """One category's line in the failure table; ``share`` is of all failures."""

    category: str
    label: str
    count: int
    share: float
    example_id: str
    example_evidence: str


def failure_table(failures: Sequence[tuple[str, Failure]]) -> list[FailureRow]:
    """One row per category that occurs, in CATEGORIES order, with its first example.

    ``failures`` are (sample id, Failure) pairs in the order the samples were scored.
    """
    counts = Counter(failure.category for _, failure in failures)
    if unknown := set(counts) - set(CATEGORIES):
        raise ValueError(f"unknown failure categories {sorted(unknown)}; expected one of {CATEGORIES}")
    first: dict[str, tuple[str, Failure]] = {}
    for sample_id, failure in failures:
        first.setdefault(failure.category, (sample_id, failure))
    return [
        FailureRow(
            category=category,
            label=CATEGORY_LABELS[category],
            count=counts[category],
            share=counts[category] / len(failures),
            example_id=first[category][0],
            example_evidence=first[category][1].evidence,
        )
        for category in CATEGORIES
        if counts[category]
    ]


def markdown_cell(text: str) -> str:
    """Text that cannot break a Markdown table row."""
    # "<answer>" would be read as an HTML tag and vanish from the rendered table.
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def failure_markdown(rows: Sequence[FailureRow], total_samples: int) -> str:
    """A sentence with the failure count, then the table (no table without failures).

    >>> print(failure_markdown([FailureRow("other", "Other", 1, 1.0, "t-1", "answer 17 vs reference 18")], 4), end="")
    1 of 4 samples failed (25.0%).
    <BLANKLINE>
    | Category | Count | Share of failures | Example (id: evidence) |
    |---|---:|---:|---|
    | Other | 1 | 100.0% | t-1: answer 17 vs reference 18 |
    """
    n_failures = sum(row.count for row in rows)
    if n_failures > total_samples:
        raise ValueError(f"{n_failures} failures but only {total_samples} samples")
    rate = f" ({100 * n_failures / total_samples:.1f}%)" if total_samples else ""
    lines = [f"{n_failures} of {total_samples} samples failed{rate}."]
    if rows:
        lines += ["", "| Category | Count | Share of failures | Example (id: evidence) |", "|---|---:|---:|---|"]
        lines += [
            f"| {row.label} | {row.count} | {100 * row.share:.1f}% | {markdown_cell(row.example_id)}: {markdown_cell(row.example_evidence)} |"
            for row in rows
        ]
    return "\n".join(lines) + "\n"
