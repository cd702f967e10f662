"""The model card (card.py) of exports that tracetune itself wrote on the tiny model:
a `tracetune run` directory with evaluations, a stage run alone, an export moved away
from its run, a GGUF export beside the merged one, and the export hook (lora.export_run)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tracetune import card as card_mod
from tracetune.card import CARD_MARKER, model_card, write_card
from tracetune.config import LoraConfig, load_config, save_config
from tracetune.errors import ExportError
from tracetune.evaluate import write_summary
from tracetune.failures import categorize
from tracetune.lora import apply_lora, export_run
from tracetune.models.registry import load_model
from tracetune.scoring import score_sample

from conftest import wrap

N = 20  # problems per evaluation
QUESTION = "How many clips did Natalia sell?"


def sample(i: int, correct: bool, well_formed: bool) -> dict:
    """One samples.jsonl record as the harness writes it (score + failure)."""
    answer = "72" if correct else "71"
    completion = wrap(answer, "Step 1: 48 + 24 = 72.\nTherefore, the answer is 72.") if well_formed else f"I think it is {answer}."
    score = score_sample(QUESTION, "72", completion, [-0.1], id=f"test-{i}")
    failure = None if correct and well_formed else dataclasses.asdict(categorize(QUESTION, "72", completion))
    return {**score.record(), "finish_reason": "stop", "completion_tokens": 20, "failure": failure}


def write_eval(directory: Path, model: str, records: list[dict]) -> None:
    """eval.json and samples.jsonl as `tracetune eval` writes them, metrics through its own writer."""
    directory.mkdir(parents=True)
    settings = {"variant": directory.name, "model": model, "source": "gsm8k", "split": "test", "limit": N,
                "max_new_tokens": 64, "prompt_style": "plain", "decoding": "greedy",
                "reward_weights": {"correctness": 0.6, "trace": 0.25, "confidence": 0.15, "arithmetic": 0.0}}
    (directory / "eval.json").write_text(json.dumps(settings))
    (directory / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_summary(directory, records, settings)


def train_stub(run_dir: Path, loaded, config) -> tuple[Path, Path]:
    """A finished SFT run without the training: its config, three logged updates, and
    the export as lora.export_run writes it (the card hook included)."""
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3)))
    model = apply_lora(loaded.model, LoraConfig(rank=4, alpha=8.0), 0)
    return export_run(model, loaded, config.sft.lora, run_dir, stage="sft", step=3, selected="last step")


@pytest.fixture(scope="module")
def tiny_as_270m():
    """The tiny model under the embedded 270M's registry name, so that the card's base
    model resolves to a Hugging Face repository (the weights stay tiny's)."""
    return dataclasses.replace(load_model("tiny"), name="gemma3-270m")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_as_270m) -> Path:
    """A `tracetune run` directory: config, pipeline.json, data/, an SFT run with its
    exports, and two evaluations of the same 20 problems (zero-shot: all wrong and
    malformed; SFT: right on 0-7, all well formed)."""
    root = tmp_path_factory.mktemp("pipeline") / "run"
    config = load_config("tiny", ["data.source=gsm8k", "sft.lora.rank=4", "sft.lora.alpha=8"])
    root.mkdir()
    save_config(config, root / "config.yaml")
    note = "7000 train + 373 validation traces, targets score 100%"  # as Pipeline.stage_data words it
    (root / "pipeline.json").write_text(json.dumps({"data": {"status": "done", "note": note}}))
    train_stub(root / "sft", tiny_as_270m, config)
    (root / "sft" / "summary.json").write_text(json.dumps({"steps": 3, "reward_weights": config.rewards.as_dict(), "seconds": 60}))
    write_eval(root / "eval" / "zero-shot", "gemma3-270m", [sample(i, False, False) for i in range(N)])
    write_eval(root / "eval" / "sft", str(root / "sft" / "export" / "merged"), [sample(i, i < 8, True) for i in range(N)])
    return root


def front_matter(text: str) -> dict:
    head, _, _ = text.removeprefix("---\n").partition("\n---\n")
    return yaml.safe_load(head)


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n\n", 1)[1].split("\n## ", 1)[0]


def test_export_run_writes_a_card_beside_both_exports(pipeline):
    for kind in ("merged", "adapter"):
        readme = pipeline / "sft" / "export" / kind / "README.md"
        assert readme.is_file() and CARD_MARKER in readme.read_text()


def test_the_front_matter_is_yaml_with_the_hub_fields(pipeline):
    merged = model_card(pipeline / "sft" / "export" / "merged")
    meta = front_matter(merged)
    assert meta["base_model"] == "google/gemma-3-270m" and meta["base_model_relation"] == "finetune"
    assert meta["license"] == "gemma" and "https://ai.google.dev/gemma/terms" in merged
    assert meta["datasets"] == ["openai/gsm8k"]  # data.source gsm8k
    assert {"tracetune", "gemma3", "lora", "sft", "reasoning"} <= set(meta["tags"]) and "grpo" not in meta["tags"]
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    adapter = front_matter(model_card(pipeline / "sft" / "export" / "adapter"))
    assert adapter["library_name"] == "tracetune" and adapter["base_model_relation"] == "adapter"


