"""Wall time of the evaluation harness's decoding: rows that stop early leave the
batch (``Generator(compact=True)``, the default) against the whole batch running
to its longest row (``compact=False``), in the same run.

Both sides decode the first N GSM8K test problems the way ``tracetune eval``
does (the plain prompt, greedy, the harness's token budget, ``</answer>`` as the
stop string, batches of 32), each in its own process, compiles included (the
smaller buckets compile during the run: that is part of what a user waits for).
Greedy tokens must be the same on both sides; the bench checks it.

    python bench/harness.py --model runs/cpu-demo/sft [--problems 64] [--new-tokens 320]

``--model`` is anything ``tracetune eval --model`` takes; a fine-tuned model is
the interesting case (the base model never writes ``</answer>``: every row runs
to the budget and there is nothing to compact).
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import time

import sides


def run_side(model: str, problems: int, new_tokens: int, compact: bool) -> dict:
    from tracetune.data import load_examples
    from tracetune.format import build_prompt
    from tracetune.generate import Generator, SamplingConfig
    from tracetune.models.registry import load_model

    loaded = load_model(model)
    prompts = [build_prompt(e.question) for e in load_examples("gsm8k", "test").examples[:problems]]
    generator = Generator(loaded.model, loaded.tokenizer, max_batch=32, compact=compact)
    start = time.perf_counter()
    out = generator.generate(prompts, SamplingConfig(max_new_tokens=new_tokens))
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(repr([o.token_ids for o in out]).encode()).hexdigest()
    return {"seconds": seconds, "tokens": sum(len(o.token_ids) for o in out), "compactions": generator.stats.compactions,
            "stopped": sum(o.finish_reason != "length" for o in out), "digest": digest,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m", help="a model name, checkpoint, run directory or .gguf")
    parser.add_argument("--problems", type=int, default=64, help="the first N GSM8K test problems")
    parser.add_argument("--new-tokens", type=int, default=320, help="token budget per completion (cpu-demo's harness: 320)")
    parser.add_argument("--side", choices=["compact", "static"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        sides.report(run_side(args.model, args.problems, args.new_tokens, args.side == "compact"))
        return
    print(f"{args.model}: {args.problems} GSM8K test problems, greedy, {args.new_tokens} new tokens, batches of 32, compiles included")
    common = ("--model", args.model, "--problems", str(args.problems), "--new-tokens", str(args.new_tokens))
    static = sides.run(__file__, *common, "--side", "static")
    compact = sides.run(__file__, *common, "--side", "compact")
    for name, side in (("whole batch to its longest row", static), ("rows leave when they stop", compact)):
        print(f"{name:<31} {side['seconds']:7.1f} s  {side['tokens'] / side['seconds']:6.1f} generated tok/s  "
              f"{side['stopped']}/{args.problems} stopped  {side['compactions']} compactions  peak {side['peak_rss_mb']:.0f} MB")
    print(f"speed-up {static['seconds'] / compact['seconds']:.2f}x; same tokens: {'yes' if static['digest'] == compact['digest'] else 'NO'}")


if __name__ == "__main__":
    main()
