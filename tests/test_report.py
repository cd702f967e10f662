"""``tracetune report`` on small fake run directories: paired comparisons, reward
weights, and GRPO curves for whatever keys a run logged (old runs keep working)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tracetune.report import collect, comparison_pairs, grpo_panels, plot_grpo, write_report
from tracetune.scoring import score_sample

from conftest import wrap

N = 20
WEIGHTS = {"correctness": 0.6, "trace": 0.25, "confidence": 0.15}


def sample(i: int, correct: bool, well_formed: bool) -> dict:
    """One samples.jsonl record, scored by the harness's own scoring."""
    answer = "72" if correct else "71"
    completion = wrap(answer, "Step 1: 48 + 24 = 72.\nTherefore, the answer is 72.") if well_formed else f"I think it is {answer}."
    score = score_sample("How many clips did Natalia sell?", "72", completion, [-0.1], id=f"test-{i}")
    return {**score.record(), "finish_reason": "stop", "completion_tokens": 20, "failure": None}


def write_eval(directory: Path, records: list[dict], weights: dict | None = WEIGHTS) -> None:
    directory.mkdir(parents=True)
    settings = {"variant": directory.name, "model": "tiny", "source": "gsm8k", "split": "test", "limit": N,
                "max_new_tokens": 64, "prompt_style": "plain", "decoding": "greedy"}
    if weights is not None:
        settings["reward_weights"] = weights
    (directory / "eval.json").write_text(json.dumps(settings))
    (directory / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_run(directory: Path, records: list[dict], summary: dict) -> None:
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "summary.json").write_text(json.dumps(summary))


def old_grpo_records(steps: int = 6) -> list[dict]:
    """What GRPO logged before this change: three components and zero_spread."""
    return [{"step": s, "reward/composite": 0.2 + 0.01 * s, "reward/correctness": 0.0, "reward/trace": 0.9,
             "reward/confidence": 0.0, "zero_spread": 0.75, "truncated": 0.0, "reward_weights": WEIGHTS}
            for s in range(1, steps + 1)]


