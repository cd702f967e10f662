"""Parameters as flat ``"layers.0.attn.q_einsum.w" -> array`` dicts, to and from
Tunix's ``Gemma3``, and the Hugging Face safetensors layout.

Flat dicts are what every loader produces and every writer consumes, so shape
checks (a checkpoint of another size) live in one place: ``build_model``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.models.gemma3 import model as gemma3

from tracetune.files import atomic_path
from tracetune.models.errors import ModelError

ModelConfig = gemma3.ModelConfig


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return tree


def abstract_model(config: ModelConfig) -> gemma3.Gemma3:
    """A Gemma3 with shapes and dtypes but no memory (``nnx.eval_shape``)."""
    return nnx.eval_shape(lambda: gemma3.Gemma3(config, rngs=nnx.Rngs(0)))


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's flat name and shape for ``config``, without allocating it."""
    state = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    return {k: tuple(v.shape) for k, v in flatten(state).items()}


def build_model(config: ModelConfig, flat: dict[str, np.ndarray], source: str) -> gemma3.Gemma3:
    """Fill a Gemma3 of ``config`` with ``flat`` params, emptying ``flat``; a ModelError
    names any missing, unexpected or mis-shaped tensor (a checkpoint of another size)."""
    model = abstract_model(config)
    expected = param_shapes(config)
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{source} does not match a {describe(config)} model: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for key, value in flat.items():
        if expected[key] != tuple(value.shape):
            raise ModelError(
                f"{source} has {key} of shape {tuple(value.shape)}, but a {describe(config)} "
                f"model needs {expected[key]}: a checkpoint of another size?"
            )
    # Move tensors to the device one by one, dropping each host copy as we go,
    # so loading never holds two full copies of the weights (peak RSS).
    dtype = config.param_dtype
    device = {key: jnp.asarray(flat.pop(key), dtype=dtype) for key in sorted(flat)}
    nnx.update(model, unflatten(device))
    return model


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as host numpy arrays (LoRA adapters excluded)."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {k: np.asarray(jax.device_get(v)) for k, v in flatten(state).items()}


def describe(config: ModelConfig) -> str:
    return (
        f"Gemma 3 ({config.num_layers} layers, d={config.embed_dim}, "
        f"{config.num_heads}/{config.num_kv_heads} heads, vocab {config.num_embed})"
    )


def config_to_json(config: ModelConfig) -> dict[str, Any]:
    """The text-model fields of a ModelConfig, JSON-ready (sharding and vision omitted)."""
    fields = ("num_layers", "num_embed", "embed_dim", "hidden_dim", "num_heads", "head_dim", "num_kv_heads",
              "sliding_window_size", "local_base_frequency", "global_base_frequency",
              "local_scale_factor", "global_scale_factor")
    out = {name: getattr(config, name) for name in fields}
    out["query_pre_attn_norm"] = config.query_pre_attn_norm.name
    out["param_dtype"] = np.dtype(config.param_dtype).name
    return out


def config_from_json(data: dict[str, Any]) -> ModelConfig:
    data = dict(data)
    data["query_pre_attn_norm"] = gemma3.QueryPreAttentionNormalisation[data["query_pre_attn_norm"]]
    data["param_dtype"] = jnp.dtype(data["param_dtype"])
    return ModelConfig(**data)


def with_dtype(config: ModelConfig, dtype: str) -> ModelConfig:
    return dataclasses.replace(config, param_dtype=jnp.dtype(dtype))


# ---------------------------------------------------------- Hugging Face layout

# Tunix name inside a layer -> Hugging Face name inside model.layers.i
_HF_NORMS = {
    "pre_attention_norm.scale": "input_layernorm.weight",
    "post_attention_norm.scale": "post_attention_layernorm.weight",
    "pre_ffw_norm.scale": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.scale": "post_feedforward_layernorm.weight",
    "attn._query_norm.scale": "self_attn.q_norm.weight",
    "attn._key_norm.scale": "self_attn.k_norm.weight",
}


