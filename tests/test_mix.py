"""Data mixes (``data.mix``): several sources in one run, drawn by weight. Fast, no model."""

from __future__ import annotations

import math
from collections import Counter
from itertools import islice

import pytest

from tracetune.config import Config, ConfigError, DataConfig, EvalConfig, MixSource, load_config, save_config
from tracetune.data import DataError, curate_mix, interleave, load_mix, mix_label, mix_problems, mixed, split_examples
from tracetune.errors import TrainingError


def numeric_rows(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
            for i in range(n)]


def open_rows(n: int) -> list[dict]:
    return [{"id": f"o{i}", "kind": "open", "domain": "writing", "question": f"Write a poem about the number {i}."} for i in range(n)]


class Words:
    """A tokenizer stand-in: one token per word (all ``prompt_examples`` asks of it)."""

    def encode(self, text: str) -> list[str]:
        return text.split()


def mix_config(*entries: MixSource, **data: object) -> Config:
    return Config(data=DataConfig(mix=entries, **data))


# ------------------------------------------------------------------ the draw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_position_follows_the_weights(seed):
    a, b = [("a", i) for i in range(1000)], [("b", i) for i in range(1000)]
    drawn = mixed([a, b], [0.8, 0.2], seed)
    assert len(drawn) == 2000  # the rule: as many as the sources hold together
    share = sum(name == "a" for name, _ in drawn) / len(drawn)
    sigma = math.sqrt(0.8 * 0.2 / len(drawn))  # binomial: 0.0089
    assert abs(share - 0.8) < 3 * sigma


def test_a_source_gives_a_seeded_shuffle_and_starts_again_when_it_runs_out():
    small, large = [("s", i) for i in range(10)], [("l", i) for i in range(990)]
    drawn = mixed([small, large], [0.5, 0.5], seed=3)
    from_small = [i for name, i in drawn if name == "s"]
    assert len(from_small) > 400  # ~500 draws of a 10-row source: it cycles
    for start in range(0, len(from_small) - 9, 10):  # every pass is a permutation of the whole source
        assert sorted(from_small[start : start + 10]) == list(range(10))
    assert from_small[:10] != from_small[10:20]  # reshuffled, not replayed


def test_the_seed_fixes_the_order():
    pools = [list(range(100)), list(range(100, 150))]
    assert mixed(pools, [1, 1], seed=7) == mixed(pools, [1, 1], seed=7)
    assert mixed(pools, [1, 1], seed=7) != mixed(pools, [1, 1], seed=8)
    with pytest.raises(ValueError, match="pool 1 is empty"):
        mixed([[1], []], [1, 1], seed=0)


# ------------------------------------------------------------------ loading


def test_ids_are_unique_across_sources_and_rows_get_the_entrys_domain(tmp_path, write_jsonl):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = write_jsonl("a/train.jsonl", [{"question": "1 + 1?", "answer": "#### 2"}])  # no id: "train-1"
    second = write_jsonl("b/train.jsonl", [{"question": "2 + 2?", "answer": "#### 4", "domain": "sums"}])  # also "train-1"
    third = write_jsonl("open.jsonl", open_rows(1) + [{"kind": "open", "question": "Say hello."}])
    data = DataConfig(mix=(MixSource(source=str(first), domain="math"), MixSource(source=str(second)),
                           MixSource(source=str(third), kind="open")))
    parts = load_mix(data)
    assert [p.name for p in parts] == ["train-0", "train-1", "open"]  # a shared stem gets the entry's index
    assert [(e.id, e.domain) for p in parts for e in p.examples] == [
        ("train-0/train-1", "math"),  # the entry's domain
        ("train-1/train-1", "sums"),  # a row keeps its own
        ("open/o0", "writing"),
        ("open/open-2", "open"),  # no domain anywhere: the short name
    ]
    assert mix_label(data.mix) == "train-0+train-1+open"


def test_a_bad_row_in_the_second_source_is_named_by_source_line_and_field(write_jsonl):
    good = write_jsonl("good.jsonl", numeric_rows("g", 3))
    bad = write_jsonl("bad.jsonl", numeric_rows("b", 2) + [{"id": "b2", "question": "Three?"}])
    data = DataConfig(mix=(MixSource(source=str(good)), MixSource(source=str(bad))))
    with pytest.raises(DataError) as caught:
        load_mix(data)
    assert (caught.value.source, caught.value.line, caught.value.field) == (str(bad), 3, "answer")
    parts = load_mix(data, skip_invalid=True)
    assert [len(p.examples) for p in parts] == [3, 2] and parts[1].skipped[0].line == 3


# ------------------------------------------------------------------ config


MIX_YAML = """\
data:
  mix:
    - {source: gsm8k, weight: 0.5}
    - {source: open, kind: open, weight: 0.5, eval_split: eval}
"""


