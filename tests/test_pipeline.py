"""``tracetune run`` end to end on the tiny model, and ``tracetune report``."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import finish, start_tracetune, wait_for
from tracetune.pipeline import STAGES

# A CI-sized pipeline: SFT long enough to learn the format, 4 GRPO updates, 16
# problems per evaluation, 2 judged samples per variant.
SETTINGS = ["sft.max_steps=200", "sft.eval_every_steps=0", "sft.checkpoint_steps=50", "grpo.max_steps=4",
            "eval.limit=16", "eval.judge_samples=2"]


@pytest.fixture(scope="module")
def judge_url():
    """``tracetune serve``'s app around the tiny model on loopback: a real
    OpenAI-compatible endpoint (its ratings are gibberish, so they are unscored)."""
    from tracetune.models.registry import load_model
    from tracetune.serve import create_app, running_server

    with running_server(create_app(load_model("tiny"), model_name="tiny-judge", default_max_tokens=32)) as url:
        yield url


def metrics_of(run, variant: str) -> dict:
    return json.loads((run / "eval" / variant / "metrics.json").read_text())["metrics"]


@pytest.mark.slow
def test_the_pipeline_runs_every_stage_and_continues_after_a_stop(tmp_path, judge_url):
    run = tmp_path / "run"
    args = ("--preset", "tiny", "--judge-url", judge_url, "--judge-model", "tiny-judge")
    first = start_tracetune("run", run, *args, settings=SETTINGS)
    # Stop it during SFT, once a checkpoint is saved: the stage saves and the pipeline exits 143.
    wait_for(run / "sft" / "checkpoints" / "50" / "commit_success.txt", first, timeout=600)
    first.send_signal(signal.SIGTERM)
    stopped = finish(first, timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "re-run `tracetune run`" in stopped.stderr and "Traceback" not in stopped.stderr
    state = json.loads((run / "pipeline.json").read_text())
    assert state["data"]["status"] == state["eval-zero-shot"]["status"] == "done" and "sft" not in state

    # SIGKILL the pipeline itself at a seeded point of the SFT stage: its stage process
    # must not live on as an orphan writing into the run directory (it gets SIGTERM
    # and saves), and the next run continues.
    second = start_tracetune("run", run, *args, settings=SETTINGS)
    wait_for(run / "sft" / "checkpoints" / "100" / "commit_success.txt", second, timeout=600)
    time.sleep(random.Random(5).uniform(0.0, 2.0))
    stage = [p for p in psutil.Process(second.pid).children() if "sft" in p.cmdline()]
    assert stage, "the SFT stage runs as a child process"
    second.send_signal(signal.SIGKILL)
    stage[0].wait(timeout=120)  # it got SIGTERM when its parent died: it saves and leaves
    killed = finish(second, timeout=60)  # the stage's output came through the same pipe
    assert "checkpoint saved" in killed.stderr, killed.stderr

    resumed = finish(start_tracetune("run", run, *args, settings=SETTINGS), timeout=1500)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr  # SFT continued from its checkpoint
    state = json.loads((run / "pipeline.json").read_text())
    assert [state[s.name]["status"] for s in STAGES] == ["done"] * len(STAGES)
    # each stage that runs as its own process records that process's peak RSS
    assert all(state[name]["peak_rss_mb"] > 0 for name in ("data", "eval-zero-shot", "sft", "grpo", "eval-grpo")), state
    assert state["sft"]["peak_rss_mb"] > 200 and state["grpo"]["peak_rss_mb"] > 200, state  # JAX and a model live there

    # Something was learned: SFT taught the format the base model lacks.
    zero, sft = metrics_of(run, "zero-shot"), metrics_of(run, "sft")
    assert zero["format_rate"]["mean"] <= 0.1 and sft["format_rate"]["mean"] >= 0.8, (zero, sft)
    assert metrics_of(run, "grpo")["accuracy"]["n"] == 16
    # The judge ran against the loopback endpoint for every variant.
    for variant in ("zero-shot", "sft", "grpo"):
        judge = json.loads((run / "eval" / variant / "judge.json").read_text())
        assert judge["n"] == 2 and judge["judge_model"] == "tiny-judge"

    report = (run / "report" / "report.md").read_text()
    for row in ("| Zero-shot |", "| SFT only |", "| SFT + GRPO |"):
        assert row in report
    for section in ("## Results", "## Failure analysis", "## LLM judge", "## Training", "## Sample outputs"):
        assert section in report
    for plot in ("variants.png", "sft_loss.png", "grpo_rewards.png"):
        assert (run / "report" / plot).stat().st_size > 1000

    # Nothing left to do: a re-run only prints the overview.
    start = time.perf_counter()
    again = finish(start_tracetune("run", run, *args, settings=SETTINGS), timeout=300)
    assert again.returncode == 0 and "stage 1/" not in again.stderr, again.stderr
    assert time.perf_counter() - start < 60


def test_report_names_what_it_cannot_find(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tracetune.cli", "report", str(tmp_path / "nothing-here")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nothing-here" in result.stderr, result.stderr


MIX_SETTINGS = ["sft.max_steps=100", "sft.eval_every_steps=0", "grpo.max_steps=3", "eval.limit=12", "eval.judge_samples=4"]


@pytest.mark.slow
def test_a_mixed_run_with_the_judge_in_the_reward_runs_every_stage(tmp_path, judge_url):
    """`tracetune run --preset tiny-mix`: the arithmetic task (SFT and GRPO) mixed with
    the open-ended prompts (GRPO only), the judge in GRPO's reward in group mode,
    against `tracetune serve` on loopback; its guided replies always parse, so
    nothing is unscored. The evaluations and the report have the per-domain table."""
    run = tmp_path / "mix"
    result = finish(start_tracetune("run", run, "--preset", "tiny-mix", "--judge-url", judge_url, "--judge-model", "tiny-judge",
                                    settings=MIX_SETTINGS), timeout=1500)
    assert result.returncode == 0, result.stderr
    assert "no SFT traces from open (GRPO only)" in result.stderr
    state = json.loads((run / "pipeline.json").read_text())
    assert [state[s.name]["status"] for s in STAGES] == ["done"] * len(STAGES)
    traces = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert traces and all(t["id"].startswith("arithmetic/") for t in traces)  # only the source with worked solutions

    steps = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "reward/judge" in r]
    assert len(steps) == 3
    for record in steps:
        assert record["judge/requests"] == 8  # group mode: one request per prompt of grpo.prompts_per_step
        assert record["judge/unscored"] == 0 and record["judge/prompt_tokens"] > 0
        assert record["reward_weights"]["judge"] == 0.3

    domains = ["arithmetic", "creative_writing", "ideation", "summarization", "math", "coding", "science"]
    for variant in ("zero-shot", "sft", "grpo"):
        saved = json.loads((run / "eval" / variant / "metrics.json").read_text())
        assert saved["settings"]["source"] == "arithmetic+open"
        assert [d["domain"] for d in saved["domains"]] == domains, saved["domains"]  # 12 open prompts: 2 per domain
        judge = json.loads((run / "eval" / variant / "judge.json").read_text())
        assert judge["n"] == judge["scored"] == 4
    report = (run / "report" / "report.md").read_text()
    assert "## Per domain" in report and all(f"| {d} |" in report for d in domains)
