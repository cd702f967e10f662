"""``tracetune run``: the whole recipe as one resumable job.

    data -> zero-shot eval -> SFT -> eval -> GRPO -> eval -> judge -> report

Everything lives in one run directory (``runs/<preset>`` by default)::

    config.yaml      the resolved config: every stage reads this file
    pipeline.json    each stage's status and wall time
    data/            the curated SFT traces (train.jsonl, validation.jsonl)
    sft/  grpo/      the training runs (checkpoints, metrics, export)
    eval/<variant>/  the harness's output per variant (zero-shot, sft, grpo)
    report/          report.md and its plots

The training and evaluation stages run as ``tracetune`` sub-processes on the saved
config, so each stage's memory is returned to the system before the next (the
270M's SFT and GRPO peaks do not add up), and each stage is exactly the command a
user could run by hand. Re-running skips finished stages; an interrupted stage
resumes from its own checkpoint or saved samples. SIGTERM / Ctrl-C reach the
running stage, which saves before it stops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tracetune.config import Config
from tracetune.errors import DiskFull, Interrupted, TimeLimitReached, TrainingError
from tracetune.files import atomic_path
from tracetune.runs import claim_directory

SECTIONS = ("data", "rewards", "sft", "grpo", "eval")


@dataclass(frozen=True)
class Stage:
    name: str
    title: str


STAGES = (
    Stage("data", "curate and check the SFT traces"),
    Stage("eval-zero-shot", "evaluate the base model (zero-shot)"),
    Stage("sft", "SFT with LoRA"),
    Stage("eval-sft", "evaluate SFT"),
    Stage("grpo", "GRPO from the SFT policy"),
    Stage("eval-grpo", "evaluate SFT + GRPO"),
    Stage("judge", "LLM judge on every variant"),
    Stage("report", "write the report"),
)


class StageInterrupted(Interrupted):
    def __init__(self, signum: int, stage: str):
        self.signum = signum
        RuntimeError.__init__(self, f"stopped by {signal.Signals(signum).name} during stage {stage} (it saved what it had); "
                                    "re-run `tracetune run` with the same options to continue")


def _die_with_parent() -> None:
    """In the stage's process, before exec: SIGTERM when `tracetune run` dies, even by
    SIGKILL, so that no orphaned stage goes on writing into the run directory while a
    re-run starts another (the stage saves a checkpoint on SIGTERM). Linux only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Pipeline:
    def __init__(self, config: Config, run_dir: Path, console: Console | None = None, *, time_limit_minutes: float | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.console = console or Console(stderr=True)
        self.state_path = self.run_dir / "pipeline.json"
        self.state: dict[str, dict] = {}
        self.stage_peak_kb = 0
        self.started = time.perf_counter()
        # Sessions with a hard end (Kaggle's 9 hours) stop themselves in time to save.
        self.time_limit = time_limit_minutes
        self.deadline = self.started + time_limit_minutes * 60 if time_limit_minutes else None

    # -- state
    def _load_state(self) -> None:
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def _mark(self, stage: str, status: str, seconds: float, note: str = "") -> None:
        self.state[stage] = {"status": status, "seconds": round(seconds, 1), "note": note,
                             "peak_rss_mb": round(self.stage_peak_kb / 1024) if self.stage_peak_kb else None,
                             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with atomic_path(self.state_path) as tmp:
            tmp.write_text(json.dumps(self.state, indent=2) + "\n")

    def overview(self) -> Table:
        table = Table(title=f"tracetune run {self.run_dir} ({self.config.preset})")
        for column in ("#", "stage", "status", "time"):
            table.add_column(column)
        table.add_column("peak memory")
        for index, stage in enumerate(STAGES, start=1):
            info = self.state.get(stage.name, {})
            status = info.get("status", "to do")
            style = {"done": "green", "skipped": "yellow"}.get(status, "")
            seconds, peak = info.get("seconds"), info.get("peak_rss_mb")
            table.add_row(str(index), stage.title, f"[{style}]{status}[/{style}]" if style else status,
                          f"{seconds / 60:.1f} min" if seconds is not None else "",
                          f"{peak / 1024:.1f} GB" if peak else "")
        return table

    # -- the stages
    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    def _tracetune(self, *args: str) -> None:
        """One stage as ``python -m tracetune.cli ARGS``; its output streams through.
        SIGTERM / SIGINT are forwarded so the stage can save before stopping."""
        command = [sys.executable, "-m", "tracetune.cli", *args]
        process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent)
        received: list[int] = []

        def forward(signum, _frame):
            received.append(signum)
            if process.poll() is None:
                process.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                code = self._wait(process, None if self.deadline is None else max(0.0, self.deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGTERM)  # the stage saves a checkpoint, then exits
                code = self._wait(process, None)
                raise TimeLimitReached(self.time_limit, args[0]) from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if code in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT) or received:
            raise StageInterrupted(received[0] if received else (abs(code) % 128 or signal.SIGTERM), args[0])
        if code == DiskFull.exit_code:  # the stage said which file, in its one line
            raise DiskFull(self.run_dir, reported=True)
        if code != 0:
            raise TrainingError(f"stage `tracetune {' '.join(args)}` failed with exit code {code} (its error is above); "
                                "fix it and re-run `tracetune run` to continue from this stage")

    def _wait(self, process: subprocess.Popen, timeout: float | None) -> int:
        """The stage's exit code, waiting as ``Popen.wait`` does, and its own peak RSS
        (the kernel's rusage of that child) into ``stage_peak_kb``."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                self.stage_peak_kb = max(self.stage_peak_kb, usage.ru_maxrss)
                return process.returncode
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired(process.args, timeout)
            time.sleep(0.2)

    def stage_data(self) -> str:
        # The same two commands a user runs by hand: curate the traces, then the
        # harness's sanity check (the curated targets must score perfectly).
        out = self.run_dir / "data"
        self._tracetune("data", "--out", str(out), "--preset", str(self.config_path))
        self._tracetune("validate", "--preset", str(self.config_path))
        counts = {split: len((out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()) for split in ("train", "validation")}
        return f"{counts['train']} train + {counts['validation']} validation traces, targets score 100%"

    def _eval(self, variant: str, model_args: list[str]) -> str:
        out = self.run_dir / "eval" / variant
        self._tracetune("eval", *model_args, "--out", str(out), "--preset", str(self.config_path))
        metrics = json.loads((out / "metrics.json").read_text())["metrics"]
        return (f"accuracy {metrics['accuracy']['mean']:.1%}, format rate {metrics['format_rate']['mean']:.1%}, "
                f"trace {metrics['trace']['mean']:.3f} on {metrics['format_rate']['n']} problems")

    def stage_eval_zero_shot(self) -> str:
        return self._eval("zero-shot", ["--model", self.config.sft.model])

    def stage_sft(self) -> str:
        self._tracetune("sft", "--preset", str(self.config_path), "--run-dir", str(self.run_dir / "sft"))
        return "merged weights in sft/export/merged"

    def stage_eval_sft(self) -> str:
        return self._eval("sft", ["--checkpoint", str(self.run_dir / "sft")])

    def stage_grpo(self) -> str:
        self._tracetune("grpo", "--preset", str(self.config_path), "--run-dir", str(self.run_dir / "grpo"),
                        "--init", str(self.run_dir / "sft" / "export" / "merged"))
        return "merged weights in grpo/export/merged"

    def stage_eval_grpo(self) -> str:
        return self._eval("grpo", ["--checkpoint", str(self.run_dir / "grpo")])

    def stage_judge(self) -> str | None:
        from tracetune.evaluate import judge_directory, judge_settings

        judge = judge_settings(self.config)
        if judge is None:
            return None
        notes = []
        for variant in ("zero-shot", "sft", "grpo"):
            summary = judge_directory(self.run_dir / "eval" / variant, judge)
            notes.append(f"{variant} {summary['mean']:.2f}" if summary["scored"] else f"{variant} unscored")
        return ", ".join(notes)

    def stage_report(self) -> str:
        from tracetune.report import write_report

        path = write_report([self.run_dir], self.run_dir / "report", title=f"tracetune: {self.config.preset} on {self.config.sft.model}")
        return str(path)

    # -- the run
    def run(self) -> Path:
        claim_directory(self.run_dir, self.config, SECTIONS)
        self._load_state()
        self.console.print(self.overview())
        for index, stage in enumerate(STAGES, start=1):
            if self.state.get(stage.name, {}).get("status") in ("done", "skipped"):
                continue
            if self.deadline is not None and time.perf_counter() >= self.deadline:
                raise TimeLimitReached(self.time_limit, stage.name)
            elapsed = (time.perf_counter() - self.started) / 60
            self.console.rule(f"[bold]stage {index}/{len(STAGES)}: {stage.title}[/bold]  (pipeline {elapsed:.1f} min)")
            start = time.perf_counter()
            self.stage_peak_kb = 0  # the largest peak RSS of the stage's processes
            note = getattr(self, "stage_" + stage.name.replace("-", "_"))()
            status = "skipped" if note is None else "done"
            if note is None:
                note = "no judge endpoint configured (eval.judge_base_url or TRACETUNE_JUDGE_BASE_URL)"
            self._mark(stage.name, status, time.perf_counter() - start, note)
            self.console.print(f"[green]{stage.name}[/green]: {note}" if status == "done" else f"[yellow]{stage.name} skipped[/yellow]: {note}")
        self.console.print(self.overview())
        return self.run_dir / "report" / "report.md"
