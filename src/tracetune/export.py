"""A finished run's model where people run models: a GGUF for llama.cpp, LM Studio and
Ollama, with an Ollama ``Modelfile`` and a model card beside it.

``export_gguf(RUN)`` reads the run's merged weights (``RUN/export/merged``, written
when SFT or GRPO finishes) and writes ``RUN/export/gguf/``::

    model.gguf   Gemma 3 metadata, the SentencePiece tokenizer, the matrices in the
                 chosen type (f32, f16, q8_0); tracetune's prompt and stop strings
                 under its own keys; a chat template that builds the same prompt
    Modelfile    ``ollama create NAME -f Modelfile`` works as written
    gguf.json    what was written: type, bytes, sha256, the step it came from
    README.md    the model card (``tracetune.card``)

``check_gguf`` reads the GGUF back through tracetune's own loader and compares its
weights and greedy continuations with the merged model's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tracetune.format import build_prompt
from tracetune.models.errors import ModelError

QUESTION = "{question}"


@dataclass(frozen=True)
class GGUFExport:
    """What ``export_gguf`` wrote."""

    directory: Path
    file: Path
    kind: str
    bytes: int
    sha256: str
    seconds: float


def merged_dir(run: Path) -> Path:
    """The merged safetensors of a finished SFT/GRPO run (or such a directory itself)."""
    from tracetune.models.hf import MARKER, is_hf_dir

    run = Path(run)
    for candidate in (run / "export" / "merged", run):
        if is_hf_dir(candidate) and (candidate / MARKER).exists():
            return candidate
    if not run.exists():
        raise ModelError(f"{run}: no such run directory")
    raise ModelError(f"{run} has no merged model (export/merged with tracetune.json): "
                     "is the run finished? `tracetune sft` / `tracetune grpo` write it at their end")


def prompt_style(run: Path) -> str:
    """The prompt style the run trained with (its saved config), "plain" if unknown."""
    from tracetune.config import ConfigError, load_config

    for path in (Path(run) / "config.yaml", Path(run).parent / "config.yaml"):
        if path.exists():
            try:
                return load_config(path).data.prompt_style
            except ConfigError:
                break
    return "plain"


def prompt_parts(style: str) -> tuple[str, str]:
    """tracetune's prompt around the question: (before, after)."""
    before, after = build_prompt(QUESTION, style).split(QUESTION)
    return before, after


def chat_template(style: str) -> str:
    """A Jinja chat template (llama.cpp, LM Studio) that turns the last user message
    into exactly the prompt the model was trained on."""
    before, after = prompt_parts(style)
    # String literals, not template text: Jinja drops a template's trailing newline
    # (the prompt ends in one) and would read any braces in the prompt as markup.
    return f"{{{{ bos_token }}}}{{{{ {json.dumps(before)} }}}}{{{{ messages[-1]['content'] | trim }}}}{{{{ {json.dumps(after)} }}}}"


