"""The fixed evaluation harness: one way to generate and score, for every variant.

Zero-shot, SFT, GRPO and any ablation are all scored here, with the same
problems, prompt, greedy decoding and token budget (``EvalConfig``), by the same
``scoring.score_sample`` the rewards train on. SFT's held-out evaluation and the
benchmarks call ``generate_and_score``; ``tracetune eval`` calls ``evaluate``,
which adds the evaluation directory:

    eval.json       what was evaluated and how (a resumed evaluation must match)
    samples.jsonl   one record per problem: question, task kind, domain, reference,
                    completion, parsed answer, every metric, finish reason, failure
                    category + evidence
    metrics.json    the aggregate metrics with 95% confidence intervals, and per domain
                    (``domains``) when the problems have domains
    metrics.md      the same as Markdown tables: the metrics, the domains, the failures
    judge.json      with ``--judge``: the judge's summary and verdicts; the domain
                    table in metrics.json/.md is then rewritten with a judge column

Samples are appended after every batch, so re-running skips what is already
scored and a killed evaluation loses at most one batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune import failures
from tracetune.config import Config, ConfigError, RewardWeights
from tracetune.data import Example, mix_label
from tracetune.errors import TrainingError
from tracetune.files import append_jsonl, atomic_path, json_safe, read_appended, rewrite_jsonl
from tracetune.format import build_prompt
from tracetune.rewards import answer_token_logprobs
from tracetune.scoring import (
    METRIC_LABELS,
    Estimate,
    SampleScore,
    aggregate,
    estimate_cell,
    markdown_table,
    mean_ci,
    metrics_json,
    score_sample,
)

if TYPE_CHECKING:  # generation needs JAX; reading a finished evaluation (report, model card) does not
    from tracetune.generate import Generation, Generator

# What must be equal for a resumed evaluation to add to the samples it finds.
HELD_OUT = "held-out"  # eval.split: the train split's held-out validation problems
SETTINGS = ("model", "source", "split", "limit", "max_new_tokens", "prompt_style", "shots", "reward_weights")
SETTING_DEFAULTS = {"shots": 0}  # what an eval.json written before the setting existed means
# Where the harness stops a completion: the answer's end, or the start of a new
# question ("Q:" on a line of its own, the prompt's own newline included): the base
# model answers the plain prompt by writing further questions to its budget (all 250
# zero-shot completions of docs/cpu-demo-250 did: 320 tokens each, no answer), as
# lm-evaluation-harness stops GSM8K at "Question:". No SFT or GRPO completion of
# that report holds one.
STOP_STRINGS = ("</answer>", "\nQ:")
# The judge's scale (judge.SCORES): its mean's interval is cut to it, as judge.summarize cuts it.
JUDGE_SCALE = (1.0, 5.0)


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

    scored: list = [None] * len(examples)
    for index, score, generation in stream_and_score(generator, examples, max_new_tokens=max_new_tokens,
                                                      prompt_style=prompt_style, weights=weights):
        scored[index] = (score, generation)
        if progress:
            progress(1)
    return scored


def stream_and_score(
    generator: Generator,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    prompt_style: str = "plain",
    weights: RewardWeights = RewardWeights(),
    prefix: str = "",
) -> Iterator[tuple[int, SampleScore, Generation]]:
    """``generate_and_score`` one example at a time as each finishes: (index, score, generation).
    ``prefix`` goes before every prompt (``shot_prefix``'s worked examples)."""
    from tracetune.generate import SamplingConfig

    prompts = [prefix + build_prompt(e.question, prompt_style, e.kind) for e in examples]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_strings=STOP_STRINGS)
    for index, generation in generator.stream(prompts, sampling):
        yield index, score_generation(examples[index], generation, weights), generation


def sample_record(score: SampleScore, generation: Generation, example: Example) -> dict[str, Any]:
    """The per-sample JSONL record: the score's fields (its task kind among them),
    the example's domain ("" when it has none), how the generation ended, and for a
    wrong or malformed answer its failure category with the evidence."""
    record = score.record()
    record["domain"] = example.domain
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
    domains: list[DomainSummary] = field(default_factory=list)  # empty: no per-domain table


