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


def score(model, tokenizer, examples, max_new_tokens: int) -> dict:
    from tracetune.format import build_prompt
    from tracetune.generate import Generator, SamplingConfig
    from tracetune.scoring import aggregate, score_sample

    generator = Generator(model, tokenizer, max_batch=32)
    start = time.perf_counter()
    outputs = generator.generate([build_prompt(e.question) for e in examples], SamplingConfig(max_new_tokens=max_new_tokens))
    scores = [score_sample(e.question, e.reference, o.text, id=e.id) for e, o in zip(examples, outputs)]
    metrics = aggregate(scores)
    return {
        "format_rate": metrics["format_rate"].mean,
        "accuracy": metrics["accuracy"].mean,
        "lenient_accuracy": metrics["lenient_accuracy"].mean,
        "seconds": time.perf_counter() - start,
        "example": outputs[0].text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/cpu-demo/sft"))
    parser.add_argument("--problems", type=int, default=50, help="held-out GSM8K test problems to score")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. sft.max_steps=40")
    args = parser.parse_args()

    from tracetune.config import load_config
    from tracetune.data import load_examples
    from tracetune.models.registry import load_model
    from tracetune.sft import train_sft

    config = load_config("cpu-demo", args.set)
    budget = config.sft.eval_max_new_tokens
    examples = load_examples("gsm8k", "test", limit=args.problems).examples
    base = load_model(config.sft.model, dtype=config.sft.dtype)
    before = score(base.model, base.tokenizer, examples, budget)
    start = time.perf_counter()
    run = train_sft(config, args.run_dir, loaded=base)
    sft_seconds = time.perf_counter() - start
    tuned = load_model(str(run.merged_dir), dtype=config.sft.dtype)
    after = score(tuned.model, tuned.tokenizer, examples, budget)
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
