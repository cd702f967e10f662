"""Task kinds (numeric, choice, text, open): loading, correctness, the trace rubric on
prose, scoring and failure analysis of non-numeric rows, the shipped open-ended set,
and numeric scoring left exactly as it was."""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter
from types import SimpleNamespace

import pytest

from tracetune import failures
from tracetune.config import ConfigError, DataConfig, RewardWeights
from tracetune.data import DataError, Example, curate, load_examples, shipped_path
from tracetune.format import CHAT_INSTRUCTION, KINDS, build_prompt, choice_letter, normalize_text, read_answer
from tracetune.rewards import (
    choice_correct,
    combine,
    correctness,
    correctness_reward,
    make_composite_reward,
    numeric_correct,
    reward_components,
    text_correct,
    trace_breakdown,
    trace_structure,
)
from tracetune.scoring import aggregate, read_completions, score_sample

from conftest import REPO, wrap

OPTIONS = {"A": "Oxygen", "B": "Carbon dioxide", "C": "Vitamin C", "D": "Nitrogen"}

# ---------------------------------------------------------------- correctness

CHOICE_CASES = [
    # (answer block, right for reference "B")  # what it probes
    ("B", True),  # the bare letter
    ("b", True),  # lowercase, alone
    ("(B)", True),  # bracketed
    ("[B]", True),  # square brackets
    ("b)", True),  # lowercase with a closing bracket
    ("B.", True),  # with a stop
    ("Option B", True),  # a cue word
    ("option (b)", True),  # cue and brackets, lowercase
    ("B. Carbon dioxide", True),  # the letter and its option's text
    ("B. the text of option B", True),  # the letter named again in the rest
    ("The answer is B", True),  # a sentence cue
    ("The correct answer is (B) carbon dioxide.", True),  # cue, brackets, text
    ("Answer: Option B", True),  # two cues
    ("**B**", True),  # markdown emphasis
    ("B because plants fix it into sugar", True),  # a reason after the letter
    ("I think it is (B).", True),  # one letter named in a sentence ("I" is no option)
    ("carbon dioxide", True),  # the option's text alone
    ("Carbon Dioxide.", True),  # ... in any case, with punctuation
    ("A", False),  # another option
    ("A or B", False),  # ambiguous: two letters
    ("A and B", False),  # ambiguous
    ("A, B", False),  # ambiguous, a list
    ("A/B", False),  # ambiguous, slashed
    ("B, not A", False),  # names two letters: rejected, not guessed
    ("The answer is B or maybe D", False),  # hedging
    ("Both A and C", False),  # two letters, neither the reference
    ("E", False),  # not among the options
    ("a dog", False),  # a lowercase "a" is an article, not a letter
    ("", False),  # nothing
    ("none of the above", False),  # no letter, no option's text
]


@pytest.mark.parametrize("answer,right", CHOICE_CASES)
def test_choice_correctness_reads_the_letter_in_many_spellings(answer, right):
    assert correctness(wrap(answer), "B", "choice", OPTIONS) == float(right)
    assert choice_correct(answer, "B", OPTIONS) == float(right)


def test_an_options_own_capital_is_no_second_letter():
    # "Vitamin C" holds a capital C: "C. Vitamin C" names one option.
    assert choice_letter("C. Vitamin C", OPTIONS) == "C"
    assert choice_correct("(C) Vitamin C", "C", OPTIONS) == 1.0


TEXT_CASES = [
    # (answer block, reference, right)  # what it probes
    ("Paris", "Paris", True),  # exact
    ("paris", "Paris", True),  # case
    ("Paris.", "Paris", True),  # punctuation
    ("  Paris \n", "Paris", True),  # whitespace
    ("The Eiffel Tower", "Eiffel tower", True),  # an article
    ("the  Eiffel   tower!", "The Eiffel Tower", True),  # articles, spacing and punctuation together
    ("\u201cAn apple a day\u201d", "apple day", True),  # curly quotes are punctuation too
    ("Paris, France", "Paris", False),  # more words: exact match after normalising, not containment
    ("The answer is Paris", "Paris", False),  # an answer block holds the answer only
    ("Lyon", "Paris", False),  # wrong
    ("", "Paris", False),  # empty
]


