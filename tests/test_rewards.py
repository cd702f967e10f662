from __future__ import annotations

import math
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracetune.config import RewardWeights
from tracetune.data import curate_solution
from tracetune.format import lenient_number, parse_completion
from tracetune.rewards import (
    REWARDS,
    SCAN_LIMIT,
    answer_token_logprobs,
    arithmetic,
    arithmetic_breakdown,
    arithmetic_reward,
    available_components,
    combine,
    confidence,
    confidence_from_logprobs,
    confidence_reward,
    correctness,
    correctness_reward,
    make_composite_reward,
    parse_reference,
    progress,
    progress_reward,
    reward_components,
    sound_reward,
    soundness,
    trace_breakdown,
    trace_reward,
    trace_structure,
)

from conftest import wrap

# ------------------------------------------------------------------ soundness

SOUNDNESS_CASES = [
    (wrap("72", "Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.\nTherefore, the answer is 72."), "72", 1.0),  # right, all true
    (wrap("72", "Step 1: 48 / 2 = 20.\nStep 2: 48 + 24 = 72.\nTherefore, the answer is 72."), "72", 0.0),  # right by luck
    (wrap("72", "Step 1: The answer is 72.\nTherefore, the answer is 72."), "72", 1.0),  # no claim is no false claim
    (wrap("72", "Step 1: 48 / 2 = 24.\nTherefore, the answer is 72.") + " 3 + 4 = 8", "72", 0.0),  # false claim outside
    (wrap("71", "Step 1: 48 / 2 = 24.\nStep 2: 48 + 23 = 71.\nTherefore, the answer is 71."), "72", 0.0),  # true, wrong
    (wrap("72", "Step 1: 10 / 3 = 3.\nStep 2: 69 + 3 = 72.\nTherefore, the answer is 72."), "72", 1.0),  # rounding holds
    ("48 / 2 = 24, 48 + 24 = 72", "72", 0.0),  # no answer block
]


@pytest.mark.parametrize(("completion", "reference", "expected"), SOUNDNESS_CASES)
def test_soundness_pays_right_answers_whose_claims_all_hold(completion, reference, expected):
    assert soundness(completion, reference) == expected
    assert sound_reward(["p"], [completion], reference=[reference]) == [expected]


def test_soundness_is_undefined_where_correctness_is():
    assert soundness(wrap("because"), "", "open") is None
    assert soundness(wrap("B", "Step 1: 2 + 2 = 5.\nTherefore, B."), "B", "choice", {"A": "x", "B": "y"}) == 0.0


# ------------------------------------------------------------------ correctness

CORRECTNESS_CASES = [
    (wrap("72"), "72", 1.0),  # plain integer
    (wrap("40 km/h"), "40", 1.0),  # unit after the number
    (wrap("$1,000.50"), "1000.5", 1.0),  # currency, thousands separator, decimals
    (wrap("$1,000.50"), "1000", 0.0),  # ... and the cents count
    (wrap("3/4"), "0.75", 1.0),  # simple fraction against a decimal reference
    (wrap("1 1/2 hours"), "1.5", 1.0),  # mixed number with a unit
    (wrap("-5"), "-5", 1.0),  # negative
    (wrap("5"), "-5", 0.0),  # the sign matters
    (wrap("40.0"), "40", 1.0),  # 40.0 = 40
    (wrap("40.5"), "40", 0.0),  # but 40.5 is not 40
    (wrap("72."), "72", 1.0),  # trailing period
    (wrap("75%"), "75", 1.0),  # percent sign
    (wrap("1200"), "1,200", 1.0),  # thousands separator in the reference
    (wrap("The answer is 18 dollars."), "18", 1.0),  # words around the number
    (wrap("48 + 24 = 72"), "72", 1.0),  # the last number is the result
    (wrap("72 or 73"), "72", 0.0),  # hedging: the last number counts
    (wrap("10001"), "10000", 0.0),  # no loose relative tolerance on large integers
    ("<reasoning>so the answer is 72</reasoning>", "72", 0.0),  # answer only in the reasoning
    ("<reasoning>r</reasoning><answer>72</answer><answer>72</answer>", "72", 0.0),  # two answer tags
    ("<reasoning>r</reasoning><answer>71</answer><answer>72</answer>", "72", 0.0),  # two answers, last right
    (wrap(""), "72", 0.0),  # empty answer
    ("<reasoning>r</reasoning><answer>72", "72", 0.0),  # unclosed answer tag
    ("<reasoning>r</reasoning><answer><answer>72</answer></answer>", "72", 0.0),  # nested answer tags
    (wrap("seventy-two"), "72", 0.0),  # no number in the answer
    ("72", "72", 0.0),  # a bare number is not an answer
    ("Sure! " + wrap("72"), "72", 1.0),  # text outside: format fails, the answer still counts
    (wrap("72"), 72, 1.0),  # numeric reference column
]


@pytest.mark.parametrize("completion,reference,expected", CORRECTNESS_CASES)
def test_correctness(completion, reference, expected):
    assert correctness(completion, reference) == expected


def test_unparseable_reference_is_an_error_not_a_score():
    with pytest.raises(ValueError, match="not a number"):
        correctness(wrap("72"), "seventy-two")
    assert parse_reference(3) == 3.0


# ------------------------------------------------------------------------ trace

GOOD_TRACE = wrap(
    "72",
    "Step 1: First, Natalia sold 48 / 2 = 24 clips in May.\n"
    "Step 2: Then she sold 48 + 24 = 72 clips in total.\n"
    "Therefore, the answer is 72.",
)


