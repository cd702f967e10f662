"""The one safe evaluator and claim extraction (``tracetune.arithmetic``), shared by
the failure analysis and the arithmetic reward."""

from __future__ import annotations

import doctest
import math
import time

import pytest

from tracetune import arithmetic
from tracetune.arithmetic import arithmetic_claims, calculate, calculator_annotations, problem_numbers, shows_calculation
from tracetune.data import load_examples

# --------------------------------------------------------- arithmetic claims

# (text, [(claim text, holds)]), one probe per line.
CLAIM_CASES = [
    ("48 / 2 = 24", [("48 / 2 = 24", True)]),
    ("1,200 + 300 = 1,500", [("1,200 + 300 = 1,500", True)]),  # thousands separators
    ("$5 x 3 = $15", [("$5 x 3 = $15", True)]),  # currency, x as times
    ("12*3=36", [("12*3 = 36", True)]),
    ("3 × 4 = 12 and 12 ÷ 4 = 3", [("3 × 4 = 12", True), ("12 ÷ 4 = 3", True)]),  # Unicode operators
    ("3 x 4 = 13", [("3 x 4 = 13", False)]),
    ("60 / 1.5 = 45", [("60 / 1.5 = 45", False)]),
    ("10 / 3 = 3.33", [("10 / 3 = 3.33", True)]),  # rounded to 2 decimals
    ("2 / 3 = 0.66", [("2 / 3 = 0.66", True)]),  # truncated: within one unit of the last digit
    ("10 / 3 = 3", [("10 / 3 = 3", True)]),  # rounded to an integer
    ("10 / 3 = 4", [("10 / 3 = 4", True)]),  # ... or up ("4 buses are needed")
    ("40 / 100 = 1", [("40 / 100 = 1", False)]),  # but a value below one unit only to the nearest ...
    ("1/10 = 0", [("1/10 = 0", True)]),  # ... which is 0 (true, not precise: the reward pays nothing)
    ("10 / 3 = 3.4", [("10 / 3 = 3.4", False)]),  # 3.33... is not 3.4 at one decimal
    ("2 / 3 = 0.7", [("2 / 3 = 0.7", True)]),  # but 0.66... is 0.7
    ("1 / 8 = 0.13", [("1 / 8 = 0.13", True)]),  # a tie, rounded half up (Python's round() gives 0.12)
    ("12 x 1 and 1/4 = 15", []),  # a mixed number written with "and"
    ("12.5 * 4 = 49", [("12.5 * 4 = 49", False)]),  # 50 is exact: rounding is no excuse
    ("0.1 + 0.2 = 0.3", [("0.1 + 0.2 = 0.3", True)]),  # float error
    ("5 - 8 = -3", [("5 - 8 = -3", True)]),  # negative result
    ("5 - 8 = 3", [("5 - 8 = 3", False)]),
    ("3 + 4 * 2 = 11", [("3 + 4 * 2 = 11", True)]),  # precedence
    ("(3 + 4) * 2 = 14", [("(3 + 4) * 2 = 14", True)]),
    ("(so 3 + 4 = 7)", [("3 + 4 = 7", True)]),  # stray parentheses of the sentence
    ("3 * 4 = 12 + 5 = 17", [("3 * 4 = 12 + 5", True), ("12 + 5 = 17", True)]),  # a running total
    ("(3*4)+5 = 12+5 = 17", [("(3*4)+5 = 12+5", True), ("12+5 = 17", True)]),  # a proper chain
    ("3 * 4 = 13 + 5 = 18", [("3 * 4 = 13 + 5", False), ("13 + 5 = 18", True)]),
    ("20% * 50 = 10", [("20% * 50 = 10", True)]),  # 20% as 0.2
    ("100 + 20% = 120", [("100 + 20% = 120", True)]),  # 20% of the left operand
    ("0.25 * 80 = 20%", [("0.25 * 80 = 20%", True)]),  # 20% as the number 20
    ("20% of 50 = 10", []),  # skipped: "of" is a word, not an operator
    ("28 / 1/5 = 140", [("28 / 1/5 = 140", True)]),  # GSM8K: a compact fraction is one number
    ("48/2 = <<48/2=24>>24 clips", [("48/2 = 24", True)]),  # the annotation repeats the visible claim
    ("48/2 = <<48/2=24>>25 clips", [("48/2 = 25", False), ("48/2 = 24", True)]),
    ("<<48/2=25>>", [("48/2 = 25", False)]),  # an annotation alone
    ("Total = 3 + 4 = 7", [("3 + 4 = 7", True)]),  # "Total =" is no number
    ("24 = 20 + 4, and x = 5", []),  # no operator on the left: nothing calculated
    ("Step 1: 2 + 2 = 4. Step 2: 4 * 3 = 12", [("2 + 2 = 4", True), ("4 * 3 = 12", True)]),
    ("Step 1 - 3 + 4 = 7", []),  # "1 - 3 + 4" would be a misreading
    ("1. 3 + 4 = 7", [("3 + 4 = 7", True)]),  # a numbered line
    ("3 * 4 = 12 apples a day", [("3 * 4 = 12", True)]),  # a word after the result
    ("3 * 4 = 12 (4 in each box)", [("3 * 4 = 12", True)]),  # a remark after the result
    ("2 + 1 = 2(3 + 4)", []),  # implicit multiplication continues the result
    ("It costs 3 * 4 = $12/hour", [("3 * 4 = $12", True)]),  # a unit after the result
    ("2 hours * 60 = 120 minutes", []),  # part of an expression with words
    ("9 hours * 2/3 = 6 hours", []),
    ("27 - 9 = 6 * x - 3 * x", []),  # the result continues with a variable
    ("5 - 1 - 1/2 = 3 1/2 hours", []),  # a mixed number
    ("X*6 + 9 = 87", []),  # algebra
    ("6:00+48 = 6:48 PM", []),  # clock times
    ("8 / 0 = 0", []),  # division by zero is no claim
]


