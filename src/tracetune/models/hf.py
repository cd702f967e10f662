"""Gemma 3 in the Hugging Face safetensors layout: local directories, the Hugging
Face hub, Kaggle, and the checkpoints tracetune writes.

Reading goes through Tunix's own ``create_model_from_safe_tensors``; tracetune only
decides which ``ModelConfig`` a directory holds. A tracetune checkpoint is such a
directory plus ``tracetune.json`` (the exact config and what it was trained from)
and ``tokenizer.model``, so every tool that reads Gemma 3 safetensors reads ours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tracetune.models.errors import ModelError
from tracetune.models.params import (
    ModelConfig,
    config_from_json,
    config_to_json,
    describe,
    hf_config,
    save_safetensors,
    to_hf,
    with_dtype,
    write_json,
)
from tracetune.models.tokenizer import Tokenizer

CHECKPOINT_FORMAT = "tracetune.model/1"
MARKER = "tracetune.json"

# (num_hidden_layers, hidden_size) -> Tunix's ModelConfig factory for that size.
KNOWN_SIZES = {
    (18, 640): "gemma3_270m",
    (26, 1152): "gemma3_1b_pt",
    (34, 2560): "gemma3_4b_pt",
    (48, 3840): "gemma3_12b_pt",
    (62, 5376): "gemma3_27b_pt",
}


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and any(path.glob("*.safetensors"))


def config_of_dir(path: Path, dtype: str) -> ModelConfig:
    """The ModelConfig of a safetensors directory: tracetune's exact one if it wrote
    the directory, else Tunix's preset for the size its ``config.json`` declares."""
    marker = path / MARKER
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ModelError(f"{marker}: unknown checkpoint format {meta.get('format')!r}")
        return with_dtype(config_from_json(meta["config"]), dtype)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"{path / 'config.json'} is not readable JSON ({error})") from None
    hf = hf.get("text_config", hf)  # multimodal checkpoints nest the text model
    arch = hf.get("model_type", "?")
    if not str(arch).startswith("gemma3"):
        raise ModelError(f"{path} holds a {arch!r} model; tracetune trains Gemma 3 models")
    factory = KNOWN_SIZES.get((hf.get("num_hidden_layers"), hf.get("hidden_size")))
    if factory is None:
        raise ModelError(
            f"{path}: no Tunix config for a Gemma 3 with {hf.get('num_hidden_layers')} layers and "
            f"hidden size {hf.get('hidden_size')}"
        )
    return with_dtype(getattr(ModelConfig, factory)(), dtype)


def load_dir(path: Path, dtype: str):
    """(model, tokenizer, config) from a Hugging Face safetensors directory."""
    from tunix.models.gemma3.params_safetensors import create_model_from_safe_tensors

    config = config_of_dir(path, dtype)
    tokenizer_file = path / "tokenizer.model"
    if not tokenizer_file.exists():
        raise ModelError(f"{path} has no tokenizer.model (the SentencePiece model of Gemma 3)")
    try:
        model = create_model_from_safe_tensors(str(path), config, mesh=None, dtype=config.param_dtype)
    except (ValueError, KeyError, TypeError) as error:  # Tunix reports shape and key mismatches this way
        reason = str(error).strip().splitlines()[0][:200]
        raise ModelError(f"{path} does not match a {describe(config)} model ({reason}): a checkpoint of another size?") from None
    return model, Tokenizer.from_file(tokenizer_file), config


def download_hf(repo_id: str, cache_dir: Path | None = None) -> Path:
    """Snapshot the safetensors, config and tokenizer of a hub repository.

    The token comes from ``HF_TOKEN`` (or ``huggingface-cli login``); Gemma repositories
    are gated, so the account must have accepted Google's licence.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.safetensors", "*.json", "tokenizer.model"],
                cache_dir=cache_dir,
                token=os.environ.get("HF_TOKEN"),
            )
        )
    except GatedRepoError:
        raise ModelError(
            f"{repo_id} is gated: accept the Gemma licence on its Hugging Face page and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"Hugging Face repository {repo_id} not found (or HF_TOKEN lacks access)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise ModelError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(error).__name__}): "
            "check the network and HF_TOKEN, or pass a local directory of safetensors"
        ) from None


def download_kaggle(handle: str) -> Path:
    """Download a Kaggle model handle (credentials: KAGGLE_USERNAME / KAGGLE_KEY or ~/.kaggle)."""
    try:
        import kagglehub

        return Path(kagglehub.model_download(handle))
    except Exception as error:  # noqa: BLE001 - kagglehub raises many types; the user needs one sentence
        raise ModelError(
            f"cannot download Kaggle model {handle} ({type(error).__name__}): set KAGGLE_USERNAME "
            "and KAGGLE_KEY, accept the Gemma licence on Kaggle, and check the network"
        ) from None


def save_checkpoint(flat, config: ModelConfig, tokenizer: Tokenizer, out_dir: Path, *, base: str, extra: dict | None = None) -> Path:
    """Write a tracetune checkpoint: Hugging Face safetensors + config.json +
    tokenizer.model + tracetune.json. Written file by file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(to_hf(flat, config), out_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(hf_config(config), out_dir / "config.json")
    tokenizer.save(out_dir / "tokenizer.model")
    # The marker last: a directory without it is not taken for a finished checkpoint.
    write_json({"format": CHECKPOINT_FORMAT, "base": base, "config": config_to_json(config), **(extra or {})}, out_dir / MARKER)
    return out_dir
