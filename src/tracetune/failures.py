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
    other                 none of the above

Why this order: the most objective evidence wins. A malformed completion cannot be
read at all; a false ``a op b = c`` is a fact about the trace alone; a unit factor
needs the reference and a heuristic; step counts and repeats are the weakest signs
of what went wrong, and an answer that is the reference's own intermediate result
says more than a long trace does, so premature comes before verbose.

The heuristics' thresholds are module constants: ``UNIT_FACTORS``, ``VERBOSE_FACTOR``
and ``VERBOSE_MIN_EXTRA``, ``PREMATURE_FACTOR`` and ``PREMATURE_MIN_MISSING``.

>>> categorize("How far?", "40", "<reasoning>Step 1: 60 / 1.5 = 45\\nTherefore, the answer is 45."
...            "</reasoning>\\n<answer>45</answer>").evidence
'`60 / 1.5 = 45` is false (60 / 1.5 = 40)'
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
)
from tracetune.rewards import CONCLUSION_CUES, parse_reference, split_steps

CATEGORIES: tuple[str, ...] = (
    "format_failure",
    "calculation_error",
    "unit_confusion",
    "premature_conclusion",
    "verbose_reasoning",
    "other",
)
CATEGORY_LABELS: dict[str, str] = {
    "format_failure": "Format failure",
    "calculation_error": "Calculation error",
    "unit_confusion": "Unit confusion",
    "premature_conclusion": "Premature conclusion",
    "verbose_reasoning": "Verbose reasoning",
    "other": "Other",
}


@dataclass(frozen=True)
class Failure:
    """The category of one failed sample and the evidence for it."""

    category: str
    evidence: str


# ------------------------------------------------------------- safe arithmetic

# A hand-written parser, never eval(): the text is model output. Grammar (no unary
# minus, no powers, no names; anything else is a ValueError)::
#
#     expr   := term (("+" | "-") term)*
#     term   := factor (("*" | "/") factor)*
#     factor := NUMBER | "(" expr ")"
#
# NUMBER: digits with optional thousands commas and decimals, an optional currency
# sign before it and an optional "%" after it; or a compact fraction "1/5", which is
# one number, so that GSM8K's "28 / 1/5 = 140" divides by a fifth. x, X and ×
# multiply; ÷ divides; the Unicode minus and the en dash subtract.
_NUM = (
    r"(?:[$\u00a3\u20ac]\s*)?"  # currency
    r"(?:(?:[0-9]{1,3}(?:,[0-9]{3})++(?![0-9])|[0-9]++)(?:\.[0-9]++)?|\.[0-9]++)"  # 1,200.5 or 12 or .5
    r"(?:\s*%)?"
)
_OP = r"[-+*/\u00d7\u00f7\u2212\u2013]|(?<![A-Za-z])[xX](?![A-Za-z])"
_FRACTION = r"[0-9]++/[0-9]++(?![0-9/]|[.,][0-9])"
_TOKEN = re.compile(rf"\s*(?:(?P<fraction>{_FRACTION})|(?P<num>{_NUM})|(?P<op>{_OP})|(?P<paren>[()]))")
_OPERATORS = {
    "+": "+", "-": "-", "\u2212": "-", "\u2013": "-",
    "*": "*", "x": "*", "X": "*", "\u00d7": "*",
    "/": "/", "\u00f7": "/",
}
MAX_EXPRESSION_CHARS = 200  # bounds the parser's work and recursion depth


@dataclass(frozen=True)
class _Num:
    value: float
    percent: bool
    ulp: float  # one unit in the last place written: 1 for "3", 0.01 for "3.33", 0 if exact


@dataclass(frozen=True)
class _BinOp:
    op: str  # one of + - * /
    left: _Num | _BinOp
    right: _Num | _BinOp


def _number_token(text: str) -> _Num:
    digits = re.sub(r"[$\u00a3\u20ac,%\s]", "", text)
    decimals = len(digits.partition(".")[2])
    return _Num(float(digits), text.rstrip().endswith("%"), 10.0**-decimals)