def summarize(records: Sequence[dict[str, Any]]) -> tuple[dict[str, Estimate], list[failures.FailureRow]]:
    metrics = aggregate([record_score(r) for r in records])
    found = [(r["id"], failures.Failure(**r["failure"])) for r in records if r.get("failure")]
    return metrics, failures.failure_table(found)


# ------------------------------------------------------------------ per domain


@dataclass(frozen=True)
class DomainSummary:
    """One row of the per-domain table: ``n`` samples of ``domain``.

    accuracy: over the rows with a reference; n == 0 for an open domain (its rows are
      judged, not checked).
    judge: the mean judge score (1-5) over this domain's samples the judge scored
      (its n: how many); None when the judge has not run on the evaluation.
    unscored: this domain's samples the judge was asked about but could not score
      (left out of ``judge``, counted here).
    """

    domain: str
    n: int
    format_rate: Estimate
    trace: Estimate
    accuracy: Estimate
    judge: Estimate | None = None
    unscored: int = 0


def domain_of(record: dict[str, Any]) -> str:
    """A record's domain; a record without one (a GSM8K row, a record from before
    domains) counts under its task kind, so a GSM8K evaluation is one "numeric" group."""
    return record.get("domain") or record.get("kind") or "numeric"


def domain_summary(records: Sequence[dict[str, Any]], judgements: Sequence[dict[str, Any]] | None = None) -> list[DomainSummary]:
    """Per domain, in the order the records first show it: n, format rate, mean trace
    score and accuracy (the harness's own ``aggregate``, with its intervals), and with
    ``judgements`` (judge.json's, joined by ``id``) the mean judge score.

    Empty when there is nothing to split: no record has a domain and all share one
    task kind. A judgement whose id no record has is ignored (it has no domain).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(domain_of(record), []).append(record)
    if len(groups) < 2 and not any(r.get("domain") for r in records):
        return []
    verdicts = {str(j["id"]): j.get("score") for j in judgements or ()}
    out = []
    for domain, members in groups.items():
        metrics = aggregate([record_score(r) for r in members])
        judge, unscored = None, 0
        if judgements is not None:
            found = [verdicts[str(r["id"])] for r in members if str(r["id"]) in verdicts]
            scores = [float(s) for s in found if s is not None]
            judge, unscored = mean_ci(scores, JUDGE_SCALE), len(found) - len(scores)
        out.append(DomainSummary(domain, len(members), metrics["format_rate"], metrics["trace"], metrics["accuracy"], judge, unscored))
    return out


def domain_rows(domains: Sequence[DomainSummary], *, judge_columns: bool | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-domain table, for Markdown, the terminal and the
    report: each cell a value with its 95% interval; accuracy "—" where the domain
    has no reference to check; the judge columns when the judge ran (or as
    ``judge_columns`` says, so variants' rows line up)."""
    judged = any(d.judge is not None for d in domains) if judge_columns is None else judge_columns
    header = ["Domain", "n", METRIC_LABELS["format_rate"], METRIC_LABELS["trace"], "Accuracy"]
    header += ["Judge (1-5)", "Judged"] if judged else []
    rows = []
    for d in domains:
        accuracy = "—" if d.accuracy.n == 0 else estimate_cell(d.accuracy, "accuracy") + (f" (n={d.accuracy.n})" if d.accuracy.n != d.n else "")
        row = [d.domain, str(d.n), estimate_cell(d.format_rate, "format_rate"), estimate_cell(d.trace, "trace"), accuracy]
        if judged:
            row += [judge_text(d.judge), judged_text(d)]
        rows.append(row)
    return header, rows


def judge_text(estimate: Estimate | None) -> str:
    """``"3.50 [2.80, 4.20]"``: a mean judge score with its interval; "n/a" when the
    judge scored none of the samples, "not judged" when it has not run."""
    if estimate is None:
        return "not judged"
    if estimate.n == 0:
        return "n/a"
    return f"{estimate.mean:.2f} [{estimate.low:.2f}, {estimate.high:.2f}]"


def judged_text(d: DomainSummary) -> str:
    """How many of the domain's samples the judge scored, and how many it could not."""
    if d.judge is None:
        return "—"
    return f"{d.judge.n}" + (f" (+{d.unscored} unscored)" if d.unscored else "")


def domains_json(domains: Sequence[DomainSummary]) -> list[dict[str, Any]]:
    return [asdict(d) for d in domains]


