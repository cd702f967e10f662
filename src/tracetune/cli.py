"""The ``tracetune`` command: one sub-command per stage, wiring only.

Errors the user can fix (bad data, bad config) print one line and exit with 2;
nothing here holds training or scoring logic.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tracetune import data as data_mod
from tracetune import files, scoring
from tracetune.files import atomic_path
from tracetune.errors import DamagedFile, DiskFull, ExportError, Interrupted, TimeLimitReached, TrainingError
from tracetune.models.errors import ModelError
from tracetune.config import Config, ConfigError, RewardWeights, load_config, reward_defaults, save_config

app = typer.Typer(
    help="tracetune: teach small language models to show their work (SFT + GRPO on Tunix).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

PresetOpt = Annotated[str, typer.Option("--preset", help="Preset name (see `tracetune presets`) or a saved config.yaml.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config field, e.g. --set data.seed=7 (repeatable)."),
]
MeshOpt = Annotated[
    Optional[str],
    typer.Option("--mesh", help="Hardware preset for the device mesh: v5e-8 (TPU, 8 chips), gpu-1, gpu-8, pod (multi-host, "
                                "every device). Sets mesh.fsdp / mesh.tp / mesh.distributed; --set mesh.fsdp=2 --set mesh.tp=4 "
                                "gives any other shape. Default: the preset's mesh (one device)."),
]
SourceOpt = Annotated[
    Optional[str],
    typer.Option("--source", help="'gsm8k' (shipped), a JSONL file, or a Hugging Face dataset id. Default: the preset's data.source."),
]
SkipOpt = Annotated[
    bool,
    typer.Option("--skip-invalid", help="Skip malformed rows (they are counted and listed) instead of stopping at the first."),
]
# The components and their order come from the reward registry (rewards.REWARDS).
_WEIGHTS_BY_NAME = ",".join(f"{name}={weight:g}" for name, weight in reward_defaults().items())
REWARD_WEIGHTS_HELP = (f"Composite reward weights by name, e.g. {_WEIGHTS_BY_NAME} (a component not named weighs 0), "
                       f"or by position in the order {','.join(reward_defaults())}, e.g. 0.6,0,0.15 for the no-trace "
                       "ablation. Default: the preset's.")


def _config(preset: str, overrides: list[str] | None, mesh: str | None = None, **fields: object) -> Config:
    """The preset, then the mesh preset, then --set overrides, then explicit options (which win)."""
    pairs = list(overrides or [])
    pairs += [f"{key}={value}" for key, value in fields.items() if value is not None]
    return load_config(preset, pairs, mesh=mesh)


def _join(cfg: Config) -> None:
    """Join the multi-host run the environment describes (mesh.distributed); before
    anything touches a device. Only the training commands do: they shard over every
    host, while evaluation runs on the first host alone."""
    from tracetune import mesh as mesh_lib

    if mesh_lib.initialize(cfg.mesh):
        import jax

        err_console.print(f"host {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices in all")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=True,
    )


def _report_skipped(skipped: list[Exception]) -> None:
    if skipped:
        err_console.print(f"[yellow]skipped {len(skipped)} invalid row(s):[/yellow]")
        for error in skipped[:20]:
            err_console.print(f"  {error}", markup=False)
        if len(skipped) > 20:
            err_console.print(f"  ... and {len(skipped) - 20} more")


def _metrics_table(title: str, metrics: dict[str, scoring.Estimate]) -> Table:
    table = Table(title=title)
    for column, justify in (("Metric", "left"), ("Value", "right"), ("95% CI", "right"), ("n", "right")):
        table.add_column(column, justify=justify)
    for row in scoring.metrics_rows(metrics):
        table.add_row(*row)
    return table


def _domain_table(title: str, domains) -> Table:
    """The per-domain table (``evaluate.domain_rows``), as metrics.md has it."""
    from rich.markup import escape

    from tracetune.evaluate import domain_rows

    header, rows = domain_rows(domains)
    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(escape(row[0]), *row[1:])  # a domain is the data's text: never markup
    return table


def _score_all(rows: list[scoring.CompletionRow], weights: RewardWeights) -> list[scoring.SampleScore]:
    scores = []
    with _progress() as progress:
        task = progress.add_task("scoring", total=len(rows))
        for r in rows:
            scores.append(scoring.score_sample(r.question, r.reference, r.completion, r.answer_logprobs, weights=weights,
                                               id=r.id, kind=r.kind, choices=r.choices))
            progress.advance(task)
    return scores


@app.command()
def presets() -> None:
    """List the config presets shipped with tracetune, and the hardware (mesh)
    presets that --mesh lays over any of them."""
    from tracetune.config import mesh_preset_names, preset_names

    for name in preset_names():
        console.print(name)
    for name in mesh_preset_names():
        console.print(f"--mesh {name}")


@app.command("data")
def data_cmd(
    out: Annotated[Path, typer.Option(help="Directory for train.jsonl and validation.jsonl of curated traces.")] = Path("runs/data"),
    split: Annotated[str, typer.Option(help="Split of the source to curate.")] = "train",
    source: SourceOpt = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Share held out for validation (seeded). Default: preset's data.val_fraction.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the train/validation split. Default: preset's data.seed (42).")] = None,
    skip_invalid: SkipOpt = False,
    preset: PresetOpt = "default",
    set_: SetOpt = None,
) -> None:
    """Curate SFT traces from GSM8K-shaped data and write them as JSONL.

    Prints the counts, what was dropped and why, and length percentiles.
    """
    config = _config(preset, set_, **{"data.source": source, "data.val_fraction": val_fraction, "data.seed": seed})
    cfg = config.data
    # The length filter needs a tokenizer, which comes with a model; until one is
    # given, no trace is dropped for length and the report says so.
    result, skipped, described = data_mod.curate_data(cfg, split, skip_invalid=skip_invalid)
    _report_skipped(skipped)
    paths = result.write(out)
    save_config(config, out / "config.yaml")

    table = Table(title=f"Curated traces from {described} ({split if not cfg.mix else 'training splits'})")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows_read = len(result.train) + len(result.validation) + sum(result.dropped.values()) if not cfg.mix else None
    if rows_read is not None:
        table.add_row("rows read", str(rows_read + len(skipped)))
    table.add_row("invalid rows skipped", str(len(skipped)))
    for reason, count in sorted(result.dropped.items()):
        table.add_row(f"dropped: {reason}", str(count))
    for name, count in result.sources.items():
        table.add_row(f"traces from {name}" + (" (GRPO only)" if not count else ""), str(count))
    table.add_row("train traces", str(len(result.train)))
    table.add_row("validation traces", str(len(result.validation)))
    console.print(table)

    traces = result.train + result.validation
    lengths = Table(title="Trace lengths")
    lengths.add_column("measure")
    for q in ("p50", "p90", "p99", "p100"):
        lengths.add_column(q if q != "p100" else "max", justify="right")
    for label, values in (
        ("characters (prompt + completion)", [len(t.prompt) + len(t.completion) for t in traces]),
        ("steps", [t.n_steps for t in traces]),
    ):
        p = data_mod.percentiles(values)
        lengths.add_row(label, *(str(p.get(q, "-")) for q in ("p50", "p90", "p99", "p100")))
    console.print(lengths)
    console.print("length filter: off (token counts need a model's tokenizer)")
    for split_name, path in paths.items():
        console.print(f"wrote {path} ({split_name})")


@app.command()
def validate(
    split: Annotated[str, typer.Option(help="Split to curate and score.")] = "train",
    source: SourceOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write per-sample scores, metrics.json and metrics.md here.")] = None,
    skip_invalid: SkipOpt = False,
    preset: PresetOpt = "default",
    set_: SetOpt = None,
) -> None:
    """Sanity-check the evaluation: score the curated SFT targets as if a model wrote them.

    Passes with 100% accuracy, 100% format rate and an average trace score of at
    least 0.9; lists every target that fails (a failure is a curation bug).
    """
    config = _config(preset, set_, **{"data.source": source})
    cfg = config.data
    # Every example is a target here: no validation hold-out.
    curated, skipped, described = data_mod.curate_data(cfg, split, val_fraction=0.0, skip_invalid=skip_invalid)
    _report_skipped(skipped)
    rows = [scoring.CompletionRow(t.id, t.question, t.reference, t.completion, kind=t.kind, choices=t.choices) for t in curated.train]
    scores = _score_all(rows, config.rewards)
    metrics = scoring.aggregate(scores)
    console.print(_metrics_table(f"Curated targets of {described} ({split}) scored as completions", metrics))
    console.print("confidence and composite need the model's log-probabilities: n/a for targets.")
    if out:
        paths = scoring.write_scores(scores, metrics, out)
        console.print(f"wrote {paths['samples']}, {paths['metrics']}, {paths['table']}")

    failures = [s for s in scores if not (s.correct and s.well_formed)]
    for s in failures[:50]:
        console.print(f"[red]FAIL[/red] {s.id}: correct={s.correct} well_formed={s.well_formed} answer={s.answer!r} reference={s.reference}")
    # open rows have no reference to write a target with: GRPO-only by design, not a curation bug
    faults = {reason: ids for reason, ids in curated.dropped_ids.items() if reason != data_mod.NO_REFERENCE}
    for reason, ids in faults.items():
        console.print(f"[red]DROPPED[/red] {len(ids)} target(s): {reason}: {', '.join(ids[:10])}")
    if open_rows := curated.dropped.get(data_mod.NO_REFERENCE):
        console.print(f"{open_rows} open row(s) have no target (judged only, GRPO): not checked")
    problems = scoring.validation_problems(metrics)
    if faults:
        problems.append(f"{sum(len(ids) for ids in faults.values())} example(s) could not be curated")
    if problems:
        for problem in problems:
            err_console.print(f"[red]validate failed:[/red] {problem}")
        raise typer.Exit(1)
    console.print(f"[green]validate passed[/green] on {len(scores)} targets.")


@app.command()
def score(
    completions: Annotated[Path, typer.Argument(help="JSONL with question, reference (or a GSM8K answer), completion, and optionally answer_logprobs or token_texts + token_logprobs.")],
    out: Annotated[Optional[Path], typer.Option(help="Directory for samples.jsonl, metrics.json and metrics.md. Default: beside the input, <name>.scores/.")] = None,
    reward_weights: Annotated[Optional[str], typer.Option(help=REWARD_WEIGHTS_HELP)] = None,
    skip_invalid: SkipOpt = False,
    preset: PresetOpt = "default",
    set_: SetOpt = None,
) -> None:
    """Score a file of completions with the fixed harness and print the metrics table."""
    config = _config(preset, set_)
    weights = RewardWeights.parse(reward_weights) if reward_weights else config.rewards
    rows, skipped = scoring.read_completions(completions, skip_invalid=skip_invalid)
    _report_skipped(skipped)
    scores = _score_all(rows, weights)
    metrics = scoring.aggregate(scores)
    out = out or completions.with_suffix(".scores")
    paths = scoring.write_scores(scores, metrics, out)
    console.print(_metrics_table(f"Scores of {completions} ({len(scores)} scored, {len(skipped)} skipped)", metrics))
    console.print(f"wrote {paths['samples']}, {paths['metrics']}, {paths['table']}")
    (out / "run.json").write_text(json.dumps({"input": str(completions), "weights": weights.as_dict(), "scored": len(scores), "skipped": len(skipped)}, indent=2) + "\n")


@app.command()
def generate(
    question: Annotated[Optional[str], typer.Argument(help="A question to answer (or use --input).")] = None,
    model: Annotated[str, typer.Option(help="Model name (gemma3-270m, gemma3-1b-it, tiny, ...), a checkpoint path, a finished run directory (its export/merged), a Gemma 3 .gguf, or a published export (hf:OWNER/NAME, kaggle:...).")] = "gemma3-270m",
    weights: Annotated[Optional[str], typer.Option(help="For Hugging Face models: a local safetensors directory, hf:REPO or kaggle:HANDLE.")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", help="JSONL with a 'question' per row; every row's fields are kept in the output.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="JSONL to write, one row per input row (with --input).")] = None,
    prompt_style: Annotated[Optional[str], typer.Option(help="'plain' (Q: ... A:) or 'chat' (Gemma turns). Default: chat for -it models, else plain.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Token budget per completion.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy decoding.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off, at most 64).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed; the same seed gives the same output.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together (rounded up to a power of two).")] = 8,
    dtype: Annotated[str, typer.Option(help="Parameter dtype: float32 or bfloat16.")] = "float32",
) -> None:
    """Generate reasoning traces: one question on the command line, or a JSONL batch."""
    from tracetune.format import build_prompt
    from tracetune.generate import Generator, SamplingConfig
    from tracetune.models.registry import load_model

    if (question is None) == (input is None):
        raise typer.BadParameter("give either a QUESTION or --input FILE.jsonl")
    if input is not None and output is None:
        raise typer.BadParameter("--input needs --output FILE.jsonl")
    rows = [{"question": question}]
    if input is not None:
        rows = []
        for line, row in data_mod.read_jsonl(input):
            if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                raise data_mod.DataError(str(input), line, "question", "missing or not a string")
            rows.append(row)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    with err_console.status(f"loading {model}"):
        loaded = load_model(model, dtype=dtype, weights=weights)
    style = prompt_style or ("chat" if loaded.chat else "plain")
    prompts = [build_prompt(r["question"], style) for r in rows]
    generator = Generator(loaded.model, loaded.tokenizer, max_batch=batch_size)
    with _progress() as progress:
        task = progress.add_task("generating", total=len(prompts))
        results = generator.generate(prompts, sampling, progress=lambda n: progress.advance(task, n))
    stats = generator.stats
    err_console.print(
        f"{stats.generated_tokens} tokens in {stats.seconds:.1f} s "
        f"({stats.generated_tokens / max(stats.seconds, 1e-9):.1f} tok/s, compilation included)"
    )
    if input is None:
        console.print(f"[bold]prompt[/bold]\n{prompts[0]}", markup=True, highlight=False)
        console.print("[bold]completion[/bold]", markup=True)
        console.print(results[0].text, markup=False, highlight=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row, prompt, result in zip(rows, prompts, results):
            record = {**row, "prompt": prompt, "completion": result.text, "finish_reason": result.finish_reason,
                      "token_texts": result.token_texts, "token_logprobs": result.token_logprobs}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    console.print(f"wrote {len(results)} completions to {output}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "model"


def _failure_table(rows, total: int) -> Table:
    table = Table(title=f"Failures ({sum(r.count for r in rows)} of {total} samples)")
    for column, justify in (("Category", "left"), ("Count", "right"), ("Share", "right"), ("Example", "left")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row.label, str(row.count), f"{row.share:.0%}", f"{row.example_id}: {row.example_evidence}")
    return table


def _judge(cfg: Config, result) -> None:
    """Rate the evaluation's samples with the configured LLM judge and print the summary,
    then the per-domain table again with the judge's scores."""
    from tracetune.evaluate import directory_domains, judge_directory, judge_settings
    from tracetune.judge import JudgeConfig

    judge = judge_settings(cfg) or JudgeConfig.from_env()  # from_env names what is missing
    with _progress() as progress:
        task = progress.add_task(f"judging with {judge.model}", total=min(judge.samples, len(result.records)))
        summary = judge_directory(result.out_dir, judge, progress=lambda n: progress.advance(task, n))
    if summary["scored"]:
        console.print(f"judge {judge.model}: mean {summary['mean']:.2f} [{summary['low']:.2f}, {summary['high']:.2f}] "
                      f"on {summary['scored']} samples ({summary['unscored']} unscored); "
                      f"histogram 1-5: {' '.join(str(summary['histogram'][str(k)]) for k in range(1, 6))}")
    else:
        console.print(f"judge {judge.model}: no sample could be scored ({summary['unscored']} unscored; see judge.json)")
    domains = directory_domains(result.out_dir, result.records)
    if domains:
        console.print(_domain_table(f"Per domain, judged by {judge.model} ({summary['scored']} of {summary['n']} rated samples "
                                    f"scored), 95% intervals", domains))


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="Model to evaluate: a name (gemma3-270m, gemma3-1b-it, tiny, ...), a checkpoint path, a Gemma 3 .gguf, or a published export (hf:OWNER/NAME, kaggle:...).")] = "gemma3-270m",
    checkpoint: Annotated[Optional[Path], typer.Option(help="A finished SFT or GRPO run directory: evaluates its merged export instead of --model.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of data.source to score, or held-out: the validation problems SFT and GRPO hold out of the train split (choose on these, not on test). Default: the preset's eval.split (test).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Score the first N problems (0 = all). Default: the preset's eval.limit.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Evaluation directory (eval.json, samples.jsonl, metrics.json, metrics.md). Default: runs/eval/<model>-<split>.")] = None,
    shots: Annotated[Optional[int], typer.Option(help="Worked examples before each question: the first N SFT traces of the training data (never a held-out or test problem). A base model's fair baseline: zero-shot it has not seen the trace format. Default: the preset's eval.shots (0).")] = None,
    judge: Annotated[bool, typer.Option("--judge/--no-judge", help="Also rate reasoning 1-5 with an LLM judge (an OpenAI-compatible endpoint; see --judge-url).")] = False,
    judge_url: Annotated[Optional[str], typer.Option(help="Judge base URL, e.g. http://127.0.0.1:8000/v1. Default: eval.judge_base_url, then $TRACETUNE_JUDGE_BASE_URL or $OPENAI_BASE_URL.")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="Judge model name. Default: eval.judge_model, then $TRACETUNE_JUDGE_MODEL.")] = None,
    judge_samples: Annotated[Optional[int], typer.Option(help="How many scored samples the judge rates (seeded choice). Default: eval.judge_samples (50).")] = None,
    preset: PresetOpt = "cpu-demo",
    set_: SetOpt = None,
    mesh: MeshOpt = None,
) -> None:
    """The fixed harness: greedy completions of the same problems with the same prompt
    and token budget for every model variant, scored with 95% confidence intervals.

    Writes per-sample records (with a failure category and its evidence for every
    wrong answer) and the metrics; re-running skips the samples already scored.
    """
    from tracetune.evaluate import evaluate, problems
    from tracetune.models.registry import load_model

    cfg = _config(preset, set_, mesh, **{"eval.split": split, "eval.limit": limit, "eval.shots": shots, "eval.judge_base_url": judge_url,
                                   "eval.judge_model": judge_model, "eval.judge_samples": judge_samples})
    from tracetune import mesh as mesh_lib

    if cfg.mesh.distributed != "off" and mesh_lib.cluster_requested() and mesh_lib.host_id() != 0:
        # Greedy decoding of a model that fits one host: host 0 scores it; the
        # others would only repeat its work and race on the same files.
        err_console.print(f"evaluation runs on host 0 of this multi-host run; host {mesh_lib.host_id()} has nothing to do")
        return
    source = str(checkpoint) if checkpoint is not None else model
    directory = out or Path("runs") / "eval" / f"{_slug(Path(source).name if checkpoint else source)}-{cfg.eval.split}"
    examples = problems(cfg)
    with err_console.status(f"loading {source}"):
        loaded = load_model(source, dtype=cfg.eval.dtype)
    with _progress() as progress:
        task = progress.add_task(f"evaluating {directory.name}", total=len(examples))
        result = evaluate(loaded, examples, directory, cfg, progress=lambda n: progress.advance(task, n))
    shots_note = f", {cfg.eval.shots}-shot" if cfg.eval.shots else ""
    console.print(_metrics_table(f"{source} on {result.settings['source']} {cfg.eval.split} ({len(result.records)} problems, greedy, "
                                 f"{cfg.eval.max_new_tokens} tokens{shots_note})", result.metrics))
    if result.domains:
        console.print(_domain_table(f"Per domain ({len(result.domains)}), 95% intervals", result.domains))
    if result.failure_rows:
        console.print(_failure_table(result.failure_rows, len(result.records)))
    if judge:
        _judge(cfg, result)
    console.print(f"wrote {directory}/samples.jsonl, metrics.json, metrics.md")


