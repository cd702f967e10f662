"""Arithmetic in model output: the one safe evaluator and the claims it checks.

Three readers share these definitions, so that "a calculation" means one thing:
the failure analysis (``failures``: a false claim is a calculation error), the
arithmetic reward (``rewards.arithmetic``: the share of true, grounded claims) and
the trace rubric (``rewards.trace_breakdown``: a step that shows a calculation).

* ``calculate``: the value of ``3 x (4 + 1)``-style expressions, parsed by hand.
* ``arithmetic_claims``: every checkable ``expr = number`` claim in a text, with
  the value claimed, the true value, and the operands as written.
* ``shows_calculation``: the cheap test of form ("48 / 2", "= 24"), no checking.
* ``problem_numbers``: the numbers a problem statement gives, its quantities
  (digits, "three", "a dozen") and the factors its words imply ("half", minutes
  and hours: 60), which ground a claim's operands.
* ``calculator_annotations``: GSM8K's ``<<48/2=24>>`` steps of a reference solution.

>>> [(c.text, c.holds) for c in arithmetic_claims("So 60 / 1.5 = 45 km/h, and 3 x 4 = 12.")]
[('60 / 1.5 = 45', False), ('3 x 4 = 12', True)]
"""

from __future__ import annotations

import bisect
import functools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
class Number:
    """A number as written: ``value`` without the "%" (20 for "20%"), whether a "%"
    follows, and ``ulp``, one unit in the last place written (1 for "3", 0.01 for
    "3.33", 0 for an exact compact fraction "1/5"), and a compact fraction's
    (numerator, denominator)."""

    value: float
    percent: bool
    ulp: float
    fraction: tuple[int, int] | None = None


@dataclass(frozen=True)
class _BinOp:
    op: str  # one of + - * /
    left: Number | _BinOp
    right: Number | _BinOp


def _number_token(text: str) -> Number:
    digits = re.sub(r"[$\u00a3\u20ac,%\s]", "", text)
    decimals = len(digits.partition(".")[2])
    return Number(float(digits), text.rstrip().endswith("%"), 10.0**-decimals)


def _tokens(expression: str) -> list[Number | str]:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens: list[Number | str] = []
    pos, end = 0, len(expression.rstrip())
    while pos < end:
        match = _TOKEN.match(expression, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"unexpected {expression[pos:].strip()[:20]!r} in {expression!r}")
        if match.group("fraction"):
            numerator, denominator = map(int, match.group("fraction").split("/"))
            if denominator == 0:
                raise ValueError("division by zero")
            tokens.append(Number(numerator / denominator, False, 0.0, (numerator, denominator)))
        elif match.group("num"):
            tokens.append(_number_token(match.group("num")))
        elif match.group("op"):
            tokens.append(_OPERATORS[match.group("op")])
        else:
            tokens.append(match.group("paren"))
        pos = match.end()
    return tokens


def _parse(expression: str) -> Number | _BinOp:
    """The syntax tree of ``expression``; ValueError for anything outside the grammar."""
    tokens, pos = _tokens(expression), 0

    def peek() -> Number | str | None:
        return tokens[pos] if pos < len(tokens) else None

    def binary(operand: Callable[[], Number | _BinOp], ops: str) -> Number | _BinOp:
        nonlocal pos
        node = operand()
        while isinstance(op := peek(), str) and op in ops:
            pos += 1
            node = _BinOp(op, node, operand())
        return node

    def factor() -> Number | _BinOp:
        nonlocal pos
        token = peek()
        pos += 1
        if isinstance(token, Number):
            return token
        if token == "(":
            node = expr()
            if peek() != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            pos += 1
            return node
        raise ValueError(f"expected a number in {expression!r}")

    def expr() -> Number | _BinOp:
        return binary(lambda: binary(factor, "*/"), "+-")

    tree = expr()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} in {expression!r}")
    return tree