def test_the_results_table_lists_every_variant_with_intervals_and_n(pipeline):
    text = section(write_card(pipeline / "sft" / "export" / "merged").read_text(), "Results")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert rows["Variant"][1:3] == ["n", "GSM8K accuracy"]
    # Wilson 95%: 0 of 20 -> [0, 16.1]; 8 of 20 -> 40.0% [21.9, 61.3]
    assert rows["Zero-shot"][1:3] == ["20", "0.0% [0.0, 16.1]"]
    assert rows["SFT only"][1:3] == ["20", "40.0% [21.9, 61.3]"]
    assert "gsm8k test (20 problems)" in text and "This export is the **SFT only** row." in text
    failures = section(model_card(pipeline / "sft" / "export" / "merged"), "Failure analysis")
    assert "| Format failure | 20 (100%) | 0 (0%) |" in failures


def test_the_card_states_weights_prompt_config_and_loading(pipeline):
    text = model_card(pipeline / "sft" / "export" / "merged", published_as="hf:alice/tracer")
    assert "correctness=0.6, trace=0.25, confidence=0.15" in section(text, "Reward")
    assert "7000 train + 373 validation traces" in section(text, "Data")
    prompt = section(text, "Prompt format")
    assert "Q: Natalia sold clips to 48 of her friends" in prompt and "<answer>72</answer>" in prompt
    training = section(text, "Training")
    assert "`lora.rank` 4" in training and "3 updates, loss 2.000 -> 0.667" in training
    assert str(pipeline) not in text  # local paths stay home: the config says RUN/...
    usage = section(text, "How to use")
    assert "tracetune eval --model hf:alice/tracer" in usage and 'AutoModelForCausalLM.from_pretrained("alice/tracer")' in usage


def test_a_stage_run_alone_says_what_is_missing_in_one_line_each(tmp_path, tiny_as_270m):
    run = tmp_path / "solo"
    train_stub(run, tiny_as_270m, load_config("tiny", ["sft.lora.rank=4", "sft.lora.alpha=8"]))
    text = (run / "export" / "merged" / "README.md").read_text()  # written by the export hook
    assert front_matter(text)["license"] == "gemma"
    for title, line in (("Results", "No evaluation yet"), ("Failure analysis", "No evaluation yet"),
                        ("Data", "Curation counts: not recorded")):
        found = [s for s in section(text, title).splitlines() if s.startswith(line)]
        assert len(found) == 1, (title, section(text, title))
    # Moved away from its run: the card still writes, from tracetune.json alone.
    moved = shutil.copytree(run / "export" / "merged", tmp_path / "elsewhere" / "merged")
    shutil.rmtree(run)
    text = model_card(moved)
    assert "(its run directory is not beside the export)" in text and "Training data: not recorded" in text
    assert "No evaluation yet" in text


def test_a_gguf_export_gets_its_own_card(pipeline, tmp_path):
    gguf = pipeline / "sft" / "export" / "gguf"
    gguf.mkdir()
    (gguf / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    (gguf / "Modelfile").write_text("FROM ./model.gguf\n")
    (gguf / "gguf.json").write_text(json.dumps({"file": "model.gguf", "type": "q8_0", "bytes": 64, "sha256": "ab" * 32,
                                                "stage": "sft", "step": 3, "from": str(pipeline / "sft" / "export" / "merged")}))
    try:
        text = write_card(gguf).read_text()
    finally:
        shutil.rmtree(gguf)
    meta = front_matter(text)
    assert "gguf" in meta["tags"] and meta["library_name"] == "gguf"
    assert "llama-completion -m model.gguf" in text and "ollama create" in text
    assert "This export is the **SFT only** row." in text and "q8_0" in text


def test_a_card_failure_never_loses_the_export(tmp_path, tiny_as_270m, monkeypatch, capsys):
    def broken(directory, **_):
        raise RuntimeError("a bug in the card")

    monkeypatch.setattr(card_mod, "write_card", broken)
    adapter, merged = train_stub(tmp_path / "run", tiny_as_270m, load_config("tiny", ["sft.lora.rank=4", "sft.lora.alpha=8"]))
    assert (merged / "model.safetensors").is_file() and (adapter / "adapter.safetensors").is_file()
    assert not (merged / "README.md").exists()
    assert "warning: no model card" in capsys.readouterr().err


def test_a_readme_written_by_hand_is_never_overwritten(pipeline):
    readme = pipeline / "sft" / "export" / "adapter" / "README.md"
    original = readme.read_text()
    readme.write_text("my own notes\n")
    try:
        with pytest.raises(ExportError, match="not written by tracetune"):
            write_card(readme.parent)
        assert readme.read_text() == "my own notes\n"
    finally:
        readme.write_text(original)


def test_a_directory_that_is_not_an_export_is_one_clear_error(pipeline):
    with pytest.raises(ExportError, match=r"not a tracetune export .*did you mean .*export/merged"):
        model_card(pipeline / "sft")
