from __future__ import annotations

import doctest
import math
import time

import pytest

from tracetune import failures
from tracetune.failures import (
    CATEGORIES,
    CATEGORY_LABELS,
    Failure,
    FailureRow,
    categorize,
    failure_markdown,
    failure_table,
    is_failure,
)
from tracetune.format import format_completion

from conftest import wrap


def trace(steps: list[str], answer: str) -> str:
    """A well-formed completion: the steps, the recipe's conclusion, the answer."""
    return format_completion(steps, f"Therefore, the answer is {answer}.", answer)


NATALIA_Q = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
NATALIA_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May."
)
# Five lines, each a result; the answer is 70000 (GSM8K test-3, with one line added).
HOUSE_SOLUTION = (
    "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
    "He increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\n"
    "So the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\n"
    "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n"
    "That is 70,000 dollars of profit."
)
FOUR_STEP_SOLUTION = "He has 3*4=<<3*4=12>>12 classes.\nEach has 5 rows.\nSo 12*5=<<12*5=60>>60 students.\nHe needs 60+1=<<60+1=61>>61 seats."

# ---------------------------------------------------------------- categorize

# (question, reference, completion, solution, category, evidence), one probe per line.
CATEGORIZE_CASES = [
    # looping until the token budget: no closing tags, the step markers counted
    ("Q?", "60", "<reasoning>" + "".join(f"Step {i}: So he has 60 students.\n" for i in range(1, 32)), "",
     "format_failure", "no </reasoning>, <answer>, </answer> tags; 31 'Step' markers, text cut off"),
    # the reasoning is closed but no answer block follows
    ("Q?", "4", "<reasoning>Step 1: 2 + 2 = 4.\nTherefore, the answer is 4.</reasoning>", "",
     "format_failure", "no <answer>, </answer> tags"),
    # right answer, but chatter outside the tags: still not the strict format
    ("Q?", "4", "Sure! " + trace(["2 + 2 = 4."], "4"), "",
     "format_failure", "text outside the tags: 'Sure!'"),
    # strict tags around an answer without a number (a deliberate extension of "not strict")
    ("Q?", "4", trace(["2 + 2 = 4."], "four"), "",
     "format_failure", "the <answer> block holds no number: 'four'"),
    ("Q?", "4", "<reasoning>r</reasoning>\n<answer> </answer>", "", "format_failure", "empty <answer> block"),
    ("Q?", "4", wrap("4") + "<answer>4</answer>", "", "format_failure", "2 <answer> tags; 2 </answer> tags"),
    ("Q?", "4", "<reasoning>r</reasoning>\n<answer>4", "", "format_failure", "no </answer> tag; text cut off in <answer>"),
    ("Q?", "4", "<answer>4</answer><reasoning>r</reasoning>", "", "format_failure", "<answer> comes before <reasoning>"),
    # the brief's three false claims; the true value is named
    ("Q?", "40", trace(["He drives 60 / 1.5 = 45 km per hour."], "45"), "",
     "calculation_error", "`60 / 1.5 = 45` is false (60 / 1.5 = 40)"),
    ("Q?", "12", trace(["3 x 4 = 13 apples."], "13"), "", "calculation_error", "`3 x 4 = 13` is false (3 x 4 = 12)"),
    ("Q?", "36", trace(["He buys 12*3=35 eggs."], "35"), "", "calculation_error", "`12*3 = 35` is false (12*3 = 36)"),
    # a GSM8K calculator annotation that is right does not excuse the visible claim
    ("Q?", "36", trace(["He has 12*3 = <<12*3=36>>35 eggs."], "35"), "",
     "calculation_error", "`12*3 = 35` is false (12*3 = 36)"),
    # the first false claim is reported, with the currency kept
    ("Q?", "15", trace(["2 + 2 = 4.", "$5 x 3 = $16.", "7 - 1 = 5."], "16"), "",
     "calculation_error", "`$5 x 3 = $16` is false ($5 x 3 = 15)"),
    # answer 2.5 = 150 / 60: hours for minutes
    ("A movie lasts 2.5 hours. How many minutes does it last?", "150", trace(["The movie lasts 2.5 hours."], "2.5"), "",
     "unit_confusion",
     "answer 2.5 vs reference 150: off by a factor of 60 (answer = reference / 60; minutes/hours or seconds/minutes?)"),
    # answer 1.5 = 150 / 100: dollars for cents
    ("A pen costs $1.50. How many cents does a pen cost?", "150", trace(["The pen costs $1.50."], "1.50"), "",
     "unit_confusion", "answer 1.5 vs reference 150: off by a factor of 100 (answer = reference / 100; cents/dollars or percent?)"),
    # answer 9000 = 150 x 60: seconds for minutes
    ("How many minutes are 2.5 hours?", "150", trace(["2.5 hours is 9000 seconds."], "9000"), "",
     "unit_confusion",
     "answer 9000 vs reference 150: off by a factor of 60 (answer = reference x 60; minutes/hours or seconds/minutes?)"),
    # answer 2.5 = 2500 / 1000: kilograms for grams
    ("A bag holds 2.5 kg of rice. How many grams of rice is that?", "2500", trace(["The bag holds 2.5 kg."], "2.5"), "",
     "unit_confusion",
     "answer 2.5 vs reference 2500: off by a factor of 1000 (answer = reference / 1000; e.g. grams/kilograms or meters/kilometers?)"),
    # 84 = 7 x 12, but nothing in the problem is measured in months, inches or dozens
    ("Ann has 7 apples. How many apples does she have?", "7", trace(["She has 84 apples."], "84"), "",
     "other", "answer 84 vs reference 7; no arithmetic claims to check"),
    # no factor (2 vs 90), but the conclusion is in hours where minutes were asked
    ("Ann walks 3 km in 1.5 hours. How many minutes does she walk?", "90", trace(["She walks for 1 hour and a half."], "2 hours"), "",
     "unit_confusion", "question asks for minutes; the conclusion says 'hours'"),
    # stopped one operation early: the answer is the reference's step-1 result
    (NATALIA_Q, "72", trace(["In May she sold 48 / 2 = 24 clips."], "24"), NATALIA_SOLUTION,
     "premature_conclusion", "1 step vs 2 in the reference; answer 24 is the reference's intermediate result from step 1"),
    # 2 steps where the reference needs 5 (2 <= 5 / 2 and 3 fewer)
    ("How much profit?", "70000", trace(["The house cost 80,000 + 50,000 = 130,000.", "He sold it for 200,000."], "75000"),
     HOUSE_SOLUTION, "premature_conclusion", "2 steps vs 5 in the reference"),
    # without "Step" markers the lines are the steps: 2 vs 4
    ("How many seats?", "61", wrap("17", "He has 3*4=12 classes.\nSo 12+5=17."), FOUR_STEP_SOLUTION,
     "premature_conclusion", "2 steps vs 4 in the reference"),
    # 14 steps vs 4 (more than twice, and 10 more), one step said 6 times
    ("How many seats?", "61",
     trace(["He has 3*4=12 classes.", "Each has 5 rows."] + ["So he has 60 students."] * 6 + [f"Row {i} is full." for i in range(1, 7)], "62"),
     FOUR_STEP_SOLUTION, "verbose_reasoning", "14 steps vs 4 in the reference; step 'So he has 60 students.' repeated 6 times"),
    # without a reference solution only repetition counts
    ("How many seats?", "61", trace(["He has 60 students.", "He has 60 students.", "He adds 2 seats."], "62"), "",
     "verbose_reasoning", "step 'He has 60 students.' repeated 2 times"),
    # 9 steps vs 4: more than twice but with no repeats, still verbose
    ("How many seats?", "61", trace([f"Row {i} has 5 seats." for i in range(1, 10)], "45"), FOUR_STEP_SOLUTION,
     "verbose_reasoning", "9 steps vs 4 in the reference"),
    # 3 steps vs 4 and no false arithmetic: nothing to blame but the answer
    ("How many seats?", "61", trace(["He has 3*4=12 classes.", "Each has 5 rows.", "So 12+5=17 students."], "17"),
     FOUR_STEP_SOLUTION, "other", "answer 17 vs reference 61; 2 arithmetic claims, none false"),
    ("Q?", "18", trace(["She has seventeen."], "17"), "", "other", "answer 17 vs reference 18; no arithmetic claims to check"),
]