def test_rubric_weights_sum_to_one():
    from tracetune.rewards import TRACE_RUBRIC

    assert math.isclose(sum(TRACE_RUBRIC.values()), 1.0)


def test_a_full_trace_scores_one():
    # steps 2/2, calculations 2/2, transitions 2/2 ("first"; "then"), conclusion states 72.
    assert trace_structure(GOOD_TRACE) == pytest.approx(1.0)


def test_curated_gsm8k_target_scores_high():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether."
    assert trace_structure(curate_solution(solution, "72")) >= 0.9


def test_numbered_lines_count_as_steps():
    text = wrap("72", "1. First she sold 48 / 2 = 24 in May.\n2) Then 48 + 24 = 72 in total.\nSo the answer is 72.")
    assert trace_breakdown(text)["n_steps"] == 2
    assert trace_structure(text) == pytest.approx(1.0)


TRACE_CASES = [
    # (completion, upper bound on the score)  # what it probes
    (wrap("5", "Step 1: Step 1: Step 1:"), 0.0),  # empty step markers add nothing
    (wrap("5", "first then next so thus therefore " * 20), 0.0),  # a wall of transition words
    (wrap("5", "Step 1: first then so. Step 2: thus next so. Step 3: hence therefore finally."), 0.0),  # walls as steps
    ("", 0.0),  # empty completion
    (wrap("72", "The answer is obvious."), 0.0),  # no steps, no calculation, no number
    (wrap("72", "48 / 2 = 24 and 48 + 24 = 72, so the answer is 72."), 0.45),  # prose, no step markers
    (wrap("72", "Step 1: 48 + 24 = 72.\nTherefore, the answer is 71."), 0.6),  # conclusion contradicts the answer
]


@pytest.mark.parametrize("completion,ceiling", TRACE_CASES)
def test_trace_rubric_is_not_fooled(completion, ceiling):
    assert trace_structure(completion) <= ceiling + 1e-9


def test_repeated_steps_cost():
    one = wrap("24", "Step 1: She sold 48 / 2 = 24 clips.\nTherefore, the answer is 24.")
    repeated = wrap("24", "Step 1: She sold 48 / 2 = 24 clips.\n" * 3 + "Therefore, the answer is 24.")
    renumbered = wrap("24", "".join(f"Step {i}: She sold 48 / 2 = 24 clips.\n" for i in range(1, 4)) + "Therefore, the answer is 24.")
    # 1 distinct step and 2 repeats: the repetition factor keeps 1/3 of the rubric's sum.
    assert trace_breakdown(repeated)["repetition"] == pytest.approx(1 / 3)
    assert trace_structure(repeated) == pytest.approx(trace_structure(one) / 3)
    assert trace_structure(renumbered) == pytest.approx(trace_structure(one) / 3)


def _steps(*steps: str, answer: str = "72") -> str:
    body = "".join(f"Step {i}: {step}\n" for i, step in enumerate(steps, start=1))
    return wrap(answer, body + f"Therefore, the answer is {answer}.")


CLIPS_1, CLIPS_2 = "First, Natalia sold 48 / 2 = 24 clips in May.", "Then she sold 48 + 24 = 72 clips in total."
# (the trace with a repeated step, the same trace without it)  # what counts as a repeat
REPEATED_STEP_CASES = [
    (_steps(CLIPS_1, CLIPS_1, CLIPS_2), _steps(CLIPS_1, CLIPS_2)),  # verbatim
    (_steps(CLIPS_1, CLIPS_2, CLIPS_2), _steps(CLIPS_1, CLIPS_2)),  # verbatim, the step before the conclusion
    (_steps(CLIPS_1, "First,   Natalia sold 48/2 = 24 clips\tin May.", CLIPS_2), _steps(CLIPS_1, CLIPS_2)),  # spacing changed
    (_steps(CLIPS_1, "FIRST: natalia sold 48 / 2 = 24 clips in may!", CLIPS_2), _steps(CLIPS_1, CLIPS_2)),  # case, punctuation
    (_steps(CLIPS_1, "First, Natalia sold 50 / 2 = 25 clips in May.", CLIPS_2), _steps(CLIPS_1, CLIPS_2)),  # numbers changed
    (_steps(CLIPS_1, "First, Natalia sold 48.5 / 2 = 24.25 clips in May.", CLIPS_2), _steps(CLIPS_1, CLIPS_2)),  # a decimal for a whole number
    (_steps(CLIPS_1, CLIPS_2, "Then she sold 96 + 24 = 120 clips in total."), _steps(CLIPS_1, CLIPS_2)),  # last step, numbers changed
    (wrap("72", f"1. {CLIPS_1}\n2. {CLIPS_1}\n3. {CLIPS_2}\nSo the answer is 72."),
     wrap("72", f"1. {CLIPS_1}\n2. {CLIPS_2}\nSo the answer is 72.")),  # numbered lines
    (  # the report's SFT + GRPO sample (test-1) that scored a full 1.00
        _steps("First find how many days she eats: 16 = 16 days",
               "Then subtract the number of days she eats from the number of eggs: 16 = 16 days - 4",
               "Then subtract the number of days she eats from the number of eggs: 16 = 16 days - 4",
               "Then multiply the number of days by the number of eggs: 16 = 16 days * 4",
               "Then divide that number by 4: 16 = 4", answer="4"),
        _steps("First find how many days she eats: 16 = 16 days",
               "Then subtract the number of days she eats from the number of eggs: 16 = 16 days - 4",
               "Then multiply the number of days by the number of eggs: 16 = 16 days * 4",
               "Then divide that number by 4: 16 = 4", answer="4"),
    ),
]