@app.command()
def sft(
    preset: PresetOpt = "cpu-demo",
    overrides: SetOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Run directory (config, checkpoints, metrics, samples, export). Default: runs/<preset>/sft.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model name or checkpoint path. Default: the preset's sft.model.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer updates (0 = the preset's epochs). Default: the preset's sft.max_steps.")] = None,
    mesh: MeshOpt = None,
) -> None:
    """Stage 1: LoRA fine-tuning on curated traces. Re-running the same command resumes
    from the run's latest checkpoint; SIGTERM or Ctrl-C saves one before stopping."""
    from tracetune.sft import train_sft

    cfg = _config(preset, overrides, mesh, **{"sft.model": model, "sft.max_steps": max_steps})
    _join(cfg)
    directory = run_dir or Path("runs") / cfg.preset / "sft"
    result = train_sft(cfg, directory)
    final = result.evals[-1] if result.evals else {}
    console.print(f"sft finished: {result.steps} updates in {result.seconds:.0f} s, final loss {result.final_loss:.4f}"
                  if result.final_loss is not None else f"sft finished: {result.steps} updates")
    if final:
        console.print(f"held-out format rate {final['eval/format_rate']:.1%}, accuracy {final['eval/accuracy']:.1%} ({final['eval/examples']} traces)")
    console.print(f"merged weights: {result.merged_dir}  (tracetune generate --model {result.merged_dir} ...)")
    console.print(f"LoRA adapter: {result.adapter_dir}")