@pytest.mark.parametrize("answer,reference,right", TEXT_CASES)
def test_text_correctness_is_exact_match_after_squad_normalisation(answer, reference, right):
    assert correctness(wrap(answer), reference, "text") == float(right)
    assert text_correct(answer, reference) == float(right)


def test_normalisation_follows_squad():
    # lowercase, punctuation out, articles a/an/the out, whitespace collapsed
    assert normalize_text("  A Tale of Two Cities!  ") == "tale of two cities"
    assert normalize_text("the") == ""


def test_open_rows_have_no_correctness():
    assert correctness(wrap("Any response at all."), "", "open") is None
    assert correctness(wrap("Any response at all."), "a model answer, kept for judges", "open") is None


def test_numeric_kind_is_todays_rule():
    assert correctness(wrap("$1,000.50"), "1000.5", "numeric") == correctness(wrap("$1,000.50"), "1000.5") == 1.0
    assert numeric_correct("40 km/h", "40") == 1.0 and numeric_correct("72 or 73", "72") == 0.0


@pytest.mark.parametrize(
    "kind,reference,choices,message",
    [
        ("choice", "E", OPTIONS, "not one of the options"),  # a reference outside the options
        ("choice", "B", None, "not one of the options"),  # no options at all
        ("text", " the ", None, "empty once normalised"),  # nothing left to compare
        ("numeric", "seventy-two", None, "not a number"),  # unchanged
        ("essay", "x", None, "unknown task kind"),  # not a kind
    ],
)
def test_a_reference_that_cannot_be_checked_is_an_error_not_a_score(kind, reference, choices, message):
    with pytest.raises(ValueError, match=message):
        correctness(wrap("B"), reference, kind, choices)


def test_the_batch_reward_dispatches_by_the_kind_column():
    completions = [wrap("72"), wrap("(B)"), wrap("paris"), wrap("A poem.")]
    columns = {"reference": ["72", "B", "Paris", ""], "kind": ["numeric", "choice", "text", "open"],
               "choices": [{}, OPTIONS, {}, {}]}
    assert correctness_reward([""] * 4, completions, **columns) == [1.0, 1.0, 1.0, None]
    # Without a kind column every row is numeric, as before task kinds.
    assert correctness_reward([""], [wrap("72")], reference=["72"]) == [1.0]


def test_read_answer_is_the_one_extractor_per_kind():
    assert read_answer("40 km/h") == 40.0
    assert read_answer("Option b", "choice", OPTIONS) == "B"
    assert read_answer("A or B", "choice", OPTIONS) is None
    assert read_answer(" The Nile. ", "text") == "nile"
    assert read_answer("  ", "open") is None


# -------------------------------------------------------------------- loading


def test_kinds_load_per_source_and_per_row(write_jsonl):
    path = write_jsonl("mixed.jsonl", [
        {"question": "What is 6 x 7?", "answer": "#### 42"},  # the source's kind: numeric
        {"kind": "choice", "question": "Which gas do plants take in?", "choices": {"b": "Carbon dioxide", "a": "Oxygen"}, "answer": "b"},
        {"kind": "choice", "question": "Which is a noble gas?", "choices": ["Oxygen", "Argon", "Nitrogen"], "answer": "B"},
        {"kind": "text", "id": "capital-1", "question": "What is the capital of France?", "answer": "Paris"},
        {"kind": "text", "question": "Which river?", "answer": "It flows north.\n#### The Nile"},  # a solution, then the reference
        {"kind": "open", "question": "Write a haiku about rain."},
    ])
    examples = load_examples(str(path)).examples
    assert [e.kind for e in examples] == ["numeric", "choice", "choice", "text", "text", "open"]
    assert [e.reference for e in examples] == ["42", "B", "B", "Paris", "The Nile", ""]
    # Options in letter order, whatever the row's key order or case, rendered in a fixed way.
    assert examples[1].choices == (("A", "Oxygen"), ("B", "Carbon dioxide"))
    assert examples[1].question == "Which gas do plants take in?\n(A) Oxygen\n(B) Carbon dioxide"
    assert examples[2].choices == (("A", "Oxygen"), ("B", "Argon"), ("C", "Nitrogen"))
    assert examples[3].id == "capital-1" and examples[4].id == "mixed-5"  # a row's id, else <stem>-<line>
    assert examples[4].solution == "It flows north."