@pytest.mark.parametrize(("question", "reference", "completion", "solution", "category", "evidence"), CATEGORIZE_CASES)
def test_categorize(question, reference, completion, solution, category, evidence):
    assert categorize(question, reference, completion, solution) == Failure(category, evidence)


# Two kinds of failure in one sample: the earlier category in CATEGORIES wins.
PRECEDENCE_CASES = [
    # malformed (no answer block) and a false claim
    ("Q?", "40", "<reasoning>Step 1: 60 / 1.5 = 45</reasoning>", "", "format_failure"),
    # a false claim and an answer off by x60
    ("How many minutes are 2.5 hours?", "150", trace(["2.5 x 2 = 6 hours."], "2.5"), "", "calculation_error"),
    # off by x100 and a reference intermediate (24 x 100 = 2400; 24 is step 1's result)
    ("How many cents?", "72", trace(["She earns $24."], "0.72"), NATALIA_SOLUTION, "unit_confusion"),
    # a reference intermediate, and a repeated step
    (NATALIA_Q, "72", trace(["She sold 24 clips in May.", "She sold 24 clips in May."], "24"), NATALIA_SOLUTION,
     "premature_conclusion"),
]


@pytest.mark.parametrize(("question", "reference", "completion", "solution", "category"), PRECEDENCE_CASES)
def test_the_first_category_in_precedence_order_wins(question, reference, completion, solution, category):
    assert categorize(question, reference, completion, solution).category == category


