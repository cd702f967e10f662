"""``tiny``: a small random Gemma 3 and a small tokenizer, for tests.

The tokenizer is a 1,024-piece SentencePiece BPE trained on GSM8K text, shipped in
``assets/tiny_tokenizer.model`` (rebuild it with ``python -m tracetune.models.tiny``).
It keeps Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and control pieces, and
makes the trace tags single pieces, so a 2-layer model can learn the format fast.

Weights are drawn from N(0, 1/fan_in) for every matrix and N(0, 1/d) for the
embedding. Tunix's own initialisers give zero MLP kernels and 0.01-std embeddings,
with which a LoRA-only model cannot learn (TUNIX_NOTES).
"""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from tracetune.models.params import ModelConfig, param_shapes
from tracetune.models.tokenizer import Tokenizer

TOKENIZER_ASSET = "tiny_tokenizer.model"
TINY_VOCAB = 1024
TAG_PIECES = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "\n"]


def tiny_config(vocab_size: int = TINY_VOCAB, dtype: str = "float32") -> ModelConfig:
    """2 layers, d=64, 4 query heads sharing 1 KV head (the 270M's GQA shape)."""
    return ModelConfig(
        num_layers=2,
        num_embed=vocab_size,
        embed_dim=64,
        hidden_dim=256,
        num_heads=4,
        head_dim=16,
        num_kv_heads=1,
        sliding_window_size=512,
        local_base_frequency=10_000,
        global_base_frequency=1_000_000,
        param_dtype=jnp.dtype(dtype),
    )


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer(resources.files("tracetune.models.assets").joinpath(TOKENIZER_ASSET).read_bytes())


def tiny_params(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random weights for every parameter of ``config``."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(config)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith(".scale"):
            out[key] = np.zeros(shape, np.float32)  # RMSNorm computes x * (1 + scale)
            continue
        if key == "embedder.input_embedding":
            fan_in = shape[1]  # [V, D]: also the output head, so logits start near unit scale
        elif key.endswith("attn_vec_einsum.w"):
            fan_in = shape[0] * shape[1]  # [N, H, D]
        elif key.endswith("kv_einsum.w"):
            fan_in = shape[2]  # [2, K, D, H]
        elif key.endswith("q_einsum.w"):
            fan_in = shape[1]  # [N, D, H]
        else:
            fan_in = shape[0]  # mlp kernels [in, out]
        out[key] = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape).astype(np.float32)
    return out


def train_tokenizer(texts: list[str], vocab_size: int = TINY_VOCAB) -> bytes:
    """A SentencePiece BPE with Gemma's conventions, trained on ``texts``."""
    import sentencepiece as spm

    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<start_of_turn>", "<end_of_turn>"],
        user_defined_symbols=TAG_PIECES,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return writer.getvalue()


def rebuild_tokenizer_asset() -> Path:
    """Retrain the shipped tiny tokenizer from the shipped GSM8K train split."""
    from tracetune.data import curate, load_examples

    traces = curate(load_examples("gsm8k", "train").examples, val_fraction=0.0).train
    proto = train_tokenizer([t.prompt + t.completion for t in traces])
    path = Path(str(resources.files("tracetune.models.assets").joinpath(TOKENIZER_ASSET)))
    path.write_bytes(proto)
    return path


if __name__ == "__main__":
    print(f"wrote {rebuild_tokenizer_asset()}")