def test_the_source_kind_applies_to_rows_without_one(write_jsonl):
    path = write_jsonl("capitals.jsonl", [{"question": "Capital of Peru?", "answer": "Lima"},
                                          {"question": "2 + 2?", "answer": "4", "kind": "numeric"}])
    examples = load_examples(str(path), kind="text").examples
    assert [(e.kind, e.reference) for e in examples] == [("text", "Lima"), ("numeric", "4")]
    with pytest.raises(DataError, match="not a number"):  # the default source kind is numeric
        load_examples(str(path))


BAD_KIND_ROWS = [
    # (row, field, message)  # what the loader rejects
    ({"kind": "essay", "question": "q?", "answer": "x"}, "kind", "unknown task kind 'essay'"),  # not a kind
    ({"kind": "choice", "question": "q?", "answer": "A"}, "choices", "a choice row needs its options"),  # no options
    ({"kind": "choice", "question": "q?", "choices": ["only one"], "answer": "A"}, "choices", "at least 2 options"),
    ({"kind": "choice", "question": "q?", "choices": {"A": "x", "BB": "y"}, "answer": "A"}, "choices", "single letters"),
    ({"kind": "choice", "question": "q?", "choices": {"a": "x", "A": "y"}, "answer": "A"}, "choices", "given twice"),
    ({"kind": "choice", "question": "q?", "choices": ["x", " "], "answer": "A"}, "choices", "option B must be a non-empty"),
    ({"kind": "choice", "question": "q?", "choices": "A) x B) y", "answer": "A"}, "choices", "must be a list"),
    ({"kind": "choice", "question": "q?", "choices": ["x", "y"], "answer": "C"}, "answer", "not one of the options' letters (A, B)"),
    ({"kind": "choice", "question": "q?", "choices": ["x", "y"], "answer": "x"}, "answer", "not one of the options' letters"),
    ({"kind": "choice", "question": "q?", "choices": ["x", "y"]}, "answer", "missing"),  # no reference
    ({"kind": "text", "question": "q?", "answer": "  "}, "answer", "needs a reference with words"),  # empty
    ({"kind": "text", "question": "q?", "answer": "The."}, "answer", "needs a reference with words"),  # empty once normalised
    ({"kind": "text", "question": "q?"}, "answer", "missing"),
    ({"kind": "text", "question": "q?", "answer": ["Paris"]}, "answer", "must be a string"),
    ({"kind": "open", "question": " "}, "question", "non-empty"),  # open needs a question, nothing more
    ({"kind": "open", "question": "q?", "answer": {"a": 1}}, "answer", "must be a string"),  # a reference, if given, is text
    ({"question": "q?", "answer": "#### 5", "id": ""}, "id", "non-empty string"),  # an id that names nothing
]


@pytest.mark.parametrize("row,field,message", BAD_KIND_ROWS)
def test_each_kind_is_validated_with_file_line_and_field(write_jsonl, row, field, message):
    path = write_jsonl("bad.jsonl", [{"question": "fine?", "answer": "#### 1"}, row])
    with pytest.raises(DataError) as info:
        load_examples(str(path))
    error = info.value
    assert (error.source, error.line, error.field) == (str(path), 2, field)
    assert message in str(error) and f"{path}:2: field '{field}'" in str(error)