# How to read "%": as a fraction (20% = 0.2), as a bare number (the writer's "20%"
# meaning 20), or relative after + and - ("100 + 20% = 120"). A claim holds if any
# reading makes it true: a sloppy but consistent use of % is not a calculation error.
_PERCENT_READINGS = ("fraction", "number", "relative")


def _evaluate(node: Number | _BinOp, reading: str = "fraction") -> float:
    if isinstance(node, Number):
        return node.value / 100 if node.percent and reading != "number" else node.value
    left = _evaluate(node.left, reading)
    right_node = node.right
    if reading == "relative" and node.op in "+-" and isinstance(right_node, Number) and right_node.percent:
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
PRECISE_TOL = 0.01  # a claim rounded by more than 1% holds, but proves little (Claim.precise)

# A chain "a op b = c" or "a op b = c op d = e": segments (operands with optional
# parentheses joined by operators) linked by "=". A segment may not start inside a
# number or word, nor right after "Step " ("Step 1 - 3 + 4 = 7"). Segments are found
# in one pass and then linked, and the quantifiers are possessive, so the scan is
# linear in the text (a chain regex retried at every position was quadratic).
_OPERAND = rf"(?:\(\s*){{0,8}}+(?:{_NUM})(?:\s*\)){{0,8}}+"  # bounded: "((((..." stays linear
_SEGMENT = re.compile(rf"(?<![0-9A-Za-z.,:$\u00a3\u20ac])(?<!tep ){_OPERAND}(?:\s*(?:{_OP})\s*{_OPERAND})*+")
_EQUALS = re.compile(r"\s*=\s*(?P<sign>(?:[-\u2212]\s*)?)")  # "= -3": the sign belongs to the result
_HAS_OPERATOR = re.compile(_OP)
CALCULATOR = re.compile(r"<<([^<>]*)>>")  # GSM8K's "<<48/2=24>>" annotations
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
    # The left-hand side's numbers and operators in order of writing: (48, 2) and
    # "/" for "48 / 2 = 24". What the arithmetic reward grounds and deduplicates.
    operands: tuple[Number, ...] = ()
    operators: str = ""

    @property
    def precise(self) -> bool:
        """Holds within PRECISE_TOL of the true value: ``10 / 3 = 3.33`` is precise,
        ``10 / 3 = 3`` (or 4 buses) holds by rounding but is not. The arithmetic
        reward pays only for precise claims; the failure analysis calls neither an
        error."""
        return self.holds and math.isclose(self.claimed, self.actual, rel_tol=PRECISE_TOL, abs_tol=1e-9)

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
    busloads), but a value below one unit only to the nearest: ``40 / 100 = 1`` is
    false (rounding 0.4 up would make every ``a / b = 1`` with a < b hold); decimals
    to the nearest or by truncation (``2 / 3 = 0.67`` or 0.66, not 0.7 for 0.666
    nor 3.4 for 3.333). A true value that is exact at the claim's precision excuses
    nothing: ``3 x 4 = 13`` is false.
    """
    if math.isclose(claimed, actual, rel_tol=REL_TOL, abs_tol=1e-9):
        return True
    if ulp <= 0:
        return False
    if ulp >= 1:
        nearest = round(actual / ulp) * ulp
        if abs(actual) < ulp:
            return math.isclose(claimed, nearest, rel_tol=REL_TOL, abs_tol=1e-9)
        return not math.isclose(actual, nearest, rel_tol=REL_TOL, abs_tol=1e-9) and abs(claimed - actual) < ulp
    rounded = abs(claimed - actual) <= ulp / 2 * (1 + REL_TOL)  # to the nearest, ties either way
    steps = actual / ulp  # infinite for a value with 300 decimals: no truncation to check
    truncated = math.isfinite(steps) and math.isclose(claimed, math.trunc(steps) * ulp, rel_tol=REL_TOL, abs_tol=ulp * 1e-6)
    return rounded or truncated


def _leaves(node: Number | _BinOp) -> tuple[tuple[Number, ...], str]:
    """The numbers and operators of a syntax tree, in order of writing; a compact
    fraction is its two numbers ("48/2 = 24" reads as "48 / 2 = 24")."""
    if isinstance(node, Number):
        if node.fraction is not None:
            return (Number(float(node.fraction[0]), False, 1.0), Number(float(node.fraction[1]), False, 1.0)), "/"
        return (node,), ""
    left, left_ops = _leaves(node.left)
    right, right_ops = _leaves(node.right)
    return left + right, left_ops + node.op + right_ops


def _has_percent(node: Number | _BinOp) -> bool:
    if isinstance(node, Number):
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
    if not _HAS_OPERATOR.search(left) or (negative and not isinstance(rhs, Number)):
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
        if isinstance(rhs, Number):
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
        operands, operators = _leaves(lhs)
        for claimed, holds in candidates:
            if holds:
                return Claim(text, claimed, actual, True, operands, operators)
        if first is None:
            first = Claim(text, candidates[0][0], actual, False, operands, operators)
    return first


def _chains(text: str) -> Iterator[tuple[int, int, list[str]]]:
    """(start, end, segments) of each run of two or more segments linked by "=", in order."""
    segments: list[str] = []
    start = end = 0
    for match in _SEGMENT.finditer(text):
        if segments and (equals := _EQUALS.fullmatch(text, end, match.start())):
            segments.append(equals.group("sign") + match.group())
        else:
            if len(segments) > 1:
                yield start, end, segments
            segments, start = [match.group()], match.start()
        end = match.end()
    if len(segments) > 1:
        yield start, end, segments


def _chain_claims(text: str, offset: int = 0, limit: int | None = None) -> tuple[list[tuple[int, int, Claim]], int]:
    """(start, end, claim) for each ``=`` of each chain in ``text``.

    A chain that is part of a longer expression with words or variables in it is cut
    where it joins that expression: in ``9 hours * 2/3 = 6`` the first "=" is not
    "2/3 = 6", in ``27 - 9 = 6 * x`` the last is not "27 - 9 = 6", and in
    ``5 - 1 - 1/2 = 3 1/2`` the result is a mixed number.

    Also returns where reading stopped: after the chain that brought ``limit``
    claims (every claim before that point is found), else the end of ``text``.
    """
    found: list[tuple[int, int, Claim]] = []
    for start, end, segments in _chains(text):
        if limit is not None and len(found) >= limit:
            return found, offset + start
        pairs = list(zip(segments, segments[1:]))
        before = text[max(0, start - 200) : start].rstrip()[-6:]
        if _LEFT_JOIN.search(before) or (_AND_BEFORE.search(before) and _FRACTION_FIRST.match(segments[0])):
            pairs = pairs[1:]
        if _RIGHT_JOIN.match(text, end):
            pairs = pairs[:-1]
        for left, right in pairs:
            if (claim := _claim(left, right)) is not None:
                found.append((offset + start, offset + end, claim))
    return found, offset + len(text)


def calculator_annotations(solution: str) -> list[str]:
    """GSM8K's ``<<48/2=24>>`` annotations in a reference solution, one per step of
    calculation: ``["48/2=24", "48+24=72"]`` for Natalia's two steps."""
    return CALCULATOR.findall(solution)