def _tokens(expression: str) -> list[_Num | str]:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens: list[_Num | str] = []
    pos, end = 0, len(expression.rstrip())
    while pos < end:
        match = _TOKEN.match(expression, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"unexpected {expression[pos:].strip()[:20]!r} in {expression!r}")
        if match.group("fraction"):
            numerator, denominator = map(int, match.group("fraction").split("/"))
            if denominator == 0:
                raise ValueError("division by zero")
            tokens.append(_Num(numerator / denominator, False, 0.0))
        elif match.group("num"):
            tokens.append(_number_token(match.group("num")))
        elif match.group("op"):
            tokens.append(_OPERATORS[match.group("op")])
        else:
            tokens.append(match.group("paren"))
        pos = match.end()
    return tokens


def _parse(expression: str) -> _Num | _BinOp:
    """The syntax tree of ``expression``; ValueError for anything outside the grammar."""
    tokens, pos = _tokens(expression), 0

    def peek() -> _Num | str | None:
        return tokens[pos] if pos < len(tokens) else None

    def binary(operand: Callable[[], _Num | _BinOp], ops: str) -> _Num | _BinOp:
        nonlocal pos
        node = operand()
        while isinstance(op := peek(), str) and op in ops:
            pos += 1
            node = _BinOp(op, node, operand())
        return node

    def factor() -> _Num | _BinOp:
        nonlocal pos
        token = peek()
        pos += 1
        if isinstance(token, _Num):
            return token
        if token == "(":
            node = expr()
            if peek() != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            pos += 1
            return node
        raise ValueError(f"expected a number in {expression!r}")

    def expr() -> _Num | _BinOp:
        return binary(lambda: binary(factor, "*/"), "+-")

    tree = expr()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} in {expression!r}")
    return tree


# How to read "%": as a fraction (20% = 0.2), as a bare number (the writer's "20%"
# meaning 20), or relative after + and - ("100 + 20% = 120"). A claim holds if any
# reading makes it true: a sloppy but consistent use of % is not a calculation error.
_PERCENT_READINGS = ("fraction", "number", "relative")


def _evaluate(node: _Num | _BinOp, reading: str = "fraction") -> float:
    if isinstance(node, _Num):
        return node.value / 100 if node.percent and reading != "number" else node.value
    left = _evaluate(node.left, reading)
    right_node = node.right
    if reading == "relative" and node.op in "+-" and isinstance(right_node, _Num) and right_node.percent:
        rate = right_node.value / 100
        return left * (1 + rate) if node.op == "+" else left * (1 - rate)
    right = _evaluate(right_node, reading)
    if node.op == "+":
        return left + right
    if node.op == "-":
        return left - right
    if node.op == "*":
        return left * right
    if right == 0:
        raise ValueError("division by zero")
    return left / right


def calculate(expression: str) -> float:
    """The value of an arithmetic expression, parsed by hand (never ``eval``).

    Only numbers, + - * / x × ÷ and parentheses are accepted; a name, a power, a
    call, division by zero or an infinite result raise ValueError.

    >>> calculate("$1,200 + 300"), calculate("(3 + 4) x 2"), calculate("20% * 50")
    (1500.0, 14.0, 10.0)
    """
    value = _evaluate(_parse(expression))
    if not math.isfinite(value):
        raise ValueError(f"{expression!r} is not finite")
    return value


# ------------------------------------------------------------ arithmetic claims

REL_TOL = 1e-6

