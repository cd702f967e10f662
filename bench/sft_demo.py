"""Demonstration: the `cpu-demo` SFT teaches the embedded Gemma 3 270M the trace format.

Scores the base model and the SFT result on the same held-out GSM8K test problems
with the fixed harness (the recipe's prompt, greedy decoding, the same token budget,
the foundation's scoring), and prints format rate and accuracy before and after,
with the wall time of each part.

    python bench/sft_demo.py [--run-dir runs/cpu-demo/sft] [--problems 50] [--set sft.max_steps=40]

Re-running resumes the SFT run (or reuses it when finished).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def score(loaded, examples, config, out_dir: Path) -> dict:
    """The fixed harness (tracetune eval), resumable in ``out_dir``."""
    from tracetune.evaluate import evaluate

    result = evaluate(loaded, examples, out_dir, config)
    return {
        "format_rate": result.metrics["format_rate"].mean,
        "accuracy": result.metrics["accuracy"].mean,
        "lenient_accuracy": result.metrics["lenient_accuracy"].mean,
        "seconds": result.seconds,
        "example": result.records[0]["completion"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/cpu-demo/sft"))
    parser.add_argument("--problems", type=int, default=50, help="held-out GSM8K test problems to score")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. sft.max_steps=40")
    args = parser.parse_args()

    from tracetune.config import load_config
    from tracetune.evaluate import problems
    from tracetune.models.registry import load_model
    from tracetune.sft import train_sft

    config = load_config("cpu-demo", [*args.set, f"eval.limit={args.problems}"])
    examples = problems(config)
    base = load_model(config.sft.model, dtype=config.sft.dtype)
    before = score(base, examples, config, args.run_dir / "eval" / "zero-shot")
    start = time.perf_counter()
    run = train_sft(config, args.run_dir, loaded=base)
    sft_seconds = time.perf_counter() - start
    tuned = load_model(str(run.merged_dir), dtype=config.sft.dtype)
    after = score(tuned, examples, config, args.run_dir / "eval" / "sft")
    report = {
        "problems": len(examples),
        "before": before,
        "after": after,
        "sft_steps": run.steps,
        "sft_seconds": sft_seconds,
        "final_loss": run.final_loss,
        "padding_share": run.padding_share,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(report, indent=2))
    print(f"\nformat rate {before['format_rate']:.0%} -> {after['format_rate']:.0%}, "
          f"accuracy {before['accuracy']:.0%} -> {after['accuracy']:.0%} on {len(examples)} GSM8K test problems; "
          f"SFT {run.steps} updates in {sft_seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