@pytest.mark.parametrize(("text", "expected"), CLAIM_CASES)
def test_arithmetic_claims(text, expected):
    assert [(c.text, c.holds) for c in arithmetic_claims(text)] == expected


@pytest.mark.parametrize(("text", "precise"), [
    ("48 / 2 = 24", True), ("10 / 3 = 3.33", True), ("2 / 3 = 0.67", True),
    ("10 / 3 = 3", False), ("10 / 3 = 4", False), ("2 / 3 = 0.7", False), ("1/10 = 0", False), ("3 x 4 = 13", False),
])
def test_a_claim_rounded_by_more_than_one_percent_is_not_precise(text, precise):
    [claim] = arithmetic_claims(text)
    assert claim.precise is precise


def test_a_claim_keeps_the_claimed_and_the_true_value():
    [claim] = arithmetic_claims("Step 2: he drives 60 / 1.5 = 45 km/h.")
    assert (claim.claimed, claim.actual, claim.holds, claim.expression) == (45.0, 40.0, False, "60 / 1.5")


def test_the_shipped_gsm8k_test_solutions_hold_but_two_typos():
    # 4408 claims in 1319 reference solutions; the two false ones are GSM8K's own
    # mistakes: "364 / 4 = 273" (meant 3/4 * 364) and "$32 - $20 = $300" (meant $12).
    examples = load_examples("gsm8k", "test").examples
    claims = {e.id: arithmetic_claims(e.solution) for e in examples}
    false = [(id_, c.text) for id_, found in claims.items() for c in found if not c.holds]
    assert sum(map(len, claims.values())) > 4000
    assert false == [("test-502", "364 / 4 = 273"), ("test-1025", "$32 - $20 = $300")]


@pytest.mark.parametrize(
    "make",
    [
        lambda n: "1+" * n + "1 = 3",  # one huge expression
        lambda n: "((((" * (n // 2),  # parentheses that never reach a number
        lambda n: "( " * n + "1",
        lambda n: "9" * (2 * n) + " = 9",
        lambda n: "= 1 " * (n // 2),
    ],
)
def test_claim_scanning_is_linear_on_pathological_text(make):
    """4x the text costs about 4x the time (a quadratic scan would cost 16x); a
    ratio, so that a busy machine does not fail it. The best of 3 cuts noise."""

    def seconds(n: int) -> float:
        text = make(n)
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            arithmetic_claims(text)
            best = min(best, time.perf_counter() - start)
        return best

    small, large = seconds(10_000), seconds(40_000)
    assert large < 8 * small + 0.05, (small, large)


# ------------------------------------------------------------ the safe parser

EVALUATE_CASES = [
    ("$1,200 + 300", 1500.0),
    ("(3 + 4) x 2", 14.0),
    ("12 ÷ 4 − 1", 2.0),  # Unicode divide and minus
    ("20% * 50", 10.0),
    ("28 / 1/5", 140.0),  # compact fraction
    ("10 / 4 / 5", 0.5),  # left-associative when spaced
    (".5 * 4", 2.0),
]


@pytest.mark.parametrize(("expression", "value"), EVALUATE_CASES)
def test_calculate(expression, value):
    assert calculate(expression) == pytest.approx(value)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('echo hi')",  # names and calls
        "(1).__class__",  # attribute access
        "2 ** 10",  # powers
        "2 ^ 10",
        "1e9",  # exponent notation
        "-3 + 4",  # no unary minus
        "3 +",  # dangling operator
        "(3 + 4",  # unbalanced
        "3 + 4)",
        "1 / 0",  # division by zero
        "1 / (2 - 2)",
        "1/0",
        "",  # nothing
        "(" * 100 + "1" + ")" * 100,  # longer than MAX_EXPRESSION_CHARS
        "1 + 1 # comment",
        "[1, 2]",
    ],
)
def test_calculate_rejects_anything_but_arithmetic(expression):
    with pytest.raises(ValueError):
        calculate(expression)