# A chain "a op b = c" or "a op b = c op d = e": segments (operands with optional
# parentheses joined by operators) linked by "=". A segment may not start inside a
# number or word, nor right after "Step " ("Step 1 - 3 + 4 = 7"). Segments are found
# in one pass and then linked, and the quantifiers are possessive, so the scan is
# linear in the text (a chain regex retried at every position was quadratic).
_OPERAND = rf"(?:\(\s*){{0,8}}+(?:{_NUM})(?:\s*\)){{0,8}}+"  # bounded: "((((..." stays linear
_SEGMENT = re.compile(rf"(?<![0-9A-Za-z.,:$\u00a3\u20ac])(?<!tep ){_OPERAND}(?:\s*(?:{_OP})\s*{_OPERAND})*+")
_EQUALS = re.compile(r"\s*=\s*(?P<sign>(?:[-\u2212]\s*)?)")  # "= -3": the sign belongs to the result
_HAS_OPERATOR = re.compile(_OP)
_CALCULATOR = re.compile(r"<<([^<>]*)>>")  # GSM8K's "<<48/2=24>>" annotations
# A chain joins a longer expression when an operator, a parenthesis or a number
# (a mixed number "3 1/2" or "1 and 1/4", a "350 000" thousands gap) is next to it,
# or a variable: a letter after an operator ("= 30 + M") or on the number ("= 5A"),
# x or y alone ("= 6 x"); a word is a unit ("$12/hour", "12 a day"). "6:00+48 =
# 6:48" is a time.
_VARIABLE = r"(?<![A-Za-z])[xXyY](?![A-Za-z])"
_LEFT_JOIN = re.compile(rf"(?:[-+*/^()0-9\u00d7\u00f7\u2212\u2013]|{_VARIABLE})\Z")
_AND_BEFORE, _FRACTION_FIRST = re.compile(r"[0-9] and\Z"), re.compile(rf"\s*{_FRACTION}")  # "1 and" + "1/4 = ..."
_RIGHT_JOIN = re.compile(
    rf"\s*(?:[-+*/^\u00d7\u00f7\u2212\u2013]\s*(?:[0-9$(.]|(?<![A-Za-z])[A-Za-z](?![A-Za-z]))|[0-9]|{_VARIABLE})"
    r"|\(|[A-Za-z](?![A-Za-z])|:[0-9]"  # "= 2(3 + 4)", "= 5A", "= 6:48"; not "= 12 (apples)"
)


@dataclass(frozen=True)
class Claim:
    """One ``expr = number`` claim: its text, the value claimed, the true value.

    ``holds`` allows for rounding at the precision the claim is written in
    (``10 / 3 = 3.33`` and ``10 / 3 = 3`` hold, ``3 x 4 = 13`` does not).
    """

    text: str
    claimed: float
    actual: float
    holds: bool

    @property
    def expression(self) -> str:
        """The left-hand side: ``"60 / 1.5"`` for ``"60 / 1.5 = 45"``."""
        return self.text.split(" = ", 1)[0]


def _tidy(segment: str) -> str:
    """Whitespace collapsed, "$ 18" -> "$18" (annotations leave gaps)."""
    return re.sub(r"([$\u00a3\u20ac])\s+", r"\1", " ".join(segment.split()))


def _balanced(segment: str) -> str:
    """Drop the stray outer parentheses a regex match can pick up: "(3 + 4" -> "3 + 4"."""
    segment = segment.strip()
    while segment.startswith("(") and segment.count("(") > segment.count(")"):
        segment = segment[1:].lstrip()
    while segment.endswith(")") and segment.count(")") > segment.count("("):
        segment = segment[:-1].rstrip()
    return segment


def _agrees(claimed: float, actual: float, ulp: float) -> bool:
    """``claimed`` equals ``actual`` up to rounding at ``ulp`` (the claim's last digit).

    A whole number may be rounded either way (``10 / 3 = 3``, or 4 buses for 10 / 3
    busloads); decimals to the nearest or by truncation (``2 / 3 = 0.67`` or 0.66,
    not 0.7 for 0.666 nor 3.4 for 3.333). A true value that is exact at the claim's
    precision excuses nothing: ``3 x 4 = 13`` is false.
    """
    if math.isclose(claimed, actual, rel_tol=REL_TOL, abs_tol=1e-9):
        return True
    if ulp <= 0:
        return False
    if ulp >= 1:
        nearest = round(actual / ulp) * ulp
        return not math.isclose(actual, nearest, rel_tol=REL_TOL, abs_tol=1e-9) and abs(claimed - actual) < ulp
    rounded = abs(claimed - actual) <= ulp / 2 * (1 + REL_TOL)  # to the nearest, ties either way
    truncated = math.isclose(claimed, math.trunc(actual / ulp) * ulp, rel_tol=REL_TOL, abs_tol=ulp * 1e-6)
    return rounded or truncated


