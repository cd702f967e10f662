from __future__ import annotations

import pytest

from tracetune.format import (
    build_prompt,
    find_numbers,
    format_completion,
    is_well_formed,
    lenient_number,
    numbers_match,
    parse_completion,
    parse_number,
)

from conftest import wrap


def test_recipe_prompt():
    assert build_prompt("  How many?  ") == "Q: How many?\nA:\n"


def test_chat_prompt_uses_gemma_turns_and_spells_out_the_format():
    prompt = build_prompt("How many?", "chat")
    assert prompt.startswith("<start_of_turn>user\n") and prompt.endswith("<start_of_turn>model\n")
    assert "<reasoning>" in prompt and "<answer>" in prompt and "How many?" in prompt


def test_unknown_prompt_style():
    with pytest.raises(ValueError, match="unknown prompt style"):
        build_prompt("q", "alpaca")


def test_format_completion_round_trips_through_the_parser():
    text = format_completion(["48 / 2 = 24", "48 + 24 = 72"], "Therefore, the answer is 72.", "72")
    parsed = parse_completion(text)
    assert parsed.strict
    assert parsed.reasoning == "Step 1: 48 / 2 = 24\nStep 2: 48 + 24 = 72\nTherefore, the answer is 72."
    assert parsed.answer == "72"
    assert text[slice(*parsed.answer_span)] == "72"


NUMBER_CASES = [
    ("72", 72.0),  # plain
    ("40 km/h", 40.0),  # unit with a slash is not a fraction
    ("$1,000.50", 1000.5),  # currency, thousands separator, decimals
    ("3/4", 0.75),  # simple fraction
    ("1 1/2", 1.5),  # mixed number
    ("-5", -5.0),  # negative
    ("\u22125", -5.0),  # unicode minus sign
    ("-$5", -5.0),  # sign before currency
    ("$-5", -5.0),  # sign after currency
    ("10-5", 5.0),  # a hyphen after a digit is not a sign: the last number is 5
    ("40.0", 40.0),  # decimals that are whole
    ("72.", 72.0),  # trailing sentence period
    (".5", 0.5),  # leading decimal point
    ("75%", 75.0),  # percent sign ignored
    ("48 + 24 = 72", 72.0),  # the result comes last
    ("\u20ac27", 27.0),  # euro
    ("1,2,3", 3.0),  # commas that are not thousands separators: a list
    ("3/0", None),  # division by zero is no number
    ("seventy-two", None),  # words are not numbers
    ("\u0667\u0662", None),  # non-ASCII digits are not read
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,expected", NUMBER_CASES)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_find_numbers_in_order():
    assert [float(x) for x in find_numbers("-5 apples cost $1,000.50, i.e. 3/4 of it")] == [-5.0, 1000.5, 0.75]


@pytest.mark.parametrize(
    "a,b,expected",
    [(40.0, 40, True), (0.1 + 0.2, 0.3, True), (10001, 10000, False), (None, 1, False), (float("nan"), 1, False)],
)
def test_numbers_match(a, b, expected):
    assert numbers_match(a, b) is expected


FORMAT_CASES = [
    (wrap("72"), True),  # the canonical shape
    ("  \n" + wrap("72") + "\n\n", True),  # whitespace outside is fine
    ("<reasoning>r</reasoning><answer>72</answer>", True),  # no newline between blocks
    ("Sure! " + wrap("72"), False),  # text before
    (wrap("72") + " Hope this helps", False),  # text after
    ("<answer>72</answer><reasoning>r</reasoning>", False),  # wrong order
    (wrap("72") + "<answer>72</answer>", False),  # two answer tags
    ("<reasoning>a</reasoning><reasoning>b</reasoning><answer>1</answer>", False),  # two reasoning blocks
    (wrap(""), False),  # empty answer
    (wrap("   "), False),  # blank answer
    ("<reasoning>r</reasoning><answer>72", False),  # unclosed answer
    ("<reasoning>r<answer>72</answer>", False),  # unclosed reasoning
    ("<reasoning>r</reasoning><answer><answer>72</answer></answer>", False),  # nested answer
    ("<reasoning>r <answer>7</answer></reasoning><answer>72</answer>", False),  # answer inside reasoning
    ("<answer>72</answer>", False),  # answer only
    ("72", False),  # bare number
    ("", False),
]


@pytest.mark.parametrize("text,expected", FORMAT_CASES)
def test_strict_format(text, expected):
    assert is_well_formed(text) is expected


def test_parser_keeps_a_single_answer_even_when_format_fails():
    parsed = parse_completion("Sure! <reasoning>r</reasoning><answer>72</answer>")
    assert not parsed.strict and parsed.answer == "72" and parsed.outside.strip() == "Sure!"


def test_lenient_extraction_reads_the_last_number_anywhere():
    assert lenient_number("so she earns $10 in total, i.e. 12 + 3 = 15 dollars") == 15.0
    assert lenient_number("no numbers") is None