def arithmetic_claims(text: str, limit: int | None = None) -> list[Claim]:
    """Every checkable ``expr = number`` claim in ``text``, in order of appearance;
    only the first ``limit`` when one is given (reading stops there: a reward reads
    model output of any length).

    GSM8K's calculator annotations count too: ``48/2 = <<48/2=24>>24`` is one claim
    (the annotation repeats the visible one), ``<<48/2=25>>24`` two. Claims that
    need words are skipped: ``20% of 50 = 10`` has no operator before the "=", nor
    is ``5 snakes * 6 jaguars = 30`` read (a word between the numbers).

    >>> [(c.text, c.holds) for c in arithmetic_claims("So 60 / 1.5 = 45 km/h, and 3 x 4 = 12.")]
    [('60 / 1.5 = 45', False), ('3 x 4 = 12', True)]
    """
    annotations: list[tuple[int, int, Claim]] = []
    stop = len(text)  # every claim that starts before ``stop`` is read
    for match in CALCULATOR.finditer(text):
        if limit is not None and len(annotations) >= limit:
            stop = match.start()
            break
        annotations += _chain_claims(match.group(1), offset=match.start(1))[0]
    # Blank the annotations (same length, so positions stay) and read the visible text.
    visible, visible_stop = _chain_claims(CALCULATOR.sub(lambda m: " " * len(m.group()), text), limit=limit)
    stop = min(stop, visible_stop)
    # Visible chains do not overlap: the one around an annotation is found by bisection
    # (a pairwise search was quadratic on a wall of annotated claims).
    chains: dict[tuple[int, int], list[Claim]] = {}
    for v_start, v_end, seen in visible:
        chains.setdefault((v_start, v_end), []).append(seen)
    spans = sorted(chains)
    kept = []
    for start, end, claim in annotations:
        i = bisect.bisect_right(spans, (start, math.inf)) - 1
        around = chains[spans[i]] if i >= 0 and start < spans[i][1] else []
        if not any(
            math.isclose(claim.actual, seen.actual, rel_tol=REL_TOL) and math.isclose(claim.claimed, seen.claimed, rel_tol=REL_TOL)
            for seen in around
        ):
            kept.append((start, end, claim))
    claims = [claim for start, _, claim in sorted(kept + visible, key=lambda found: found[0]) if start < stop]
    return claims if limit is None else claims[:limit]