@pytest.mark.parametrize("repeated,once", REPEATED_STEP_CASES)
def test_a_repeated_step_lowers_the_trace_score(repeated, once):
    assert trace_breakdown(repeated)["n_repeats"] == 1
    assert trace_structure(repeated) < trace_structure(once)


# Steps that share a frame but are not repeats: the repetition factor stays 1.
HONEST_STEP_CASES = [
    _steps("He buys 3 apples at 2 each, 3 * 2 = 6.", "She buys 4 pears at 5 each, 4 * 5 = 20.", answer="26"),  # same frame, other words
    _steps("Then 48 + 24 = 72.", "Then 72 - 10 = 62.", answer="62"),  # bare arithmetic: too few words to be a frame
    _steps("So 3 * 4 = 12 apples.", "So 12 * 5 = 60 apples.", answer="60"),  # 2 words besides the numbers
    _steps("The first box holds 3 * 4 = 12 eggs.", "The second box holds 5 * 4 = 20 eggs.", answer="32"),  # one word differs
]


@pytest.mark.parametrize("completion", HONEST_STEP_CASES)
def test_honest_steps_with_a_shared_frame_are_not_repeats(completion):
    parts = trace_breakdown(completion)
    assert (parts["repetition"], parts["n_repeats"], parts["n_steps"]) == (1.0, 0.0, 2.0)


def test_gsm8k_reference_solutions_keep_their_trace_scores():
    # The curated targets of the shipped test split: parallel steps that share a
    # 4-word frame ("5 tables have 3 chairs each ...") are rare (1.7% of them).
    from tracetune.data import load_examples

    examples = load_examples("gsm8k", "test").examples
    scores = [trace_breakdown(curate_solution(e.solution, e.reference)) for e in examples]
    assert sum(s["n_repeats"] > 0 for s in scores) / len(scores) < 0.025
    assert sum(s["total"] for s in scores) / len(scores) > 0.95


def test_padding_beyond_a_sensible_number_of_steps_lowers_the_score():
    def steps(n: int) -> str:
        body = "".join(f"Step {i}: Then add {i} + 1 = {i + 1} apples.\n" for i in range(1, n + 1))
        return wrap(str(n + 1), body + f"Therefore, the answer is {n + 1}.")

    assert trace_structure(steps(6)) == pytest.approx(1.0)
    assert trace_structure(steps(12)) == pytest.approx(1.0)  # 12 is still sensible
    assert trace_structure(steps(18)) == pytest.approx(0.5)  # 1 - (18 - 12) / 12
    assert trace_structure(steps(30)) == 0.0


def test_text_outside_the_tags_lowers_the_score():
    assert trace_structure("Sure, here you go! " + GOOD_TRACE) == pytest.approx(0.5 * trace_structure(GOOD_TRACE))
    assert trace_structure(GOOD_TRACE + " Hope that helps.") < trace_structure(GOOD_TRACE)


def test_untagged_reasoning_earns_partial_credit_only():
    untagged = "Step 1: 48 / 2 = 24.\nStep 2: Then 48 + 24 = 72.\nTherefore, the answer is 72."
    assert 0 < trace_structure(untagged) <= 0.5


# ------------------------------------------------------------------- arithmetic

NATALIA_Q = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
NATALIA_SOLUTION = (  # two calculator annotations: two calculations needed
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May."
)
EGGS_Q = "A box holds 3 x 4 = 12 eggs. Tom buys 5 boxes. How many eggs does Tom buy?"
EGGS_SOLUTION = "Tom buys 5*12 = <<5*12=60>>60 eggs."
JOY_Q = "Joy can read 8 pages of a book in 20 minutes. How many pages can she read in 2 hours?"
JOY_SOLUTION = "2 hours is 2*60 = <<2*60=120>>120 minutes.\nThat is 120/20 = <<120/20=6>>6 sets.\nShe reads 6*8 = <<6*8=48>>48 pages."
SHIRT_Q = "A $50 shirt is sold at 20% off. What does it cost?"
SHIRT_SOLUTION = "The discount is 50*20/100 = <<50*20/100=10>>10.\nIt costs 50-10 = <<50-10=40>>40."


def natalia(reasoning: str) -> float:
    return arithmetic(wrap("72", reasoning), NATALIA_Q, NATALIA_SOLUTION)


