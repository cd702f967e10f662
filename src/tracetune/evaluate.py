"""The fixed evaluation harness: one way to generate and score, for every variant.

Zero-shot, SFT, GRPO and any ablation are all scored here, with the same
problems, prompt, greedy decoding and token budget (``EvalConfig``), by the same
``scoring.score_sample`` the rewards train on. SFT's held-out evaluation and the
benchmarks call ``generate_and_score``; ``tracetune eval`` calls ``evaluate``,
which adds the evaluation directory:

    eval.json       what was evaluated and how (a resumed evaluation must match)
    samples.jsonl   one record per problem: question, task kind, reference, completion,
                    parsed answer, every metric, finish reason, failure category + evidence
    metrics.json    the aggregate metrics with 95% confidence intervals
    metrics.md      the same as a Markdown table, then the failure table

Samples are appended after every batch, so re-running skips what is already
scored and a killed evaluation loses at most one batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune import failures
from tracetune.config import Config, RewardWeights
from tracetune.data import Example, mix_label
from tracetune.errors import TrainingError
from tracetune.files import append_jsonl, atomic_path, json_safe, read_appended
from tracetune.format import build_prompt
from tracetune.rewards import answer_token_logprobs
from tracetune.scoring import Estimate, SampleScore, aggregate, markdown_table, metrics_json, score_sample

if TYPE_CHECKING:  # generation needs JAX; reading a finished evaluation (report, model card) does not
    from tracetune.generate import Generation, Generator

# What must be equal for a resumed evaluation to add to the samples it finds.
SETTINGS = ("model", "source", "split", "limit", "max_new_tokens", "prompt_style", "reward_weights")


class EvalError(TrainingError):
    """An evaluation directory that cannot be resumed as asked."""


def score_generation(example: Example, generation: Generation, weights: RewardWeights) -> SampleScore:
    """Score one greedy completion with every registered reward: the confidence term
    from the model's own log-probabilities of its answer tokens, the arithmetic
    term against the problem and its reference solution."""
    try:
        # No answer block: no answer tokens, and a confidence term of 0 (not unknown).
        answer_logprobs = answer_token_logprobs(generation.text, generation.token_texts, generation.token_logprobs) or []
    except ValueError:  # token texts that do not rebuild the text: no confidence term
        answer_logprobs = None
    return score_sample(example.question, example.reference, generation.text, answer_logprobs, weights=weights,
                        id=example.id, solution=example.solution, kind=example.kind, choices=example.choices)


def generate_and_score(
    generator: Generator,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    prompt_style: str = "plain",
    weights: RewardWeights = RewardWeights(),
    progress: Callable[[int], None] | None = None,
) -> list[tuple[SampleScore, Generation]]:
    """Greedy completions of ``examples`` under the harness's prompt, scored."""
    from tracetune.generate import SamplingConfig

    prompts = [build_prompt(e.question, prompt_style, e.kind) for e in examples]
    outputs = generator.generate(prompts, SamplingConfig(max_new_tokens=max_new_tokens), progress=progress)
    return [(score_generation(e, o, weights), o) for e, o in zip(examples, outputs)]


def sample_record(score: SampleScore, generation: Generation, example: Example) -> dict[str, Any]:
    """The per-sample JSONL record: the score's fields, how the generation ended,
    and for a wrong or malformed answer its failure category with the evidence."""
    record = score.record()
    record["finish_reason"] = generation.finish_reason
    record["completion_tokens"] = len(generation.token_ids)
    record["failure"] = None
    if failures.is_failure(score.correct, score.well_formed):
        failure = failures.categorize(example.question, example.reference, generation.text, example.solution,
                                      example.kind, example.choices)
        record["failure"] = {"category": failure.category, "evidence": failure.evidence}
    return record


