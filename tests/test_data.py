from __future__ import annotations

import json

import pytest

from tracetune.data import (
    DataError,
    curate,
    curate_solution,
    load_examples,
    percentiles,
    shipped_path,
    split_examples,
    with_loop,
)
from tracetune.format import format_completion, is_well_formed
from tracetune.rewards import correctness, trace_structure

from conftest import SHARED_GSM8K

# Real GSM8K rows (train lines 1 and 2), as shipped.
NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
WENG = {
    "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
}


def test_shipped_gsm8k_is_the_real_dataset():
    train = load_examples("gsm8k", "train").examples
    test = load_examples("gsm8k", "test").examples
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0].question == NATALIA["question"] and train[0].reference == "72"
    # Identical to the copy CI reads from ../shared (when it is there).
    if SHARED_GSM8K.exists():
        assert shipped_path("gsm8k", "test").read_bytes() == (SHARED_GSM8K / "test.jsonl").read_bytes()
    assert (shipped_path("gsm8k", "train").parent / "LICENSE").read_text().startswith("MIT License")


def test_curation_of_real_rows():
    assert curate_solution(NATALIA["answer"].split("####")[0], "72") == (
        "<reasoning>Step 1: Natalia sold 48/2 = 24 clips in May.\n"
        "Step 2: Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "Therefore, the answer is 72.</reasoning>\n<answer>72</answer>"
    )
    # Annotations are removed even when a currency sign precedes them.
    weng = curate_solution(WENG["answer"].split("####")[0], "10")
    assert "Step 1: Weng earns 12/60 = $0.2 per minute." in weng and "<<" not in weng


def test_thousands_separators_in_references_become_canonical(write_jsonl):
    path = write_jsonl("d.jsonl", [{"question": "q?", "answer": "It is 1,000 + 200 = <<1000+200=1200>>1,200.\n#### 1,200"}])
    (example,) = load_examples(str(path)).examples
    assert example.reference == "1200"
    result = curate([example], val_fraction=0.0)
    assert result.train[0].completion.endswith("<answer>1200</answer>")


def test_curated_targets_are_well_formed_and_correct_on_a_real_slice():
    examples = load_examples("gsm8k", "test", limit=200).examples
    result = curate(examples, val_fraction=0.0)
    assert len(result.train) == 200 and not result.dropped
    for trace in result.train:
        assert is_well_formed(trace.completion), trace.id
        assert correctness(trace.completion, trace.reference) == 1.0, trace.id
    assert sum(trace_structure(t.completion) for t in result.train) / 200 >= 0.9


@pytest.mark.parametrize(
    ("after", "block", "times", "looped"),
    [
        (1, 1, 1, ["a", "a", "b", "c"]),
        (2, 1, 2, ["a", "b", "b", "b", "c"]),
        (2, 2, 1, ["a", "b", "a", "b", "c"]),  # a two-step cycle
        (3, 1, 1, ["a", "b", "c", "c"]),  # after the last step: the conclusion follows
    ],
)
def test_with_loop_repeats_steps_renumbers_and_splits_at_the_loop(after, block, times, looped):
    completion = format_completion(["a", "b", "c"], "Therefore, the answer is 3.", "3")
    head, loop, tail = with_loop(completion, 3, after, block, times)
    assert head + loop + tail == format_completion(looped, "Therefore, the answer is 3.", "3")
    assert head.endswith(f"Step {after}: {looped[after - 1]}\n")
    assert loop == "".join(f"Step {i}: {looped[i - 1]}\n" for i in range(after + 1, after + block * times + 1))
    assert is_well_formed(head + loop + tail)


def test_with_loop_keeps_real_steps_intact():
    """Numbers and colons inside a step survive; only the "Step N: " label changes."""
    trace = curate(load_examples("gsm8k", "train", limit=1).examples, val_fraction=0).train[0]
    head, loop, tail = with_loop(trace.completion, trace.n_steps, 1, 1, 1)
    assert loop == "Step 2: Natalia sold 48/2 = 24 clips in May.\n"
    assert tail.startswith("Step 3: Natalia sold 48+24 = 72 clips altogether in April and May.\nTherefore")
    with pytest.raises(ValueError, match="no loop of 2 step"):
        with_loop(trace.completion, trace.n_steps, 1, 2, 1)