def test_categories_are_in_precedence_order_and_labelled():
    assert CATEGORIES == (
        "format_failure", "calculation_error", "unit_confusion", "premature_conclusion", "verbose_reasoning",
        "wrong_answer", "other",  # wrong_answer: choice and text rows (tests/test_kinds.py)
    )
    assert list(CATEGORY_LABELS) == list(CATEGORIES)
    assert CATEGORY_LABELS["calculation_error"] == "Calculation error"


def test_a_right_well_formed_sample_is_no_failure():
    with pytest.raises(ValueError, match="not a failure"):
        categorize("Q?", "4", trace(["2 + 2 = 4."], "4"))


def test_a_right_answer_outside_the_format_is_a_format_failure():
    assert categorize("Q?", "4", "The answer is <answer>4</answer>").category == "format_failure"


def test_a_reference_that_is_no_number_is_a_data_bug():
    with pytest.raises(ValueError, match="not a number"):
        categorize("Q?", "many", trace(["2 + 2 = 4."], "4"))


def test_an_unparseable_reference_solution_skips_the_step_comparison():
    # "<<" without ">>" is not GSM8K-shaped (solution_steps raises): no step counts
    completion = trace(["He has 3*4=12 classes."], "12")
    assert categorize("Q?", "61", completion, "He has <<3*4=12 classes.\nA\nB\nC\nD").category == "other"


@pytest.mark.parametrize(
    ("correct", "well_formed", "expected"),
    [(True, True, False), (True, False, True), (False, True, True), (False, False, True)],
)
def test_is_failure(correct, well_formed, expected):
    assert is_failure(correct, well_formed) is expected


def test_a_long_loop_is_categorized_in_linear_time():
    """~60k characters, as a model looping to a large token budget writes: categorised
    right, and 4x the loop costs at most about 4x the time (a ratio, best of 3, so that
    a busy machine does not fail it)."""

    def seconds(steps: int) -> float:
        loop = [f"So he has {60 + i % 3} students and 3 x 4 = 12." for i in range(steps)]
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            assert categorize("Q?", "61", trace(loop, "62"), FOUR_STEP_SOLUTION).category == "verbose_reasoning"
            assert categorize("Q?", "61", trace(loop, "62")[:-30], FOUR_STEP_SOLUTION).category == "format_failure"
            best = min(best, time.perf_counter() - start)
        return best

    small, large = seconds(375), seconds(1500)
    assert large < 8 * small + 0.05, (small, large)


# ------------------------------------------------------------------ the table

FAILURES = [
    ("t-1", Failure("other", "answer 17 vs reference 18")),
    ("t-2", Failure("calculation_error", "`3 x 4 = 13` is false (3 x 4 = 12)")),
    ("t-3", Failure("format_failure", "no <answer>, </answer> tags")),
    ("t-4", Failure("calculation_error", "`60 / 1.5 = 45` is false (60 / 1.5 = 40)")),
]


def test_failure_table_counts_shares_and_first_examples():
    assert failure_table(FAILURES) == [
        FailureRow("format_failure", "Format failure", 1, 0.25, "t-3", "no <answer>, </answer> tags"),
        FailureRow("calculation_error", "Calculation error", 2, 0.5, "t-2", "`3 x 4 = 13` is false (3 x 4 = 12)"),
        FailureRow("other", "Other", 1, 0.25, "t-1", "answer 17 vs reference 18"),
    ]


def test_failure_table_of_nothing_and_of_an_unknown_category():
    assert failure_table([]) == []
    with pytest.raises(ValueError, match="unknown failure categories"):
        failure_table([("t-1", Failure("bad_luck", "..."))])


def test_failure_markdown():
    assert failure_markdown(failure_table(FAILURES), 10) == (
        "4 of 10 samples failed (40.0%).\n"
        "\n"
        "| Category | Count | Share of failures | Example (id: evidence) |\n"
        "|---|---:|---:|---|\n"
        "| Format failure | 1 | 25.0% | t-3: no &lt;answer>, &lt;/answer> tags |\n"
        "| Calculation error | 2 | 50.0% | t-2: `3 x 4 = 13` is false (3 x 4 = 12) |\n"
        "| Other | 1 | 25.0% | t-1: answer 17 vs reference 18 |\n"
    )


def test_failure_markdown_escapes_pipes_and_newlines_and_has_no_table_without_failures():
    rows = failure_table([("t|1", Failure("other", "said 'a | b'\nthen 3"))])
    assert failure_markdown(rows, 2).splitlines()[-1] == "| Other | 1 | 100.0% | t\\|1: said 'a \\| b' then 3 |"
    assert failure_markdown([], 5) == "0 of 5 samples failed (0.0%).\n"
    assert failure_markdown([], 0) == "0 of 0 samples failed.\n"
    with pytest.raises(ValueError, match="4 failures but only 3 samples"):
        failure_markdown(failure_table(FAILURES), 3)


def test_docstring_examples():
    assert doctest.testmod(failures).failed == 0
