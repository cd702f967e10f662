"""``tracetune report``: the results section, written from run directories.

Every evaluation directory found under the given paths (``eval.json``) is one
variant (zero-shot, SFT-only, SFT+GRPO, an ablation, ...), and every training
run (an SFT or GRPO ``metrics.jsonl``) gives curves. The report is Markdown with
PNG plots beside it:

    report.md        results table (the recipe's columns, 95% CIs), paired comparisons
                     of each variant with the one before it (compare.py), failure
                     table, judge scores, a per-domain table when the problems have
                     domains, training summary with every run's reward weights,
                     sample outputs
    variants.png     the main metrics per variant with their intervals
    sft_loss.png     SFT training loss (and held-out format rate) over updates
    grpo_rewards.png GRPO curves, one row per run: every reward component, validation
                     accuracy, share of groups with spread, rollouts spent by the
                     dynamic-sampling filter (a panel whose keys a run lacks is left out)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracetune.compare import RESAMPLES, SEED, SIGNIFICANCE, Comparison, McNemar, MeanDifference, NoSharedProblems, compare
from tracetune.evaluate import EvalResult, domain_rows, load_result
from tracetune.failures import CATEGORIES, CATEGORY_LABELS, markdown_cell
from tracetune.files import atomic_path
from tracetune.scoring import METRIC_LABELS, METRICS, PROPORTIONS, Estimate

# The results table's columns, in the recipe's order.
COLUMNS = ("accuracy", "lenient_accuracy", "sound_accuracy", "format_rate", "trace", "arithmetic", "composite")
# Known variants first, in pipeline order; anything else after, by name.
VARIANT_ORDER = ("zero-shot", "sft", "grpo")
VARIANT_LABELS = {"zero-shot": "Zero-shot", "sft": "SFT only", "grpo": "SFT + GRPO"}
# The rates the paired comparison tests (McNemar); every mean metric present is compared too.
PAIRED_RATES = ("accuracy", "format_rate")


@dataclass
class Variant:
    name: str
    label: str
    result: EvalResult
    judge: dict[str, Any] | None = None  # judge.json's summary, when the judge ran


@dataclass
class TrainingRun:
    name: str
    kind: str  # "sft" or "grpo"
    path: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the rest still reports
            continue
    return out


def _name(path: Path, root: Path, prefix: str) -> str:
    relative = path.relative_to(root).parts
    tail = relative[-1] if relative else root.name
    return f"{prefix}{tail}"


def collect(paths: Sequence[Path]) -> tuple[list[Variant], list[TrainingRun]]:
    """Variants and training runs under ``paths``. With several paths, names get
    the path's directory name as a prefix so ablation runs stay apart."""
    variants: list[Variant] = []
    runs: list[TrainingRun] = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(2, "no such run directory", str(root))
        prefix = f"{root.name}/" if len(paths) > 1 else ""
        for settings in sorted(root.glob("**/eval.json")):
            directory = settings.parent
            result = load_result(directory)
            if not result.records:
                continue
            name = _name(directory, root, prefix)
            base = directory.name
            label = VARIANT_LABELS.get(base, base)
            judge_path = directory / "judge.json"
            judge = json.loads(judge_path.read_text()) if judge_path.exists() else None
            variants.append(Variant(name, f"{prefix}{label}", result, judge))
        for metrics in sorted(root.glob("**/metrics.jsonl")):
            directory = metrics.parent
            if (directory / "eval.json").exists():
                continue
            records = _read_jsonl(metrics)
            kind = "grpo" if any("reward/composite" in r for r in records) else "sft" if any("loss" in r for r in records) else ""
            if not kind:
                continue
            summary_path = directory / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            runs.append(TrainingRun(_name(directory, root, prefix), kind, directory, records, summary))

    def order(v: Variant) -> tuple:
        base = v.result.out_dir.name
        return (v.name.split("/")[0] if "/" in v.name else "", VARIANT_ORDER.index(base) if base in VARIANT_ORDER else len(VARIANT_ORDER), base)

    return sorted(variants, key=order), sorted(runs, key=lambda r: (r.name.rsplit("/", 1)[0] if "/" in r.name else "", r.kind != "sft", r.name))


# ----------------------------------------------------------------- formatting


