"""Seconds per GRPO step for the embedded Gemma 3 270M at the `cpu-demo` settings,
split into rollout, reward, reference log-probabilities and update, with peak RSS.

Ours: the `tracetune` rollout engine (tracetune's sampler). Peer, in the same run:
Tunix's vanilla sampler (`grpo.rollout_engine=vanilla`), the same steps otherwise.
Each side runs in its own process on a fresh run directory; the first step
(compilation) is reported apart from the mean of the others.

    python bench/grpo.py [--steps 4] [--init gemma3-270m] [--set grpo.prompts_per_step=2]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import sides


def run_side(engine: str, steps: int, init: str, overrides: list[str]) -> dict:
    from tracetune.config import load_config
    from tracetune.grpo import train_grpo

    config = load_config("cpu-demo", [*overrides, f"grpo.rollout_engine={engine}", f"grpo.max_steps={steps}",
                                      f"grpo.init={init}", "grpo.checkpoint_minutes=0"])
    with tempfile.TemporaryDirectory() as directory:
        result = train_grpo(config, Path(directory))
    phases = [r["seconds"] for r in result.history]
    later = phases[1:] or phases
    mean = {k: sum(p.get(k, 0.0) for p in later) / len(later) for k in ("rollout", "reward", "reference", "update")}
    return {
        "engine": engine,
        "steps": result.steps,
        "first_step_seconds": sum(phases[0].values()),
        "seconds_per_step": sum(mean.values()),
        "phases": mean,
        "completion_length": sum(r["completion_length"] for r in result.history) / len(result.history),
        "completions_per_step": config.grpo.prompts_per_step * config.grpo.num_generations,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--init", default="gemma3-270m", help="model or SFT run to start from")
    parser.add_argument("--set", action="append", default=[], help="config override on top of cpu-demo")
    parser.add_argument("--engine", choices=("tracetune", "vanilla"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        sides.report(run_side(args.engine, args.steps, args.init, args.set))
        return
    results = {}
    for engine in ("tracetune", "vanilla"):
        overrides = [arg for item in args.set for arg in ("--set", item)]
        results[engine] = sides.run(__file__, "--engine", engine, "--steps", str(args.steps), "--init", args.init, *overrides)
    ours, peer = results["tracetune"], results["vanilla"]
    print(f"{'seconds per step':22}{'tracetune':>12}{'Tunix vanilla':>15}")
    for phase in ("rollout", "reward", "reference", "update"):
        print(f"  {phase:20}{ours['phases'][phase]:>12.2f}{peer['phases'][phase]:>15.2f}")
    print(f"  {'total':20}{ours['seconds_per_step']:>12.2f}{peer['seconds_per_step']:>15.2f}")
    print(f"{'first step (compile)':22}{ours['first_step_seconds']:>12.1f}{peer['first_step_seconds']:>15.1f}")
    print(f"{'peak RSS MB':22}{ours['peak_rss_mb']:>12.0f}{peer['peak_rss_mb']:>15.0f}")
    def rollout_rate(side: dict) -> float:  # generated tokens per second of rollout
        return side["completion_length"] * side["completions_per_step"] / side["phases"]["rollout"]

    print(f"{'rollout tokens/s':22}{rollout_rate(ours):>12.1f}{rollout_rate(peer):>15.1f}")
    print(f"{'steps/s':22}{1 / ours['seconds_per_step']:>12.4f}{1 / peer['seconds_per_step']:>15.4f}")
    print(f"ratio (steps/s): {peer['seconds_per_step'] / ours['seconds_per_step']:.2f}x, "
          f"rollout tokens/s: {rollout_rate(ours) / rollout_rate(peer):.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
