"""The model card: ``README.md`` in an export directory, in Hugging Face's format.

``write_card(RUN/export/merged)`` (or ``adapter``, ``gguf``) writes YAML front
matter (base model, licence, data set, tags) and a body that says what was trained
and how, how well it scores, what the prompt looks like and how to load the files.
Every fact comes from what the run wrote:

    EXPORT/tracetune.json   merged: base, stage, step, run, how the step was selected
    EXPORT/adapter.json     adapter: the same, with rank, alpha and targets
    EXPORT/gguf.json        gguf: file, type, bytes, sha256 (the stage facts: ../merged)
    RUN/                    the stage's run: config.yaml, summary.json, metrics.jsonl
    RUN/../                 the pipeline around it, if any: pipeline.json (the data
                            note), data/, eval/<variant>/ (the harness's results)

A GRPO export's base is the SFT export it started from, so the stages are found by
following ``base`` from export to export. A piece that is absent (a stage run without
a pipeline, no evaluation yet) becomes one line saying so; a damaged file is an
ExportError naming it. ``tracetune publish`` rewrites the card just before uploading,
so evaluations that finished after the export are in it.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tracetune.errors import ExportError
from tracetune.files import atomic_path

# The file that makes a directory an export of each kind (a merged export first:
# it is what the harness scores and what transformers loads).
KINDS = {"merged": "tracetune.json", "adapter": "adapter.json", "gguf": "gguf.json"}
# Hugging Face's library_name per kind: the merged export is Gemma3ForCausalLM
# safetensors; the adapter is qwix's LoRA factors (not PEFT's layout).
LIBRARIES = {"merged": "transformers", "adapter": "tracetune", "gguf": "gguf"}
# How the Hub's model tree relates the export to its base (its card spec's values).
RELATIONS = {"merged": "finetune", "adapter": "adapter", "gguf": "finetune"}
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
# The first line after the front matter; a README.md without it was not written here
# and is never overwritten.
CARD_MARKER = "<!-- tracetune model card: written from the run's files; `tracetune publish` rewrites it -->"
# Data sources by their Hugging Face dataset id (the shipped copy of GSM8K is OpenAI's, MIT).
DATASET_IDS = {"gsm8k": "openai/gsm8k"}
# The config fields worth a line per stage; the whole config.yaml follows in the card.
HIGHLIGHTS = {
    "sft": ("model", "lora.rank", "lora.alpha", "learning_rate", "epochs", "max_steps", "batch_size", "select"),
    "grpo": ("lora.rank", "lora.alpha", "num_generations", "beta", "epsilon", "learning_rate", "max_steps",
             "prompts_per_step", "temperature", "max_new_tokens", "loss_algo", "advantage_estimator", "select"),
}
STAGE_LABELS = {"sft": "SFT", "grpo": "GRPO"}
MAX_CHAIN = 8  # stages followed back through ``base`` (a loop of exports cannot hang the card)


@dataclass(frozen=True)
class Stage:
    """One training stage behind an export, from the tracetune.json of its merged export."""

    name: str  # "sft" | "grpo"
    step: int | None  # the exported step
    selected: str | None  # how that step was chosen: "last step" | "best validation accuracy"
    last_step: int | None  # the run's last step, when an earlier (best) step was exported
    run_dir: Path | None  # the stage's run directory, when it is still where the export says
    recorded_run: str | None = None  # the run directory as tracetune.json wrote it (maybe since moved)

    @property
    def label(self) -> str:
        return STAGE_LABELS.get(self.name, self.name)


@dataclass(frozen=True)
class Provenance:
    """What an export is and where it came from, as far as the files on disk say."""

    kind: str  # "merged" | "adapter" | "gguf"
    export_dir: Path
    own: dict[str, Any]  # the export's own file: tracetune.json, adapter.json or gguf.json
    scored_dir: Path  # the merged weights the harness scores: this export, or the one it came from
    base: str | None  # the first stage's base model: a registry name or a path
    stages: tuple[Stage, ...]  # first (SFT) to last (the stage that wrote this export)
    root: Path | None  # the `tracetune run` directory around the last stage, if any

    @property
    def last(self) -> Stage | None:
        return self.stages[-1] if self.stages else None


# ---------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if there is no such file."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path} is not readable JSON ({error}); the model card reads it: restore or remove it") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} holds a JSON {type(value).__name__}, not an object; the model card reads it")
    return value


def _read_yaml(path: Path) -> dict[str, Any] | None:
    """The YAML mapping in ``path`` (a run's config.yaml); None if there is no such file."""
    if not path.is_file():
        return None
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ExportError(f"{path} is not readable YAML ({error}); the model card reads it") from None
    return value if isinstance(value, dict) else None


def export_kind(export_dir: Path) -> str:
    """``"merged"``, ``"adapter"`` or ``"gguf"``: which file of ``KINDS`` the directory has."""
    for kind, marker in KINDS.items():
        if (export_dir / marker).is_file():
            return kind
    hint = f"; did you mean {export_dir / 'export' / 'merged'}?" if (export_dir / "export" / "merged").is_dir() else ""
    raise ExportError(f"{export_dir} is not a tracetune export (no {', '.join(KINDS.values())}): give RUN/export/merged, "
                      f"RUN/export/adapter or RUN/export/gguf{hint}")


def _find_dir(text: str | None, near: Path | None) -> Path | None:
    """The directory a path recorded at training time names now: as written, relative
    to a parent of ``near`` (a relative path was relative to the cwd of that time), or
    its last three parts under ``near``'s parent (a pipeline directory moved whole)."""
    if not text:
        return None
    path = Path(text)
    candidates = [path]
    if near is not None:
        near = near.resolve()
        if not path.is_absolute():
            candidates += [parent / path for parent in near.parents]
        if len(path.parts) >= 3:
            candidates.append(near.parent / Path(*path.parts[-3:]))
    return next((c for c in candidates if c.is_dir()), None)


def _run_dir(meta: Mapping[str, Any], export_dir: Path) -> Path | None:
    """A stage's run directory: the one the export sits in (RUN/export/KIND), else
    the one its tracetune.json names."""
    around = export_dir.parent.parent
    if export_dir.parent.name == "export" and any((around / f).exists() for f in ("config.yaml", "metrics.jsonl", "summary.json")):
        return around
    return _find_dir(meta.get("run"), export_dir)


def _stage(meta: Mapping[str, Any], export_dir: Path) -> Stage:
    return Stage(str(meta["stage"]), meta.get("step"), meta.get("selected"), meta.get("last_step"),
                 _run_dir(meta, export_dir), meta.get("run"))


def provenance(export_dir: Path) -> Provenance:
    """The export's kind, its stages (first to last) and its base model."""
    export_dir = Path(export_dir)
    kind = export_kind(export_dir)
    own = _read_json(export_dir / KINDS[kind]) or {}
    # The merged export holds the stage facts: an adapter's sibling, a GGUF's source
    # (gguf.json "from"; RUN/export/merged when it was written elsewhere).
    scored = export_dir if kind == "merged" else export_dir.parent / "merged"
    if kind == "gguf":
        scored = _find_dir(own.get("from"), export_dir) or scored
    meta = own if kind != "gguf" else _read_json(scored / KINDS["merged"]) or own
    stages: list[Stage] = []
    base = None
    where = export_dir if kind == "adapter" else scored
    while meta and len(stages) < MAX_CHAIN:
        base = meta.get("base")
        if not meta.get("stage"):  # a checkpoint tracetune wrote outside training: the chain's start
            break
        stage = _stage(meta, where)
        stages.append(stage)
        previous = _find_dir(base, stage.run_dir or where)
        meta = _read_json(previous / KINDS["merged"]) if previous is not None else None
        if meta:
            where = previous
    stages.reverse()
    last_run = stages[-1].run_dir if stages else None
    around = last_run.parent if last_run else None
    root = around if around and ((around / "pipeline.json").is_file() or (around / "eval").is_dir()) else None
    return Provenance(kind, export_dir, own, scored, base, tuple(stages), root)


def _config(stage: Stage | None) -> dict[str, Any]:
    return (_read_yaml(stage.run_dir / "config.yaml") or {}) if stage and stage.run_dir else {}


def _summary(stage: Stage | None) -> dict[str, Any]:
    return (_read_json(stage.run_dir / "summary.json") or {}) if stage and stage.run_dir else {}


def _field(config: Mapping[str, Any], dotted: str) -> Any:
    """``_field({"lora": {"rank": 16}}, "lora.rank")`` -> 16; None when absent."""
    value: Any = config
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def base_repo(base: str | None) -> str | None:
    """The Hugging Face repository of a registered base model (``gemma3-270m`` ->
    ``google/gemma-3-270m``); None for a path, ``tiny`` or an unknown name."""
    if not base:
        return None
    from tracetune.models.registry import MODELS  # the registry is the one list of models (it brings JAX)

    spec = MODELS.get(base)
    return spec.hf_repo if spec is not None else None


def _base_text(base: str | None) -> str:
    if not base:
        return "an unrecorded base model"
    from tracetune.models.registry import MODELS

    spec = MODELS.get(base)
    if spec is None:  # a path: its name only, a card carries no local paths
        return f"a local checkpoint (`{Path(base).name}`)"
    if spec.hf_repo is None:
        return f"`{base}` (tracetune's {spec.source} test model, random weights)"
    quantized = ", loaded from a quantized GGUF of it and dequantized" if spec.source == "gguf" else ""
    return f"[{spec.hf_repo}](https://huggingface.co/{spec.hf_repo}) (tracetune's `{base}`{quantized})"


# ---------------------------------------------------------------- front matter


def _datasets(config: Mapping[str, Any]) -> list[str]:
    """The Hugging Face dataset ids of the training data: GSM8K's, or a source that is
    itself a dataset id; none for a local file or a synthetic task."""
    from tracetune.data import SYNTHETIC, looks_local

    source = _field(config, "data.source")
    if not isinstance(source, str) or source in SYNTHETIC:
        return []
    if source in DATASET_IDS:
        return [DATASET_IDS[source]]
    return [source] if "/" in source and not looks_local(source) else []


def front_matter(p: Provenance, config: Mapping[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata (Hugging Face's model card fields)."""
    meta: dict[str, Any] = {}
    repo = base_repo(p.base)
    if repo:
        meta["base_model"] = repo
        meta["base_model_relation"] = RELATIONS[p.kind]
    meta["license"] = "gemma"
    datasets = _datasets(config)
    if datasets:
        meta["datasets"] = datasets
    names = {s.name for s in p.stages}
    tags = ["tracetune", "gemma3", "lora", *(n for n in ("sft", "grpo") if n in names), "reasoning", "math"]
    if p.kind == "gguf":
        tags.append("gguf")
    meta["tags"] = tags
    meta["pipeline_tag"] = "text-generation"
    meta["library_name"] = LIBRARIES[p.kind]
    return meta


# --------------------------------------------------------------------- sections


def _stage_line(stage: Stage) -> str:
    step = f"step {stage.step}" if stage.step is not None else "an unrecorded step"
    later = f"; the run went on to step {stage.last_step}" if stage.last_step else ""
    how = f" ({stage.selected}{later})" if stage.selected else ""
    run = f" in run `{stage.run_dir.name}`" if stage.run_dir else " (its run directory is not beside the export)"
    return f"{stage.label} {step}{how}{run}"


def model_section(p: Provenance) -> str:
    what = {
        "merged": "the LoRA adapters folded into the base weights: a plain Gemma 3 checkpoint in Hugging Face's "
                  "safetensors layout (`model.safetensors`, `config.json`, `tokenizer.model`), with `tracetune.json` "
                  "recording its exact config and origin",
        "adapter": "the LoRA adapters alone (`adapter.safetensors`: qwix's A and B factors per targeted projection; "
                   "`adapter.json`: base, rank, alpha, targets). They apply to the base named below; the merged "
                   "export beside them holds the same weights folded in",
        "gguf": "the merged weights converted to one GGUF file for llama.cpp and Ollama",
    }[p.kind]
    lines = [f"This export holds {what}.", ""]
    lines.append(f"- **Base model:** {_base_text(p.base)}")
    if p.stages:
        lines.append("- **Stages:** " + " -> ".join(_stage_line(s) for s in p.stages))
    else:
        lines.append("- **Stages:** not recorded (no tracetune.json for this export)")
    if p.kind == "adapter":
        lines.append(f"- **LoRA:** rank {p.own.get('rank')}, alpha {p.own.get('alpha')}, on `{p.own.get('targets')}`")
    if p.kind == "gguf":
        size = p.own.get("bytes")
        lines.append(f"- **GGUF:** `{p.own.get('file', '?')}`, tensor type {p.own.get('type', '?')}"
                     + (f", {size:,} bytes" if isinstance(size, int) else "") + f", sha256 `{p.own.get('sha256', '?')}`")
    return "\n".join(lines) + "\n"


def _portable_yaml(text: str, p: Provenance) -> str:
    """A run's config.yaml with the run directories' own paths (where they are now and
    where they were when trained) written as ``RUN``, and the home directory as ``~``:
    the card travels, local paths stay home."""
    roots = {p.root} if p.root else set()
    for stage in p.stages:
        roots |= {d.parent for d in (stage.run_dir, Path(stage.recorded_run) if stage.recorded_run else None) if d}
    forms = {str(r) for r in roots} | {str(r.resolve()) for r in roots}
    for form in sorted(forms - {".", ""}, key=len, reverse=True):  # the longest first: one may contain another
        text = text.replace(form + "/", "RUN/")
    return text.replace(str(Path.home()) + "/", "~/")


def training_section(p: Provenance) -> str:
    from tracetune.report import collect, training_section as runs_text

    if not p.stages:
        return "Not recorded: the export names no training run.\n"
    out = []
    for stage in p.stages:
        if stage.run_dir is None:
            out.append(f"- **{stage.label}:** its run directory is not beside the export, so its config and curves are not in this card.")
            continue
        config = _config(stage)
        section = config.get(stage.name) if isinstance(config.get(stage.name), dict) else {}
        fields = [f"`{key}` {value}" for key in HIGHLIGHTS.get(stage.name, ()) if (value := _field(section, key)) is not None]
        runs = collect([stage.run_dir])[1] if (stage.run_dir / "metrics.jsonl").is_file() else []
        curve = runs_text(runs).strip().removeprefix("- ") if runs else f"**{stage.run_dir.name}**: no metrics.jsonl"
        out.append(f"- {curve}" + (f"\n  - settings: {', '.join(fields)}" if fields else "\n  - settings: config.yaml not found"))
    text = "\n".join(out) + "\n"
    configs: dict[str, list[Stage]] = {}  # a pipeline's stages share one config: shown once
    for stage in p.stages:
        if stage.run_dir and (stage.run_dir / "config.yaml").is_file():
            yaml_text = _portable_yaml((stage.run_dir / "config.yaml").read_text(encoding="utf-8"), p)
            configs.setdefault(yaml_text, []).append(stage)
    for yaml_text, stages in configs.items():
        names = " and ".join(s.label for s in stages)
        text += (f"\n<details><summary>The resolved config of the {names} run{'s' if len(stages) > 1 else ''} "
                 f"(config.yaml; <code>--preset config.yaml</code> repeats it)</summary>\n\n"
                 f"```yaml\n{yaml_text.rstrip()}\n```\n\n</details>\n")
    return text


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def data_section(p: Provenance, config: Mapping[str, Any]) -> str:
    source = _field(config, "data.source")
    lines = []
    if source:
        from tracetune.data import SYNTHETIC

        ids = _datasets(config)
        named = (f"[{ids[0]}](https://huggingface.co/datasets/{ids[0]})" if ids
                 else f"tracetune's synthetic `{source}` task" if source in SYNTHETIC else f"`{Path(source).name}`")
        lines.append(f"Training data: {named}, curated into traces of the answer format (`tracetune data`): "
                     "each solution's lines become numbered steps, then a \"Therefore, ...\" conclusion and the answer.")
    else:
        lines.append("Training data: not recorded (no config.yaml beside the export).")
    note = ((_read_json(p.root / "pipeline.json") or {}).get("data") or {}).get("note") if p.root else None
    data_dir = p.root / "data" if p.root else None
    if note:
        lines.append(f"Curation: {note}.")
    elif data_dir and (data_dir / "train.jsonl").is_file():
        files = {split: data_dir / f"{split}.jsonl" for split in ("train", "validation")}
        counts = {split: _count_lines(path) for split, path in files.items() if path.is_file()}
        lines.append("Curation: " + " + ".join(f"{n} {split}" for split, n in counts.items()) + " traces.")
    else:
        lines.append("Curation counts: not recorded beside this run (no `tracetune run` directory with pipeline.json or data/).")
    return "\n\n".join(lines) + "\n"


def _same_dir(recorded: str | None, directory: Path) -> bool:
    """Whether an eval.json's ``model`` (a path as given then) is ``directory``."""
    if not recorded:
        return False
    path, target = Path(recorded), directory.resolve()
    if path.is_absolute():
        return path.resolve() == target
    return target.parts[-len(path.parts):] == path.parts  # relative to the cwd of that time


def _variants(p: Provenance) -> list:
    from tracetune.report import collect

    if p.root is None or not (p.root / "eval").is_dir():
        return []
    return collect([p.root / "eval"])[0]


def results_section(p: Provenance, variants: Sequence) -> str:
    from tracetune.report import harness_text, results_table

    if not variants:
        return ("No evaluation yet: none was found beside this run (a `tracetune run` directory's eval/); "
                "`tracetune eval --model MODEL_DIR` scores it.\n")
    text = harness_text(variants) + "\n\n" + results_table(variants)
    mine = [v for v in variants if _same_dir(v.result.settings.get("model"), p.scored_dir)]
    if mine:
        text += f"\nThis export is the **{mine[0].label}** row."
    elif p.last and any(v.result.out_dir.name == p.last.name for v in variants):
        label = next(v.label for v in variants if v.result.out_dir.name == p.last.name)
        text += f"\nThis export is the **{label}** row (matched by stage: its eval.json names another path)."
    else:
        text += "\nNone of these rows names this export's weights."
    if p.kind == "gguf":
        text += (f" The harness scored the merged weights before conversion; the GGUF's tensors are {p.own.get('type', 'converted')}, "
                 "and quantization can move these numbers.")
    elif p.kind == "adapter":
        text += " The harness scored the merged weights, which are these adapters folded into the base."
    return text + "\n"


def failures_section(variants: Sequence) -> str:
    from tracetune.report import failure_table

    if not variants:
        return "No evaluation yet, so no failure analysis.\n"
    return ("Every wrong or malformed answer of the harness gets one category with its evidence "
            "(counts and share of each variant's problems, one example each).\n\n" + failure_table(variants))


def reward_section(p: Provenance, config: Mapping[str, Any]) -> str:
    from tracetune.report import weights_text

    weights = _summary(p.last).get("reward_weights") or config.get("rewards")
    if not isinstance(weights, dict) or not weights:
        return "Reward weights: not recorded (no summary.json or config.yaml beside the export).\n"
    text = (f"The composite reward is R = sum_k w_k * r_k over the components {', '.join(weights)} (each in [0, 1]; "
            f"rewards.py), with the weights {weights_text(weights)}.")
    if {s.name for s in p.stages} <= {"sft"}:
        text += " SFT trains on the traces' token loss; these weights only score its held-out checks."
    return text + "\n"


def _example(config: Mapping[str, Any]) -> tuple[str, str]:
    """(question, target completion) of the first training problem with a worked
    solution in the run's source (or its mix's sources, in order; GSM8K's when none
    is shipped with tracetune), curated as SFT curates it. Open rows have none."""
    from tracetune.data import SHIPPED, SYNTHETIC, curate_solution, load_examples

    mix = _field(config, "data.mix") or []
    sources = [entry.get("source") for entry in mix if isinstance(entry, Mapping)] or [_field(config, "data.source")]
    for name in [s for s in sources if s in SHIPPED or s in SYNTHETIC] + ["gsm8k"]:
        for example in load_examples(name, "train", limit=20).examples:
            if example.kind != "open" and example.solution:
                return example.question, curate_solution(example.solution, example.reference)
    raise AssertionError("the shipped GSM8K has worked solutions")


def prompt_section(p: Provenance, config: Mapping[str, Any]) -> tuple[str, str, str]:
    """(section text, the example question, its prompt), for the usage snippets."""
    from tracetune.format import build_prompt

    style = _field(config, "data.prompt_style") or p.own.get("prompt_style") or "plain"
    question, completion = _example(config)
    prompt = build_prompt(question, style)
    budget = _field(config, "eval.max_new_tokens")
    text = (f"The model was trained on the `{style}` prompt (tracetune's `format.build_prompt`) and answers in the trace format. "
            f"An example prompt:\n\n```text\n{prompt}```\n\nand the curated completion SFT trained on for it:\n\n"
            f"```text\n{completion}\n```\n\nThe answer is the number inside `<answer>`; greedy decoding"
            + (f" with {budget} new tokens is what the harness scores" if budget else " is what the harness scores") + ".\n")
    return text, question, prompt


def usage_section(p: Provenance, question: str, prompt: str, published_as: str | None) -> str:
    hub, _, name = (published_as or "").partition(":")
    # A JSON string is a Python literal; the shell gets single quotes (GSM8K has "$"s),
    # and llama.cpp turns the prompt's written "\n"s back into newlines itself.
    quoted, asked, raw = json.dumps(prompt), shlex.quote(question), shlex.quote(prompt.replace("\n", "\\n"))
    if p.kind == "merged":
        where = f'"{name}"' if hub == "hf" else "path" if hub == "kaggle" else '"MODEL_DIR"'
        imports = (("import kagglehub\n" if hub == "kaggle" else "")
                   + "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n")
        fetch = f'path = kagglehub.model_download("{name}")\n' if hub == "kaggle" else ""
        model_arg = published_as or "MODEL_DIR"
        # <bos> is put first by hand: from tokenizer.model alone, transformers' Gemma
        # tokenizer does not add it, and Gemma (like tracetune's tokenizer) expects it.
        return (
            f"With tracetune{'' if published_as else ' (`MODEL_DIR`: this directory)'}:\n\n"
            f"```bash\ntracetune eval --model {model_arg}\ntracetune generate --model {model_arg} {asked}\n```\n\n"
            "With transformers (the prompt starts with `<bos>`, as in training):\n\n"
            f"```python\n{imports}{fetch}"
            f"model = AutoModelForCausalLM.from_pretrained({where})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({where})\n"
            f"ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode({quoted}, add_special_tokens=False)])\n"
            "output = model.generate(ids, max_new_tokens=256, do_sample=False)\n"
            "print(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))\n```\n"
        )
    if p.kind == "adapter":
        return ("These are tracetune's own LoRA factors (qwix's layout, not PEFT's): `tracetune.lora.set_lora_params` "
                "puts them on a model that `tracetune.lora.apply_lora` prepared with the same rank, alpha and targets. "
                "To run the model, load the merged export beside them instead (`tracetune eval --model MODEL_DIR`, or "
                "transformers' `AutoModelForCausalLM.from_pretrained`).\n")
    file = p.own.get("file") or "model.gguf"
    tag = name.split("/")[1].lower() if name else "tracetune"  # hf:OWNER/NAME, kaggle:OWNER/MODEL/...
    return (
        "With llama.cpp: the model was trained on a plain prompt, not a chat turn, so run a raw completion "
        "(`llama-cli -m` alone opens a chat that wraps the prompt in Gemma's turns):\n\n"
        f"```bash\nllama-completion -m {file} -p {raw} -n 256 --temp 0\n"
        f"# older llama.cpp builds: llama-cli -m {file} -no-cnv -p ... -n 256 --temp 0\n```\n\n"
        "With Ollama (the Modelfile beside the GGUF names it and the prompt template):\n\n"
        f"```bash\nollama create {tag} -f Modelfile\nollama run {tag} {asked}\n```\n\n"
        f"With tracetune: `tracetune eval --model MODEL_DIR/{file}`.\n"
    )


def license_section() -> str:
    return (f"A derivative of Gemma 3: its use is governed by the [Gemma Terms of Use]({GEMMA_TERMS}) "
            "and Google's Gemma Prohibited Use Policy, which pass on to anyone this model is shared with.\n")


# ------------------------------------------------------------------------- card


def _title(p: Provenance) -> str:
    stages = " + ".join(s.label for s in p.stages) or "tracetune"
    kind = {"merged": "merged weights", "adapter": "LoRA adapter", "gguf": "GGUF"}[p.kind]
    repo = base_repo(p.base)
    base = repo.split("/")[-1] if repo else (Path(p.base).name if p.base else "model")
    return f"{base}, {stages} with tracetune ({kind})"


def _intro(p: Provenance) -> str:
    how = {"sft": "LoRA SFT on curated step-by-step traces", "grpo": "GRPO on a composite reward"}
    steps = ", then ".join(how.get(s.name, s.name) for s in p.stages) or "training not recorded"
    return ("A Gemma 3 model fine-tuned with tracetune (JAX, Tunix) to solve grade-school math word problems and "
            "show its work as `<reasoning>Step 1: ... Therefore, ...</reasoning><answer>N</answer>`: "
            f"{steps}.\n")


def model_card(export_dir: Path, *, published_as: str | None = None) -> str:
    """The README.md text of ``export_dir`` (RUN/export/merged, adapter or gguf).

    published_as: where it is being published (``hf:OWNER/NAME``, ``kaggle:...``), so
    the loading examples name it; None writes them for a local directory.
    """
    p = provenance(Path(export_dir))
    config = _config(p.last)
    variants = _variants(p)
    prompt_text, question, prompt = prompt_section(p, config)
    head = yaml.safe_dump(front_matter(p, config), sort_keys=False, allow_unicode=True)
    sections = [
        f"---\n{head}---\n{CARD_MARKER}\n\n# {_title(p)}\n",
        _intro(p),
        "## Model\n\n" + model_section(p),
        "## Training\n\n" + training_section(p),
        "## Data\n\n" + data_section(p, config),
        "## Results\n\n" + results_section(p, variants),
        "## Failure analysis\n\n" + failures_section(variants),
        "## Reward\n\n" + reward_section(p, config),
        "## Prompt format\n\n" + prompt_text,
        "## How to use\n\n" + usage_section(p, question, prompt, published_as),
        "## License\n\n" + license_section(),
    ]
    return "\n".join(sections)


def is_card(path: Path) -> bool:
    """Whether ``path`` is a README.md this module wrote (and may rewrite)."""
    try:
        return CARD_MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def write_card(export_dir: Path, *, published_as: str | None = None) -> Path:
    """Write ``export_dir/README.md`` (atomically); returns its path. A README.md that
    tracetune did not write is never overwritten: that is an ExportError."""
    path = Path(export_dir) / "README.md"
    if path.exists() and not is_card(path):
        raise ExportError(f"{path} was not written by tracetune (edited by hand?); move it away to get a fresh model card")
    text = model_card(export_dir, published_as=published_as)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
