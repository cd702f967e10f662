"""GGUF export: tracetune's writer and reader agree, and the export is usable as written."""

from __future__ import annotations

import json

import jinja2
import numpy as np
import pytest
from typer.testing import CliRunner

from tracetune import export
from tracetune.cli import app
from tracetune.format import build_prompt
from tracetune.generate import Generator, SamplingConfig
from tracetune.models import gguf as gguf_lib
from tracetune.models.hf import save_checkpoint
from tracetune.models.params import build_model, flat_params
from tracetune.models.registry import load_model
from tracetune.models.tiny import tiny_config, tiny_params, tiny_tokenizer

PROMPTS = [build_prompt(q) for q in ("Tom has 3 apples and buys 4 more. How many?", "What is 12 times 7?",
                                     "A car goes 40 km in 1 hour. How far in 3 hours?")]


def trained_like_params(seed: int = 1) -> dict[str, np.ndarray]:
    """Tiny weights with non-zero norms, as training leaves them (tiny_params has zero norms)."""
    rng = np.random.default_rng(seed)
    flat = tiny_params(tiny_config(), seed)
    return {k: (rng.normal(0, 0.3, v.shape).astype(np.float32) if k.endswith(".scale") else v) for k, v in flat.items()}


@pytest.fixture
def merged_run(tmp_path):
    """A finished run's layout: RUN/export/merged as SFT/GRPO write it."""
    run = tmp_path / "run"
    save_checkpoint(trained_like_params(), tiny_config(), tiny_tokenizer(), run / "export" / "merged", base="tiny",
                    extra={"stage": "sft", "step": 7, "selected": "last step"})
    return run


@pytest.mark.parametrize("kind, tolerance", [("f32", 0.0), ("f16", 2e-3), ("q8_0", 3e-2)])
def test_the_reader_gets_back_what_the_writer_wrote(tmp_path, kind, tolerance):
    config, flat = tiny_config(), trained_like_params()
    path = gguf_lib.write_gguf(dict(flat), config, tiny_tokenizer().proto, tmp_path / "m.gguf", kind=kind)
    reader = gguf_lib.open_gguf(path)
    assert gguf_lib.config_from_gguf(reader) == config
    back = gguf_lib.gguf_params(reader, config, np.float32)
    assert set(back) == set(flat)
    for key, value in flat.items():
        if key.endswith(".scale"):  # stored as 1 + w in float32: one rounding of 1 + w
            np.testing.assert_allclose(back[key], value, rtol=0, atol=1.2e-7)
        elif tolerance == 0.0:
            assert np.array_equal(back[key], value), key
        else:
            scale = np.max(np.abs(value))
            assert np.max(np.abs(back[key] - value)) <= tolerance * scale, key


def test_the_tokenizer_survives_the_round_trip(tmp_path):
    tokenizer = tiny_tokenizer()
    path = gguf_lib.write_gguf(tiny_params(tiny_config()), tiny_config(), tokenizer.proto, tmp_path / "m.gguf", kind="f32")
    back = gguf_lib.tokenizer_proto(gguf_lib.open_gguf(path))
    assert gguf_lib.tokenizer_metadata(back) == gguf_lib.tokenizer_metadata(tokenizer.proto)
    from tracetune.models.tokenizer import Tokenizer

    text = "Q: Tom has 3 apples.\nA:\n<reasoning>Step 1: 3 + 4 = 7</reasoning>  <answer>7</answer>"
    assert Tokenizer(back).encode(text) == tokenizer.encode(text)


def test_an_f32_export_decodes_the_same_greedy_tokens(tmp_path):
    config, flat = tiny_config(), trained_like_params()
    reference = build_model(config, dict(flat), "reference")
    path = gguf_lib.write_gguf(dict(flat), config, tiny_tokenizer().proto, tmp_path / "m.gguf", kind="f32")
    loaded = load_model(str(path))
    sampling = SamplingConfig(max_new_tokens=24, stop_strings=())
    ours = Generator(reference, tiny_tokenizer()).generate(PROMPTS, sampling)
    theirs = Generator(loaded.model, loaded.tokenizer).generate(PROMPTS, sampling)
    assert [g.token_ids for g in theirs] == [g.token_ids for g in ours]