def new_grpo_records(steps: int = 6) -> list[dict]:
    """A newer run: an arithmetic component, validation every 2 updates, the share of
    groups with spread and the dynamic-sampling filter's rollouts."""
    out = []
    for s in range(1, steps + 1):
        r = {"step": s, "reward/composite": 0.3, "reward/correctness": 0.1 * s, "reward/trace": 0.8,
             "reward/confidence": 0.05, "reward/arithmetic": 0.5, "zero_spread": 0.5, "groups_with_spread": 0.9,
             "filter_rollouts": 4 * (s % 2), "revisited_groups": s // 3}
        out.append(r)
        if s % 2 == 0:  # a line of its own, after the update's
            out.append({"step": s, "val/accuracy": 0.05 * s, "val/format_rate": 0.9, "val/composite": 0.4})
    return out


@pytest.fixture
def run(tmp_path) -> Path:
    """A `tracetune run` directory: three evaluations of the same 20 problems, an SFT
    run from before SFT recorded weights, and a GRPO run with a fourth component.

    zero-shot: every answer wrong and malformed
    sft:       right on problems 0-7, every answer well formed
    grpo:      right on 2-11 (won 8-11, lost 0-1), malformed on 18 and 19
    """
    root = tmp_path / "run"
    write_eval(root / "eval" / "zero-shot", [sample(i, False, False) for i in range(N)])
    write_eval(root / "eval" / "sft", [sample(i, i < 8, True) for i in range(N)])
    write_eval(root / "eval" / "grpo", [sample(i, 2 <= i < 12, i < 18) for i in range(N)])
    write_run(root / "sft", [{"step": s, "loss": 2.0 / s} for s in range(1, 5)] + [{"step": 4, "eval/format_rate": 1.0}],
              {"steps": 4, "seconds": 60})
    write_run(root / "grpo", new_grpo_records(),
              {"steps": 6, "reward_weights": {**WEIGHTS, "arithmetic": 0.1}, "seconds": 120, "exported_step": 6, "select": "best",
               "first_quarter": {"reward/correctness": 0.1}, "last_quarter": {"reward/correctness": 0.6}})
    return root


def test_the_report_compares_each_variant_with_the_one_before_it(run, tmp_path):
    report = write_report([run], tmp_path / "out").read_text()
    section = report.split("## Paired comparisons")[1].split("\n## ")[0]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    # SFT vs zero-shot: accuracy won 8 lost 0, p = 2 / 2^8 = 0.0078; format won 20, p = 2 / 2^20 < 0.001
    assert "| SFT only vs Zero-shot | 20 | **8 / 0 / 0.008** | **20 / 0 / < 0.001** |" in lines["SFT only vs Zero-shot"]
    # GRPO vs SFT: accuracy won 4 lost 2, p = 2 * (1 + 6 + 15) / 64 = 0.6875; format lost 2, p = 2 / 4 = 0.5
    assert "| SFT + GRPO vs SFT only | 20 | 4 / 2 / 0.688 | 0 / 2 / 0.500 |" in lines["SFT + GRPO vs SFT only"]
    assert "Avg trace score: difference [95% CI]" in section and "Avg composite reward: difference [95% CI]" in section
    # plain sentences: p < 0.05 said when it holds, and when it does not
    assert "GSM8K accuracy: **higher for SFT only, p < 0.05** (8 won, 0 lost, p = 0.008)" in section
    assert "Format rate: **higher for SFT only, p < 0.05** (20 won, 0 lost, p < 0.001)" in section
    assert "GSM8K accuracy: no significant difference, p >= 0.05 (4 won, 2 lost, p = 0.688)" in section
    assert "(20 shared problems)" in section
    # the report is the same on every run (the bootstrap is seeded)
    assert write_report([run], tmp_path / "again").read_text() == report


def test_every_evaluation_and_training_run_states_its_reward_weights(run, tmp_path):
    report = write_report([run], tmp_path / "out").read_text()
    assert "weights correctness=0.6, trace=0.25, confidence=0.15 for every variant" in report
    training = report.split("## Training")[1]
    # whatever names the mapping has, a fourth component included
    assert "(GRPO): 6 updates; reward weights correctness=0.6, trace=0.25, confidence=0.15, arithmetic=0.1" in training
    assert "(SFT): 4 updates, loss 2.000 -> 0.500" in training and "no reward weights (token loss)" in training
    assert "validation accuracy 10.0% -> 30.0% (best 30.0% at step 6)" in training
    assert "the dynamic-sampling filter sampled 12 completions beyond the steps' own" in training  # 4 on each odd step of 6
    assert "; 5 sampled groups were of problems sampled before (grpo.revisit)" in training  # 0+0+1+1+1+2
    assert "exported step 6 (best validation accuracy)" in training


def test_the_harness_sentence_names_worked_examples_only_when_there_were_some(run, tmp_path):
    assert "the `plain` prompt. Intervals" in write_report([run], tmp_path / "plain").read_text()
    for variant in ("zero-shot", "sft", "grpo"):
        path = run / "eval" / variant / "eval.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "shots": 4}))
    report = write_report([run], tmp_path / "shots").read_text()
    assert "the `plain` prompt after 4 worked training examples (`eval.shots`). Intervals" in report


def test_evaluations_with_different_weights_say_so(run, tmp_path):
    other = {**WEIGHTS, "arithmetic": 0.2}
    (run / "eval" / "grpo" / "eval.json").write_text(json.dumps(
        {**json.loads((run / "eval" / "grpo" / "eval.json").read_text()), "reward_weights": other}))
    report = write_report([run], tmp_path / "out").read_text()
    assert "different weights per variant" in report and "SFT + GRPO: correctness=0.6, trace=0.25, confidence=0.15, arithmetic=0.2" in report
    assert "The two composites are scored with different weights" in report


def test_variants_on_different_problems_are_compared_on_the_shared_ones(run, tmp_path):
    path = run / "eval" / "grpo" / "samples.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:15]))  # problems 0-14
    report = write_report([run], tmp_path / "out").read_text()
    assert "| SFT + GRPO vs SFT only | 15 (5 left out) |" in report
    assert "15 shared problems, 5 scored by only one left out" in report


def test_variants_without_a_shared_problem_are_named_not_fatal(tmp_path):
    root = tmp_path / "run"
    write_eval(root / "eval" / "sft", [sample(i, True, True) for i in range(3)])
    write_eval(root / "eval" / "grpo", [sample(i, True, True) for i in range(10, 13)])
    report = write_report([root], tmp_path / "out").read_text()
    assert "**SFT + GRPO vs SFT only**: SFT only (3 problems) and SFT + GRPO (3 problems) share no problem id" in report


def test_an_old_run_still_reports(tmp_path):
    """A run from before weights by name, validation and the filter: eval.json without
    weights, GRPO with three components and zero_spread only."""
    root = tmp_path / "run"
    write_eval(root / "eval" / "sft", [sample(i, i < 2, True) for i in range(5)], weights=None)
    write_eval(root / "eval" / "grpo", [sample(i, i < 3, True) for i in range(5)], weights=None)
    write_run(root / "grpo", old_grpo_records(), {"steps": 6})
    out = tmp_path / "out"
    report = write_report([root], out).read_text()
    assert "The evaluations do not record their reward weights" in report
    assert "| SFT + GRPO vs SFT only | 5 | 1 / 0 / 1.000 |" in report
    assert "(GRPO): 6 updates; reward weights correctness=0.6, trace=0.25, confidence=0.15" in report  # from the records
    assert "validation accuracy" not in report and "filter" not in report
    assert (out / "grpo_rewards.png").stat().st_size > 1000


def test_grpo_panels_plot_every_logged_curve_and_skip_missing_keys(tmp_path):
    new = collect_run(tmp_path / "new", new_grpo_records())
    panels = {title: dict(lines) for title, _, lines in grpo_panels(new)}
    assert list(panels) == ["rewards", "validation (held out)", "groups with spread", "dynamic-sampling filter"]
    # every reward/<name> key, the composite first
    assert list(panels["rewards"]) == ["composite", "correctness", "trace", "confidence", "arithmetic"]
    assert panels["validation (held out)"]["accuracy"] == [(2, 0.1), (4, 0.2), (6, pytest.approx(0.3))]  # every 2 updates
    assert panels["groups with spread"] == {"groups with spread": [(s, 0.9) for s in range(1, 7)]}
    assert panels["dynamic-sampling filter"]["filter rollouts"] == [(s, 4.0 * (s % 2)) for s in range(1, 7)]
    assert panels["dynamic-sampling filter"]["revisited groups"] == [(s, float(s // 3)) for s in range(1, 7)]

    old = collect_run(tmp_path / "old", old_grpo_records())
    panels = {title: dict(lines) for title, _, lines in grpo_panels(old)}
    assert list(panels) == ["rewards", "groups with spread"]  # no validation, no filter: skipped
    assert panels["groups with spread"] == {"1 - zero_spread": [(s, 0.25) for s in range(1, 7)]}  # 1 - 0.75

    path = plot_grpo([new, old], tmp_path / "grpo.png")  # one row per run, unequal panel counts
    assert path.stat().st_size > 1000


def collect_run(root: Path, records: list[dict]):
    write_run(root / "grpo", records, {})
    _, runs = collect([root])
    assert [r.kind for r in runs] == ["grpo"]
    return runs[0]


def test_an_ablation_pairs_within_each_directory_and_with_the_first_directory(tmp_path):
    for name in ("full", "no-trace"):
        for variant in ("sft", "grpo"):
            write_eval(tmp_path / name / "eval" / variant, [sample(i, i < 2, True) for i in range(4)])
    variants, _ = collect([tmp_path / "full", tmp_path / "no-trace"])
    pairs = [(a.name, b.name) for a, b in comparison_pairs(variants)]
    assert pairs == [("full/sft", "full/grpo"), ("no-trace/sft", "no-trace/grpo"),
                     ("full/sft", "no-trace/sft"), ("full/grpo", "no-trace/grpo")]
    report = write_report([tmp_path / "full", tmp_path / "no-trace"], tmp_path / "out").read_text()
    assert "against the first directory's variant of the same name" in report
    assert "| no-trace/SFT + GRPO vs full/SFT + GRPO | 4 | 0 / 0 / 1.000 |" in report  # identical answers: p = 1


def open_sample(i: int, well_formed: bool, domain: str) -> dict:
    """An open prompt's record: no reference, judged only."""
    completion = wrap("A haiku.", "Step 1: pick the season.\nTherefore, the answer is a haiku.") if well_formed else "A haiku."
    score = score_sample("Write a haiku.", "", completion, None, id=f"{domain}-{i}", kind="open")
    return {**score.record(), "domain": domain, "finish_reason": "stop", "completion_tokens": 20, "failure": None}


def test_the_per_domain_table_shows_only_when_a_variant_has_domains(run, tmp_path):
    assert "## Per domain" not in write_report([run], tmp_path / "plain").read_text()  # GSM8K only: one group

    root = tmp_path / "domains"
    # sft: 4 writing prompts, 3 well formed; 4 science, all well formed. grpo: all 8 well formed, judged.
    write_eval(root / "eval" / "sft", [open_sample(i, i < 3, "writing") for i in range(4)] + [open_sample(i, True, "science") for i in range(4)])
    write_eval(root / "eval" / "grpo", [open_sample(i, True, "writing") for i in range(4)] + [open_sample(i, True, "science") for i in range(4)])
    judgements = [{"id": "writing-0", "score": 4}, {"id": "writing-1", "score": 2}, {"id": "writing-2", "score": None},
                  {"id": "science-0", "score": 5}]
    (root / "eval" / "grpo" / "judge.json").write_text(json.dumps(
        {"judge_model": "judge-x", "n": 4, "scored": 3, "unscored": 1, "mean": 11 / 3, "low": 1.0, "high": 5.0,
         "histogram": {}, "judgements": judgements}))
    report = write_report([root], tmp_path / "out").read_text()
    section = report.split("## Per domain\n")[1].split("\n## ")[0]
    assert "rated: SFT only: not judged; SFT + GRPO: judge-x, 3 of 4 scored (1 unscored)." in section  # the judge, and how many
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0] == "| Domain | Variant | n | Format rate | Avg trace score | Accuracy | Judge (1-5) | Judged |"
    # Grouped by domain, the variants side by side; format 3/4 has the Wilson interval [30.1, 95.4]
    # (test_evaluate works it out); open prompts have no accuracy; judge 4 and 2: 3.00 [1.04, 4.96].
    assert [r.split(" | ")[:3] for r in rows[1:]] == [["| writing", "SFT only", "4"], ["| writing", "SFT + GRPO", "4"],
                                                      ["| science", "SFT only", "4"], ["| science", "SFT + GRPO", "4"]]
    assert rows[1].split(" | ")[3] == "75.0% [30.1, 95.4]" and rows[1].split(" | ")[5:] == ["—", "not judged", "— |"]
    assert rows[2].split(" | ")[5:] == ["—", "3.00 [1.04, 4.96]", "2 (+1 unscored) |"]
    assert rows[4].split(" | ")[6:] == ["5.00 [5.00, 5.00]", "1 |"]
    # The other sections are the same with or without domains.
    assert "## Results" in report and "## LLM judge" in report and "judge-x" in report.split("## LLM judge")[1]