def _has_percent(node: _Num | _BinOp) -> bool:
    if isinstance(node, _Num):
        return node.percent
    return _has_percent(node.left) or _has_percent(node.right)


def _claim(left: str, right: str) -> Claim | None:
    """The claim ``left = right``, or None when it is not one we can check.

    The right side is a number (``= 24``, ``= -3``, ``= $15``) or an expression. An
    expression is checked as a whole (``(3*4)+5 = 12+5``) or, in a running chain
    (``3 * 4 = 12 + 5 = 17``), by its first number.
    """
    left, right = _balanced(left), _balanced(right)
    negative = right[:1] in ("-", "\u2212")
    try:
        lhs = _parse(left)
        rhs = _parse(right[1:] if negative else right)
    except ValueError:
        return None
    if not _HAS_OPERATOR.search(left) or (negative and not isinstance(rhs, _Num)):
        return None  # "x = 5" or "24 = 20 + 4" is no calculation to check
    sign = -1.0 if negative else 1.0
    readings = _PERCENT_READINGS if _has_percent(lhs) or _has_percent(rhs) else _PERCENT_READINGS[:1]
    first: Claim | None = None
    for reading in readings:
        try:
            actual = _evaluate(lhs, reading)
            whole = sign * _evaluate(rhs, reading)
        except ValueError:  # division by zero
            return None
        if not (math.isfinite(actual) and math.isfinite(whole)):
            return None
        if isinstance(rhs, _Num):
            scale = 0.01 if rhs.percent and reading != "number" else 1.0
            holds = _agrees(whole, actual, scale * rhs.ulp)
            candidates = [(whole, holds)]
        else:
            leading = rhs
            while isinstance(leading, _BinOp):
                leading = leading.left
            candidates = [(whole, _agrees(whole, actual, 0.0))]
            if right.lstrip()[:1] != "(":  # "12 + 5" in "3 * 4 = 12 + 5": the running total 12
                value = _evaluate(leading, reading)
                candidates.append((value, _agrees(value, actual, leading.ulp)))
        text = f"{_tidy(left)} = {_tidy(right)}"
        for claimed, holds in candidates:
            if holds:
                return Claim(text, claimed, actual, True)
        if first is None:
            first = Claim(text, candidates[0][0], actual, False)
    return first


def _chains(text: str) -> list[tuple[int, int, list[str]]]:
    """(start, end, segments) of each run of two or more segments linked by "="."""
    chains: list[tuple[int, int, list[str]]] = []
    segments: list[str] = []
    start = end = 0
    for match in _SEGMENT.finditer(text):
        if segments and (equals := _EQUALS.fullmatch(text, end, match.start())):
            segments.append(equals.group("sign") + match.group())
        else:
            if len(segments) > 1:
                chains.append((start, end, segments))
            segments, start = [match.group()], match.start()
        end = match.end()
    if len(segments) > 1:
        chains.append((start, end, segments))
    return chains


def _chain_claims(text: str, offset: int = 0) -> list[tuple[int, int, Claim]]:
    """(start, end, claim) for each ``=`` of each chain in ``text``.

    A chain that is part of a longer expression with words or variables in it is cut
    where it joins that expression: in ``9 hours * 2/3 = 6`` the first "=" is not
    "2/3 = 6", in ``27 - 9 = 6 * x`` the last is not "27 - 9 = 6", and in
    ``5 - 1 - 1/2 = 3 1/2`` the result is a mixed number.
    """
    found = []
    for start, end, segments in _chains(text):
        pairs = list(zip(segments, segments[1:]))
        before = text[max(0, start - 200) : start].rstrip()[-6:]
        if _LEFT_JOIN.search(before) or (_AND_BEFORE.search(before) and _FRACTION_FIRST.match(segments[0])):
            pairs = pairs[1:]
        if _RIGHT_JOIN.match(text, end):
            pairs = pairs[:-1]
        for left, right in pairs:
            if (claim := _claim(left, right)) is not None:
                found.append((offset + start, offset + end, claim))
    return found


