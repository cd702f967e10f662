"""What stays resident through an SFT run's stages, and what each compiled program keeps.

After each stage (imports, the cached 270M, the LoRA model and its trainer, each
micro-batch step) it waits for the device, returns the allocator's free pages
(``memory.release``) and prints the resident set, so what is printed is live
memory, not allocator slack. Then the run's export (``lora.export_run``: adapters
and merged safetensors, into a temporary directory), with the highest resident set
sampled every 50 ms while it writes; then ``jax.clear_caches()`` drops every
compiled program and the memory each kept shows as the fall. `cpu-demo`, the
embedded 270M:

    python bench/resident.py [--steps 8] [--set sft.micro_batch_size=1]

The README's "Where GRPO's peak memory is" quotes a run of this script.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="micro-batch steps")
    parser.add_argument("--set", action="append", default=["sft.micro_batch_size=1"],
                        help="config override on top of cpu-demo and sft.micro_batch_size=1 (later ones win)")
    args = parser.parse_args()
    def resident(stage: str) -> float:
        gib = sides.live_rss() / 2**30
        print(f"{stage:36} {gib:5.2f} GiB", flush=True)
        return gib

    resident("start")
    import jax
    from flax import nnx
    from tunix.sft import peft_trainer

    from tracetune.config import load_config
    from tracetune.data import curate, load_examples
    from tracetune.lora import apply_lora, export_run
    from tracetune.models.registry import load_model
    from tracetune import runs
    from tracetune.runs import StopFlag
    from tracetune.sft import LOSSES, Batches, Trainer, model_inputs, tokenize_traces

    resident("imports")
    config = load_config("cpu-demo", args.set)
    sft = config.sft
    loaded = load_model(sft.model, dtype=sft.dtype)
    jax.block_until_ready(nnx.state(loaded.model))
    traces = curate(load_examples("gsm8k", "train").examples, val_fraction=config.data.val_fraction, seed=config.data.seed).train
    examples, _ = tokenize_traces(traces, loaded.tokenizer, config.data.max_tokens)
    resident("the model and the traces")
    pad = loaded.tokenizer.pad_id
    model = apply_lora(loaded.model, sft.lora, sft.seed)
    optimizer = runs.optimizer(sft.learning_rate, sft.max_grad_norm)
    trainer = Trainer(model, optimizer, peft_trainer.TrainingConfig(eval_every_n_steps=1 << 30, max_steps=10**6))
    trainer.with_loss_fn(LOSSES["chunked"], has_aux=True)
    trainer.with_gen_model_input_fn(lambda b: model_inputs(b, pad_id=pad))
    step, _ = trainer.jit_train_and_eval_step()
    jax.block_until_ready(nnx.state(model))
    resident("the LoRA model and its trainer")
    shapes = set()
    for i, batch in enumerate(Batches(examples, sft, pad, args.steps, StopFlag())):
        jax.block_until_ready(step(batch))
        new = (batch["tokens"].shape, batch["scored"].shape) not in shapes
        shapes.add((batch["tokens"].shape, batch["scored"].shape))
        resident(f"step {i + 1} {batch['tokens'].shape}{' new shape' if new else ''}")
    trained = resident("before the export")
    samples = sides.sample_rss(0.05)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        export_run(model, loaded, sft.lora, Path(directory), stage="sft", step=args.steps)
    seconds = time.perf_counter() - started
    highest = max([trained, *(rss / 2**30 for t, rss in list(samples) if t <= started + seconds)])
    print(f"{'the export':36} highest {highest:5.2f} GiB ({highest - trained:+.2f} over the trained model), "
          f"{seconds:.1f} s", flush=True)
    before = resident("after the export")
    jax.clear_caches()
    after = resident("jax.clear_caches()")
    print(f"{len(shapes)} compiled step shapes kept {before - after:.2f} GiB "
          f"({(before - after) / max(1, len(shapes)) * 1024:.0f} MiB each); "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