# ------------------------------------------------------------- shown calculations

# The trace rubric's cheap test of form, no checking: "48 / 2", "0.2 x 50", "3*4",
# "3 times 4", or "= 24". Looser than a claim on purpose (a step may show its
# working without a checkable "a op b = c"); both regexes start at a literal or a
# digit, so they scan fast on every rollout.
_EQUALS_NUMBER = re.compile(r"=[ \t]*\$?-?[0-9.]")
_OPERATION = re.compile(
    r"[0-9][ \t]*[-+*/xX\u00d7\u00f7\u2212\u2013][ \t]*\$?[0-9.]"
    r"|[0-9] (?:plus|minus|times|divided by|multiplied by) \$?[0-9]"
)


def shows_calculation(text: str) -> bool:
    """``48 / 2``, ``0.2 x 50``, ``3 times 4`` or ``= 24`` (the "=" test is cheap, so first)."""
    return ("=" in text and _EQUALS_NUMBER.search(text) is not None) or _OPERATION.search(text) is not None


# ------------------------------------------------------------------------ units

# (factor, the units it converts between, words of which the question or the
# completion must hold one each for the factor to count). GSM8K's units: time,
# money, metric prefixes and the calendar; a factor whose units are nowhere near is
# more likely a coincidence (84 vs 7 in a problem about apples). The failure
# analysis reads an answer off by one of these as unit confusion; the arithmetic
# reward lets a claim use one when the question names its units.
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
_UNIT_FACTOR_WORDS = [(factor, [re.compile(word, re.IGNORECASE) for word in words]) for factor, _, words in UNIT_FACTORS]


# ------------------------------------------------------- numbers a problem gives

# Digits as the question writes them: "1,200", "2.5", ".5"; a fraction "3/4" gives
# 3, 4 and 0.75; a percent "20%" or "20 percent" gives 20 and 0.2.
_PROBLEM_NUMBER = re.compile(r"(?:[0-9]{1,3}(?:,[0-9]{3})++(?![0-9])|[0-9]++)(?:\.[0-9]++)?|\.[0-9]++")
_PROBLEM_FRACTION = re.compile(_FRACTION)
_PERCENT_AFTER = re.compile(r"\s*(?:%|percent)")