# ---------------------------------------------------------- what the reward reads

# (claim text, its operands as written, its operators), one probe per line.
OPERAND_CASES = [
    ("48 / 2 = 24", (48.0, 2.0), "/"),
    ("48/2 = 24", (48.0, 2.0), "/"),  # a compact fraction is its two numbers
    ("28 / 1/5 = 140", (28.0, 1.0, 5.0), "//"),
    ("$1,200 + 300 = 1,500", (1200.0, 300.0), "+"),  # currency and thousands
    ("20% * 50 = 10", (20.0, 50.0), "*"),  # a percent as written
    ("(3 + 4) x 2 = 14", (3.0, 4.0, 2.0), "+*"),  # in order of writing
]


@pytest.mark.parametrize("text,operands,operators", OPERAND_CASES)
def test_a_claim_keeps_its_operands_and_operators(text, operands, operators):
    [claim] = arithmetic_claims(text)
    assert (tuple(o.value for o in claim.operands), claim.operators) == (operands, operators)


def test_claims_can_stop_after_a_limit():
    text = "1 + 1 = 2, <<2+2=4>> 3 * 3 = 9, 4 * 4 = 16 and <<5*5=25>>"
    everything = arithmetic_claims(text)
    assert [c.text for c in everything] == ["1 + 1 = 2", "2+2 = 4", "3 * 3 = 9", "4 * 4 = 16", "5*5 = 25"]
    for limit in range(len(everything) + 2):
        assert arithmetic_claims(text, limit=limit) == everything[:limit]


def test_a_wall_of_annotations_is_read_in_linear_time():
    """4x the annotations cost about 4x the time (a ratio, best of 3)."""

    def seconds(n: int) -> float:
        text = "48 / 2 = <<48/2=24>>24. " * n
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            assert len(arithmetic_claims(text)) == n  # each annotation repeats its visible claim
            best = min(best, time.perf_counter() - start)
        return best

    small, large = seconds(1_250), seconds(5_000)
    assert large < 8 * small + 0.05, (small, large)


PROBLEM_CASES = [
    # (question, in the quantities, in the factors, in neither)  # what it probes
    ("He has 1,200 apples and 2.5 pears.", {1200.0, 2.5}, set(), {1.0, 200.0}),  # thousands, decimals
    ("3/4 of the 20% discount", {3.0, 4.0, 0.75, 20.0, 0.2}, {100.0, 0.01}, set()),  # fraction, percent and its 100
    ("twenty-five dogs and three cats, a dozen eggs", {25.0, 20.0, 5.0, 3.0, 12.0}, set(), set()),  # cardinals
    ("half as many, twice as tall, a third of them", set(), {2.0, 0.5, 3.0, 1 / 3}, {1.0}),  # operation words are factors
    ("It takes 20 minutes. How many hours?", {20.0}, {60.0, 1 / 60}, {24.0}),  # unit factors the question names
    ("It runs 3 hours a day for a week.", {3.0}, {24.0, 7.0, 60.0}, {52.0}),  # both units named: hours/days, days/weeks
    ("A box of apples.", set(), set(), {60.0, 100.0, 12.0}),  # no units, no factors
]


@pytest.mark.parametrize("question,quantities,factors,neither", PROBLEM_CASES)
def test_problem_numbers(question, quantities, factors, neither):
    numbers = problem_numbers(question)
    assert quantities <= set(numbers.quantities) and factors <= set(numbers.factors)
    assert not neither & (set(numbers.quantities) | set(numbers.factors))
    assert list(numbers.quantities) == sorted(set(numbers.quantities))


def test_calculator_annotations_count_the_reference_steps():
    assert calculator_annotations("Natalia sold 48/2 = <<48/2=24>>24.\nThen 48+24 = <<48+24=72>>72.\n#### 72") == ["48/2=24", "48+24=72"]
    assert calculator_annotations("") == []


@pytest.mark.parametrize("text,shows", [
    ("48 / 2", True), ("0.2 x 50", True), ("3 times 4", True), ("= 24", True),  # operation or a result
    ("She sold 24 clips", False), ("Step 2:", False), ("a-b", False),  # a number alone, a marker, words
])
def test_shows_calculation(text, shows):
    assert shows_calculation(text) is shows


def test_docstring_examples():
    assert doctest.testmod(arithmetic).failed == 0