def test_split_is_deterministic_and_disjoint():
    examples = load_examples("gsm8k", "train", limit=400).examples
    train_a, val_a = split_examples(examples, 0.1, seed=42)
    train_b, val_b = split_examples(examples, 0.1, seed=42)
    _, val_c = split_examples(examples, 0.1, seed=7)
    assert [e.id for e in val_a] == [e.id for e in val_b] and len(val_a) == 40
    assert {e.id for e in val_a} != {e.id for e in val_c}
    assert not {e.id for e in train_a} & {e.id for e in val_a}
    assert len(train_a) + len(val_a) == 400


def test_length_filter_drops_and_counts(write_jsonl):
    examples = load_examples("gsm8k", "test", limit=50).examples
    result = curate(examples, val_fraction=0.0, count_tokens=lambda text: len(text.split()), max_tokens=80)
    assert result.dropped["longer than 80 tokens"] == 50 - len(result.train) > 0
    assert all(t.n_tokens <= 80 for t in result.train)


def test_uncuratable_solutions_are_dropped_with_a_reason(write_jsonl):
    path = write_jsonl("d.jsonl", [
        {"question": "a?", "answer": "Half is 48/2 = <<48/2=24 24\n#### 24"},  # unbalanced annotation
        {"question": "b?", "answer": "#### 5"},  # no steps
        {"question": "c?", "answer": "Say <answer>5</answer>\n#### 5"},  # our tags inside
        NATALIA,
    ])
    result = curate(load_examples(str(path)).examples, val_fraction=0.0)
    assert len(result.train) == 1
    assert result.dropped == {"unbalanced calculator annotation": 1, "no solution steps": 1, "solution contains trace tags": 1}


BAD_ROWS = [
    ('{"question": "q?", "answer": "#### 5"', 1, None, "malformed JSON"),  # truncated JSON
    ('["q?", "#### 5"]', 1, None, "expected a JSON object"),  # not an object
    (json.dumps({"answer": "#### 5"}), 1, "question", "missing"),  # missing field
    (json.dumps({"question": "", "answer": "#### 5"}), 1, "question", "non-empty"),  # empty question
    (json.dumps({"question": "q?", "answer": "#### five"}), 1, "answer", "not a number"),  # word reference
    (json.dumps({"question": "q?", "answer": "no marker here"}), 1, "answer", "not a number"),  # no ####
    (json.dumps({"question": "q?", "answer": None}), 1, "answer", "must be a string"),  # null answer
]


@pytest.mark.parametrize("line,line_no,field,message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(write_jsonl, line, line_no, field, message):
    path = write_jsonl("bad.jsonl", [line])
    with pytest.raises(DataError) as info:
        load_examples(str(path))
    error = info.value
    assert (error.source, error.line, error.field) == (str(path), line_no, field)
    assert message in str(error) and str(path) in str(error)


def test_skip_invalid_skips_counts_and_keeps_reading(write_jsonl):
    path = write_jsonl("mixed.jsonl", [NATALIA, "{not json", {"question": "q"}, "", WENG, {"question": "q", "answer": "#### x"}])
    result = load_examples(str(path), skip_invalid=True)
    assert [e.reference for e in result.examples] == ["72", "10"]
    assert [(e.line, e.field) for e in result.skipped] == [(2, None), (3, "answer"), (6, "answer")]


def test_error_is_on_the_right_line_after_valid_rows(write_jsonl):
    path = write_jsonl("d.jsonl", [NATALIA, WENG, {"question": "q", "answer": "#### ?"}])
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'answer'"):
        load_examples(str(path))


def test_numeric_answer_column_without_marker(write_jsonl):
    path = write_jsonl("plain.jsonl", [{"problem": "2 + 3?", "solution": 5}])
    (example,) = load_examples(str(path), question_field="problem", answer_field="solution").examples
    assert example.reference == "5" and example.solution == ""


def test_hugging_face_datasets_path_reads_a_local_dataset_folder(tmp_path):
    # The same code path as a hub id (datasets.load_dataset), on a folder, so it runs offline.
    folder = tmp_path / "my_gsm"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(NATALIA) + "\n" + json.dumps(WENG) + "\n")
    result = load_examples(str(folder), "train")
    assert [e.reference for e in result.examples] == ["72", "10"]


def test_unknown_shipped_split():
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_examples("gsm8k", "dev")


def test_percentiles_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "p100": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "p100": 7}
    assert percentiles([]) == {}