# (reasoning, expected arithmetic score) for Natalia's problem (needed = 2), one
# probe per line. Score = (T'/needed) * (T'/(T'+F)), T' = min(true grounded, needed).
NATALIA_CASES = [
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.", 1.0),  # the reference's two calculations
    ("Step 1: 48/2 = 24 clips.\nStep 2: 24 + 48 = 72 clips.", 1.0),  # operands in another order
    ("Step 1: 48 * 0.5 = 24.\nStep 2: 48 + 24 = 72.", 1.0),  # another route: 0.5 from "half"
    ("Step 1: 48 / 2 = 24.", 0.5),  # half the calculations needed: coverage 1/2
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 73.", 0.25),  # a false claim costs: (1/2) * (1/2)
    ("Step 1: 48 / 2 = 25.\nStep 2: 48 + 25 = 73.", 0.25),  # an error carried forward costs once: the next claim is right on it
    ("Step 1: 48 + 24 = 73.", 0.0),  # only false: nothing paid
    ("Natalia sold half as many clips in May, so 72 in all.", 0.0),  # no claim at all
    ("Step 1: 1 + 1 = 2.\nStep 2: 2 + 2 = 4.", 0.0),  # trivially true: free constants and "half"'s 2 alone are not grounded
    ("Step 1: 7 * 8 = 56.\nStep 2: 56 + 1 = 57.", 0.0),  # true, but nothing from the problem
    ("Step 1: 48 * 1 = 48.\nStep 2: 48 + 0 = 48.\nStep 3: 48 / 1 = 48.", 0.0),  # identities do no work
    ("Step 1: 48 / 48 = 1.\nStep 2: 48 - 48 = 0.\nStep 3: 48 * 0 = 0.", 0.0),  # a number against itself, a product with 0: no work
    ("Step 1: 2 / 48 = 0.\nStep 2: 48 / 24 = 2.", 0.5),  # a rounded claim (0.04 to 0) neither pays nor costs
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 / 10 = 5.\nStep 3: 48 + 24 = 72.", 1.0),  # ... even beside the real ones (4.8 to 5)
    ("Step 1: 48 / 2 = 24.\n" * 5, 0.5),  # the same claim repeated counts once
    ("Step 1: 48 / 2 = 24. 48 / 2 = 24. 2 x 48 / 4 = 24.", 0.5),  # ... and a new claim with the same result is only grounded
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 73.\nStep 3: 24 + 48 = 73.", 0.25),  # a false claim repeated costs once
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.\nStep 3: 7 * 8 = 57.", 2 / 3),  # an ungrounded false claim costs too
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.\nStep 3: 9 * 9 = 81.", 1.0),  # an ungrounded true claim neither pays nor costs
    ("Step 1: 48/2 = <<48/2=24>>24.\nStep 2: 48+24 = <<48+24=72>>72.", 1.0),  # annotations repeating the claims count once
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.\n" + "".join(f"Step {i}: 48 + {i} = {48 + i}.\n" for i in range(3, 9)),
     0.5),  # a wall: 8 claims, 2 past max(3 x 2, 6), each costing as a false one: (2/2) * (2/4)
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 73.\nStep 3: 48 + 1 = 49.\nStep 4: 48 * 2 = 96.\nStep 5: 24 - 1 = 23.",
     2 / 3),  # grounded true padding fills the coverage, but at most `needed` claims pay: the false one still costs, (2/2) * (2/3)
]


@pytest.mark.parametrize("reasoning,expected", NATALIA_CASES)
def test_arithmetic_rubric(reasoning, expected):
    assert natalia(reasoning) == pytest.approx(expected)


# (completion, question, solution, expected), one probe per line.
ARITHMETIC_CASES = [
    (wrap("60", "Step 1: 3 x 4 = 12 eggs in a box.\nStep 2: 5 * 12 = 60."), EGGS_Q, EGGS_SOLUTION, 1.0),  # the copy dropped, the real one pays
    (wrap("12", "Step 1: 3 x 4 = 12 eggs in a box."), EGGS_Q, EGGS_SOLUTION, 0.0),  # a claim copied from the question pays nothing
    (wrap("48", "Step 1: 2 * 60 = 120.\nStep 2: 120 / 20 = 6.\nStep 3: 6 * 8 = 48."), JOY_Q, JOY_SOLUTION, 1.0),  # 60: minutes and hours
    (wrap("48", "Step 1: 8 * 6 = 48."), JOY_Q, JOY_SOLUTION, 1 / 3),  # 6 is the reference's own result; 1 of 3 needed
    (wrap("40", "Step 1: 50 * 0.2 = 10.\nStep 2: 50 - 10 = 40."), SHIRT_Q, SHIRT_SOLUTION, 1.0),  # 20% read as 0.2
    (wrap("40", "Step 1: 50 * 20 / 100 = 10.\nStep 2: 50 - 10 = 40."), SHIRT_Q, SHIRT_SOLUTION, 1.0),  # ... or as 20 / 100
    (wrap("24", "Step 1: 48 / 2 = 24."), NATALIA_Q, "", 1.0),  # no solution: one grounded true claim is enough
    (wrap("24", "Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 73."), NATALIA_Q, "", 0.5),  # ... and a false one still costs
    ("<reasoning>Step 1: First add.</reasoning> 48 / 2 = 24, 48 + 24 = 72 <answer>72</answer>",
     NATALIA_Q, NATALIA_SOLUTION, 0.0),  # claims outside <reasoning> pay nothing
    (wrap("48 / 2 = 24, 48 + 24 = 72", "Step 1: I add."), NATALIA_Q, NATALIA_SOLUTION, 0.0),  # ... nor in <answer>
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.", NATALIA_Q, NATALIA_SOLUTION, 0.0),  # no <reasoning> block at all
    ("<reasoning>Step 1: 48 / 2 = 24.</reasoning><reasoning>48 + 24 = 72</reasoning><answer>72</answer>",
     NATALIA_Q, NATALIA_SOLUTION, 0.0),  # two reasoning blocks: none to read
    (wrap("72", "Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.\n" + "48 / 2 = 24. " * SCAN_LIMIT),
     NATALIA_Q, NATALIA_SOLUTION, 0.0),  # more than SCAN_LIMIT claims, even repeats: a wall that scores 0
]


@pytest.mark.parametrize("completion,question,solution,expected", ARITHMETIC_CASES)
def test_arithmetic_cases(completion, question, solution, expected):
    assert arithmetic(completion, question, solution) == pytest.approx(expected)