@app.command()
def grpo(
    preset: PresetOpt = "cpu-demo",
    overrides: SetOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Run directory (config, checkpoints, metrics, samples, export). Default: runs/<preset>/grpo.")] = None,
    init: Annotated[Optional[str], typer.Option(help="SFT run directory (or model) to start from; also the KL reference. Default: runs/<preset>/sft.")] = None,
    reward_weights: Annotated[Optional[str], typer.Option(help=REWARD_WEIGHTS_HELP)] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="GRPO updates. Default: the preset's grpo.max_steps.")] = None,
    mesh: MeshOpt = None,
) -> None:
    """Stage 2: GRPO from the SFT policy with the composite reward R = sum_k w_k
    component_k over the registered rewards (--reward-weights). Re-running the same command
    resumes from the run's latest checkpoint; SIGTERM or Ctrl-C saves one first."""
    from tracetune.grpo import train_grpo

    fields: dict[str, object] = {"grpo.init": init, "grpo.max_steps": max_steps}
    if reward_weights is not None:
        weights = RewardWeights.parse(reward_weights)
        fields.update({f"rewards.{k}": v for k, v in weights.as_dict().items()})
    cfg = _config(preset, overrides, mesh, **fields)
    _join(cfg)
    result = train_grpo(cfg, run_dir or Path("runs") / cfg.preset / "grpo")
    summary = json.loads((result.run_dir / "summary.json").read_text())
    table = Table(title=f"GRPO: {result.steps} updates in {result.seconds / 60:.1f} min")
    table.add_column("mean")
    table.add_column("first quarter", justify="right")
    table.add_column("last quarter", justify="right")
    for key, value in summary["first_quarter"].items():
        table.add_row(key, f"{value:.3f}", f"{summary['last_quarter'].get(key, float('nan')):.3f}")
    console.print(table)
    console.print(f"merged weights: {result.merged_dir}")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Model to serve: a name (gemma3-270m, tiny, ...), a checkpoint path, a finished run directory, a Gemma 3 .gguf, or a published export (hf:OWNER/NAME, kaggle:...).")] = "gemma3-270m",
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1-65535).", min=1, max=65535)] = 8000,
    name: Annotated[Optional[str], typer.Option(help="Model name reported by the API. Default: --model.")] = None,
    max_batch: Annotated[int, typer.Option(help="Greedy requests with the same settings are decoded together, up to this many.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Default completion budget when a request gives none.")] = 256,
    dtype: Annotated[str, typer.Option(help="Parameter dtype: float32 or bfloat16.")] = "float32",
) -> None:
    """An OpenAI-compatible HTTP endpoint (/v1/models, /v1/chat/completions,
    /v1/completions) around a tracetune model: a local judge for `tracetune eval
    --judge`, or a backend for any OpenAI client."""
    from tracetune.models.registry import load_model
    from tracetune.serve import serve as run_server

    with err_console.status(f"loading {model}"):
        loaded = load_model(model, dtype=dtype)
    err_console.print(f"serving {name or model} on http://{host}:{port}/v1")
    run_server(loaded, host=host, port=port, model_name=name or model, max_batch=max_batch, default_max_tokens=max_tokens)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories: a `tracetune run` directory, evaluation directories (eval.json) and/or SFT/GRPO run directories. Several are compared side by side (e.g. an ablation).")],
    out: Annotated[Optional[Path], typer.Option(help="Directory for report.md and its PNG plots. Default: <first run>/report.")] = None,
    title: Annotated[str, typer.Option(help="The report's title.")] = "tracetune results",
) -> None:
    """A Markdown report: the results table (every variant side by side, with 95%
    intervals), failure categories, judge scores, training curves and sample outputs."""
    from tracetune.report import write_report

    path = write_report(runs, out or runs[0] / "report", title=title)
    console.print(f"wrote {path} (and its plots beside it)")


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="A finished SFT or GRPO run directory (its export/merged), or a merged model directory.")],
    format: Annotated[str, typer.Option("--format", help="What to write: 'gguf' (llama.cpp, LM Studio, Ollama).")] = "gguf",
    type: Annotated[str, typer.Option("--type", help="GGUF tensor type of the matrices: f32 (exact), f16 (half the size) or q8_0 (a quarter); norms stay f32.")] = "f16",
    out: Annotated[Optional[Path], typer.Option(help="Output directory. Default: RUN/export/gguf.")] = None,
    check: Annotated[int, typer.Option(help="Read the GGUF back with tracetune and compare its weights and greedy tokens with the merged model's on this many GSM8K training questions (0: no check).")] = 0,
    check_tokens: Annotated[int, typer.Option(help="Greedy tokens per question for --check.")] = 128,
) -> None:
    """Export a trained model as a GGUF with an Ollama Modelfile and a model card
    (`ollama create NAME -f RUN/export/gguf/Modelfile`)."""
    from tracetune import export
    from tracetune.models.params import write_json

    if format != "gguf":
        raise ConfigError(f"--format must be 'gguf', got {format!r} (merged safetensors and LoRA adapters are already in RUN/export)")
    result = export.export_gguf(run, type, out)
    console.print(f"wrote {result.file} ({result.bytes / 2**20:.0f} MiB, {result.kind}, sha256 {result.sha256[:12]}..., "
                  f"{result.seconds:.0f} s), {result.directory / 'Modelfile'} and {result.directory / 'README.md'}")
    if check:
        from tracetune.format import build_prompt

        questions = [e.question for e in data_mod.load_examples("gsm8k", "train", limit=check).examples]
        style = export.prompt_style(run)
        prompts = [build_prompt(q, style) for q in questions]
        result_check = export.check_gguf(result.file, export.merged_dir(run), prompts, check_tokens)
        write_json(result_check.as_dict(), result.directory / "check.json")
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in result_check.max_abs_diff.items())
        console.print(f"read back by tracetune: max |difference| {diffs}; greedy tokens identical on "
                      f"{result_check.identical} of {result_check.prompts} questions "
                      f"({result_check.agreeing_prefix} of {result_check.tokens} tokens before the first difference)")


