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
    hf_views,
    save_safetensors,
    with_dtype,
    write_json,
)
from tracetune.models.tokenizer import Tokenizer
from tunix.models.gemma3.model import QueryPreAttentionNormalisation

CHECKPOINT_FORMAT = "tracetune.model/1"
MARKER = "tracetune.json"

def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and any(path.glob("*.safetensors"))


def config_of_dir(path: Path, dtype: str) -> ModelConfig:
    """The ModelConfig of a safetensors directory: tracetune's exact one if it wrote
    the directory, else the one its Hugging Face ``config.json`` declares."""
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
    try:
        scaling = (hf.get("rope_scaling") or {}).get("factor", 1.0)
        by_head_dim = hf.get("query_pre_attn_scalar", hf["head_dim"]) == hf["head_dim"]
        config = ModelConfig(
            num_layers=hf["num_hidden_layers"],
            num_embed=hf["vocab_size"],
            embed_dim=hf["hidden_size"],
            hidden_dim=hf["intermediate_size"],
            num_heads=hf["num_attention_heads"],
            head_dim=hf["head_dim"],
            num_kv_heads=hf["num_key_value_heads"],
            sliding_window_size=hf.get("sliding_window"),
            local_base_frequency=int(hf.get("rope_local_base_freq", 10_000)),
            global_base_frequency=int(hf.get("rope_theta", 1_000_000)),
            global_scale_factor=float(scaling),
            # Gemma 3 27B scales queries by (d / heads)^-1/2, the other sizes by head_dim^-1/2.
            query_pre_attn_norm=QueryPreAttentionNormalisation[
                "BY_ONE_OVER_SQRT_HEAD_DIM" if by_head_dim else "BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS"
            ],
        )
    except KeyError as error:
        raise ModelError(f"{path / 'config.json'} lacks the Gemma 3 field {error.args[0]!r}") from None
    return with_dtype(config, dtype)


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


def published_dir(name: str) -> Path:
    """The directory of a tracetune export that ``tracetune publish`` put on a hub:
    ``hf:OWNER/NAME`` (Hugging Face) or ``kaggle:OWNER/MODEL/FRAMEWORK/VARIATION``,
    downloaded (and cached) by the hub's own client. Only a merged export loads."""
    from tracetune.errors import ExportError
    from tracetune.publish import HF, parse_target

    try:
        target = parse_target(name, "--model")
    except ExportError as error:
        raise ModelError(str(error)) from None
    fetch = download_hf if target.hub == HF else download_kaggle
    try:
        directory = fetch(target.name)
    except ModelError as error:
        raise ModelError(f"{name}: tried to download it as a published tracetune export: {error}") from None
    if not is_hf_dir(directory):
        raise ModelError(f"{name}: the download ({directory}) has no config.json and *.safetensors: not a merged "
                         "tracetune export (a GGUF runs in llama.cpp or Ollama, an adapter beside its merged export)")
    return directory


def save_checkpoint(flat, config: ModelConfig, tokenizer: Tokenizer, out_dir: Path, *, base: str, extra: dict | None = None) -> Path:
    """Write a tracetune checkpoint: Hugging Face safetensors + config.json +
    tokenizer.model + tracetune.json. Written file by file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(hf_views(flat, config), out_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(hf_config(config), out_dir / "config.json")
    tokenizer.save(out_dir / "tokenizer.model")
    # The marker last: a directory without it is not taken for a finished checkpoint.
    write_json({"format": CHECKPOINT_FORMAT, "base": base, "config": config_to_json(config), **(extra or {})}, out_dir / MARKER)
    return out_dir