def test_arithmetic_worked_example_of_the_docstring():
    parts = arithmetic_breakdown(wrap("73", "48 / 2 = 24. 1 + 1 = 2. 48 + 24 = 73. 24 + 48 = 73."), NATALIA_Q, NATALIA_SOLUTION)
    assert {k: parts[k] for k in ("true", "false", "ungrounded", "dropped", "needed", "total")} == {
        "true": 1, "false": 1, "ungrounded": 1, "dropped": 1, "needed": 2, "total": 0.25}


def test_gsm8k_reference_solutions_earn_the_arithmetic_reward():
    # The curated targets of the shipped test split scored against their own
    # problems: no false claims but GSM8K's two typos, and a high mean; those with
    # no claim the evaluator reads ("5 snakes/jaguar * 6 jaguars = 30") score 0.
    from tracetune.data import load_examples

    examples = load_examples("gsm8k", "test").examples
    parts = [arithmetic_breakdown(curate_solution(e.solution, e.reference), e.question, e.solution) for e in examples]
    assert sum(p["false"] for p in parts) <= 2
    assert sum(p["total"] for p in parts) / len(parts) > 0.7
    assert sum(p["total"] == 1.0 for p in parts) / len(parts) > 0.6


def test_arithmetic_batch_form_and_its_columns():
    completions = [wrap("72", "Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72."), wrap("72", "Step 1: 48 / 2 = 24.")]
    assert arithmetic_reward(["p"] * 2, completions, question=[NATALIA_Q] * 2, solution=[NATALIA_SOLUTION, ""]) == [1.0, 1.0]
    assert arithmetic_reward(["p"] * 2, completions, question=[NATALIA_Q] * 2) == [1.0, 1.0]  # no solution column: needed 1
    assert REWARDS["arithmetic"](["p"] * 2, completions, question=[NATALIA_Q] * 2, solution=[NATALIA_SOLUTION] * 2) == [1.0, 0.5]
    with pytest.raises(ValueError, match="'question'"):
        REWARDS["arithmetic"](["p"] * 2, completions, reference=["72"] * 2)


# ------------------------------------------------------------------- confidence


def tokens_of(completion: str, answer: str, answer_logprobs: list[float]) -> tuple[list[str], list[float]]:
    """Split a completion into [prefix, answer chars..., suffix] tokens."""
    start = completion.index("<answer>") + len("<answer>")
    texts = [completion[:start], *answer, completion[start + len(answer) :]]
    assert "".join(texts) == completion
    return texts, [-0.01, *answer_logprobs, -0.02]


def test_confidence_is_p_when_right_and_one_minus_p_when_wrong():
    completion = wrap("72")
    texts, logprobs = tokens_of(completion, "72", [math.log(0.9), math.log(0.4)])
    p = math.sqrt(0.9 * 0.4)  # geometric mean of the answer tokens' probabilities = 0.6
    assert confidence(completion, "72", texts, logprobs) == pytest.approx(p)
    assert confidence(completion, "71", texts, logprobs) == pytest.approx(1 - p)


def test_confident_wrong_answers_are_penalised():
    completion = wrap("71")
    sure = tokens_of(completion, "71", [math.log(0.999), math.log(0.999)])
    unsure = tokens_of(completion, "71", [math.log(0.1), math.log(0.1)])
    assert confidence(completion, "72", *sure) < 0.01
    assert confidence(completion, "72", *unsure) == pytest.approx(0.9)


def test_answer_tokens_exclude_whitespace_and_tags():
    completion = wrap(" 72 ")
    start = completion.index("<answer>") + len("<answer>")
    texts = [completion[:start], " ", "72", " ", completion[start + 4 :]]
    assert answer_token_logprobs(completion, texts, [-1.0, -2.0, -0.5, -3.0, -4.0]) == [-0.5]


def test_no_answer_gives_zero_confidence():
    for completion in ("<reasoning>72</reasoning>", wrap("none"), wrap("")):
        assert confidence(completion, "72", list(completion), [-0.1] * len(completion)) == 0.0
    assert confidence_from_logprobs(True, []) == 0.0


def test_confidence_needs_log_probabilities():
    with pytest.raises(ValueError, match="token_logprobs"):
        confidence_reward(["q"], [wrap("72")], reference=["72"])


def test_tokens_must_spell_the_completion():
    with pytest.raises(ValueError, match="concatenate"):
        confidence(wrap("72"), "72", ["nope"], [-1.0])
    with pytest.raises(ValueError, match="log-probabilities"):
        confidence(wrap("72"), "72", [wrap("72")], [-1.0, -2.0])


# -------------------------------------------------------------------- composite


def test_batch_forms_match_the_per_sample_helpers_and_ignore_extra_columns():
    completions = [GOOD_TRACE, wrap("71"), "garbage"]
    refs = ["72", "72", "72"]
    extra = {"mode": "train", "trajectory_ids": [0, 1, 2], "question": ["q"] * 3}
    assert correctness_reward(["p"] * 3, completions, reference=refs, **extra) == [1.0, 0.0, 0.0]
    assert trace_reward(["p"] * 3, completions, **extra) == [trace_structure(c) for c in completions]


