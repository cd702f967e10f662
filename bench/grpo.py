"""Seconds per GRPO step for the embedded Gemma 3 270M at the `cpu-demo` settings,
split into rollout, reward, reference log-probabilities and update, with peak RSS
and the number of XLA compiles.

Sides, each in its own process on a fresh run directory, one after the other:
  chunked   cpu-demo as shipped: tracetune's sampler, log-probs with the tied head
            only at completion positions and the step's padding trimmed
            (`grpo.logprobs=chunked`, logprobs.py)
  full      the path before it: Tunix's own `compute_per_token_logps` and GRPO
            loss over the whole padded budget (`grpo.logprobs=full`)
  vanilla   (with --vanilla) Tunix's sampler instead of tracetune's, chunked
  before    (with --before REV) tracetune at an earlier commit, from a git worktree
            of REV, on Tunix's log-prob path (`grpo.logprobs=full`): the step as it
            was when the work on speed started (e4c867d, 2026-12-02: Tunix's log-probs
            and train step over the padded budget, the first tracetune sampler).
            The other sides then do that commit's work: its reward weights, no
            curriculum, no dynamic-sampling filter, no validation
            (``EQUAL_WORK``); the preset's own settings otherwise.
The first step (compilation) is reported apart from the mean of the others; the
ratios divide each side's wall seconds per step (from the steps' own records) by
the chunked side's.

    python bench/grpo.py [--steps 4] [--init gemma3-270m] [--set grpo.prompts_per_step=2] [--vanilla]
                         [--before e4c867d] [--no-full]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import sides


SIDES = {
    "chunked": ["grpo.rollout_engine=tracetune", "grpo.logprobs=chunked"],
    "full": ["grpo.rollout_engine=tracetune", "grpo.logprobs=full", "grpo.rows_per_pass=0",  # Tunix's loss takes the whole micro-batch
             "grpo.row_gradients=recompute", "grpo.prompt_width=0"],  # ... and pads prompts to the budget
    "vanilla": ["grpo.rollout_engine=vanilla", "grpo.logprobs=chunked"],
    "before": ["grpo.rollout_engine=tracetune", "grpo.logprobs=full"],  # names that commit knows
}
# What the earlier commit's cpu-demo step did, for the sides beside it: the recipe's
# three weights, a seeded shuffle of the prompts, every group kept, no validation.
EQUAL_WORK = ["rewards.correctness=0.6", "rewards.trace=0.25", "rewards.confidence=0.15", "rewards.arithmetic=0",
              "grpo.curriculum=none", "grpo.dynamic_sampling=off", "grpo.revisit=0", "grpo.val_every_steps=0", "grpo.select=last"]


def run_side(side: str, steps: int, init: str, overrides: list[str]) -> dict:
    import jax

    import tracetune
    from tracetune.config import load_config
    from tracetune.grpo import train_grpo

    compiles = []  # (when it ended, seconds): a step that compiles a new padded shape pays for it once
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append((time.perf_counter(), seconds))
        if event == "/jax/core/compile/backend_compile_duration" else None)
    started = time.perf_counter()
    config = load_config("cpu-demo", [*overrides, *SIDES[side], f"grpo.max_steps={steps}",
                                      f"grpo.init={init}", "grpo.checkpoint_minutes=0"])
    with tempfile.TemporaryDirectory() as directory:
        result = train_grpo(config, Path(directory))
    phases = [r["seconds"] for r in result.history]
    later = phases[1:] or phases
    mean = {k: sum(p.get(k, 0.0) for p in later) / len(later) for k in ("rollout", "reward", "reference", "update")}
    # Compiles after the first step (new padded widths) and how long they took, per later step.
    first_end = started + result.history[0]["elapsed_seconds"] if result.history else started
    late = [seconds for when, seconds in compiles if when > first_end]
    return {
        "side": side,
        "compiles": len(compiles),
        "compile_seconds": sum(seconds for _, seconds in compiles),
        "later_compile_seconds_per_step": sum(late) / max(1, len(later)),
        "padded_widths": sorted({tuple(w) for r in result.history for w in r.get("padded_widths", [])}),
        "steps": result.steps,
        "first_step_seconds": sum(phases[0].values()),
        "seconds_per_step": sum(mean.values()),
        # wall time between the records of later steps: the phases plus whatever runs
        # between them (Tunix's loop, metrics, tracing a new shape)
        "wall_seconds_per_step": ((result.history[-1]["elapsed_seconds"] - result.history[0]["elapsed_seconds"])
                                  / (len(result.history) - 1) if len(result.history) > 1 else sum(phases[0].values())),
        "phases": mean,
        "completion_length": sum(r["completion_length"] for r in result.history) / len(result.history),
        "completions_per_step": config.grpo.prompts_per_step * config.grpo.num_generations,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tracetune": str(Path(tracetune.__file__).parent),  # which checkout ran
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--init", default="gemma3-270m", help="model or SFT run to start from")
    parser.add_argument("--set", action="append", default=[], help="config override on top of cpu-demo (not the before side)")
    parser.add_argument("--vanilla", action="store_true", help="also run Tunix's sampler (chunked log-probs)")
    parser.add_argument("--before", metavar="REV", help="also run tracetune at commit REV on Tunix's log-prob path, "
                        "every side then doing that commit's work (EQUAL_WORK)")
    parser.add_argument("--no-full", action="store_true", help="skip the full side")
    parser.add_argument("--side", choices=tuple(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        sides.report(run_side(args.side, args.steps, args.init, args.set))
        return
    names = ["chunked"] + ([] if args.no_full else ["full"]) + (["vanilla"] if args.vanilla else [])
    names += ["before"] if args.before else []
    common = ["--steps", str(args.steps), "--init", args.init]
    ours = [arg for item in (EQUAL_WORK if args.before else []) + args.set for arg in ("--set", item)]
    results = {}
    for side in names:
        if side == "before":
            tree = sides.worktree(args.before)
            results[side] = sides.run(__file__, "--side", side, *common, env={"PYTHONPATH": str(tree / "src")})
            if not results[side]["tracetune"].startswith(str(tree)):
                raise SystemExit(f"the before side imported {results[side]['tracetune']}, not {tree}")
        else:
            results[side] = sides.run(__file__, "--side", side, *common, *ours)

    def row(label: str, fmt: str, value) -> None:
        print(f"{label:24}" + "".join(f"{fmt.format(value(results[side])):>12}" for side in names))

    def rollout_rate(side: dict) -> float:  # generated tokens per second of rollout (kept groups only)
        return side["completion_length"] * side["completions_per_step"] / side["phases"]["rollout"]

    print(f"{'seconds per step':24}" + "".join(f"{side:>12}" for side in names))
    for phase in ("rollout", "reward", "reference", "update"):
        row(f"  {phase}", "{:.2f}", lambda r, phase=phase: r["phases"][phase])
    row("  total", "{:.2f}", lambda r: r["seconds_per_step"])
    row("wall seconds per step", "{:.2f}", lambda r: r["wall_seconds_per_step"])
    row("  of which compiling", "{:.2f}", lambda r: r["later_compile_seconds_per_step"])
    row("  wall less compiles", "{:.2f}", lambda r: r["wall_seconds_per_step"] - r["later_compile_seconds_per_step"])
    row("first step (compile)", "{:.1f}", lambda r: r["first_step_seconds"])
    row("XLA compiles", "{}", lambda r: r["compiles"])
    row("peak RSS MB", "{:.0f}", lambda r: r["peak_rss_mb"])
    row("completion length", "{:.1f}", lambda r: r["completion_length"])
    row("rollout tokens/s", "{:.1f}", rollout_rate)
    chunked = results["chunked"]
    steady = lambda r: r["wall_seconds_per_step"] - r["later_compile_seconds_per_step"]  # noqa: E731
    for side in names[1:]:
        other = results[side]
        print(f"ratio {side} / chunked: wall seconds per step {other['wall_seconds_per_step'] / chunked['wall_seconds_per_step']:.2f}x, "
              f"less compiles {steady(other) / steady(chunked):.2f}x; update {other['phases']['update'] / chunked['phases']['update']:.2f}x, "
              f"reference {other['phases']['reference'] / chunked['phases']['reference']:.2f}x, "
              f"peak RSS {other['peak_rss_mb'] / chunked['peak_rss_mb']:.2f}x")
    # The targets ("Training steps at the machine's limit"): against the path
    # the work started from, measured in this run; the peak in bytes (4 GB = 3815 MiB).
    if "before" in results:
        before = results["before"]
        sides.target("GRPO step, before / chunked, wall seconds", before["wall_seconds_per_step"] / chunked["wall_seconds_per_step"], 2.2)
        sides.target("GRPO step, before / chunked, less compiles", steady(before) / steady(chunked), 2.2)
    sides.target("GRPO peak RSS, GB (at most)", chunked["peak_rss_mb"] * 2**20 / 1e9, 4.0, at_most=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