def domains_markdown(domains: Sequence[DomainSummary], judge: dict[str, Any] | None = None) -> str:
    """The per-domain table, after a sentence naming the judge (judge.json's summary)."""
    header, rows = domain_rows(domains)
    lines = [f"Per domain ({len(domains)}), 95% intervals (Wilson for rates, normal for means)."]
    if judge is not None:
        lines[0] += (f" Judge: {judge.get('judge_model') or '?'}, {judge.get('scored', 0)} of {judge.get('n', 0)} "
                     f"rated samples scored ({judge.get('unscored', 0)} unscored).")
    lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(failures.markdown_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def read_judge(out_dir: Path) -> dict[str, Any] | None:
    """judge.json: the judge's summary and its ``judgements``; None when the judge has not run."""
    path = out_dir / "judge.json"
    return json.loads(path.read_text()) if path.exists() else None


def directory_domains(out_dir: Path, records: Sequence[dict[str, Any]]) -> list[DomainSummary]:
    """The evaluation directory's per-domain table, with the judge's scores when it ran."""
    judge = read_judge(out_dir)
    return domain_summary(records, (judge or {}).get("judgements"))  # a judge.json without verdicts: no judge column


def write_summary(out_dir: Path, records: Sequence[dict[str, Any]], settings: dict[str, Any]) -> tuple[dict[str, Estimate], list[failures.FailureRow]]:
    """metrics.json and metrics.md from the records: the metrics, the per-domain table
    (when the problems have domains; with the judge's scores when judge.json is there)
    and the failures. Both ``evaluate`` and ``judge_directory`` write through here."""
    metrics, rows = summarize(records)
    judge = read_judge(out_dir)
    domains = directory_domains(out_dir, records)
    summary: dict[str, Any] = {"settings": settings, "metrics": metrics_json(metrics)}
    if domains:
        summary["domains"] = domains_json(domains)
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    table = markdown_table(metrics) + "\n"
    if domains:
        table += domains_markdown(domains, judge) + "\n"
    table += failures.failure_markdown(rows, len(records))
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
    prefix = shot_prefix(config)  # before eval.json is written: too many shots leaves no directory behind
    settings = {
        "variant": variant or out_dir.name,
        "model": loaded.source,
        "source": mix_label(config.data.mix) if config.data.mix else config.data.source,
        "split": harness.split,
        "limit": harness.limit,
        "max_new_tokens": harness.max_new_tokens,
        "prompt_style": config.data.prompt_style,
        "shots": harness.shots,
        "reward_weights": config.rewards.as_dict(),
        "decoding": "greedy",
        "stop_strings": list(STOP_STRINGS),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path = out_dir / "eval.json"
    if settings_path.exists():
        saved = {k: SETTING_DEFAULTS.get(k) for k in SETTINGS} | json.loads(settings_path.read_text())
        changed = [k for k in SETTINGS if saved[k] != settings[k]]
        if changed:
            raise EvalError(f"{out_dir} holds an evaluation with other settings ({', '.join(f'{k}: {saved[k]!r} -> {settings[k]!r}' for k in changed)}); "
                            "use another --out directory")
    else:
        with atomic_path(settings_path) as tmp:
            tmp.write_text(json.dumps(settings, indent=2) + "\n")

    samples_path = out_dir / "samples.jsonl"
    wanted = {e.id for e in examples}
    records = [r for r in read_records(samples_path) if r.get("id") in wanted]
    done = {r["id"] for r in records}
    rewrite_jsonl(samples_path, records)  # drop a cut-off last line before appending
    if progress and done:
        progress(len(done))

    todo = [e for e in examples if e.id not in done]
    start = time.perf_counter()
    if todo:
        from tracetune.generate import Generator

        generator = Generator(loaded.model, loaded.tokenizer, max_batch=min(harness.batch_size, len(todo)))
        # Each record is appended as its problem finishes, so a stopped evaluation resumes from there.
        for index, score, generation in stream_and_score(generator, todo, max_new_tokens=harness.max_new_tokens,
                                                          prompt_style=config.data.prompt_style, weights=config.rewards,
                                                          prefix=prefix):
            record = sample_record(score, generation, todo[index])
            records.append(record)
            append_jsonl(samples_path, record)
            if progress:
                progress(1)
    order = {e.id: i for i, e in enumerate(examples)}
    records.sort(key=lambda r: order[r["id"]])
    if todo:  # appended in the order they finished; the finished file is in the problems' order
        rewrite_jsonl(samples_path, records)
    metrics, rows = write_summary(out_dir, records, settings)
    return EvalResult(out_dir, settings, records, metrics, rows, time.perf_counter() - start if todo else 0.0,
                      directory_domains(out_dir, records))


def load_result(out_dir: Path) -> EvalResult:
    """A finished evaluation directory, as ``evaluate`` returned it."""
    settings_path = out_dir / "eval.json"
    if not settings_path.exists():
        raise EvalError(f"{out_dir} is not an evaluation directory (no eval.json)")
    settings = json.loads(settings_path.read_text())
    records = read_records(out_dir / "samples.jsonl")
    metrics, rows = summarize(records)
    return EvalResult(out_dir, settings, records, metrics, rows, 0.0, directory_domains(out_dir, records))


def shot_prefix(config: Config) -> str:
    """The worked examples ``eval.shots`` puts before every question: the first
    ``eval.shots`` SFT traces of the run's training data (``curate_data``: its train
    part, so never a held-out validation problem, and never the test split), each
    its prompt and target completion, then a blank line; "" with ``eval.shots`` 0.

    >>> shot_prefix(Config())
    ''
    """
    if not config.eval.shots:
        return ""
    from tracetune.data import curate_data

    curated, _, described = curate_data(config.data)
    traces = curated.train[: config.eval.shots]
    if len(traces) < config.eval.shots:
        raise ConfigError(f"eval.shots={config.eval.shots}, but the training data ({described}) gives only {len(traces)} traces")
    return "".join(f"{trace.prompt}{trace.completion}\n\n" for trace in traces)


def problems(config: Config) -> list[Example]:
    """The harness's problems: ``eval.split`` of ``data.source``, the first ``eval.limit``.
    With ``data.mix``: each source's evaluation split (its ``eval_split``, else
    ``eval.split``), the first ``eval.limit`` of each, concatenated in mix order.
    ``eval.split="held-out"``: the validation problems GRPO validates on (the
    train split's held-out ``data.val_fraction``, drawn with ``data.seed``), in
    that order, for choices that must not look at the test split.

    A source whose rows have domains (the ``open`` set) is read round-robin over
    its domains before the limit, so that a limit sees every domain (the first 16
    of the open set would all be creative writing); a source without domains keeps
    its file order. The order is fixed, the same for every variant."""
    from tracetune.data import load_examples, load_mix

    limit = config.eval.limit or None
    if config.data.mix and config.eval.split == HELD_OUT:
        raise ConfigError(f"eval.split={HELD_OUT} is the held-out part of one source's train split; with data.mix, "
                          "name each source's eval_split instead")
    if config.data.mix:
        parts = load_mix(config.data, "eval", eval_split=config.eval.split)
        # load_mix gives a row without a domain its source's name: one domain, file order
        return [example for part in parts for example in by_domain(part.examples)[:limit]]
    if config.eval.split == HELD_OUT:  # what SFT and GRPO hold out of the train split to choose steps on
        from tracetune.data import held_out_split

        return held_out_split(config.data)[1][:limit]
    examples = load_examples(config.data.source, config.eval.split, question_field=config.data.question_field,
                             answer_field=config.data.answer_field, kind=config.data.kind).examples
    return by_domain(examples)[:limit]


def by_domain(examples: Sequence[Example]) -> list[Example]:
    """``examples`` round-robin over their domains, each domain in file order
    (domains in order of first appearance); unchanged when they share one."""
    from tracetune.data import interleave

    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.domain, []).append(example)
    return interleave(list(groups.values()))


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
    judge.jsonl (re-running sends only what is missing), the summary in judge.json,
    then metrics.json/.md rewritten so the per-domain table has the judge's scores."""
    from tracetune.judge import judge_samples, summarize as judge_summary

    result = load_result(out_dir)
    judgements = judge_samples(result.records, judge, cache_path=out_dir / "judge.jsonl", progress=progress)
    summary = judge_summary(judgements)
    with atomic_path(out_dir / "judge.json") as tmp:
        tmp.write_text(json.dumps({**summary, "judgements": [asdict(j) for j in judgements]}, indent=2) + "\n")
    write_summary(out_dir, result.records, result.settings)
    return summary