def test_a_mix_round_trips_through_a_saved_config(tmp_path):
    (tmp_path / "mix.yaml").write_text(MIX_YAML)
    config = load_config(tmp_path / "mix.yaml")
    assert config.data.mix == (MixSource(source="gsm8k", weight=0.5),
                               MixSource(source="open", kind="open", weight=0.5, eval_split="eval"))
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert load_config("default").data.mix == ()  # no mix: data.source alone, as before


@pytest.mark.parametrize("entry,message", [
    ("{source: open, weight: 0}", r"data\.mix\[1\]\.weight: must be > 0"),
    ("{source: open, weight: -1}", r"data\.mix\[1\]\.weight: must be > 0"),
    ("{source: open, wieght: 1}", r"data\.mix\[1\]: unknown field 'wieght'"),  # a typo names the field
    ("{weight: 1}", r"data\.mix\[1\]\.source: missing"),
    ("{source: open, kind: essay}", r"data\.mix\[1\]\.kind: must be one of"),
    ("{source: open, weight: lots}", r"data\.mix\[1\]\.weight: expected float"),
    ("open", r"data\.mix\[1\]: expected a mapping of fields"),
])
def test_config_errors_name_the_entry(tmp_path, entry, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"data:\n  mix:\n    - {{source: gsm8k}}\n    - {entry}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_mix_cannot_be_set_on_the_command_line():
    with pytest.raises(ConfigError, match=r"data\.mix: is a list of mappings, which --set cannot give"):
        load_config("default", ["data.mix=gsm8k"])


# ------------------------------------------------------------------ the stages


def test_sft_trains_only_on_sources_with_worked_solutions(tmp_path, write_jsonl):
    from tracetune.sft import SFTRun

    opens = write_jsonl("open.jsonl", open_rows(40))
    config = mix_config(MixSource(source="gsm8k", split="test"), MixSource(source=str(opens), kind="open", weight=3.0))
    train, validation = SFTRun(config, tmp_path / "run")._traces()
    assert train and validation and all(t.id.startswith("gsm8k/") for t in train + validation)
    assert len(train) == len(set(t.id for t in train)) > 1200  # one source left: its traces, each drawn once

    curated = curate_mix(load_mix(config.data), seed=42)
    assert curated.sources["open"] == 0 and curated.sources["gsm8k"] > 1000
    assert curated.dropped["an open row has no reference answer to train on"] == 40  # counted, not an error

    only_open = mix_config(MixSource(source=str(opens), kind="open"))
    with pytest.raises(TrainingError, match="no training traces from data.mix open"):
        SFTRun(only_open, tmp_path / "run2")._traces()


def test_grpo_uses_every_source_holds_out_each_and_resumes_in_the_same_order(write_jsonl):
    from tracetune.grpo import PromptBatches, prompt_examples
    from tracetune.runs import StopFlag

    maths, opens = write_jsonl("maths.jsonl", numeric_rows("m", 200)), write_jsonl("open.jsonl", open_rows(50))
    config = mix_config(MixSource(source=str(maths), weight=0.8), MixSource(source=str(opens), kind="open", weight=0.2),
                        val_fraction=0.1)
    train, validation = prompt_examples(config, Words())
    assert len(train) == 180 + 45  # each source's training rows, held out on its own
    kinds = Counter(e.kind for e in train)
    assert kinds["open"] > 20  # the open source is drawn from (0.2 of 225: ~45)
    parts = load_mix(config.data)
    # each source held out on its own, interleaved: a validation budget sees every source
    assert validation == interleave([split_examples(part.examples, 0.1, 42)[1] for part in parts])
    assert {validation[0].kind, validation[1].kind} == {"numeric", "open"}
    assert not {e.id for e in validation} & {e.id for e in train}
    assert prompt_examples(config, Words()) == (train, validation)  # re-read: the same order

    def references(examples, skip):
        batches = PromptBatches(examples, 8, 42, "plain", StopFlag())
        return [b["question"].tolist() for b in islice(batches, skip, 12)]

    full = references(train, 0)
    resumed = references(prompt_examples(config, Words())[0], 5)  # a resumed run re-reads the data and skips
    assert resumed == full[5:]
    other = mix_config(*config.data.mix, val_fraction=0.1, seed=7)
    assert prompt_examples(other, Words())[0] != train  # the seed fixes the draw

    with pytest.raises(DataError, match="open.*no training problems left"):
        mix_problems(parts, 0.1, 42, keep=lambda e: e.kind != "open")


def test_the_harness_scores_the_first_limit_of_each_source(write_jsonl):
    from tracetune.evaluate import problems

    config = Config(data=DataConfig(mix=(MixSource(source="gsm8k"), MixSource(source="open", kind="open", eval_split="eval"))),
                    eval=EvalConfig(limit=3))
    got = problems(config)
    # the open set round-robin over its domains, so that a limit sees each of them
    assert [e.id for e in got] == ["gsm8k/test-1", "gsm8k/test-2", "gsm8k/test-3", "open/open-creative_writing-01",
                                   "open/open-ideation-01", "open/open-summarization-01"]
    assert [e.domain for e in got] == ["gsm8k"] * 3 + ["creative_writing", "ideation", "summarization"]
