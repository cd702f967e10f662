"""How many completions per second the composite reward scores, on one core.

Completions are realistic: the curated GSM8K test targets, and variants a policy
writes during GRPO (a wrong answer, chatter outside the tags, a missing answer tag,
padded repeated steps), each with per-token log-probabilities on ~4-character
tokens (Gemma's average on GSM8K text). The peer, timed in the same run, is the
minimal reward many GRPO scripts start from: one format regex plus the last number
compared with the reference. Target: >= 20,000 completions/s.

    python bench/rewards.py [--n 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import time

from tracetune.config import RewardWeights
from tracetune.data import curate, load_examples
from tracetune.format import parse_completion, parse_number
from tracetune.rewards import make_composite_reward


def variants(completion: str, reference: str, rng: random.Random) -> list[str]:
    head, _, _ = completion.rpartition("<answer>")
    wrong = str(int(float(reference)) + rng.randint(1, 9)) if reference.lstrip("-").isdigit() else "0"
    steps = head.split("\n")
    return [
        completion,
        f"{head}<answer>{wrong}</answer>",
        "Sure! Let me think.\n" + completion + "\nI hope this helps.",
        head.removesuffix("\n"),
        "\n".join(steps[:1] * 6 + steps[1:]) + f"<answer>{reference}</answer>",
    ]


def tokens(text: str, rng: random.Random) -> tuple[list[str], list[float]]:
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(2, 6)
        pieces.append(text[i : i + n])
        i += n
    return pieces, [-rng.expovariate(3.0) for _ in pieces]


_FORMAT = re.compile(r"^<reasoning>.*?</reasoning>\s*<answer>.*?</answer>$", re.DOTALL)
_LAST = re.compile(r"-?\d+(?:\.\d+)?")


def peer_reward(prompts, completions, reference, **_):
    """The minimal reward: format regex + last number equals the reference."""
    out = []
    for completion, ref in zip(completions, reference):
        numbers = _LAST.findall(completion)
        correct = bool(numbers) and abs(float(numbers[-1]) - float(ref)) < 1e-6
        out.append(0.6 * correct + 0.4 * bool(_FORMAT.match(completion)))
    return out


def best_rate(fn, columns: dict, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        parse_completion.cache_clear()
        parse_number.cache_clear()
        # CPU time of this process: the rate one core gives, even while other work
        # shares the machine (wall time would charge us for the other processes).
        start = time.process_time()
        fn(columns["prompts"], columns["completions"], **{k: v for k, v in columns.items() if k not in ("prompts", "completions")})
        best = min(best, time.process_time() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="completions per timed batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says

    rng = random.Random(42)
    traces = curate(load_examples("gsm8k", "test").examples, val_fraction=0.0).train
    pool = [(t.prompt, c, t.reference) for t in traces for c in variants(t.completion, t.reference, rng)]
    # Every completion unique, as in GRPO: parse caches then only help within a batch.
    batch = []
    for i in range(args.n):
        prompt, completion, reference = pool[rng.randrange(len(pool))]
        batch.append((prompt, completion.replace("Step 1: ", f"Step 1: (#{i}) ", 1), reference))
    toks = [tokens(c, rng) for _, c, _ in batch]
    columns = {
        "prompts": [p for p, _, _ in batch],
        "completions": [c for _, c, _ in batch],
        "reference": [r for _, _, r in batch],
        "token_texts": [t for t, _ in toks],
        "token_logprobs": [lp for _, lp in toks],
    }
    mean_chars = sum(map(len, columns["completions"])) / args.n

    ours = best_rate(make_composite_reward(RewardWeights()), columns, args.n, args.repeats)
    peer = best_rate(peer_reward, columns, args.n, args.repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"completions: {args.n} (mean {mean_chars:.0f} chars, {sum(map(len, columns['token_texts'])) / args.n:.0f} tokens), 1 core")
    print(f"composite reward (correctness + trace + confidence): {ours:,.0f} completions/s")
    print(f"peer, format regex + last number:                    {peer:,.0f} completions/s")
    print(f"ratio ours/peer: {ours / peer:.2f}   target >= 20,000/s: {'met' if ours >= 20_000 else 'NOT met'}")
    print(f"peak RSS: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