def test_ids_are_unique(write_jsonl):
    path = write_jsonl("d.jsonl", [{"kind": "open", "id": "x", "question": "a"}, {"kind": "open", "id": "x", "question": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'id': 'x' is already the id of line 1"):
        load_examples(str(path))
    assert [e.question for e in load_examples(str(path), skip_invalid=True).examples] == ["a"]


def test_skip_invalid_skips_bad_rows_of_every_kind(write_jsonl):
    path = write_jsonl("d.jsonl", [{"kind": "text", "question": "q", "answer": ""}, {"kind": "open", "question": "q"},
                                   {"kind": "choice", "question": "q", "choices": ["x", "y"], "answer": "Z"}])
    result = load_examples(str(path), skip_invalid=True)
    assert [e.kind for e in result.examples] == ["open"]
    assert [(e.line, e.field) for e in result.skipped] == [(1, "answer"), (3, "answer")]


def test_an_unknown_source_kind_is_an_error():
    with pytest.raises(DataError, match="unknown task kind 'mcq'"):
        load_examples("gsm8k", "test", kind="mcq")
    with pytest.raises(ConfigError, match="data.kind must be one of"):
        DataConfig(kind="mcq")
    assert DataConfig().kind == "numeric"


def test_open_rows_are_not_curated_into_sft_targets():
    examples = [Example("o-1", "Write a haiku.", "", kind="open"),
                Example("t-1", "Capital of Peru?", "Lima", "Peru's capital is on the coast.", kind="text")]
    result = curate(examples, val_fraction=0.0)
    assert [t.id for t in result.train] == ["t-1"] and result.train[0].kind == "text"
    assert result.train[0].completion.endswith("Therefore, the answer is Lima.</reasoning>\n<answer>Lima</answer>")
    assert correctness(result.train[0].completion, "Lima", "text") == 1.0
    assert result.dropped == {"an open row has no reference answer to train on": 1}


def test_the_chat_prompt_says_what_each_kind_answers():
    assert CHAT_INSTRUCTION in build_prompt("q", "chat")  # numeric: unchanged
    assert "only the letter" in build_prompt("q", "chat", "choice")
    assert "full response" in build_prompt("q", "chat", "open")
    assert {build_prompt("q", "plain", kind) for kind in KINDS} == {"Q: q\nA:\n"}  # the recipe's prompt has no instruction


# ---------------------------------------------------------- the trace on prose

ICE_Q = "Why does ice float on liquid water, when most solids sink in their own liquid?"
ICE_ANSWER = "Ice is less dense than liquid water: hydrogen bonds hold its molecules in an open lattice."
ICE_STEPS = [
    "First, an object floats when it is less dense than the liquid around it.",
    "In ice, hydrogen bonds lock each molecule to four neighbours in an open hexagonal lattice.",
    "That lattice takes more room than the closer packing of the liquid, so ice is about 9% less dense.",
]
ICE_CONCLUSION = "Therefore, ice floats because freezing spreads water's molecules apart."


def _prose(*steps: str, conclusion: str = ICE_CONCLUSION, answer: str = ICE_ANSWER) -> str:
    body = "".join(f"Step {i}: {step}\n" for i, step in enumerate(steps, start=1))
    return wrap(answer, body + conclusion)


GENUINE = _prose(*ICE_STEPS)

PROSE_GAMING_CASES = [
    # (completion)  # how it games the rubric; each scores below GENUINE
    _prose(ICE_STEPS[0], ICE_STEPS[1], "Let me think.", "This is important.", ICE_STEPS[2]),  # filler steps padded in
    _prose("Let me think.", "This is important.", "Let me consider the question carefully.", "Okay, now I understand."),  # filler only
    _prose("The question asks why ice floats on liquid water.", "Most solids sink in their own liquid.",
           "So we need to find why ice does not sink in liquid water."),  # the question restated as steps
    _prose(ICE_STEPS[0], "Why does ice float on liquid water?", "Most solids sink in their own liquid.", ICE_STEPS[1]),  # restatement padded in
    _prose(ICE_STEPS[0], ICE_STEPS[1], ICE_STEPS[0], ICE_STEPS[1], ICE_STEPS[2]),  # repeated steps
    _prose(*ICE_STEPS, conclusion="So."),  # a cue with nothing after it
    wrap(ICE_ANSWER, " ".join(ICE_STEPS) + " " + ICE_CONCLUSION),  # no step markers
]


@pytest.mark.parametrize("completion", PROSE_GAMING_CASES)
def test_prose_trace_gaming_scores_below_a_genuine_trace(completion):
    assert trace_structure(completion, ICE_Q, "open") < trace_structure(GENUINE, ICE_Q, "open")


def test_a_genuine_prose_trace_scores_full_marks_without_calculations():
    # The question holds no digit: calculations are not weighed, and steps 0.35,
    # transitions 0.15 and conclusion 0.25 are renormalised by 0.75 to weigh 1.
    parts = trace_breakdown(GENUINE, ICE_Q, "open")
    assert (parts["steps"], parts["transitions"], parts["conclusion"], parts["n_hollow"]) == (1.0, 1.0, 1.0, 0.0)
    assert parts["total"] == pytest.approx(1.0)
    # Half the transitions: (0.35 + 0.15 * 0.5 + 0.25) / 0.75 = 0.9.
    plain = _prose("An object floats when it is less dense than the liquid around it.", ICE_STEPS[1],
                   "That lattice takes more room than the closer packing of the liquid, making ice about 9% less dense.")
    assert trace_structure(plain, ICE_Q, "text") == pytest.approx(0.9)


def test_filler_and_restated_steps_count_like_repeats():
    parts = trace_breakdown(PROSE_GAMING_CASES[0], ICE_Q, "open")
    # 3 genuine steps, 2 hollow ones: the repetition factor keeps 3 / 5.
    assert (parts["n_steps"], parts["n_hollow"], parts["repetition"]) == (3.0, 2.0, pytest.approx(3 / 5))
    assert trace_breakdown(PROSE_GAMING_CASES[2], ICE_Q, "open")["n_hollow"] == 3.0
    # Without the question only filler is hollow: a restated step is new words then.
    assert trace_breakdown(PROSE_GAMING_CASES[2], None, "open")["n_hollow"] == 0.0


def test_calculations_weigh_where_the_prompt_has_a_number():
    question = "A tank holds 40 litres and leaks 2 litres an hour. Is it empty after a day?"
    reasoning = wrap("Yes", "Step 1: The leak empties the tank in 40 / 2 = 20 hours.\n"
                     "Step 2: Then it has been dry for 24 - 20 = 4 hours when the day ends.\nTherefore, it is empty after a day.")
    parts = trace_breakdown(reasoning, question, "text")
    assert parts["calculations"] == 1.0 and parts["total"] == pytest.approx(1.0)  # 0.35 + 0.25 + 0.15 + 0.25
    words = wrap("Yes", "Step 1: The leak drains the tank well before the day ends.\n"
                 "Step 2: Then nothing is left by the evening.\nTherefore, it is empty after a day.")
    assert trace_breakdown(words, question, "text")["total"] == pytest.approx(0.75)  # no calculation shown


def test_a_choice_conclusion_that_contradicts_the_answer_is_none():
    question = "Which gas do plants take in?\n(A) Oxygen\n(B) Carbon dioxide"
    steps = ("Step 1: Photosynthesis builds sugar from carbon and water, powered by light.\n"
             "Step 2: The carbon comes from carbon dioxide taken in through the leaves.\n")
    agrees = trace_breakdown(wrap("B", steps + "Therefore, the answer is B."), question, "choice", OPTIONS)
    contradicts = trace_breakdown(wrap("B", steps + "Therefore, the answer is A."), question, "choice", OPTIONS)
    unreadable = trace_breakdown(wrap("A or B", steps + "Therefore, the answer is B."), question, "choice", OPTIONS)
    assert (agrees["conclusion"], contradicts["conclusion"], unreadable["conclusion"]) == (1.0, 0.0, 0.5)


def test_the_numeric_rubric_ignores_the_question_and_kind_defaults():
    # A GSM8K question written in words: a numeric row still weighs calculations.
    completion = wrap("6", "Step 1: Two walks a day for three days is 2 * 3 = 6 walks.\nTherefore, the answer is 6.")
    question = "Roque walks to work twice a day for three days. How many walks is that?"
    assert trace_breakdown(completion, question, "numeric") == trace_breakdown(completion)
    with pytest.raises(ValueError, match="unknown task kind"):
        trace_breakdown(completion, question, "essay")


# --------------------------------------------------- the composite and scoring


def test_an_open_row_renormalises_the_composite_over_its_components():
    weights = RewardWeights()  # 0.6 correctness + 0.25 trace + 0.15 confidence
    components = {"correctness": [1.0, None], "trace": [0.5, 0.5], "confidence": [0.8, None], "arithmetic": [1.0, None]}
    numeric, open_row = combine(components, weights)
    assert numeric == 0.6 * 1.0 + 0.25 * 0.5 + 0.15 * 0.8  # 0.845: the plain weighted sum
    assert open_row == pytest.approx(0.5)  # (1.0 / 0.25) * 0.25 * 0.5: trace alone, on the same [0, 1] scale
    with pytest.raises(ValueError, match="row 1 has none of the weighted components"):
        combine({"correctness": [1.0, None], "trace": [0.5, 0.5]}, RewardWeights(trace=0, confidence=0))


def test_a_mixed_batch_through_the_composite_reward():
    completions = [wrap("72"), wrap("B"), _prose(*ICE_STEPS)]
    columns = {"reference": ["72", "B", ""], "kind": ["numeric", "choice", "open"], "choices": [{}, OPTIONS, {}],
               "question": ["What is 70 + 2?", "Which gas do plants take in?", ICE_Q], "answer_logprobs": [[-0.1], [-0.1], [-0.1]]}
    components = reward_components([""] * 3, completions, **columns)
    assert components["correctness"] == [1.0, 1.0, None] and components["confidence"][2] is None
    assert components["arithmetic"][1:] == [None, None]  # prose rows without a digit: nothing to ground
    rewards = make_composite_reward()([""] * 3, completions, **columns)
    assert rewards[2] == pytest.approx(trace_structure(completions[2], ICE_Q, "open"))


def test_scoring_non_numeric_rows():
    choice = score_sample("Which gas?\n(A) Oxygen\n(B) Carbon dioxide", "B", wrap("Option B"), [-0.1], kind="choice", choices=OPTIONS)
    text = score_sample("Capital of France?", "Paris", wrap("Lyon"), [-0.1], kind="text")
    open_row = score_sample(ICE_Q, "", GENUINE, [-0.1], kind="open")
    assert (choice.correct, text.correct, open_row.correct) == (True, False, None)
    assert (choice.lenient_correct, choice.predicted) == (None, None)  # numbers only
    assert open_row.confidence is None and open_row.composite == pytest.approx(open_row.trace)
    assert open_row.record()["kind"] == "open" and choice.record()["kind"] == "choice"
    metrics = aggregate([choice, text, open_row])
    assert (metrics["accuracy"].mean, metrics["accuracy"].n) == (0.5, 2)  # the open row has nothing to check
    assert metrics["lenient_accuracy"].n == 0 and metrics["format_rate"].n == 3


def test_completion_files_carry_kinds(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"kind": "choice", "question": "Which gas?", "choices": ["Oxygen", "Carbon dioxide"], "reference": "B", "completion": wrap("(b)")},
            {"kind": "open", "id": "o-1", "question": "Write a haiku.", "completion": wrap("Rain on tin.")}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parsed, skipped = read_completions(path)
    assert [(r.kind, r.reference, r.id) for r in parsed] == [("choice", "B", "c-1"), ("open", "", "o-1")]
    assert parsed[0].choices == (("A", "Oxygen"), ("B", "Carbon dioxide")) and not skipped


def test_the_evaluation_harness_scores_every_kind_and_records_it():
    from tracetune.evaluate import sample_record, score_generation, summarize  # imports the generator (JAX)
    from tracetune.generate import Generation
    from tracetune.report import samples_section

    def generation(text: str) -> Generation:
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
        return Generation("prompt", text, list(range(len(pieces))), pieces, [-0.1] * len(pieces), "eos")

    rows = [
        (Example("n-1", "What is 70 + 2?", "72"), wrap("72")),
        (Example("c-1", "Which gas?\n(A) Oxygen\n(B) Carbon dioxide", "B", kind="choice", choices=(("A", "Oxygen"), ("B", "Carbon dioxide"))), wrap("A")),
        (Example("t-1", "Capital of France?", "Paris", kind="text"), wrap("paris.")),
        (Example("o-1", ICE_Q, "", kind="open"), GENUINE),
        (Example("o-2", ICE_Q, "", kind="open"), "Ice floats."),
    ]
    weights = RewardWeights()
    records = [sample_record(score_generation(e, generation(t), weights), generation(t), e) for e, t in rows]
    assert [r["kind"] for r in records] == ["numeric", "choice", "text", "open", "open"]
    assert [r["correct"] for r in records] == [True, False, True, None, None]
    assert [r["failure"] and r["failure"]["category"] for r in records] == [None, "wrong_answer", None, None, "format_failure"]
    assert records[3]["confidence"] is None and records[3]["composite"] == pytest.approx(records[3]["trace"])
    metrics, table = summarize(records)
    assert (metrics["accuracy"].mean, metrics["accuracy"].n, metrics["format_rate"].n) == (2 / 3, 3, 5)
    assert {row.category: row.count for row in table} == {"wrong_answer": 1, "format_failure": 1}
    variant = SimpleNamespace(label="Zero-shot", result=SimpleNamespace(records=records[3:]))  # what the section reads
    assert "**Zero-shot** (judged only, trace" in samples_section([variant], count=1)


FAILURE_CASES = [
    # (kind, reference, choices, completion, category, evidence)  # non-numeric failures
    ("choice", "B", OPTIONS, wrap("A"), "wrong_answer", "answer names option A ('A') vs reference B"),
    ("choice", "B", OPTIONS, wrap("A or B"), "format_failure", "the <answer> block names no single option: 'A or B'"),
    ("text", "Paris", None, wrap("Lyon"), "wrong_answer", "answer 'Lyon' vs reference 'Paris'"),
    ("text", "Paris", None, wrap("The."), "format_failure", "the <answer> block states nothing: 'The.'"),
    ("text", "Paris", None, "Paris", "format_failure", "no <reasoning>"),
    ("text", "Paris", None, wrap("Lyon", "Step 1: Lyon is big.\nStep 2: Lyon is big.\nStep 3: It is French.\nSo Lyon."),
     "verbose_reasoning", "repeated 2 times"),
    ("open", "", None, "A haiku, no tags.", "format_failure", "no <reasoning>"),
]


@pytest.mark.parametrize("kind,reference,choices,completion,category,evidence", FAILURE_CASES)
def test_non_numeric_failures_get_a_category(kind, reference, choices, completion, category, evidence):
    failure = failures.categorize("Q?", reference, completion, "", kind, choices)
    assert failure.category == category and evidence in failure.evidence


def test_an_open_row_fails_on_format_only():
    assert not failures.is_failure(None, True) and failures.is_failure(None, False)
    with pytest.raises(ValueError, match="not a failure"):
        failures.categorize("Q?", "", GENUINE, "", "open")
    with pytest.raises(ValueError, match="not a failure"):
        failures.categorize("Q?", "B", wrap("(B)"), "", "choice", OPTIONS)


# ------------------------------------------------- numeric scoring is unchanged

NATALIA_Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?")
NATALIA_S = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May."
WENG_Q = "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?"
WENG_S = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10."

# Values computed by the code before task kinds (commit 66e7252), with answer
# log-probabilities [-0.05, -0.4]: (question, reference, solution, completion,
# (correct, well_formed, lenient_correct), trace, confidence, arithmetic,
# composite under the default weights, composite with arithmetic=0.2, failure).
NUMERIC_BEFORE = [
    (NATALIA_Q, "72", NATALIA_S,
     "<reasoning>Step 1: Natalia sold 48/2 = 24 clips in May.\nStep 2: Natalia sold 48+24 = 72 clips altogether in April and May.\n"
     "Therefore, the answer is 72.</reasoning>\n<answer>72</answer>",
     (True, True, True), 0.9249999999999999, 0.7985162187593771, 1.0, 0.9510274328139066, 1.1510274328139065, None),
    (NATALIA_Q, "72", NATALIA_S,
     "<reasoning>Step 1: First, 48 / 2 = 25 clips in May.\nStep 2: Then 48 + 25 = 73.\nTherefore, the answer is 73.</reasoning>\n<answer>73</answer>",
     (False, True, False), 1.0, 0.20148378124062294, 0.25, 0.28022256718609345, 0.33022256718609344,
     ("calculation_error", "`48 / 2 = 25` is false (48 / 2 = 24)")),
    (NATALIA_Q, "72", NATALIA_S, "She sold 48/2 = 24 in May, so 48 + 24 = 72 in total.",
     (False, False, True), 0.0, 0.0, 0.0, 0.0, 0.0,
     ("format_failure", "no <reasoning>, </reasoning>, <answer>, </answer> tags; 0 'Step' markers")),
    (NATALIA_Q, "72", NATALIA_S,
     "<reasoning>Step 1: She sold 48 / 2 = 24 clips.\nStep 2: She sold 48 / 2 = 24 clips.\nStep 3: So 24 clips.\n"
     "Therefore, the answer is 24.</reasoning>\n<answer>24</answer>",
     (False, True, False), 0.5833333333333333, 0.20148378124062294, 0.5, 0.17605590051942677, 0.27605590051942674,
     ("premature_conclusion", "3 steps vs 2 in the reference; answer 24 is the reference's intermediate result from step 1")),
    (WENG_Q, "10", WENG_S,
     "<reasoning>12 / 60 = 0.2 dollars a minute, and 0.2 * 50 = 10, so the answer is 10.</reasoning>\n<answer>$10</answer>",
     (True, True, True), 0.325, 0.7985162187593771, 1.0, 0.8010274328139065, 1.0010274328139066, None),
    (WENG_Q, "10", WENG_S,
     "<reasoning>Step 1: She earns 12 * 50 = 600.\nTherefore, she earned 600 dollars.</reasoning>\n<answer>600</answer>",
     (False, True, False), 0.625, 0.20148378124062294, 0.5, 0.18647256718609345, 0.28647256718609343,
     ("unit_confusion", "answer 600 vs reference 10: off by a factor of 60 (answer = reference x 60; minutes/hours or seconds/minutes?)")),
]


@pytest.mark.parametrize("question,reference,solution,completion,flags,trace,conf,arith,composite,with_arith,failure", NUMERIC_BEFORE)
def test_numeric_scores_are_bit_identical_to_before_task_kinds(question, reference, solution, completion, flags, trace,
                                                               conf, arith, composite, with_arith, failure):
    for kind_args in ({}, {"kind": "numeric"}):  # the default and the explicit kind
        for weights, expected in ((RewardWeights(), composite), (RewardWeights(arithmetic=0.2), with_arith)):
            score = score_sample(question, reference, completion, [-0.05, -0.4], weights=weights, solution=solution, **kind_args)
            assert (score.correct, score.well_formed, score.lenient_correct) == flags
            assert (score.trace, score.confidence, score.arithmetic, score.composite) == (trace, conf, arith, expected)  # exact
    found = failures.categorize(question, reference, completion, solution) if failures.is_failure(*flags[:2]) else None
    assert (found.category, found.evidence) == failure if failure else found is None


def test_the_numeric_batch_composite_is_unchanged_with_a_kind_column():
    completions = [row[3] for row in NUMERIC_BEFORE]
    columns = {"reference": [row[1] for row in NUMERIC_BEFORE], "question": [row[0] for row in NUMERIC_BEFORE],
               "solution": [row[2] for row in NUMERIC_BEFORE], "answer_logprobs": [[-0.05, -0.4]] * len(NUMERIC_BEFORE)}
    expected = [row[8] for row in NUMERIC_BEFORE]
    composite = make_composite_reward()
    assert composite([""] * 6, completions, **columns) == expected
    assert composite([""] * 6, completions, **columns, kind=["numeric"] * 6, choices=[{}] * 6) == expected


# ------------------------------------------------------ the shipped open set

DOMAINS = ("creative_writing", "ideation", "summarization", "math", "coding", "science")


def open_rows(split):
    return [json.loads(line) for line in shipped_path("open", split).read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("split, prefix", [("train", "open-train-"), ("eval", "open-")])
def test_the_open_sets(split, prefix):
    rows = open_rows(split)
    assert len(rows) >= 120
    assert all(set(r) == {"id", "domain", "kind", "question"} and r["kind"] == "open" for r in rows)
    per_domain = Counter(r["domain"] for r in rows)
    assert set(per_domain) == set(DOMAINS) and min(per_domain.values()) >= 20
    assert all(re.fullmatch(rf"{prefix}{r['domain']}-[0-9]{{2}}", r["id"]) for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({" ".join(r["question"].lower().split()) for r in rows}) == len(rows)
    for r in rows:  # a summarization prompt holds its text: an instruction, a blank line, 80-200 words
        if r["domain"] == "summarization":
            instruction, _, passage = r["question"].partition("\n\n")
            assert 80 <= len(passage.split()) <= 200, r["id"]
    examples = load_examples("open", split).examples
    assert [e.id for e in examples] == [r["id"] for r in rows] and {e.kind for e in examples} == {"open"}
    assert all(e.reference == "" for e in examples)


def test_the_open_train_and_eval_splits_share_no_prompt():
    train, held_out = ({" ".join(r["question"].lower().split()) for r in open_rows(split)} for split in ("train", "eval"))
    assert not train & held_out
    assert not {r["id"] for r in open_rows("train")} & {r["id"] for r in open_rows("eval")}


def test_the_open_set_is_licensed_and_packaged():
    folder = shipped_path("open", "eval").parent
    assert "CC0 1.0 Universal" in (folder / "LICENSE").read_text() and "written for tracetune" in (folder / "LICENSE").read_text()
    assert "CC0-1.0" in (folder / "README.md").read_text()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tracetune"]
    assert {"datasets/open/*.jsonl", "datasets/open/LICENSE", "datasets/open/README.md"} <= set(package_data)
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_examples("open", "test")
