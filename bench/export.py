"""A trained model's GGUF export, read three ways: tracetune's merged safetensors,
tracetune's own GGUF reader, and llama.cpp (llama-cpp-python), in the same run.

For each GGUF type it writes the export (``tracetune.export.export_gguf``) and
reports its size and seconds; then, on the same GSM8K *training* questions in the
run's prompt (greedy, ``--new-tokens`` tokens, no stop strings, up to EOS):

* tracetune reading the GGUF back: the largest weight difference from the merged
  model, and how many greedy continuations are token-for-token identical to the
  merged model's;
* llama.cpp loading the same file: whether it tokenizes the prompts to tracetune's
  ids, how many continuations are identical to tracetune's (and the tokens before
  the first difference), and its decode rate at batch 1 beside tracetune's at
  batch 1 and at the whole batch.

Each side runs in its own process, so its peak RSS is its own.

    python bench/export.py RUN [--types f32 f16 q8_0] [--prompts 20] [--new-tokens 128]

RUN: a finished SFT or GRPO run directory (its export/merged). llama.cpp comes from
the optional extra: pip install -e '.[llama]' (builds llama.cpp from source, ~15 min
on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import sides


def questions(n: int) -> list[str]:
    from tracetune.data import load_examples

    return [e.question for e in load_examples("gsm8k", "train", limit=n).examples]


def run_export(run: str, kind: str, out: str) -> dict:
    from tracetune.export import export_gguf

    result = export_gguf(Path(run), kind, Path(out))
    return {"bytes": result.bytes, "seconds": result.seconds, "file": str(result.file),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_ours(model: str, n: int, new_tokens: int, style: str, batch_one: int) -> dict:
    """Greedy continuations from ``model`` (a merged directory or a .gguf) read by tracetune."""
    from tracetune.format import build_prompt
    from tracetune.generate import Generator, SamplingConfig
    from tracetune.models.registry import load_model

    loaded = load_model(model)
    prompts = [build_prompt(q, style) for q in questions(n)]
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_strings=())
    # Compiled programs depend on the budget (the cache's size): warm up at the timed one.
    generator = Generator(loaded.model, loaded.tokenizer, max_batch=len(prompts))
    generator.generate(prompts, sampling)
    start = time.perf_counter()
    out = generator.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    single = Generator(loaded.model, loaded.tokenizer, max_batch=1)
    single.generate(prompts[:1], sampling)
    start = time.perf_counter()
    one = single.generate(prompts[:batch_one], sampling)
    one_seconds = time.perf_counter() - start
    return {"ids": [g.token_ids for g in out], "prompt_ids": [loaded.tokenizer.encode(p) for p in prompts],
            "tokens_per_s": sum(len(g.token_ids) for g in out) / seconds,
            "tokens_per_s_batch_1": sum(len(g.token_ids) for g in one) / one_seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_llama(gguf_file: str, prompt_ids: list[list[int]], prompts: list[str], new_tokens: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_file, n_ctx=1024, n_threads=2, n_batch=512, seed=0, verbose=False)
    tokenized = [llm.tokenize(p.encode(), add_bos=True, special=True) for p in prompts]
    out, tokens, seconds = [], 0, 0.0
    for ids in prompt_ids:
        llm.reset()
        start = time.perf_counter()
        row = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token == llm.token_eos() or len(row) == new_tokens:
                break
            row.append(int(token))
        seconds += time.perf_counter() - start
        tokens += len(row)
        out.append(row)
    return {"ids": out, "same_tokenization": sum(a == b for a, b in zip(tokenized, prompt_ids)),
            "tokens_per_s": tokens / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished SFT or GRPO run directory")
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"], help="GGUF types to export and compare")
    parser.add_argument("--prompts", type=int, default=20, help="GSM8K training questions")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per question")
    parser.add_argument("--batch-one", type=int, default=3, help="questions timed one at a time on tracetune's side")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--arg", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side == "export":
        sides.report(run_export(args.run, *args.arg))
        return
    if args.side == "ours":
        sides.report(run_ours(args.arg[0], args.prompts, args.new_tokens, args.arg[1], args.batch_one))
        return
    if args.side == "llama":
        data = json.loads(Path(args.arg[1]).read_text())
        sides.report(run_llama(args.arg[0], data["prompt_ids"], data["prompts"], args.new_tokens))
        return

    from tracetune.export import agreement, merged_dir, prompt_style
    from tracetune.format import build_prompt

    style = prompt_style(Path(args.run))
    common = ["--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--batch-one", str(args.batch_one)]
    merged = sides.run(__file__, args.run, "--side", "ours", "--arg", str(merged_dir(Path(args.run))), "--arg", style, *common)
    print(f"{args.run}: {args.prompts} GSM8K training questions ({style} prompt), greedy, {args.new_tokens} tokens, this machine's CPUs")
    print(f"tracetune (merged safetensors): {merged['tokens_per_s']:.1f} tok/s at batch {args.prompts}, "
          f"{merged['tokens_per_s_batch_1']:.1f} tok/s at batch 1, peak {merged['peak_rss_mb']:.0f} MB")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({"prompt_ids": merged["prompt_ids"], "prompts": [build_prompt(q, style) for q in questions(args.prompts)]}, handle)
    print(f"{'type':>5} | {'MiB':>6} | {'export s':>8} | {'tracetune read-back identical':>29} | "
          f"{'llama.cpp identical':>19} | {'prefix tokens':>13} | {'same ids':>8} | {'llama tok/s b1':>14} | {'ratio':>5} | {'peak MB':>7}")
    out_root = Path(tempfile.mkdtemp(prefix="tracetune-export-bench-"))
    for kind in args.types:
        written = sides.run(__file__, args.run, "--side", "export", "--arg", kind, "--arg", str(out_root / kind))
        back = sides.run(__file__, args.run, "--side", "ours", "--arg", written["file"], "--arg", style, *common)
        ours_same, _, _ = agreement(back["ids"], merged["ids"])
        try:
            llama = sides.run(__file__, args.run, "--side", "llama", "--arg", written["file"], "--arg", handle.name, *common)
        except SystemExit as error:  # llama.cpp missing or failing: the tracetune columns still stand
            print(f"{kind:>5} | llama.cpp side failed: {str(error)[-300:]}")
            llama = None
        row = f"{kind:>5} | {written['bytes'] / 2**20:>6.0f} | {written['seconds']:>8.1f} | {ours_same:>6} of {args.prompts:<19} | "
        if llama:
            same, prefix, total = agreement(llama["ids"], merged["ids"])
            row += (f"{same:>6} of {args.prompts:<9} | {prefix:>5} of {total:<5} | {llama['same_tokenization']:>3} of {args.prompts:<2} | "
                    f"{llama['tokens_per_s']:>14.1f} | {llama['tokens_per_s'] / merged['tokens_per_s_batch_1']:>5.2f} | "
                    f"{llama['peak_rss_mb']:>7.0f}")
        print(row, flush=True)
    print(f"(exports in {out_root}; ratio: llama.cpp at batch 1 over tracetune at batch 1)")


if __name__ == "__main__":
    main()