def modelfile(style: str, stop_strings: tuple[str, ...], gguf_name: str = "model.gguf") -> str:
    """An Ollama Modelfile: the GGUF beside it, the training prompt as the template,
    greedy decoding, and the stop strings (Ollama leaves a stop string out of the reply)."""
    before, after = prompt_parts(style)
    lines = [
        "# Written by tracetune. Use: ollama create NAME -f Modelfile && ollama run NAME \"a question\"",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{before}{{{{ .Prompt }}}}{after}"""',
        *(f'PARAMETER stop "{stop}"' for stop in stop_strings),
        "PARAMETER temperature 0",
        "PARAMETER num_ctx 2048",
    ]
    return "\n".join(lines) + "\n"


def export_gguf(run: Path, kind: str = "f16", out: Path | None = None,
                stop_strings: tuple[str, ...] = ("</answer>",)) -> GGUFExport:
    """Write ``RUN/export/gguf`` (or ``out``): model.gguf, Modelfile, gguf.json, README.md."""
    from tracetune.models.gguf import GGUF_TYPES, file_sha256, write_gguf
    from tracetune.models.hf import MARKER, load_dir
    from tracetune.models.params import flat_params, write_json

    if kind not in GGUF_TYPES:
        raise ModelError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {kind!r}")
    start = time.perf_counter()
    source = merged_dir(run)
    run_dir = source.parent.parent if source == Path(run) / "export" / "merged" else Path(run)
    facts = json.loads((source / MARKER).read_text())
    style = prompt_style(run_dir)
    model, tokenizer, config = load_dir(source, "float32")
    flat = flat_params(model)
    del model
    directory = Path(out) if out else run_dir / "export" / "gguf"
    directory.mkdir(parents=True, exist_ok=True)
    before, after = prompt_parts(style)
    path = write_gguf(
        flat, config, tokenizer.proto, directory / "model.gguf", kind=kind,
        name=f"{facts.get('base', 'gemma3')} tracetune {facts.get('stage', '')}".strip(),
        prompt_template=before + QUESTION + after, stop_strings=stop_strings, chat_template=chat_template(style),
        extra={"base": facts.get("base", ""), "stage": facts.get("stage", ""), "step": facts.get("step", "")},
    )
    del flat
    (directory / "Modelfile").write_text(modelfile(style, stop_strings, path.name))
    sha256 = file_sha256(path)
    export = GGUFExport(directory, path, kind, path.stat().st_size, sha256, round(time.perf_counter() - start, 1))
    write_json({"file": path.name, "type": kind, "bytes": export.bytes, "sha256": sha256,
                "base": facts.get("base"), "stage": facts.get("stage"), "step": facts.get("step"),
                "selected": facts.get("selected"), "prompt_style": style, "stop_strings": list(stop_strings),
                # Relative: the file travels with the export (publish uploads it) and
                # should not carry this machine's paths.
                "from": os.path.relpath(source, directory)}, directory / "gguf.json")
    try:
        from tracetune.card import write_card

        write_card(directory)
    except Exception as error:  # noqa: BLE001 - the card is documentation; the export stands without it
        print(f"export: the model card was not written ({type(error).__name__}: {error})", file=sys.stderr)
    return export


@dataclass(frozen=True)
class GGUFCheck:
    """A GGUF read back through tracetune against the merged model it came from."""

    max_abs_diff: dict[str, float]  # per tensor kind: matrices, norms, embedding
    prompts: int
    identical: int  # prompts whose greedy token ids agree exactly
    tokens: int  # tokens compared
    agreeing_prefix: int  # tokens before the first difference, summed over prompts

    def as_dict(self) -> dict:
        return asdict(self)


def check_gguf(gguf_file: Path, merged: Path, prompts: list[str], max_new_tokens: int = 128) -> GGUFCheck:
    """Load ``gguf_file`` with tracetune's GGUF reader and ``merged`` with the
    safetensors reader; compare every weight and the greedy tokens on ``prompts``."""
    from tracetune.generate import Generator, SamplingConfig
    from tracetune.models.params import flat_params
    from tracetune.models.registry import load_model

    theirs, ours = load_model(str(gguf_file)), load_model(str(merged))
    a, b = flat_params(theirs.model), flat_params(ours.model)
    if set(a) != set(b):
        raise ModelError(f"{gguf_file} and {merged} hold different tensors")
    diffs: dict[str, float] = {}
    for key in a:
        group = "norms" if key.endswith(".scale") else "embedding" if key.startswith("embedder") else "matrices"
        diffs[group] = max(diffs.get(group, 0.0), float(np.max(np.abs(a[key].astype(np.float64) - b[key]))))
    del a, b
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    left = Generator(theirs.model, theirs.tokenizer).generate(prompts, sampling)
    right = Generator(ours.model, ours.tokenizer).generate(prompts, sampling)
    identical, prefix, tokens = agreement([g.token_ids for g in left], [g.token_ids for g in right])
    return GGUFCheck(diffs, len(prompts), identical, tokens, prefix)


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int, int]:
    """Two readers' greedy token ids on the same prompts: (identical rows, tokens
    before the first difference, tokens compared), summed over the rows."""
    same = prefix = total = 0
    for x, y in zip(a, b):
        same += x == y
        total += max(len(x), len(y))
        prefix += next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    return same, prefix, total