def arithmetic_claims(text: str) -> list[Claim]:
    """Every checkable ``expr = number`` claim in ``text``, in order of appearance.

    GSM8K's calculator annotations count too: ``48/2 = <<48/2=24>>24`` is one claim
    (the annotation repeats the visible one), ``<<48/2=25>>24`` two. Claims that
    need words are skipped: ``20% of 50 = 10`` has no operator before the "=".

    >>> [(c.text, c.holds) for c in arithmetic_claims("So 60 / 1.5 = 45 km/h, and 3 x 4 = 12.")]
    [('60 / 1.5 = 45', False), ('3 x 4 = 12', True)]
    """
    annotations = []
    for match in _CALCULATOR.finditer(text):
        annotations += _chain_claims(match.group(1), offset=match.start(1))
    # Blank the annotations (same length, so positions stay) and read the visible text.
    visible = _chain_claims(_CALCULATOR.sub(lambda m: " " * len(m.group()), text))
    duplicate = {
        i
        for i, (start, _, claim) in enumerate(annotations)
        for v_start, v_end, seen in visible
        if v_start <= start < v_end
        and math.isclose(claim.actual, seen.actual, rel_tol=REL_TOL)
        and math.isclose(claim.claimed, seen.claimed, rel_tol=REL_TOL)
    }
    kept = [a for i, a in enumerate(annotations) if i not in duplicate]
    return [claim for _, _, claim in sorted(kept + visible, key=lambda found: found[0])]


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


def _format_problem(completion: str) -> str | None:
    """What keeps ``completion`` from the strict format, or None if it is strict."""
    parsed = parse_completion(completion)
    if parsed.strict:
        if parse_number(parsed.answer) is None:
            return f"the <answer> block holds no number: '{_quote(parsed.answer or '')}'"
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

# (factor, the units it converts between, words of which the question or the
# completion must hold one each for the factor to count). GSM8K's units: time,
# money, metric prefixes and the calendar; a factor whose units are nowhere near is
# more likely a coincidence (84 vs 7 in a problem about apples).
UNIT_FACTORS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (60, "minutes/hours or seconds/minutes", (r"minute|hour|\bseconds?\b|\bmins?\b|\bhrs?\b",)),
    (100, "cents/dollars or percent", (r"cent|dollar|\$|%|meter|metre",)),
    (1000, "e.g. grams/kilograms or meters/kilometers", (r"gram|kilo|\bkg\b|\bkm\b|meter|metre|lit(?:er|re)|\bml\b|thousand",)),
    (3600, "seconds/hours", (r"\bseconds?\b", r"hour")),
    (24, "hours/days", (r"hour", r"\bday")),
    (7, "days/weeks", (r"\bday", r"\bweek")),
    (12, "months/years, inches/feet or dozens", (r"month|inch|feet|foot|dozen",)),
    (52, "weeks/years", (r"\bweek", r"\byear")),
)

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
    lines = [line for line in solution.partition("####")[0].splitlines() if _CALCULATOR.sub("", line).strip()]
    for step, line in enumerate(lines, start=1):
        results = [value for inner in _CALCULATOR.findall(line) for value in find_numbers(inner.rpartition("=")[2])[:1]]
        visible = _CALCULATOR.sub("", line)
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


def is_failure(correct: bool, well_formed: bool) -> bool:
    """A sample needs a category unless it is both right and in the strict format."""
    return not (correct and well_formed)


def categorize(question: str, reference: str, completion: str, solution: str = "") -> Failure:
    """The category of a failed sample and the evidence for it (see the module docstring).

    ``reference`` is the canonical number string; ``solution`` the GSM8K reference
    solution (the text before ``####``; "" skips the step-count comparisons).
    A sample that is right and well formed is no failure: ValueError.
    """
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