# Numbers GSM8K questions spell out. Cardinals are quantities ("three apples", "a
# dozen eggs"); the other words name an operation and imply its number: "half as
# many" is "/ 2" or "* 0.5", "twice" is "* 2", "a third" is "/ 3", "percent" "/ 100".
_ONES = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_ORDINALS = ("third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
CARDINAL_WORDS: dict[str, float] = {
    **{word: float(i) for i, word in enumerate(_ONES, start=1)},
    **{word: float(i) for i, word in enumerate(_TEENS, start=10)},
    **{word: 10.0 * i for i, word in enumerate(_TENS, start=2)},
    "hundred": 100.0, "thousand": 1000.0, "million": 1e6, "dozen": 12.0, "dozens": 12.0,
}
OPERATION_WORDS: dict[str, tuple[float, ...]] = {
    **{word + plural: (float(i), 1 / i) for i, word in enumerate(_ORDINALS, start=3) for plural in ("", "s")},
    "half": (2.0, 0.5), "halves": (2.0, 0.5), "quarter": (4.0, 0.25), "quarters": (4.0, 0.25),
    "twice": (2.0,), "double": (2.0,), "doubles": (2.0,), "doubled": (2.0,), "pair": (2.0,), "pairs": (2.0,),
    "couple": (2.0,), "triple": (3.0,), "triples": (3.0,), "tripled": (3.0,), "thrice": (3.0,),
    "quadruple": (4.0,), "percent": (100.0,),
}
_WORD = re.compile(r"[a-z]+")
_COMPOUND = re.compile(rf"\b({'|'.join(_TENS)})[- ]({'|'.join(_ONES)})\b")  # "twenty-five"


@dataclass(frozen=True)
class ProblemNumbers:
    """The numbers a problem statement gives a calculation, each sorted, each once.

    ``quantities``: what the problem counts, its digits (a fraction gives its parts
    and its value, a percent its value as a fraction too) and its spelled-out
    cardinals ("three", "twenty-five", "a dozen"). ``factors``: numbers its words
    imply for an operation ("half": 2 and 0.5, "twice": 2, "a third": 3 and 1/3,
    "percent": 100), and the ``UNIT_FACTORS`` whose units it names, with their
    inverses (60 and 1/60 about minutes and hours; 100 and 0.01 where it has a
    "%" or a "$").
    """

    quantities: tuple[float, ...]
    factors: tuple[float, ...]


@functools.lru_cache(maxsize=4096)  # G completions of one prompt share their question
def problem_numbers(question: str) -> ProblemNumbers:
    """The quantities and factors of a problem statement (see ``ProblemNumbers``).

    >>> problem_numbers("Half of the 3/4 dozen eggs cost 20% more.")
    ProblemNumbers(quantities=(0.2, 0.75, 3.0, 4.0, 12.0, 20.0), factors=(0.01, 0.08333333333333333, 0.5, 2.0, 12.0, 100.0))
    """
    quantities: set[float] = set()
    for match in _PROBLEM_NUMBER.finditer(question):
        value = float(match.group().replace(",", ""))
        quantities.add(value)
        if _PERCENT_AFTER.match(question, match.end()):
            quantities.add(value / 100)
    for match in _PROBLEM_FRACTION.finditer(question):
        numerator, denominator = map(int, match.group().split("/"))
        if denominator:
            quantities.add(numerator / denominator)
    lower = question.lower()
    factors: set[float] = set()
    for word in _WORD.findall(lower):
        if word in CARDINAL_WORDS:
            quantities.add(CARDINAL_WORDS[word])
        factors.update(OPERATION_WORDS.get(word, ()))
    for match in _COMPOUND.finditer(lower):
        quantities.add(CARDINAL_WORDS[match.group(1)] + CARDINAL_WORDS[match.group(2)])
    for factor, words in _UNIT_FACTOR_WORDS:  # "* 60" or "* .01" ("25% = 25 * .01")
        if all(w.search(question) for w in words):
            factors.update((float(factor), 1 / factor))
    return ProblemNumbers(tuple(sorted(quantities)), tuple(sorted(factors)))