def test_composite_is_the_weighted_sum():
    texts, logprobs = tokens_of(GOOD_TRACE, "72", [math.log(0.5)] * 2)
    columns = {"reference": ["72"], "token_texts": [texts], "token_logprobs": [logprobs]}
    components = reward_components(["p"], [GOOD_TRACE], RewardWeights(), **columns)
    assert components == {"correctness": [1.0], "trace": [pytest.approx(1.0)], "confidence": [pytest.approx(0.5)],
                          "sound": [1.0]}  # unweighted, yet scored: every component its columns allow
    # R = 0.6 * 1 + 0.25 * 1 + 0.15 * 0.5 = 0.925
    assert make_composite_reward()(["p"], [GOOD_TRACE], **columns) == [pytest.approx(0.925)]


def test_ablation_weights_drop_a_term():
    texts, logprobs = tokens_of(GOOD_TRACE, "72", [math.log(0.5)] * 2)
    columns = {"reference": ["72"], "token_texts": [texts], "token_logprobs": [logprobs]}
    no_trace = make_composite_reward(RewardWeights(correctness=0.6, trace=0.0, confidence=0.15))
    assert no_trace(["p"], [GOOD_TRACE], **columns) == [pytest.approx(0.6 + 0.15 * 0.5)]
    # Without the confidence term, no log-probabilities are needed.
    no_conf = make_composite_reward(RewardWeights(correctness=0.6, trace=0.25, confidence=0.0))
    assert no_conf(["p"], [GOOD_TRACE], reference=["72"]) == [pytest.approx(0.85)]


def test_combine_applies_weights_once():
    assert combine({"correctness": [1.0, 0.0], "trace": [0.5, 1.0], "confidence": [1.0, 1.0]}, RewardWeights()) == [
        pytest.approx(0.6 + 0.125 + 0.15),
        pytest.approx(0.25 + 0.15),
    ]


def test_every_registered_reward_is_named_for_its_metric_key():
    assert list(REWARDS) == ["correctness", "trace", "confidence", "arithmetic", "judge", "sound",
                             "progress"]  # the positional weights' order
    assert list(RewardWeights().as_dict()) == list(REWARDS)
    for name, reward in REWARDS.items():
        assert re.fullmatch(r"[a-z_]+", name) and reward.name == name and reward.label  # "reward/<name>" reads well
        assert all(isinstance(group, tuple) for group in reward.columns)


def test_the_recipe_weights_are_the_registered_defaults():
    assert {name: r.default_weight for name, r in REWARDS.items()} == {
        "correctness": 0.6, "trace": 0.25, "confidence": 0.15, "arithmetic": 0.0, "judge": 0.0, "sound": 0.0,
        "progress": 0.0}


def test_arithmetic_joins_the_composite_by_weight():
    completion = wrap("72", "Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 73.\nTherefore, the answer is 72.")
    columns = {"reference": ["72"], "question": [NATALIA_Q], "solution": [NATALIA_SOLUTION]}
    weights = RewardWeights(correctness=0.5, trace=0.0, confidence=0.0, arithmetic=0.5)
    components = reward_components(["p"], [completion], weights, **columns)
    assert components["arithmetic"] == [0.25]  # one of two claims false: (1/2) * (1/2)
    # R = 0.5 * 1 + 0.5 * 0.25 = 0.625; trace is computed for logging but not paid.
    assert make_composite_reward(weights)(["p"], [completion], **columns) == [pytest.approx(0.625)]
    assert "trace" in components and "confidence" not in components  # no log-probabilities: skipped at weight 0


def test_a_weighted_component_without_its_columns_is_an_error_and_an_unweighted_one_is_skipped():
    completion = [GOOD_TRACE]
    with pytest.raises(ValueError, match="the arithmetic reward \\(weight 0.2\\) needs the columns 'question'"):
        reward_components(["p"], completion, RewardWeights(confidence=0, arithmetic=0.2), reference=["72"])
    # Weight 0 and no question: not computed (the default weights need no question column).
    assert set(reward_components(["p"], completion, RewardWeights(confidence=0), reference=["72"])) == {"correctness", "trace", "sound"}
    # The question given: computed for logging even at weight 0.
    assert "arithmetic" in reward_components(["p"], completion, RewardWeights(confidence=0), reference=["72"], question=["q"])


def test_combine_refuses_a_missing_weighted_component():
    with pytest.raises(ValueError, match="arithmetic"):
        combine({"correctness": [1.0], "trace": [1.0]}, RewardWeights(confidence=0, arithmetic=1))
    # Weight-0 components may be passed: they are logged, not paid.
    assert combine({"correctness": [1.0], "trace": [1.0], "arithmetic": [1.0]}, RewardWeights(confidence=0)) == [0.85]


# ------------------------------------------------------------------- properties

# Text built from the pieces that matter (tags, markers, numbers, cue words) as well
# as arbitrary unicode, so the generator reaches the parser's edge cases.
FRAGMENTS = st.sampled_from(
    ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "Step 1:", "Step 2:", "1.", "\n", " ",
     "Therefore,", "so", "then", "=", "+", "/", "-", "$", "1,000", "3/4", "72", "0.5", "%", "km/h", "é", "数"]
)
TEXT = st.one_of(st.text(max_size=300), st.lists(st.one_of(FRAGMENTS, st.text(max_size=5)), max_size=60).map("".join))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXT, st.sampled_from(["72", "-5", "0.75", "1,200"]))
def test_rewards_stay_in_range_for_any_text(text, reference):
    assert correctness(text, reference) in (0.0, 1.0)
    assert 0.0 <= trace_structure(text) <= 1.0
    parsed = parse_completion(text)
    assert parsed.strict == (parsed.reasoning is not None and parsed.answer is not None and not parsed.outside.strip()
                             and text.index("<reasoning>") < text.index("<answer>") and bool(parsed.answer.strip()))
    lenient_number(text)  # never raises