def fmt(estimate: Estimate | None, metric: str) -> str:
    """``"41.2% [28.1, 55.4]"`` for proportions, ``"0.812 [0.78, 0.84]"`` otherwise."""
    if estimate is None or estimate.n == 0 or math.isnan(estimate.mean):
        return "n/a"
    if metric in PROPORTIONS:
        return f"{100 * estimate.mean:.1f}% [{100 * estimate.low:.1f}, {100 * estimate.high:.1f}]"
    return f"{estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"


def judge_cell(judge: dict[str, Any] | None) -> str:
    if not judge:
        return "n/a"
    if not judge.get("scored"):
        return f"unscored ({judge.get('unscored', 0)})"
    return f"{judge['mean']:.2f} [{judge['low']:.2f}, {judge['high']:.2f}] (n={judge['scored']})"


def results_table(variants: Sequence[Variant]) -> str:
    head = ["Variant", "n", *(METRIC_LABELS[c] for c in COLUMNS), "Judge (1-5)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(COLUMNS) + 1)]
    for v in variants:
        cells = [v.label, str(len(v.result.records)), *(fmt(v.result.metrics.get(c), c) for c in COLUMNS), judge_cell(v.judge)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def weights_text(weights: dict[str, float] | None) -> str:
    """``"correctness=0.6, trace=0.25, confidence=0.15"``: every name the mapping has,
    so a component added later shows without a change here."""
    if not weights:
        return "not recorded"
    return ", ".join(f"{name}={value:g}" for name, value in weights.items())


def eval_weights_text(variants: Sequence[Variant]) -> str:
    """The composite's weights each evaluation scored with (eval.json)."""
    weights = [v.result.settings.get("reward_weights") for v in variants]
    if not any(weights):
        return "The evaluations do not record their reward weights (their eval.json predates them)."
    if all(w == weights[0] for w in weights):
        return f"The composite reward is scored with the weights {weights_text(weights[0])} for every variant."
    return "The composite reward is scored with different weights per variant: " + "; ".join(
        f"{v.label}: {weights_text(w)}" for v, w in zip(variants, weights)) + "."


def shots_text(shots: int) -> str:
    """What ``eval.shots`` put before each question, for the harness sentence."""
    return f" after {shots} worked training examples (`eval.shots`)" if shots else ""


def harness_text(variants: Sequence[Variant]) -> str:
    """The sentence that says how every variant was scored (the first one's eval.json)
    and with which composite weights; the report and the model card open their results with it."""
    first = variants[0].result.settings
    return (f"Every variant is scored by the same harness: {first['source']} {first['split']} "
            f"({len(variants[0].result.records)} problems), greedy decoding, {first['max_new_tokens']} new tokens, "
            f"the `{first['prompt_style']}` prompt{shots_text(first.get('shots', 0))}. "
            "Intervals are 95% (Wilson for rates, normal for means). "
            + eval_weights_text(variants))


# ------------------------------------------------------------ paired comparisons


def _group(v: Variant) -> str:
    return v.name.split("/")[0] if "/" in v.name else ""


def comparison_pairs(variants: Sequence[Variant]) -> list[tuple[Variant, Variant]]:
    """(before, after): each variant after the one before it in the report's order
    (zero-shot -> SFT -> SFT + GRPO -> others), within one run directory; with several
    directories (an ablation) also each variant against the first directory's variant
    of the same name, since comparing across directories' pipelines is meaningless."""
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(_group(v), []).append(v)
    if not groups:
        return []
    pairs = [(a, b) for members in groups.values() for a, b in zip(members, members[1:])]
    first, *others = groups.values()
    by_base = {v.result.out_dir.name: v for v in first}
    for members in others:
        pairs += [(by_base[v.result.out_dir.name], v) for v in members if v.result.out_dir.name in by_base]
    return pairs


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _difference(d: MeanDifference | None) -> str:
    if d is None or d.n == 0:
        return "n/a"
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def _rate_cell(test: McNemar | None) -> str:
    if test is None:
        return "n/a"
    cell = f"{test.won} / {test.lost} / {_p(test.p)}"
    return f"**{cell}**" if test.significant else cell


def _verdict(comparison: Comparison, metric: str) -> str:
    test = comparison.rates[metric]
    p = "p < 0.001" if test.p < 0.001 else f"p = {test.p:.3f}"
    counts = f"{test.won} won, {test.lost} lost, {p}"
    if not test.significant:
        return f"{METRIC_LABELS[metric]}: no significant difference, p >= {SIGNIFICANCE:g} ({counts})"
    direction = "higher" if test.won > test.lost else "lower"
    return f"{METRIC_LABELS[metric]}: **{direction} for {comparison.after}, p < {SIGNIFICANCE:g}** ({counts})"


def comparisons_section(variants: Sequence[Variant], *, resamples: int = RESAMPLES, seed: int = SEED) -> str:
    """The paired comparisons' table, then one plain sentence per pair."""
    rows, bullets = [], []
    results: list[Comparison] = []
    pairs = comparison_pairs(variants)
    for before, after in pairs:
        try:
            comparison = compare(before.result.records, after.result.records, before_name=before.label,
                                 after_name=after.label, resamples=resamples, seed=seed)
        except NoSharedProblems as error:
            bullets.append(f"- **{after.label} vs {before.label}**: {error}.")
            continue
        results.append(comparison)
        verdicts = "; ".join(_verdict(comparison, m) for m in PAIRED_RATES if m in comparison.rates)
        shared = f"{comparison.shared} shared problems" + (f", {comparison.left_out} scored by only one left out" if comparison.left_out else "")
        note = ""
        weights = before.result.settings.get("reward_weights"), after.result.settings.get("reward_weights")
        if weights[0] != weights[1] and "composite" in comparison.means:
            note = f" The two composites are scored with different weights ({weights_text(weights[0])} vs {weights_text(weights[1])})."
        bullets.append(f"- **{after.label} vs {before.label}** ({shared}): {verdicts or 'no rate to test'}.{note}")
    means = [m for m in METRICS if m not in PROPORTIONS and any(m in c.means for c in results)]
    head = ["Comparison", "Shared problems", *(f"{METRIC_LABELS[m]}: won / lost / p" for m in PAIRED_RATES),
            *(f"{METRIC_LABELS[m]}: difference [95% CI]" for m in means)]
    for c in results:
        shared = str(c.shared) + (f" ({c.left_out} left out)" if c.left_out else "")
        rows.append("| " + " | ".join([f"{c.after} vs {c.before}", shared, *(_rate_cell(c.rates.get(m)) for m in PAIRED_RATES),
                                         *(_difference(c.means.get(m)) for m in means)]) + " |")
    across = " (and, across run directories, against the first directory's variant of the same name)" if any(
        _group(a) != _group(b) for a, b in pairs) else ""
    intro = (f"Each variant against the one before it{across}, paired by problem on the problems both scored. Rates: problems "
             "the later variant won (right only there) / lost (right only in the earlier one) and McNemar's exact "
             f"two-sided p; the rest are ties; **bold**: p < {SIGNIFICANCE:g}. Means: the later variant minus the earlier, "
             f"with a 95% paired bootstrap interval ({resamples:,} resamples of the problems, seed {seed}).\n")
    table = ""
    if rows:
        table = "\n" + "\n".join(["| " + " | ".join(head) + " |", "|---|---:|" + "---|" * (len(head) - 2), *rows]) + "\n"
    return intro + table + "\n" + "\n".join(bullets) + "\n"


def failure_table(variants: Sequence[Variant]) -> str:
    """Counts (share of that variant's samples) per category, and one example each
    from the last variant that has one (the most trained, in pipeline order)."""
    lines = ["| Category | " + " | ".join(v.label for v in variants) + " | Example |",
             "|---|" + "---:|" * len(variants) + "---|"]
    for category in CATEGORIES:
        counts, example = [], ""
        for v in variants:
            found = [r for r in v.result.records if (r.get("failure") or {}).get("category") == category]
            total = len(v.result.records)
            counts.append(f"{len(found)} ({len(found) / total:.0%})" if total else "0")
            if found:
                evidence = markdown_cell(found[0]["failure"]["evidence"])
                example = f"{v.label}, {found[0]['id']}: {evidence[:200]}"
        if any(not c.startswith("0 ") and c != "0" for c in counts):
            lines.append(f"| {CATEGORY_LABELS[category]} | " + " | ".join(counts) + f" | {example} |")
    if len(lines) == 2:
        return "No wrong answers.\n"
    return "\n".join(lines) + "\n"


def judge_section(variants: Sequence[Variant]) -> str:
    judged = [v for v in variants if v.judge]
    if not judged:
        return ("The LLM judge did not run: no endpoint was configured (`--judge-url` or "
                "`TRACETUNE_JUDGE_BASE_URL`; `tracetune serve` can provide one).\n")
    lines = ["| Variant | Judge model | Mean [95% CI] | Scored | Unscored | 1 | 2 | 3 | 4 | 5 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in judged:
        j = v.judge
        hist = j.get("histogram", {})
        mean = f"{j['mean']:.2f} [{j['low']:.2f}, {j['high']:.2f}]" if j.get("scored") else "n/a"
        lines.append(f"| {v.label} | {j.get('judge_model', '?')} | {mean} | {j.get('scored', 0)} | {j.get('unscored', 0)} | "
                     + " | ".join(str(hist.get(str(k), hist.get(k, 0))) for k in range(1, 6)) + " |")
    return "\n".join(lines) + "\n"


def domains_section(variants: Sequence[Variant]) -> str:
    """One table, grouped by domain so the variants sit side by side within each;
    "" when no variant's problems have domains (a GSM8K evaluation)."""
    split = [v for v in variants if v.result.domains]
    if not split:
        return ""
    judged = any(v.judge for v in split)
    order = list(dict.fromkeys(d.domain for v in split for d in v.result.domains))
    header: list[str] = []
    rows: dict[str, list[list[str]]] = {domain: [] for domain in order}
    for v in split:
        header, cells = domain_rows(v.result.domains, judge_columns=judged)
        for d, row in zip(v.result.domains, cells):
            rows[d.domain].append([row[0], v.label, *row[1:]])
    header = [header[0], "Variant", *header[1:]]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for domain in order for row in rows[domain]]
    intro = ("Each variant's samples by the problem's domain (a problem without one counts under its task kind), "
             "with 95% intervals (Wilson for rates, normal for means). Accuracy is \"—\" where a domain's prompts "
             "have no reference to check (open prompts are judged only).")
    if judged:
        intro += " Judge scores (1-5) are over the samples the judge rated: " + "; ".join(
            f"{v.label}: {v.judge.get('judge_model') or '?'}, {v.judge.get('scored', 0)} of {v.judge.get('n', 0)} scored"
            + (f" ({v.judge['unscored']} unscored)" if v.judge.get("unscored") else "")
            if v.judge else f"{v.label}: not judged" for v in split) + "."
    left_out = [v.label for v in variants if not v.result.domains]
    if left_out:
        intro += f" Without domains, left out: {', '.join(left_out)}."
    return intro + "\n\n" + "\n".join(lines) + "\n"


def _values(records: Sequence[dict[str, Any]], key: str) -> list[tuple[Any, float]]:
    """(step, value) of the records that have a finite number under ``key``; keys
    logged only every N steps (validation) or by newer runs only simply give fewer."""
    return [(r.get("step"), float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]


def _validation_text(run: TrainingRun) -> str:
    """GRPO's held-out validation accuracy (``val/accuracy`` records, every N updates),
    its best step (ties: composite, as the run selects) and the step it exported."""
    points = [r for r in run.records if _values([r], "val/accuracy")]
    text = ""
    if points:
        best = max(points, key=lambda r: (r["val/accuracy"], r.get("val/composite") or 0.0))  # the first best
        text = (f"; validation accuracy {points[0]['val/accuracy']:.1%} -> {points[-1]['val/accuracy']:.1%} "
                f"(best {best['val/accuracy']:.1%} at step {best.get('step')})")
    if run.summary.get("exported_step") is not None:
        how = "best validation accuracy" if run.summary.get("select") == "best" else "last step"
        text += f"; exported step {run.summary['exported_step']} ({how})"
    return text


def training_section(runs: Sequence[TrainingRun]) -> str:
    lines = []
    for run in runs:
        weights = run.summary.get("reward_weights") or next((r["reward_weights"] for r in run.records if r.get("reward_weights")), None)
        if run.kind == "sft":
            losses = [r["loss"] for r in run.records if r.get("loss") is not None]
            evals = [r for r in run.records if "eval/format_rate" in r]
            text = f"- **{run.name}** (SFT): {len(losses)} updates"
            if losses:
                text += f", loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            if len(evals) > 1:
                text += f", held-out format rate {evals[0]['eval/format_rate']:.0%} -> {evals[-1]['eval/format_rate']:.0%}"
            elif evals:
                text += f", final held-out format rate {evals[-1]['eval/format_rate']:.0%}"
            # SFT trains on the traces' token loss; weights matter only to its held-out scoring.
            text += f"; reward weights {weights_text(weights)}" if weights else "; no reward weights (token loss)"
            if run.summary.get("seconds"):
                text += f"; {run.summary['seconds'] / 60:.1f} min"
            lines.append(text)
        else:
            first, last = run.summary.get("first_quarter", {}), run.summary.get("last_quarter", {})
            updates = sum(1 for r in run.records if "reward/composite" in r)
            text = f"- **{run.name}** (GRPO): {updates} updates; reward weights {weights_text(weights)}"
            if first and last:
                parts = ", ".join(f"{k.split('/')[-1]} {first[k]:.3f} -> {last[k]:.3f}" for k in first if k.startswith("reward/") and k in last)
                text += f"; first -> last quarter: {parts}"
            text += _validation_text(run)
            spent = _values(run.records, "filter_rollouts")
            if spent:
                text += f"; the dynamic-sampling filter sampled {sum(v for _, v in spent):g} completions beyond the steps' own"
            revisited = sum(v for _, v in _values(run.records, "revisited_groups"))
            if revisited:
                text += f"; {revisited:g} sampled groups were of problems sampled before (grpo.revisit)"
            if run.summary.get("seconds"):
                text += f"; {run.summary['seconds'] / 60:.1f} min"
            lines.append(text)
    return "\n".join(lines) + "\n" if lines else "No training runs found.\n"


def samples_section(variants: Sequence[Variant], count: int = 3, width: int = 700) -> str:
    """The same problems under every variant, so the difference is visible."""
    if not variants:
        return ""
    ids = [r["id"] for r in variants[-1].result.records[:count]]
    out = []
    for sample_id in ids:
        first = next(r for r in variants[-1].result.records if r["id"] == sample_id)
        out.append(f"### {sample_id}\n\n**Question.** {first['question']}\n\n**Reference answer:** {first['reference']}\n")
        for v in variants:
            record = next((r for r in v.result.records if r["id"] == sample_id), None)
            if record is None:
                continue
            verdict = "judged only" if record["correct"] is None else "correct" if record["correct"] else "wrong"
            failure = f", {CATEGORY_LABELS[record['failure']['category']]}" if record.get("failure") else ""
            text = record["completion"] if len(record["completion"]) <= width else record["completion"][:width] + " [...]"
            fence = "````" if "```" in text else "```"
            out.append(f"**{v.label}** ({verdict}{failure}, trace {record['trace']:.2f}):\n\n{fence}\n{text}\n{fence}\n")
    return "\n".join(out)


# ---------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_variants(variants: Sequence[Variant], path: Path) -> Path:
    plt = _pyplot()
    metrics = [m for m in ("accuracy", "format_rate", "trace", "arithmetic", "composite") if any(v.result.metrics[m].n for v in variants)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * max(1, len(variants)) / 2), 4))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(metrics))]
        est = [v.result.metrics[m] for m in metrics]
        means = [0 if math.isnan(e.mean) else e.mean for e in est]
        # Clamped at 0: Wilson's bound at 0 of n (or n of n) can miss the mean by an ulp
        # (1e-17 at n = 20 or 250), and matplotlib refuses a negative error bar.
        errors = [[0 if math.isnan(e.mean) else max(0.0, e.mean - e.low) for e in est],
                  [0 if math.isnan(e.mean) else max(0.0, e.high - e.mean) for e in est]]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=v.label)
    ax.set_xticks(range(len(metrics)), [METRIC_LABELS[m] for m in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (95% CI)")
    ax.set_title("Metrics per variant")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sft(runs: Sequence[TrainingRun], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    twin = None
    for run in runs:
        points = [(r["step"], r["loss"]) for r in run.records if r.get("loss") is not None and "step" in r]
        if points:
            ax.plot(*zip(*points), label=f"{run.name} loss")
        evals = [(r["step"], r["eval/format_rate"]) for r in run.records if "eval/format_rate" in r]
        if evals:
            twin = twin or ax.twinx()
            twin.plot(*zip(*evals), "o--", label=f"{run.name} held-out format rate")
            twin.set_ylim(0, 1.05)
            twin.set_ylabel("format rate")
    ax.set_xlabel("update")
    ax.set_ylabel("completion-token loss")
    ax.set_title("SFT")
    handles = ax.get_legend_handles_labels()
    if twin is not None:
        more = twin.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    ax.legend(*handles, fontsize=8)
    return _save(fig, path)


def _reward_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every ``reward/<name>`` key the run logged, composite first, then as first seen."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update((k, None) for k in r if k.startswith("reward/"))
    return sorted(keys, key=lambda k: k != "reward/composite")


def grpo_panels(run: TrainingRun) -> list[tuple[str, str, list[tuple[str, list[tuple[Any, float]]]]]]:
    """(title, y label, [(line label, (step, value) points)]) per panel the run has data
    for: reward components, validation, groups with spread, filter rollouts."""
    records = [r for r in run.records if "step" in r]
    panels = []
    rewards = [(k.split("/", 1)[1], _values(records, k)) for k in _reward_keys(records)]
    panels.append(("rewards", "mean reward", [(name, points) for name, points in rewards if points]))
    validation = [(k.split("/", 1)[1], _values(records, k)) for k in ("val/accuracy", "val/format_rate")]
    panels.append(("validation (held out)", "share of problems", [(name, points) for name, points in validation if points]))
    # A group whose G rewards are all equal carries no gradient; older runs log the opposite share.
    spread = _values(records, "groups_with_spread")
    label = "groups with spread"
    if not spread:
        spread = [(step, 1.0 - value) for step, value in _values(records, "zero_spread")]
        label = "1 - zero_spread"
    panels.append(("groups with spread", "share of groups", [(label, spread)] if spread else []))
    spent = _values(records, "filter_rollouts")
    revisited = _values(records, "revisited_groups")
    if not any(v for _, v in revisited):  # runs without grpo.revisit log zeros: no line for them
        revisited = []
    panels.append(("dynamic-sampling filter", "rollouts / groups",
                   [(label, points) for label, points in (("filter rollouts", spent), ("revisited groups", revisited)) if points]))
    return [panel for panel in panels if panel[2]]


def plot_grpo(runs: Sequence[TrainingRun], path: Path) -> Path:
    """One row per run, one panel per kind of curve the run logged."""
    plt = _pyplot()
    panels = [grpo_panels(run) for run in runs]
    columns = max(1, *(len(p) for p in panels))
    fig, axes = plt.subplots(len(runs), columns, figsize=(5 * columns, 3.6 * len(runs)), squeeze=False)
    for row, run, run_panels in zip(axes, runs, panels):
        for ax in row[len(run_panels):]:
            ax.axis("off")
        for ax, (title, ylabel, lines) in zip(row, run_panels):
            sparse = title.startswith("validation")  # every N updates: show the points
            for label, points in lines:
                ax.plot(*zip(*points), "o-" if sparse or len(points) == 1 else "-", label=label)
            top = max(value for _, points in lines for _, value in points)
            if title == "dynamic-sampling filter":  # a count
                ax.set_ylim(bottom=0)
            else:  # rewards and shares live in [0, 1] (a composite may pass 1: weights may sum past 1)
                ax.set_ylim(-0.05, max(1.05, top + 0.05))
            ax.set_xlabel("update")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{run.name}: {title}", fontsize=10)
            ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------- report


def write_report(paths: Sequence[Path], out_dir: Path, *, title: str = "tracetune results") -> Path:
    """Write ``out_dir/report.md`` and its plots; returns the report's path."""
    variants, runs = collect(paths)
    if not variants and not runs:
        raise FileNotFoundError(2, "no evaluations (eval.json) or training runs (metrics.jsonl) under", ", ".join(map(str, paths)))
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [f"# {title}\n"]
    if variants:
        sections.append(harness_text(variants) + "\n")
        sections.append("## Results\n\n" + results_table(variants))
        plot_variants(variants, out_dir / "variants.png")
        sections.append("![Metrics per variant](variants.png)\n")
        if len(variants) > 1:
            sections.append("## Paired comparisons\n\n" + comparisons_section(variants))
        sections.append("## Failure analysis\n\nEvery wrong or malformed answer gets one category with its evidence.\n\n" + failure_table(variants))
        sections.append("## LLM judge\n\n" + judge_section(variants))
        if domains := domains_section(variants):
            sections.append("## Per domain\n\n" + domains)
    sections.append("## Training\n\n" + training_section(runs))
    sft_runs = [r for r in runs if r.kind == "sft"]
    grpo_runs = [r for r in runs if r.kind == "grpo"]
    if sft_runs:
        plot_sft(sft_runs, out_dir / "sft_loss.png")
        sections.append("![SFT loss](sft_loss.png)\n")
    if grpo_runs:
        plot_grpo(grpo_runs, out_dir / "grpo_rewards.png")
        sections.append("![GRPO training curves](grpo_rewards.png)\n")
    if variants:
        sections.append("## Sample outputs\n\n" + samples_section(variants))
    report = out_dir / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(sections), encoding="utf-8")
    return report
