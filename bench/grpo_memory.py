"""Where a GRPO step's memory goes: resident memory over time, by phase.

Runs `bench/grpo.py`'s chunked side (cpu-demo, the embedded 270M) in this
process while a thread samples the resident set every 0.2 s, and prints the
highest sample inside each rollout, update call, validation and export, and outside
them, then the run's getrusage peak and seconds per step, and what the run's compiled
programs keep resident (the fall at ``jax.clear_caches()``). JAX dispatches an update
asynchronously, so its memory can show after its call returns (outside them).

    python bench/grpo_memory.py --steps 3 --set grpo.select=last --set grpo.val_every_steps=0
    python bench/grpo_memory.py --steps 3 --set grpo.rows_per_pass=1 ...
    python bench/grpo_memory.py --steps 2 --set grpo.val_every_steps=1   # with validations, as make run
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/grpo_memory.py ...   # glibc returns large freed blocks

The README's "Where GRPO's peak memory is" table came from these commands, one
process per setting, one after the other, alone on the machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--init", default="gemma3-270m", help="model or SFT run to start from")
    parser.add_argument("--set", action="append", default=[], help="config override on top of cpu-demo")
    args = parser.parse_args()

    rss = sides.sample_rss(0.2)  # (seconds, bytes)
    spans: list[tuple[str, float, float]] = []

    def timed(owner, name: str, phase: str) -> None:
        method = getattr(owner, name)

        @functools.wraps(method)
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                spans.append((phase, start, time.perf_counter()))

        setattr(owner, name, wrapper)

    import grpo as grpo_bench

    from tracetune import grpo, lora, rollout

    timed(rollout.TracetuneRollout, "step_rollout", "rollout")
    timed(rollout.TunixEngineRollout, "step_rollout", "rollout")
    timed(lora._AdapterStep, "__call__", "update")
    timed(grpo.GRPORun, "validate", "validate")  # greedy validation (grpo.val_every_steps)
    timed(lora.BestAdapters, "export", "export")  # merge and write the exported weights
    result = grpo_bench.run_side("chunked", args.steps, args.init, args.set)

    samples = [(t, b / 1e9) for t, b in list(rss)]  # GB

    def highest(inside) -> float:
        values = [gb for t, gb in samples if inside(t)]
        return max(values) if values else float("nan")

    start = samples[0][0]
    for phase, a, b in spans:
        print(f"{phase:8} {a - start:7.1f}-{b - start:7.1f} s   highest {highest(lambda t: a <= t <= b):.2f} GB")
    outside = [(gb, t) for t, gb in samples if not any(a <= t <= b for _, a, b in spans)]
    if outside:
        gb, t = max(outside)
        last = max(b for _, _, b in spans) if spans else start
        print(f"outside  highest {gb:.2f} GB at {t - start:.1f} s ({t - last:+.1f} s from the end of the last call)")
    import jax

    before = sides.live_rss() / 1e9
    jax.clear_caches()
    print(f"compiled programs kept {before - sides.live_rss() / 1e9:.2f} GB of the {before:.2f} GB live after the run")
    print(json.dumps({"settings": args.set, "highest_sample_gb": max(gb for _, gb in samples),
                      **{k: result[k] for k in ("peak_rss_mb", "seconds_per_step", "phases", "completion_length")}}))


if __name__ == "__main__":
    main()