@app.command()
def publish(
    export: Annotated[Path, typer.Argument(help="An export directory: RUN/export/merged (Hugging Face safetensors), RUN/export/adapter (LoRA) or RUN/export/gguf.")],
    to: Annotated[str, typer.Option("--to", help="Where: hf:OWNER/NAME (a Hugging Face model repository) or kaggle:OWNER/MODEL/FRAMEWORK/VARIATION (a Kaggle model variation; FRAMEWORK: transformers for merged, gguf for gguf, jax for adapter).")],
    public: Annotated[bool, typer.Option("--public", help="Create a new repository or Kaggle model public. Default: private. An existing one keeps its visibility.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List each file that would be uploaded with its size, and the total; check nothing remote, need no credentials, upload nothing.")] = False,
) -> None:
    """Upload an export to the Hugging Face hub or Kaggle, with its model card (README.md,
    rewritten from the run's files first). Credentials: HF_TOKEN (or `hf auth login`);
    KAGGLE_USERNAME and KAGGLE_KEY (or ~/.kaggle/kaggle.json). A name that holds anything but
    a tracetune export of the same kind is refused; a failed upload leaves nothing behind."""
    from tracetune.publish import Published, human_size
    from tracetune.publish import publish as upload_export

    result = upload_export(export, to, public=public, dry_run=dry_run)
    upload = result.upload if isinstance(result, Published) else result
    width = max(len(f"{size:,}") for _, size in upload.files)
    for path, size in upload.files:
        card = "  (model card, written before the upload)" if path == "README.md" and upload.card is not None else ""
        console.print(f"{size:>{width},} B  {path}{card}", highlight=False, markup=False)
    console.print(f"{len(upload.files)} files, {upload.total:,} B ({human_size(upload.total)}) in all", highlight=False)
    if not isinstance(result, Published):
        console.print(f"dry run: nothing uploaded; `tracetune publish {export} --to {to}{' --public' if public else ''}` "
                      "uploads these files", highlight=False, markup=False)
        return
    visibility = {True: "private", False: "public", None: "visibility unchanged"}[result.private]
    console.print(f"published {upload.export_dir} to {result.url} ({'new' if result.created else 'new version'}, "
                  f"{visibility})", highlight=False, markup=False)


