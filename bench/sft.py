"""SFT training throughput of the embedded Gemma 3 270M at the `cpu-demo` settings.

Ours ("chunked"): tracetune's micro-batches (similar lengths grouped, padded to a
multiple of `sft.pad_multiple`) through the jitted PeftTrainer step with the
completion-only float32 loss, the tied head applied only at completion positions
(`sft.logprobs=chunked`, logprobs.py) and tracetune's Trainer, whose step returns
the adapters only (lora.adapter_step). "full": the same batches and loss with logits at every
position (`sft.logprobs=full`) in Tunix's PeftTrainer. "before": full logits in Tunix's
PeftTrainer on unpacked micro-batches of 4 (similar lengths, padded to a multiple of 64),
with qwix's own LoRA gradient (not lora_vjp's): the path this work started from. Peer, in the
same run: the vanilla Tunix recipe from its examples:
the same examples in plain shuffled order, padded to the sequence budget, and
PeftTrainer's default loss (one-hot targets over the vocabulary), with qwix's own
LoRA gradient. Both train the
same LoRA (rank, targets, optimizer) on the same examples.

Each side runs in its own process (its peak RSS is its own) and runs the same
micro-batches twice: the first pass compiles every shape, the second is timed.
Tokens/s counts real (non-padding) tokens; padding share = padding / all tokens;
seconds per update of 8 = seconds per 8 traces trained (cpu-demo's packed rows of
352 tokens hold about 2 traces each).

    python bench/sft.py [--micro-batches 20] [--set sft.pack_tokens=0 --set sft.micro_batch_size=4 --set sft.batch_size=8]

The "before" and vanilla sides train rows of one trace, `--peer-micro-batch-size` (4)
at a time; the others follow the preset (cpu-demo: packed rows of 352 tokens, one per
micro-batch).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import sides


def run_side(side: str, micro_batches: int, overrides: list[str]) -> dict:
    import jax
    import numpy as np
    import optax
    from tunix.sft import peft_trainer

    from tracetune import runs
    from tracetune.config import load_config
    from tracetune.data import curate, load_examples
    from tracetune.models.registry import load_model
    from tracetune.lora import apply_lora
    from tracetune.runs import StopFlag
    from tracetune.sft import LOSSES, Batches, Trainer, model_inputs, pad_batch, tokenize_traces
    from tunix.sft import utils as tunix_utils

    config = load_config("cpu-demo", overrides)
    sft = config.sft
    loaded = load_model(sft.model, dtype=sft.dtype)
    traces = curate(load_examples("gsm8k", "train").examples, val_fraction=config.data.val_fraction, seed=config.data.seed).train
    examples, _ = tokenize_traces(traces, loaded.tokenizer, config.data.max_tokens)
    pad = loaded.tokenizer.pad_id
    model = apply_lora(loaded.model, sft.lora, sft.seed)
    if side in ("before", "peer"):  # qwix's own LoRA gradient, as those paths had it (lora_vjp)
        from tracetune import lora_vjp

        lora_vjp.uninstall()
    # chunked: tracetune's Trainer (its step returns the adapters only) and optimizer
    # (runs.optimizer: the adapters as one vector, non-finite updates skipped); the
    # others: Tunix's own trainer and the recipe's plain clip + AdamW.
    optimizer = (runs.optimizer(sft.learning_rate, sft.max_grad_norm) if side == "chunked"
                 else optax.chain(optax.clip_by_global_norm(sft.max_grad_norm), optax.adamw(sft.learning_rate)))
    trainer_class = Trainer if side == "chunked" else peft_trainer.PeftTrainer
    trainer = trainer_class(model, optimizer, peft_trainer.TrainingConfig(eval_every_n_steps=1 << 30, max_steps=10**6))
    loss = {"chunked": "chunked", "full": "full", "before": "full"}.get(side)  # the vanilla peer keeps Tunix's default
    if loss:
        batches = list(Batches(examples, sft, pad, micro_batches, StopFlag()))
        trainer.with_loss_fn(LOSSES[loss], has_aux=True)
        trainer.with_gen_model_input_fn(lambda b: model_inputs(b, pad_id=pad))
    else:
        order = np.random.default_rng(sft.seed).permutation(len(examples))
        batches = []
        for i in range(micro_batches):
            rows = [examples[j] for j in order[i * sft.micro_batch_size : (i + 1) * sft.micro_batch_size]]
            b = pad_batch(rows, sft.micro_batch_size, config.data.max_tokens, pad)
            batches.append(peft_trainer.TrainingInput(input_tokens=b["tokens"], input_mask=b["loss_mask"]))

        def vanilla_inputs(x):  # as in Tunix's PEFT examples
            valid = x.input_tokens != pad
            return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                    "positions": tunix_utils.build_positions_from_mask(valid),
                    "attention_mask": tunix_utils.make_causal_attn_mask(valid)}

        trainer.with_gen_model_input_fn(vanilla_inputs)

    def tokens_of(b):
        t = b["tokens"] if isinstance(b, dict) else b.input_tokens
        return int((t != pad).sum()), int(t.size)

    def traces_of(b):  # packed rows hold several traces each
        if isinstance(b, dict) and "segments" in b:
            return int(b["segments"].max(axis=1).sum())
        t = b["tokens"] if isinstance(b, dict) else b.input_tokens
        return int((t != pad).any(axis=1).sum())

    real = sum(tokens_of(b)[0] for b in batches)
    traces = sum(traces_of(b) for b in batches)
    total = sum(tokens_of(b)[1] for b in batches)
    step, _ = trainer.jit_train_and_eval_step()
    start = time.perf_counter()
    for b in batches:  # compile every shape
        jax.block_until_ready(step(b))
    warm = time.perf_counter() - start
    losses = []
    start = time.perf_counter()
    for b in batches:
        out = jax.block_until_ready(step(b))
        losses.append(float(out[0]))
    seconds = time.perf_counter() - start
    return {
        "side": side, "micro_batches": micro_batches, "micro_batch_size": sft.micro_batch_size,
        "real_tokens": real, "padded_tokens": total, "padding_share": 1 - real / total,
        "seconds": seconds, "tokens_per_second": real / seconds, "steps_per_second": micro_batches / seconds,
        "traces": traces, "seconds_per_update_of_8": seconds / (traces / 8),
        "compile_and_first_pass_seconds": warm, "last_loss": losses[-1],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batches", type=int, default=20, help="micro-batches of the chunked and full sides")
    parser.add_argument("--set", action="append", default=[], help="config override on top of cpu-demo")
    parser.add_argument("--peer-micro-batches", type=int, default=8,
                        help="the vanilla side's micro-batches (it cannot pack: rows of one trace)")
    parser.add_argument("--peer-micro-batch-size", type=int, default=4,
                        help="the vanilla side's traces per micro-batch (4: cpu-demo's before packing, its fastest)")
    parser.add_argument("--side", choices=("chunked", "full", "before", "peer"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        sides.report(run_side(args.side, args.micro_batches, args.set))
        return
    results = {}
    names = {"chunked": "chunked", "full": "full logits", "before": "before", "peer": "vanilla Tunix"}
    for side in names:
        settings, micro_batches = args.set, args.micro_batches
        if side in ("before", "peer"):  # rows of one trace, as cpu-demo trained before packing
            settings = [*args.set, "sft.pack_tokens=0", f"sft.micro_batch_size={args.peer_micro_batch_size}",
                        f"sft.batch_size={args.peer_micro_batch_size}"]
            micro_batches = args.peer_micro_batches
        overrides = [arg for item in settings for arg in ("--set", item)]
        results[side] = sides.run(__file__, "--side", side, "--micro-batches", str(micro_batches), *overrides)
    print(f"{'':32}" + "".join(f"{name:>15}" for name in names.values()))
    for key, fmt in (("tokens_per_second", "{:.1f}"), ("seconds_per_update_of_8", "{:.2f}"), ("padding_share", "{:.1%}"),
                     ("peak_rss_mb", "{:.0f}"), ("compile_and_first_pass_seconds", "{:.0f}"), ("last_loss", "{:.4f}")):
        print(f"{key:32}" + "".join(f"{fmt.format(results[side][key]):>15}" for side in names))
    chunked = results["chunked"]["tokens_per_second"]
    print(f"ratio (real tokens/s): chunked / full {chunked / results['full']['tokens_per_second']:.2f}x, "
          f"chunked / before {chunked / results['before']['tokens_per_second']:.2f}x, "
          f"chunked / vanilla Tunix {chunked / results['peer']['tokens_per_second']:.2f}x")
    # The targets ("Training steps at the machine's limit"): against the path the
    # work started from, in this run; the peak in bytes (3 GB = 2861 MiB).
    sides.target("SFT real tokens/s, chunked / before", chunked / results["before"]["tokens_per_second"], 1.5)
    sides.target("SFT peak RSS, GB (at most)", results["chunked"]["peak_rss_mb"] * 2**20 / 1e9, 3.0, at_most=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
