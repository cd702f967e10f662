"""The fixed harness's generation time: N GSM8K test problems, greedy, at the
cpu-demo budget (320 tokens, batches of 32), with this checkout's generator against
the same generator at an earlier commit (--before REV), on the same model and
problems, each side in its own process, one after the other in one run.

A batch of greedy completions used to be as slow as its longest one: a row that
loops to the budget kept all 32 rows decoding. Rows that stop now take the next
problem (generate.py), so the time follows the tokens written. Wall seconds include
compilation (an evaluation pays it); it is also printed on its own. The sides must
write the same completions: the bench prints how many differ.

    python bench/evaluate.py --model runs/cpu-demo/sft --limit 250 --before 1b9a911
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import time
from pathlib import Path

import sides


def run_side(model: str, limit: int, batch: int, new_tokens: int) -> dict:
    import jax

    import tracetune
    from tracetune.data import load_examples
    from tracetune.evaluate import STOP_STRINGS
    from tracetune.format import build_prompt
    from tracetune.generate import CHUNK, Generator, SamplingConfig
    from tracetune.models.registry import load_model

    compiles: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(seconds) if event == "/jax/core/compile/backend_compile_duration" else None)
    loaded = load_model(model)
    examples = load_examples("gsm8k", "test").examples[:limit]
    prompts = [build_prompt(e.question) for e in examples]
    generator = Generator(loaded.model, loaded.tokenizer, max_batch=batch)
    start = time.perf_counter()
    out = generator.generate(prompts, SamplingConfig(max_new_tokens=new_tokens, stop_strings=STOP_STRINGS))
    seconds = time.perf_counter() - start
    lengths = [len(o.token_ids) for o in out]
    # What static batches of ``batch`` decode: each as many steps as its longest row, in chunks.
    static_steps = sum(-(-max(lengths[i : i + batch]) // CHUNK) * CHUNK for i in range(0, len(lengths), batch))
    return {
        "seconds": seconds,
        "compile_seconds": sum(compiles),
        "tokens": sum(lengths),
        "static_steps": static_steps,
        "texts": [hashlib.sha1(o.text.encode()).hexdigest()[:12] for o in out],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tracetune": str(Path(tracetune.__file__).parent),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m", help="model name or finished run directory")
    parser.add_argument("--limit", type=int, default=250, help="the first N GSM8K test problems")
    parser.add_argument("--batch", type=int, default=32, help="rows decoded together (eval.batch_size)")
    parser.add_argument("--new-tokens", type=int, default=320, help="token budget (eval.max_new_tokens)")
    parser.add_argument("--before", metavar="REV", help="also run the generator at commit REV")
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = ["--model", args.model, "--limit", str(args.limit), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
    if args.side:
        sides.report(run_side(args.model, args.limit, args.batch, args.new_tokens))
        return
    results = {"now": sides.run(__file__, "--side", *common)}
    if args.before:
        tree = sides.worktree(args.before)
        results["before"] = sides.run(__file__, "--side", *common, env={"PYTHONPATH": str(tree / "src")})
        if not results["before"]["tracetune"].startswith(str(tree)):
            raise SystemExit(f"the before side imported {results['before']['tracetune']}, not {tree}")
    names = list(results)
    print(f"{args.limit} problems, {args.model}, greedy, {args.new_tokens} tokens, {args.batch} rows")
    print(f"{'':28}" + "".join(f"{name:>12}" for name in names))

    def row(label: str, fmt: str, value) -> None:
        print(f"{label:28}" + "".join(f"{fmt.format(value(results[name])):>12}" for name in names))

    row("wall seconds", "{:.1f}", lambda r: r["seconds"])
    row("  of which compiling", "{:.1f}", lambda r: r["compile_seconds"])
    row("generated tokens", "{}", lambda r: r["tokens"])
    row("generated tokens/s", "{:.1f}", lambda r: r["tokens"] / r["seconds"])
    row("peak RSS MB", "{:.0f}", lambda r: r["peak_rss_mb"])
    now = results["now"]
    print(f"static batches would decode {now['static_steps']} steps of {args.batch} rows for "
          f"{now['tokens'] / args.batch:.0f} steps' worth of tokens ({now['static_steps'] * args.batch / now['tokens']:.2f}x)")
    if args.before:
        before = results["before"]
        differ = sum(a != b for a, b in zip(now["texts"], before["texts"]))
        print(f"ratio before / now: wall {before['seconds'] / now['seconds']:.2f}x, "
              f"less compiles {(before['seconds'] - before['compile_seconds']) / (now['seconds'] - now['compile_seconds']):.2f}x; "
              f"completions that differ: {differ} of {len(now['texts'])}")
    for r in results.values():
        r.pop("texts")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