@app.command()
def run(
    preset: PresetOpt = "cpu-demo",
    overrides: SetOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Directory for every stage's output. Default: runs/<preset>.")] = None,
    reward_weights: Annotated[Optional[str], typer.Option(help="For GRPO. " + REWARD_WEIGHTS_HELP)] = None,
    judge_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible endpoint for the LLM judge. Default: eval.judge_base_url, then $TRACETUNE_JUDGE_BASE_URL; none: the judge stage is skipped.")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="Judge model name. Default: eval.judge_model, then $TRACETUNE_JUDGE_MODEL.")] = None,
    mesh: MeshOpt = None,
    time_limit: Annotated[Optional[float], typer.Option("--time-limit", help="Stop cleanly after this many minutes: the running stage saves a checkpoint and the command exits with code 75; re-running continues. For sessions with a hard end (a Kaggle session is 9 h: use about 510).")] = None,
) -> None:
    """The main job: prepare data, evaluate zero-shot, SFT, evaluate, GRPO, evaluate,
    judge, report. Re-running continues where it stopped (finished stages are
    skipped, the interrupted one resumes from its checkpoint)."""
    from tracetune.pipeline import Pipeline

    fields: dict[str, object] = {"eval.judge_base_url": judge_url, "eval.judge_model": judge_model}
    if reward_weights is not None:
        fields.update({f"rewards.{k}": v for k, v in RewardWeights.parse(reward_weights).as_dict().items()})
    cfg = _config(preset, overrides, mesh, **fields)
    path = Pipeline(cfg, run_dir or Path("runs") / cfg.preset, err_console, time_limit_minutes=time_limit).run()
    console.print(f"report: {path}")