@settings(max_examples=200, deadline=None)
@given(TEXT, st.lists(st.floats(min_value=-50, max_value=0), min_size=1, max_size=1))
def test_confidence_stays_in_range_for_any_text(text, lp):
    texts = list(text)  # one token per character: always spells the completion
    value = confidence(text, "72", texts, lp * len(texts))
    assert 0.0 <= value <= 1.0


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["Step 1: 2 + 2 = 4. ", " ", "<answer>", "9" * 50, "数学 ", "$1,000 "]), st.integers(2_000, 20_000))
def test_very_long_text_is_handled(piece, repeats):
    text = piece * (repeats // len(piece) + 1)
    assert correctness(text, "4") in (0.0, 1.0)
    assert 0.0 <= trace_structure(text) <= 1.0


def test_components_equal_the_registered_batch_rewards():
    completions = [GOOD_TRACE, wrap("71"), "Sure! " + wrap("72"), "<reasoning>72</reasoning>", wrap(" 72 km ")]
    toks = [tokens_of(c, c[c.index("<answer>") + 8 : c.index("</answer>")], [-0.3] * len(c[c.index("<answer>") + 8 : c.index("</answer>")]))
            if "<answer>" in c else ([c], [-0.5]) for c in completions]
    columns = {"reference": ["72"] * 5, "token_texts": [t for t, _ in toks], "token_logprobs": [lp for _, lp in toks],
               "question": [NATALIA_Q] * 5, "solution": [NATALIA_SOLUTION] * 5,
               "judge_score": [1.0, 0.25, 0.5, None, 0.0]}  # the judge's, mapped to [0, 1]; None: unscored
    prompts = ["p"] * 5
    expected = {name: fn(prompts, completions, **columns) for name, fn in REWARDS.items()}
    assert set(expected) == set(REWARDS)
    assert reward_components(prompts, completions, RewardWeights(), **columns) == expected
    assert available_components(prompts, completions, **columns) == expected
    assert expected["judge"] == [1.0, 0.25, 0.5, None, 0.0]
    with pytest.raises(ValueError, match="token_logprobs"):
        reward_components(prompts, completions, RewardWeights(), reference=["72"] * 5)


def test_confidence_from_answer_logprobs_equals_confidence_from_tokens():
    texts, logprobs = tokens_of(GOOD_TRACE, "72", [math.log(0.5)] * 2)
    from_tokens = confidence_reward(["p"], [GOOD_TRACE], reference=["72"], token_texts=[texts], token_logprobs=[logprobs])
    selected = confidence_reward(["p"], [GOOD_TRACE], reference=["72"], answer_logprobs=[answer_token_logprobs(GOOD_TRACE, texts, logprobs)])
    assert from_tokens == selected == [pytest.approx(0.5)]


# Reasoning built from what claims are made of, so the generator reaches the
# evaluator's corners: operators, parentheses, percents, fractions, annotations.
ARITHMETIC_FRAGMENTS = st.sampled_from(
    ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "Step 1:", "\n", " ", "=", "+", "-", "*", "/", "x", "×", "÷",
     "(", ")", "%", "$", "<<", ">>", "48", "2", "24", "0", "1", "0.5", "1/2", "1,000", "9" * 30, ".", "half", "minutes", "é"]
)
ARITHMETIC_TEXT = st.one_of(TEXT, st.lists(st.one_of(ARITHMETIC_FRAGMENTS, st.text(max_size=4)), max_size=80).map("".join))
QUESTIONS = st.one_of(st.sampled_from([NATALIA_Q, JOY_Q, SHIRT_Q, EGGS_Q, ""]), ARITHMETIC_TEXT)
SOLUTIONS = st.one_of(st.sampled_from([NATALIA_SOLUTION, JOY_SOLUTION, ""]), ARITHMETIC_TEXT)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ARITHMETIC_TEXT, QUESTIONS, SOLUTIONS)
def test_arithmetic_stays_in_range_and_never_raises(text, question, solution):
    for completion in (text, f"<reasoning>{text}</reasoning><answer>1</answer>"):
        parts = arithmetic_breakdown(completion, question, solution)
        assert 0.0 <= parts["total"] <= 1.0
        assert parts["total"] == 0.0 or parts["true"] >= 1