def test_export_writes_the_gguf_its_modelfile_and_what_it_came_from(merged_run):
    result = export.export_gguf(merged_run, "q8_0")
    directory = merged_run / "export" / "gguf"
    assert result.file == directory / "model.gguf" and result.bytes == result.file.stat().st_size
    facts = json.loads((directory / "gguf.json").read_text())
    assert facts["type"] == "q8_0" and facts["step"] == 7 and facts["sha256"] == result.sha256
    modelfile = (directory / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "</answer>"' in modelfile
    assert 'TEMPLATE """Q: {{ .Prompt }}\nA:\n"""' in modelfile and "PARAMETER temperature 0" in modelfile
    reader = gguf_lib.open_gguf(result.file)
    template, stops = gguf_lib.read_prompt(reader)
    assert template.format(question="What is 2 + 2?") == build_prompt("What is 2 + 2?") and stops == ("</answer>",)
    chat = jinja2.Template(gguf_lib._field(reader, "tokenizer.chat_template"))
    rendered = chat.render(messages=[{"role": "user", "content": " What is 2 + 2? "}], bos_token="<bos>")
    assert rendered == "<bos>" + build_prompt("What is 2 + 2?")
    assert gguf_lib._field(reader, "tokenizer.ggml.add_bos_token") is True


def test_a_chat_run_exports_the_chat_prompt(merged_run):
    (merged_run / "config.yaml").write_text("data:\n  prompt_style: chat\n")
    export.export_gguf(merged_run, "f16")
    modelfile = (merged_run / "export" / "gguf" / "Modelfile").read_text()
    before, after = export.prompt_parts("chat")
    assert "<start_of_turn>user" in before and f'TEMPLATE """{before}{{{{ .Prompt }}}}{after}"""' in modelfile


def test_the_export_command_checks_its_read_back(merged_run, monkeypatch):
    result = CliRunner().invoke(app, ["export", str(merged_run), "--type", "f32", "--check", "2", "--check-tokens", "16"])
    assert result.exit_code == 0, result.output
    check = json.loads((merged_run / "export" / "gguf" / "check.json").read_text())
    assert check["prompts"] == 2 and check["identical"] == 2
    assert check["max_abs_diff"]["matrices"] == 0.0 and check["max_abs_diff"]["norms"] <= 1.2e-7


@pytest.mark.parametrize("args, message", [
    (["--type", "q4"], "must be one of f32, f16, q8_0"),
    (["--format", "onnx"], "--format must be 'gguf'"),
])
def test_export_refuses_what_it_cannot_write(merged_run, args, message):
    from tracetune.models.errors import ModelError
    from tracetune.config import ConfigError

    result = CliRunner().invoke(app, ["export", str(merged_run), *args])
    assert isinstance(result.exception, (ModelError, ConfigError)) and message in str(result.exception)
    assert not (merged_run / "export" / "gguf" / "model.gguf").exists()


def test_export_of_an_unfinished_run_says_so(tmp_path):
    from tracetune.models.errors import ModelError

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ModelError, match="has no merged model.*is the run finished"):
        export.export_gguf(tmp_path / "run")
    with pytest.raises(ModelError, match="no such run directory"):
        export.export_gguf(tmp_path / "nothing")


def test_a_gguf_that_lacks_a_tensor_or_a_key_is_named(tmp_path):
    import gguf

    from tracetune.models.errors import ModelError

    config, flat = tiny_config(), tiny_params(tiny_config())
    path = gguf_lib.write_gguf(dict(flat), config, tiny_tokenizer().proto, tmp_path / "m.gguf", kind="f32")
    reader = gguf_lib.open_gguf(path)
    writer = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "gemma3")  # the same file less one tensor and one key
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture", "gemma3.feed_forward_length")):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind, field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        if tensor.name != "blk.1.ffn_up.weight":
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    cut = gguf_lib.open_gguf(tmp_path / "cut.gguf")
    with pytest.raises(ModelError, match="gemma3.feed_forward_length"):
        gguf_lib.config_from_gguf(cut)
    with pytest.raises(ModelError, match="blk.1.ffn_up.weight"):
        gguf_lib.gguf_params(cut, config, np.float32)


@pytest.mark.slow
def test_llama_cpp_reads_the_export_and_continues_the_same_way(merged_run):
    """The optional extra '.[llama]': llama.cpp loads the f32 and f16 exports, tokenizes
    the prompts to tracetune's ids and continues them with tracetune's greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's binding is the optional extra '.[llama]'")
    loaded = load_model(str(merged_run))
    sampling = SamplingConfig(max_new_tokens=16, stop_strings=())
    ours = [g.token_ids for g in Generator(loaded.model, loaded.tokenizer).generate(PROMPTS, sampling)]
    for kind in ("f32", "f16"):
        result = export.export_gguf(merged_run, kind, merged_run / "export" / f"gguf-{kind}")
        llm = llama_cpp.Llama(model_path=str(result.file), n_ctx=256, n_threads=2, seed=0, verbose=False)
        for prompt, expected in zip(PROMPTS, ours):
            ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            assert ids == loaded.tokenizer.encode(prompt)
            theirs = []
            for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                if token == llm.token_eos() or len(theirs) == len(expected):
                    break
                theirs.append(int(token))
            assert theirs == expected, kind