def hf_views(flat: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Tunix layout -> the Hugging Face ``Gemma3ForCausalLM`` safetensors layout
    (the inverse of Tunix's ``params_safetensors`` mapping), as views where numpy
    can (the MLP's transposes, the largest; the attention matrices' reshapes copy,
    about 0.1 GB for the 270M): a writer lays each tensor out (``to_hf`` all at
    once, ``save_safetensors`` one at a time). RMSNorm weights are
    stored as ``w`` in both, since both compute ``x * (1 + w)``."""
    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    out = {"model.embed_tokens.weight": flat["embedder.input_embedding"], "model.norm.weight": flat["final_norm.scale"]}
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q = flat[src + "attn.q_einsum.w"]  # [N, D, H]
        out[dst + "self_attn.q_proj.weight"] = q.transpose(0, 2, 1).reshape(n * h, d)  # [N*H, D]
        kv = flat[src + "attn.kv_einsum.w"]  # [2, K, D, H]
        out[dst + "self_attn.k_proj.weight"] = kv[0].transpose(0, 2, 1).reshape(k * h, d)
        out[dst + "self_attn.v_proj.weight"] = kv[1].transpose(0, 2, 1).reshape(k * h, d)
        out[dst + "self_attn.o_proj.weight"] = flat[src + "attn.attn_vec_einsum.w"].reshape(n * h, d).T  # [D, N*H]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[dst + f"mlp.{proj}.weight"] = flat[src + f"mlp.{proj}.kernel"].T  # [out, in]
        for tunix_name, hf_name in _HF_NORMS.items():
            out[dst + hf_name] = flat[src + tunix_name]
    return out


def to_hf(flat: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """``hf_views`` as contiguous arrays."""
    return {key: np.ascontiguousarray(value) for key, value in hf_views(flat, config).items()}


def from_hf(hf: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """The Hugging Face layout -> Tunix's: the inverse of ``to_hf``, for readers whose
    tensors arrive as ``(out, in)`` matrices under Hugging Face names (the GGUF reader)."""
    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    out = {"embedder.input_embedding": hf["model.embed_tokens.weight"], "final_norm.scale": hf["model.norm.weight"]}
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "attn.q_einsum.w"] = hf[src + "self_attn.q_proj.weight"].reshape(n, h, d).transpose(0, 2, 1)  # [N, D, H]
        out[dst + "attn.kv_einsum.w"] = np.stack(  # [2, K, D, H]
            [hf[src + f"self_attn.{p}_proj.weight"].reshape(k, h, d).transpose(0, 2, 1) for p in "kv"]
        )
        out[dst + "attn.attn_vec_einsum.w"] = hf[src + "self_attn.o_proj.weight"].T.reshape(n, h, d)  # [N, H, D]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[dst + f"mlp.{proj}.kernel"] = hf[src + f"mlp.{proj}.weight"].T  # [in, out]
        for tunix_name, hf_name in _HF_NORMS.items():
            out[dst + tunix_name] = hf[src + hf_name]
    return {key: np.ascontiguousarray(value) for key, value in out.items()}


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` for the Hugging Face layout (Gemma3TextConfig fields)."""
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": config.num_embed,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "sliding_window": config.sliding_window_size,
        "rope_theta": config.global_base_frequency,
        "rope_local_base_freq": config.local_base_frequency,
        "query_pre_attn_scalar": config.head_dim
        if config.query_pre_attn_norm.name == "BY_ONE_OVER_SQRT_HEAD_DIM"
        else config.embed_dim // config.num_heads,
        "rope_scaling": {"rope_type": "linear", "factor": config.global_scale_factor}
        if config.global_scale_factor != 1.0
        else None,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "torch_dtype": np.dtype(config.param_dtype).name,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written atomically (a killed run never leaves a truncated
    file) and one tensor at a time.

    safetensors' own writer (``save_file``) takes every tensor's bytes at once: for
    the 270M's merged export that was 1 GB of bytes beside the weights, and the
    export's peak went 1.84 GiB above the trained model. Here each tensor is made
    contiguous (a transposed view of ``hf_views`` is copied) only while it is
    written. The file is the format the library reads: an 8-byte little-endian
    header length, the JSON header (dtype, shape and byte offsets of each tensor,
    ``__metadata__``) padded with spaces to 8 bytes, then the data
    (tests/test_models.py reads it back with ``safetensors.safe_open``).
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, value in tensors.items():
        if value.dtype.name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: safetensors has no dtype {value.dtype.name}")
        header[name] = {"dtype": _SAFETENSORS_DTYPES[value.dtype.name], "shape": list(value.shape),
                        "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_path(path) as tmp, tmp.open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for value in tensors.values():
            out.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)  # any dtype, bfloat16 too


def save_npz(flat: dict[str, np.ndarray], path: Path) -> None:
    """A cache file written tensor by tensor (no second copy in memory), atomically.
    bfloat16 is not a numpy dtype npz knows: it is stored as its uint16 bits."""
    import ml_dtypes

    arrays = {
        (f"bf16:{k}" if v.dtype == ml_dtypes.bfloat16 else k): (v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v)
        for k, v in flat.items()
    }
    with atomic_path(path, ".tmp.npz") as tmp:  # np.savez appends .npz to other names
        np.savez(tmp, **arrays)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    import zipfile

    import ml_dtypes

    try:
        with np.load(path) as archive:
            return {
                (k[5:] if k.startswith("bf16:") else k): (archive[k].view(ml_dtypes.bfloat16) if k.startswith("bf16:") else archive[k])
                for k in archive.files
            }
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ModelError(f"{path} is not a readable cache file ({error})") from None


def write_json(data: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