def record_score(record: dict[str, Any]) -> SampleScore:
    return SampleScore.from_record(record)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a samples.jsonl; a torn last line (a kill, a full disk) is cut
    with a note (it will be redone), any other bad line is an error naming the line."""
    return read_appended(path)


@dataclass
class EvalResult:
    out_dir: Path
    settings: dict[str, Any]
    records: list[dict[str, Any]]
    metrics: dict[str, Estimate]
    failure_rows: list[failures.FailureRow]
    seconds: float  # generation time of this call (0 when everything was already scored)


def summarize(records: Sequence[dict[str, Any]]) -> tuple[dict[str, Estimate], list[failures.FailureRow]]:
    metrics = aggregate([record_score(r) for r in records])
    found = [(r["id"], failures.Failure(**r["failure"])) for r in records if r.get("failure")]
    return metrics, failures.failure_table(found)


def write_summary(out_dir: Path, records: Sequence[dict[str, Any]], settings: dict[str, Any]) -> tuple[dict[str, Estimate], list[failures.FailureRow]]:
    metrics, rows = summarize(records)
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(json_safe({"settings": settings, "metrics": metrics_json(metrics)}), indent=2, allow_nan=False) + "\n")
    table = markdown_table(metrics) + "\n" + failures.failure_markdown(rows, len(records))
    with atomic_path(out_dir / "metrics.md") as tmp:
        tmp.write_text(table, encoding="utf-8")
    return metrics, rows


def evaluate(
    loaded,
    examples: Sequence[Example],
    out_dir: Path,
    config: Config,
    *,
    variant: str = "",
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score ``loaded`` (a LoadedModel) on ``examples`` into ``out_dir``, resuming
    from the samples already there."""
    harness = config.eval
    settings = {
        "variant": variant or out_dir.name,
        "model": loaded.source,
        "source": mix_label(config.data.mix) if config.data.mix else config.data.source,
        "split": harness.split,
        "limit": harness.limit,
        "max_new_tokens": harness.max_new_tokens,
        "prompt_style": config.data.prompt_style,
        "reward_weights": config.rewards.as_dict(),
        "decoding": "greedy",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path = out_dir / "eval.json"
    if settings_path.exists():
        saved = json.loads(settings_path.read_text())
        changed = [k for k in SETTINGS if saved.get(k) != settings[k]]
        if changed:
            raise EvalError(f"{out_dir} holds an evaluation with other settings ({', '.join(f'{k}: {saved.get(k)!r} -> {settings[k]!r}' for k in changed)}); "
                            "use another --out directory")
    else:
        with atomic_path(settings_path) as tmp:
            tmp.write_text(json.dumps(settings, indent=2) + "\n")

    samples_path = out_dir / "samples.jsonl"
    wanted = {e.id for e in examples}
    records = [r for r in read_records(samples_path) if r.get("id") in wanted]
    done = {r["id"] for r in records}
    with atomic_path(samples_path) as tmp:  # drop a cut-off last line before appending
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    if progress and done:
        progress(len(done))

    todo = [e for e in examples if e.id not in done]
    start = time.perf_counter()
    if todo:
        from tracetune.generate import Generator

        generator = Generator(loaded.model, loaded.tokenizer, max_batch=min(harness.batch_size, len(todo)))
        for first in range(0, len(todo), harness.batch_size):
            batch = todo[first : first + harness.batch_size]
            scored = generate_and_score(generator, batch, max_new_tokens=harness.max_new_tokens,
                                        prompt_style=config.data.prompt_style, weights=config.rewards)
            batch_records = [sample_record(score, generation, example) for example, (score, generation) in zip(batch, scored)]
            records += batch_records
            append_jsonl(samples_path, *batch_records)
            if progress:
                progress(len(batch))
    order = {e.id: i for i, e in enumerate(examples)}
    records.sort(key=lambda r: order[r["id"]])
    metrics, rows = write_summary(out_dir, records, settings)
    return EvalResult(out_dir, settings, records, metrics, rows, time.perf_counter() - start if todo else 0.0)


def load_result(out_dir: Path) -> EvalResult:
    """A finished evaluation directory, as ``evaluate`` returned it."""
    settings_path = out_dir / "eval.json"
    if not settings_path.exists():
        raise EvalError(f"{out_dir} is not an evaluation directory (no eval.json)")
    settings = json.loads(settings_path.read_text())
    records = read_records(out_dir / "samples.jsonl")
    metrics, rows = summarize(records)
    return EvalResult(out_dir, settings, records, metrics, rows, 0.0)


def problems(config: Config) -> list[Example]:
    """The harness's problems: ``eval.split`` of ``data.source``, the first ``eval.limit``.
    With ``data.mix``: each source's evaluation split (its ``eval_split``, else
    ``eval.split``), the first ``eval.limit`` of each, concatenated in mix order."""
    from tracetune.data import load_examples, load_mix

    limit = config.eval.limit or None
    if config.data.mix:
        parts = load_mix(config.data, "eval", eval_split=config.eval.split, limit=limit)
        return [example for part in parts for example in part.examples]
    return load_examples(config.data.source, config.eval.split, question_field=config.data.question_field,
                         answer_field=config.data.answer_field, limit=limit, kind=config.data.kind).examples


# ----------------------------------------------------------------------- judge


def judge_settings(config: Config):
    """The judge's JudgeConfig, or None when no endpoint is configured anywhere
    (``eval.judge_base_url``, TRACETUNE_JUDGE_BASE_URL, OPENAI_BASE_URL)."""
    import os

    from tracetune.judge import ENV_BASE_URL, JudgeConfig

    harness = config.eval
    if not harness.judge_base_url and not any(os.environ.get(v) for v in ENV_BASE_URL):
        return None
    return JudgeConfig.from_env(base_url=harness.judge_base_url or None, model=harness.judge_model or None,
                                samples=harness.judge_samples, concurrency=harness.judge_concurrency,
                                rubric=config.judge.rubric, guided=config.judge.guided)


def judge_directory(out_dir: Path, judge, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Rate an evaluation's samples with the LLM judge: verdicts cached in
    judge.jsonl (re-running sends only what is missing), the summary in judge.json."""
    from tracetune.judge import judge_samples, summarize as judge_summary

    records = read_records(out_dir / "samples.jsonl")
    judgements = judge_samples(records, judge, cache_path=out_dir / "judge.jsonl", progress=progress)
    summary = judge_summary(judgements)
    with atomic_path(out_dir / "judge.json") as tmp:
        tmp.write_text(json.dumps({**summary, "judgements": [asdict(j) for j in judgements]}, indent=2) + "\n")
    return summary
