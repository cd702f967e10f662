from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracetune.config import RewardWeights
from tracetune.data import curate_solution
from tracetune.format import lenient_number, parse_completion
from tracetune.rewards import (
    REWARDS,
    answer_token_logprobs,
    combine,
    confidence,
    confidence_from_logprobs,
    confidence_reward,
    correctness,
    correctness_reward,
    make_composite_reward,
    parse_reference,
    reward_components,
    trace_breakdown,
    trace_reward,
    trace_structure,
)

from conftest import wrap

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


def test_repeated_steps_add_nothing():
    one = wrap("24", "Step 1: She sold 48 / 2 = 24 clips.\nTherefore, the answer is 24.")
    repeated = wrap("24", "Step 1: She sold 48 / 2 = 24 clips.\n" * 3 + "Therefore, the answer is 24.")
    renumbered = wrap("24", "".join(f"Step {i}: She sold 48 / 2 = 24 clips.\n" for i in range(1, 4)) + "Therefore, the answer is 24.")
    assert trace_structure(repeated) <= trace_structure(one)
    assert trace_structure(renumbered) <= trace_structure(one)


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
    assert components == {"correctness": [1.0], "trace": [pytest.approx(1.0)], "confidence": [pytest.approx(0.5)]}
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
    assert set(REWARDS) == {"correctness", "trace", "confidence"}
    assert set(RewardWeights().as_dict()) == set(REWARDS)


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


def test_one_pass_components_equal_the_registered_batch_rewards():
    completions = [GOOD_TRACE, wrap("71"), "Sure! " + wrap("72"), "<reasoning>72</reasoning>", wrap(" 72 km ")]
    toks = [tokens_of(c, c[c.index("<answer>") + 8 : c.index("</answer>")], [-0.3] * len(c[c.index("<answer>") + 8 : c.index("</answer>")]))
            if "<answer>" in c else ([c], [-0.5]) for c in completions]
    columns = {"reference": ["72"] * 5, "token_texts": [t for t, _ in toks], "token_logprobs": [lp for _, lp in toks]}
    prompts = ["p"] * 5
    expected = {name: fn(prompts, completions, **columns) for name, fn in REWARDS.items()}
    assert reward_components(prompts, completions, RewardWeights(), **columns) == expected
    with pytest.raises(ValueError, match="token_logprobs"):
        reward_components(prompts, completions, RewardWeights(), reference=["72"] * 5)