EXIT_TIME_LIMIT = 75
def _disk_full(error: DiskFull) -> None:
    """One line, then leave at once: writer threads that died on the full disk may
    hold locks that interpreter shutdown (atexit flushes) would wait on for ever.
    Everything the run wrote before is whole (atomic files, whole JSONL lines, orbax
    commits), so nothing is lost by not flushing the rest."""
    if not error.reported:
        err_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(DiskFull.exit_code)


def main() -> None:
    """Entry point: user-fixable errors become one line on stderr and exit code 2; a
    full disk exits 74, a time limit 75, a signal 128 + its number, a crash 1."""
    try:
        app()
    except DiskFull as error:
        _disk_full(error)
    except TimeLimitReached as error:  # EX_TEMPFAIL: nothing is wrong, continue later
        err_console.print(f"[yellow]stopped:[/yellow] {error}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_TIME_LIMIT)
    except Interrupted as error:  # the conventional 128 + signal number
        err_console.print(f"[yellow]stopped:[/yellow] {error}", highlight=False, soft_wrap=True)
        sys.exit(128 + error.signum)
    except (data_mod.DataError, ConfigError, ModelError, TrainingError, DamagedFile, ExportError) as error:
        err_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as error:  # a path that is a file, a missing directory: say which file
        if files.is_disk_full(error):
            _disk_full(DiskFull(error.filename or Path.cwd()))
        where = f" {error.filename}" if error.filename else ""
        err_console.print(f"[red]error:[/red] cannot write or read{where}: {error.strerror or error}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