@pytest.mark.parametrize("piece", ["48 / 2 = 24. ", "1+1=2 ", "<<48/2=24>>", "((((", "9" * 100 + " = 9 ", "48 + 24 = 73. ", "= 1 "])
def test_arithmetic_work_is_bounded_on_very_long_text(piece):
    """The reward stays in range on a wall of text, and 4x the text costs at most about
    4x the time (a ratio, best of 3, so that a busy machine does not fail it)."""

    def seconds(length: int) -> float:
        completion = wrap("72", piece * (length // len(piece) + 1))
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            assert 0.0 <= arithmetic(completion, NATALIA_Q, NATALIA_SOLUTION) <= 1.0
            best = min(best, time.perf_counter() - start)
        return best

    small, large = seconds(12_500), seconds(50_000)
    assert large < 8 * small + 0.05, (small, large)


# ------------------------------------------------------------------- progress

# (reasoning, expected progress) for Natalia's problem: milestones 24 and 72, so
# M = 2 and up to M + 1 = 3 counted claims are free.
PROGRESS_CASES = [
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.", 1.0),  # the reference's way
    ("Step 1: 48 * 0.5 = 24.\nStep 2: 24 + 48 = 72.", 1.0),  # another route to the same points
    ("Step 1: 48 / 2 = 24.", 0.5),  # half way
    ("Step 1: 48 / 2 = 24.\nStep 2: 24 + 48 = 73.", 0.5),  # half way, then a slip: the slip is arithmetic's to cost
    ("Step 1: 48 / 2 = 25.\nStep 2: 48 + 24 = 72.", 0.5),  # a slip, then the way again: 24 is the reference's, so grounded
    ("Step 1: 48 + 24 = 72.", 0.5),  # a milestone used as an operand is grounded: 72 reached
    ("Step 1: 48 / 2 = 25.\nStep 2: 48 + 25 = 73.", 0.0),  # no milestone reached
    ("Natalia sold 24 in May, so 72 in all.", 0.0),  # numbers without claims reach nothing
    ("Step 1: 48 / 2 = 24.\n" * 5, 0.5),  # a repeated claim counts once
    ("Step 1: 12 + 12 = 24.\nStep 2: 36 * 2 = 72.", 0.0),  # right values from numbers the problem lacks: ungrounded
    ("Step 1: 48 + 2 = 50. 48 - 2 = 46. 48 * 2 = 96. 48 / 2 = 24.", 0.375),  # a spray of sums: (1/2) * (3/4)
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.\nStep 3: 72 - 24 = 48.\nStep 4: 72 + 0 = 72.", 1.0),  # a check, an identity (dropped): 3 counted
    ("Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72.\n" + "".join(f"Step {i}: 48 + {i} = {48 + i}.\n" for i in range(3, 9)),
     3 / 8),  # a wall after the way: (2/2) * (3/8)
]


@pytest.mark.parametrize(("reasoning", "expected"), PROGRESS_CASES)
def test_progress_rubric(reasoning, expected):
    assert progress(wrap("72", reasoning), NATALIA_Q, NATALIA_SOLUTION) == pytest.approx(expected)


def test_progress_worked_example_of_the_docstring():
    assert progress(wrap("73", "48 / 2 = 24. 24 + 48 = 73."), NATALIA_Q, NATALIA_SOLUTION) == 0.5
    assert progress(wrap("96", "48 + 2 = 50. 48 - 2 = 46. 48 * 2 = 96. 48 / 2 = 24."), NATALIA_Q, NATALIA_SOLUTION) == 0.375
    assert progress(wrap("72", "48 / 2 = 24. 48 + 24 = 72."), NATALIA_Q, NATALIA_SOLUTION) == 1.0


def test_progress_pays_nothing_outside_the_reasoning_or_for_the_question_s_own_claims():
    assert progress("48 / 2 = 24. 48 + 24 = 72. <reasoning>Half.</reasoning><answer>72</answer>", NATALIA_Q, NATALIA_SOLUTION) == 0.0
    assert progress(wrap("72", "Half of it."), NATALIA_Q, NATALIA_SOLUTION) == 0.0
    # EGGS_Q states 3 x 4 = 12 itself: copying it reaches nothing; 5 * 12 = 60 is the one milestone.
    assert progress(wrap("60", "3 x 4 = 12."), EGGS_Q, EGGS_SOLUTION) == 0.0
    assert progress(wrap("60", "3 x 4 = 12. 5 * 12 = 60."), EGGS_Q, EGGS_SOLUTION) == 1.0


def test_progress_is_undefined_without_new_reference_results():
    assert progress(wrap("72", "48 / 2 = 24."), NATALIA_Q, "") is None  # no reference solution
    # The one annotation's result is a number the question states: no way point to reach.
    assert progress(wrap("5", "10 / 2 = 5."), "Ann has 10 pens and gives away 5. How many are left?", "<<10-5=5>>5") is None


def test_progress_batch_form_joins_the_composite_by_weight():
    completions = [wrap("72", "48 / 2 = 24. 48 + 24 = 73."), wrap("72", "48 / 2 = 24. 48 + 24 = 72.")]
    columns = {"reference": ["72"] * 2, "question": [NATALIA_Q] * 2, "solution": [NATALIA_SOLUTION] * 2}
    assert progress_reward(["p"] * 2, completions, question=columns["question"], solution=columns["solution"]) == [0.5, 1.0]
    weights = RewardWeights(correctness=0.5, trace=0.0, confidence=0.0, progress=0.5)
    assert make_composite_reward(weights)(["p"] * 2, completions, **columns) == [pytest.approx(0.75), pytest.approx(1.0)]
    with pytest.raises(ValueError, match="progress"):
        REWARDS["progress"](["p"], completions[:1], question=[NATALIA_Q])  # no solution column


def test_gsm8k_reference_solutions_reach_their_own_milestones():
    """The curated SFT targets (GSM8K's own solutions) walk the whole way: the rubric
    reads what the policy is taught to write."""
    from tracetune.data import load_examples

    examples = load_examples("gsm8k", "test").examples
    scores = [progress(curate_solution(e.solution, e.reference), e.question, e.solution) for e in examples]
    defined = [s for s in scores if s is not None]
    assert len(defined) >= 0.9 * len(scores)
    assert sum(s == 1.0 for s in defined) / len(defined) >= 0.6, sorted(defined)[:20]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ARITHMETIC_TEXT, QUESTIONS, SOLUTIONS)
def test_progress_stays_in_range_and_never_raises(text, question, solution):
    for completion in (text, f"<reasoning>{text}</reasoning><answer>1</answer>"):
        value = progress(completion, question, solution)
        assert value is None or 0.0 <= value <= 1.0
