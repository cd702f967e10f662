"""Stage 1: supervised fine-tuning with LoRA on curated traces.

Tunix's ``PeftTrainer`` runs the loop (jitted step, gradient accumulation, orbax
checkpoints that restore LoRA weights and optimizer state); qwix puts the LoRA
adapters on Gemma 3's attention and MLP projections. tracetune adds what a run
needs around it:

* the loss on completion tokens only (prompt and padding masked), in float32;
* optional written-in repetition loops the loss skips (``sft.loop_share``), so a
  small model learns to leave the greedy loops it falls into;
* batches of similar-length traces padded to a multiple of ``pad_multiple``, or
  traces packed into rows of ``pack_tokens`` (each attending only to itself), in an
  order fixed by the seed, so a resumed run sees exactly the batches it would have;
* a run directory: config.yaml, checkpoints/, metrics.jsonl, tensorboard/,
  samples/ (held-out generations with format rate and accuracy), export/;
* SIGTERM / Ctrl-C stop at the next update boundary and save; a NaN or infinite
  loss stops before anything is saved, so the last checkpoint stays good.

    run = train_sft(load_config("tiny"), Path("runs/tiny-sft"))
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.sft import hooks as tunix_hooks
from tunix.sft import metrics_logger as tunix_metrics
from tunix.sft import peft_trainer
from tunix.sft import utils as tunix_utils

from tracetune import logprobs
from tracetune import mesh as mesh_lib
from tracetune.config import Config, SFTConfig
from tracetune.data import Trace, curate_data, with_loop
from tracetune.errors import Interrupted, TrainingError
from tracetune.files import atomic_path
from tracetune.evaluate import generate_and_score
from tracetune.generate import Generator
from tracetune.lora import BestAdapters, lora_on_mesh, merged_model, use_adapter_step
from tracetune.models.params import write_json
from tracetune.scoring import aggregate
from tracetune.models.registry import LoadedModel, load_model
from tracetune.models.tokenizer import Tokenizer
from tracetune.runs import (FaultWatch, StopFlag, append_record, check_saves, checkpoint_options, claim_directory, failed_run,
                            is_primary, metrics_options, optimizer, restoring, set_aside_damaged_checkpoints, truncate_metrics)


# ------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Tokenized:
    """One trace as ids: prompt (with BOS) then completion (with EOS)."""

    ids: np.ndarray  # [L] int32
    n_prompt: int
    conclusion: int | None = None  # index of the first token of "Therefore, ..." (None: no conclusion line)
    loop: tuple[int, int] | None = None  # [start, end) of a written-in repetition the loss skips


CONCLUSION = "\nTherefore"


def prefix_length(tokenizer: Tokenizer, prefix: str, ids: Sequence[int]) -> int | None:
    """How many of ``ids`` (the encoding of a text that starts with ``prefix``)
    encode ``prefix``, or None when the prefix's own encoding is not a prefix of
    ``ids``. True at a newline, which is a token of its own."""
    head = tokenizer.encode(prefix, add_bos=False)
    return len(head) if list(ids[: len(head)]) == head else None


def conclusion_start(tokenizer: Tokenizer, completion: str, completion_ids: Sequence[int]) -> int | None:
    """Index in ``completion_ids`` of the conclusion line's first token, or None.

    The ids stay those of the whole completion; the prefix up to and including the
    newline is encoded on its own only to count its tokens."""
    at = completion.rfind(CONCLUSION)
    return None if at < 0 else prefix_length(tokenizer, completion[: at + 1], completion_ids)


def loop_choice(trace: Trace, seed: int, share: float) -> tuple[int, int, int] | None:
    """(after, block, times) of the loop ``with_loop`` writes into ``trace``, or None;
    fixed by (seed, trace id), so a resumed run tokenizes the same data."""
    rng = random.Random(f"{seed}:{trace.id}")
    if trace.n_steps < 1 or rng.random() >= share:
        return None
    after = rng.randint(1, trace.n_steps)
    return after, rng.randint(1, min(2, after)), rng.randint(1, 2)


def tokenize_traces(traces: Sequence[Trace], tokenizer: Tokenizer, max_tokens: int, *,
                    loop_share: float = 0.0, seed: int = 42) -> tuple[list[Tokenized], int]:
    """Tokenize; traces longer than ``max_tokens`` are dropped (their count is returned).

    A ``loop_share`` of the traces get a repetition loop (see ``loop_choice``) whose
    tokens the loss skips; a looped trace that would be too long stays plain."""
    out, dropped = [], 0
    for trace in traces:
        prompt = tokenizer.encode(trace.prompt)
        row = None
        choice = loop_choice(trace, seed, loop_share)
        if choice is not None:
            head, loop, tail = with_loop(trace.completion, trace.n_steps, *choice)
            row = _tokenize(tokenizer, prompt, head + loop + tail, max_tokens, loop=(head, head + loop))
        if row is None:
            row = _tokenize(tokenizer, prompt, trace.completion, max_tokens)
        if row is None:
            dropped += 1
            continue
        out.append(row)
    return out, dropped


def _tokenize(tokenizer: Tokenizer, prompt: list[int], completion: str, max_tokens: int,
              loop: tuple[str, str] | None = None) -> Tokenized | None:
    """One row, or None when too long (or when the loop's bounds do not fall on tokens)."""
    ids = tokenizer.encode(completion, add_bos=False) + [tokenizer.eos_id]
    if len(prompt) + len(ids) > max_tokens:
        return None
    span = None
    if loop is not None:
        bounds = [prefix_length(tokenizer, text, ids) for text in loop]
        if None in bounds:
            return None
        span = (len(prompt) + bounds[0], len(prompt) + bounds[1])
    start = conclusion_start(tokenizer, completion, ids)
    return Tokenized(np.asarray(prompt + ids, np.int32), len(prompt), None if start is None else len(prompt) + start, span)


def epoch_order(lengths: Sequence[int], micro_batch: int, seed: int, epoch: int, window: int = 32) -> list[list[int]]:
    """Micro-batches of example indices for one epoch, fixed by (seed, epoch).

    Shuffle, then sort by length within windows of ``window`` micro-batches and cut:
    rows of a micro-batch have similar lengths (little padding) while the order of
    micro-batches is still random. The last micro-batch may be short.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batches = []
    span = window * micro_batch
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + micro_batch] for i in range(0, len(chunk), micro_batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_batch(rows: Sequence[Tokenized], micro_batch: int, multiple: int, pad_id: int,
              conclusion_weight: float = 1.0) -> dict[str, np.ndarray]:
    """Right-padded tokens [B, T] and the loss weights [B, T] ("loss_mask"): 0 on the
    prompt and padding, 1 on completion tokens, ``conclusion_weight`` from the
    conclusion line ("Therefore, ...") to EOS. T is the longest row rounded up to
    ``multiple``; missing rows are all padding. A row's ``loop`` weighs 0. With
    them, for the chunked loss, ``scored_positions``, whose count K per row is
    rounded so that the micro-batch's B x K positions fill a head chunk of
    ``logprobs.CHUNK``: each distinct shape is a compiled program (170-190 MB
    resident for the 270M, README), so K comes in multiples of ``CHUNK //
    micro_batch`` (an 80-update ``cpu-demo`` run at micro-batch 1 with chunks of
    128: 5 shapes instead of 7).
    """
    width = logprobs.bucket(max(len(r.ids) for r in rows), multiple)
    tokens = np.full((micro_batch, width), pad_id, np.int32)
    loss_mask = np.zeros((micro_batch, width), np.float32)
    for i, row in enumerate(rows):
        tokens[i, : len(row.ids)] = row.ids
        _weigh(loss_mask[i, : len(row.ids)], row, conclusion_weight)
    return {"tokens": tokens, "loss_mask": loss_mask,
            **scored_positions(loss_mask, max(multiple, logprobs.CHUNK // micro_batch))}


def _weigh(weights: np.ndarray, row: Tokenized, conclusion_weight: float) -> None:
    """Fill ``weights`` [len(row.ids)], a view of the batch's row, with the trace's loss weights."""
    weights[row.n_prompt :] = 1.0
    if row.conclusion is not None:
        weights[row.conclusion :] = conclusion_weight
    if row.loop is not None:
        weights[row.loop[0] : row.loop[1]] = 0.0


def scored_positions(loss_mask: np.ndarray, multiple: int) -> dict[str, np.ndarray]:
    """"scored" [B, K]: the positions t whose next token t + 1 has a loss weight
    (hidden state t predicts it), and "scored_weight" [B, K]: that weight. K is the
    most in a row, rounded up to ``multiple``; unused slots weigh 0."""
    following = loss_mask[:, 1:]  # [B, T-1]
    at = [np.flatnonzero(w > 0) for w in following]
    K = min(following.shape[1], logprobs.bucket(max(len(a) for a in at), multiple))
    scored = np.zeros((len(at), K), np.int32)
    scored_weight = np.zeros((len(at), K), np.float32)
    for i, a in enumerate(at):
        scored[i, : len(a)], scored_weight[i, : len(a)] = a, following[i, a]
    return {"scored": scored, "scored_weight": scored_weight}


def pack_order(lengths: Sequence[int], width: int, rows_per_micro: int, seed: int, epoch: int,
               window: int = 256) -> list[list[list[int]]]:
    """Micro-batches of packed rows of example indices for one epoch, fixed by (seed, epoch).

    Shuffle, then within windows of ``window`` examples fill rows of ``width``
    tokens first-fit, longest first (a trace is never split), then shuffle the rows
    and cut them into micro-batches of ``rows_per_micro``; the last may be short.
    Every example is in exactly one row (each must fit ``width``).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        filled, room = [], []
        for i in sorted(order[start : start + window], key=lambda i: -lengths[i]):
            fits = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
            if fits is None:
                filled.append([int(i)])
                room.append(width - lengths[i])
            else:
                filled[fits].append(int(i))
                room[fits] -= lengths[i]
        rows += filled
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return [rows[i : i + rows_per_micro] for i in range(0, len(rows), rows_per_micro)]


def pack_batch(rows: Sequence[Sequence[Tokenized]], micro_batch: int, width: int, pad_id: int,
               conclusion_weight: float = 1.0) -> dict[str, np.ndarray]:
    """``pad_batch`` for packed rows: each row holds whole traces one after another,
    right-padded to ``width`` (every micro-batch has the same [B, width] shape), with
    "segments" [B, width]: 1, 2, ... for each row's traces, 0 on padding.
    ``model_inputs`` turns them into per-trace positions and an attention mask that
    keeps each trace to itself, so a packed trace trains as it would alone. The
    scored positions span the whole width (K = width - 1): the head skips the chunks
    past a row's last scored position at run time (``head_logprobs``' ``active``), so
    every micro-batch is one shape, one compiled program.
    """
    tokens = np.full((micro_batch, width), pad_id, np.int32)
    loss_mask = np.zeros((micro_batch, width), np.float32)
    segments = np.zeros((micro_batch, width), np.int32)
    for i, row in enumerate(rows):
        at = 0
        for segment, trace in enumerate(row, start=1):
            n = len(trace.ids)
            if at + n > width:
                raise ValueError(f"packed row {i} holds {at + n} tokens, more than its width {width}")
            tokens[i, at : at + n] = trace.ids
            segments[i, at : at + n] = segment
            _weigh(loss_mask[i, at : at + n], trace, conclusion_weight)
            at += n
    return {"tokens": tokens, "loss_mask": loss_mask, "segments": segments, **scored_positions(loss_mask, width)}


@dataclass
class Batches:
    """The run's micro-batches in a fixed order, as an iterable for PeftTrainer.

    PeftTrainer resumes by reading and skipping the micro-batches already trained,
    so the order must not depend on anything but (data, seed). ``stop`` (set by a
    signal) ends the stream at the next optimizer-update boundary.
    """

    examples: list[Tokenized]
    config: SFTConfig
    pad_id: int
    total_micro: int
    stop: StopFlag
    real_tokens: list[int] = field(default_factory=list)  # non-padding tokens per micro-batch yielded
    padded_tokens: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        lengths = [len(e.ids) for e in self.examples]
        sft = self.config
        produced, epoch = 0, 0
        while produced < self.total_micro:
            for micro in epoch_micro_batches(lengths, sft, epoch):
                if produced >= self.total_micro:
                    return
                if self.stop.signum is not None and produced % sft.grad_accum == 0:
                    return
                if sft.pack_tokens:
                    rows = [[self.examples[i] for i in row] for row in micro]
                    batch = pack_batch(rows, sft.micro_batch_size, sft.pack_tokens, self.pad_id, sft.conclusion_weight)
                    indices = [i for row in micro for i in row]
                else:
                    indices = micro
                    batch = pad_batch([self.examples[i] for i in indices], sft.micro_batch_size, sft.pad_multiple,
                                      self.pad_id, sft.conclusion_weight)
                self.real_tokens.append(int(sum(len(self.examples[i].ids) for i in indices)))
                self.padded_tokens.append(int(batch["tokens"].size))
                produced += 1
                # Padded to the whole micro-batch's width, so every host's share has
                # the same shape; each host then feeds only its own rows.
                yield {key: mesh_lib.host_share(value) for key, value in batch.items()}
            epoch += 1


def epoch_micro_batches(lengths: Sequence[int], config: SFTConfig, epoch: int) -> list:
    """One epoch's micro-batches: lists of example indices (``epoch_order``), or with
    ``pack_tokens`` lists of packed rows of them (``pack_order``)."""
    if config.pack_tokens:
        return pack_order(lengths, config.pack_tokens, config.micro_batch_size, config.seed, epoch)
    return epoch_order(lengths, config.micro_batch_size, config.seed, epoch)


def total_steps(config: SFTConfig, lengths: Sequence[int]) -> int:
    """Optimizer updates of the run: ``max_steps``, or ``epochs`` over the data
    (``lengths``: the training examples' token counts; packed, an epoch has as many
    micro-batches as the first epoch's packing gives)."""
    if config.max_steps:
        return config.max_steps
    per_epoch = len(epoch_micro_batches(lengths, config, 0))
    return max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))


# ------------------------------------------------------------------------- loss


def model_inputs(batch: dict, *, pad_id: int) -> dict:
    """The loss's inputs: the batch (``pad_batch``'s arrays) with positions and the
    causal mask from the padding."""
    if "segments" in batch:  # packed rows (pack_batch): each trace starts at position 0 and sees only itself
        batch = dict(batch)
        segments = batch.pop("segments")  # [B, T], 0 = padding
        T = segments.shape[1]
        starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
        first = jax.lax.cummax(jnp.where(starts, jnp.arange(T), 0), axis=1)  # [B, T]: where each token's trace starts
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)  # [B, T, T]
        return {**batch, "positions": jnp.arange(T) - first, "attention_mask": same & jnp.tril(jnp.ones((T, T), bool))}
    valid = batch["tokens"] != pad_id  # [B, T]
    return {
        **batch,
        "positions": tunix_utils.build_positions_from_mask(valid),  # [B, T]
        "attention_mask": tunix_utils.make_causal_attn_mask(valid),  # [B, T, T]
    }


def completion_loss(model, tokens, loss_mask, positions, attention_mask, scored, scored_weight):
    """Weighted mean negative log-likelihood of the completion tokens, the head
    applied only at the ``scored`` positions (``logprobs.head_logprobs``: no
    [B, T, V] logits, forward or backward). ``loss_mask`` is not read: its weights
    are in ``scored_weight``. (Tunix binds the arguments by position: no ``**``.)

    tokens [B, T]; scored, scored_weight [B, K] (``pad_batch``). Returns (loss,
    loss) so the trainer hands the loss to ``_post_process_train_step`` (its NaN
    check) as the auxiliary output.
    """
    hidden = logprobs.hidden_states(model, tokens, positions, attention_mask)  # [B, T, D]
    picked = jnp.take_along_axis(hidden, scored[..., None], axis=1)  # [B, K, D]
    targets = jnp.take_along_axis(tokens, scored + 1, axis=1)  # [B, K]
    weight = scored_weight.astype(jnp.float32)
    logp = logprobs.head_logprobs(picked, logprobs.embedding(model), targets, active=weight > 0)  # [B, K] float32
    loss = -jnp.sum(logp * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    return loss, loss


def full_logits_loss(model, tokens, loss_mask, positions, attention_mask, scored, scored_weight):
    """``completion_loss`` the way it was computed before ``logprobs.py``: logits at
    every position, then cross-entropy (``sft.logprobs=full``, for comparison);
    ``scored`` and ``scored_weight`` are not read."""
    logits, _ = model(tokens, positions, None, attention_mask)  # [B, T, V]
    # Float32 log-softmax: in bfloat16 the log-probabilities of likely tokens lose
    # most of their digits over a 262k vocabulary.
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T-1, V] predicts tokens[:, 1:]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])  # [B, T-1]
    mask = loss_mask[:, 1:].astype(jnp.float32)  # [B, T-1]
    loss = jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, loss


LOSSES = {"chunked": completion_loss, "full": full_logits_loss}


def learning_rate_schedule(config: SFTConfig, steps: int) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then cosine decay to 0 (the recipe's)."""
    warmup = int(config.warmup_fraction * steps)
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(steps, warmup + 1), 0.0)


# ---------------------------------------------------------------- the trainer


class Trainer(peft_trainer.PeftTrainer):
    """PeftTrainer that stops on a non-finite loss before the step is checkpointed,
    shows tokens per second in its progress bar, and returns only the adapters
    from its step.

    Tunix's jitted step donates the optimizer state only. Its outputs include every
    weight of the model, the frozen base too, so each step wrote a second copy of the
    backbone beside the first: measured on the 270M (4 x 256 tokens), peak RSS
    8.1 GB, and 5.1 GB without that copy, the same losses. ``lora.adapter_step``
    (shared with GRPO's actor) passes the base in and returns the adapters and
    the optimizer state only, so a model the caller still holds is safe too.
    """

    update_done: dict[int, float]  # update number -> when its last micro-batch finished

    def jit_train_and_eval_step(self, skip_jit: bool = False, cache_nnx_graph: bool = False):
        if not skip_jit and self._jitted_train_step_fn is None:
            use_adapter_step(self)
        return super().jit_train_and_eval_step(skip_jit, cache_nnx_graph)

    def _post_process_train_step(self, aux) -> None:
        loss = float(aux)  # waits for the step: the timing below is the step's own
        micro = self.iter_steps + 1  # this micro-batch's 1-based index (incremented after this call)
        accum = self.config.get_with_default("gradient_accumulation_steps", 1)
        if micro % accum == 0:
            self.update_done[micro // accum] = time.perf_counter()
        if not math.isfinite(loss):
            last = self.checkpoint_manager.latest_step()
            raise TrainingError(
                f"loss is {loss} at step {self.train_steps + 1}; stopped without saving it. "
                f"Last good checkpoint: {'step ' + str(last) if last is not None else 'none'}. "
                "Lower sft.learning_rate or fix the data and start a new run directory (this one keeps its checkpoints)."
            )

    @property
    def _tqdm_train_metrics(self) -> list[str]:
        return ["loss", "tokens_per_second"]


class RunHooks(tunix_hooks.TrainingHooks):
    """Per-step metrics (JSONL + TensorBoard) and periodic held-out evaluation."""

    def __init__(self, run: SFTRun):
        self.run = run

    def on_train_step_end(self, trainer, train_step, train_loss):
        # Tunix calls this one update late (metrics are written while the next step
        # runs), so the step's duration comes from the trainer's own timestamps.
        run = self.run
        run.watch.check()  # a writer thread that died (full disk) stops the run here
        check_saves(trainer.checkpoint_manager, run.run_dir / "checkpoints")
        step = int(train_step)
        accum = run.config.sft.grad_accum
        # real_tokens has every micro-batch read, including those a resumed run skips.
        tokens = sum(run.batches.real_tokens[(step - 1) * accum : step * accum])
        done = trainer.update_done
        seconds = done[step] - done.get(step - 1, run.train_started)
        record = {
            "step": step,
            "loss": float(train_loss),
            "learning_rate": float(run.schedule(step - 1)),
            "tokens": tokens,
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "elapsed_seconds": done[step] - run.started,
        }
        trainer.metrics_logger.log(trainer.metrics_prefix, "tokens_per_second", record["tokens_per_second"], tunix_metrics.Mode.TRAIN, step)
        run.append_metrics(record)
        if not sys.stderr.isatty() and (step % max(1, run.steps // 10) == 0 or step == run.steps):
            # Without a terminal Tunix's tqdm bar is off: print the same facts, ETA included.
            per_step = (done[step] - run.train_started) / max(1, len(done))
            eta = time.strftime("%H:%M:%S", time.gmtime(per_step * (run.steps - step)))
            print(f"step {step}/{run.steps} loss {record['loss']:.4f} {record['tokens_per_second']:.0f} tok/s eta {eta}", file=sys.stderr)
        every = run.config.sft.eval_every_steps
        if every and trainer.train_steps % every == 0 and trainer.train_steps < run.steps:
            run.evaluate(trainer.train_steps, trainer.model)

    def on_train_start(self, trainer):
        self.run.train_started = time.perf_counter()

    def on_train_end(self, trainer):
        pass

    def on_train_step_start(self, trainer):
        pass

    def on_eval_step_start(self, trainer):
        pass

    def on_eval_step_end(self, trainer, eval_loss):
        pass


@dataclass
class SFTResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    evals: list[dict]
    merged_dir: Path
    adapter_dir: Path
    seconds: float
    padding_share: float


class SFTRun:
    """One run directory: everything needed to start, resume and finish a run."""

    def __init__(self, config: Config, run_dir: Path, *, loaded: LoadedModel | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.loaded = loaded
        self.started = time.perf_counter()
        self.evals: list[dict] = []
        self.metrics_logger: tunix_metrics.MetricsLogger | None = None

    # -- files
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def append_metrics(self, record: dict) -> None:
        append_record(self.metrics_path, record)

    # -- data
    def _traces(self) -> tuple[list[Trace], list[Trace]]:
        data = self.config.data
        curated, _, described = curate_data(data)
        if unused := [name for name, n in curated.sources.items() if not n]:  # a mix's sources without worked solutions
            print(f"data.mix: no SFT traces from {', '.join(unused)} (GRPO only)", file=sys.stderr)
        train = curated.train[: self.config.sft.train_examples or None]
        if not train:
            raise TrainingError(f"no training traces from {described} (dropped: {dict(curated.dropped)})")
        return train, curated.validation

    # -- evaluation
    def evaluate(self, step: int, lora_model: nnx.Module) -> dict:
        """Greedy generations on the fixed held-out slice -> format rate and accuracy
        of ``lora_model`` with its adapters merged (at step 0, B = 0: the base model)."""
        sft = self.config.sft
        held_out = self.validation[: sft.eval_examples]
        if not held_out:
            return {}
        plain = merged_model(lora_model, self.loaded, sft.lora)
        generator = Generator(plain, self.loaded.tokenizer, max_batch=min(self.config.eval.batch_size, len(held_out)))
        scored = generate_and_score(generator, [t.example() for t in held_out],
                                    max_new_tokens=sft.eval_max_new_tokens, prompt_style=self.config.data.prompt_style,
                                    weights=self.config.rewards)
        scores, outputs = [s for s, _ in scored], [o for _, o in scored]
        metrics = aggregate(scores)  # the harness's own aggregation, as `tracetune eval` reports it
        result = {
            "step": step,
            **{f"eval/{m}": metrics[m].mean for m in ("format_rate", "accuracy", "composite")},
            "eval/examples": len(scores),
            "eval/seconds": generator.stats.seconds,
        }
        self._write_samples(step, held_out, outputs, scores)
        self.append_metrics(result)
        if self.metrics_logger is not None:
            for key in ("eval/format_rate", "eval/accuracy"):
                self.metrics_logger.log("", key, result[key], tunix_metrics.Mode.TRAIN, step)
        self.evals.append(result)
        better = self.best.offer(result, lora_model, self.loaded, sft.lora, "sft")
        print(f"step {step}: format rate {result['eval/format_rate']:.0%}, accuracy {result['eval/accuracy']:.0%} "
              f"on {len(scores)} held-out traces{' (best so far)' if better and step else ''}", file=sys.stderr)
        return result

    def _write_samples(self, step: int, held_out, outputs, scores) -> None:
        if not is_primary():
            return
        samples = self.run_dir / "samples" / f"step_{step:06d}.jsonl"
        samples.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(samples) as tmp, tmp.open("w", encoding="utf-8") as handle:
            for trace, output, score in zip(held_out, outputs, scores):
                handle.write(json.dumps({"id": trace.id, "question": trace.question, "reference": trace.reference,
                                         "completion": output.text, "well_formed": score.well_formed,
                                         "correct": score.correct}, ensure_ascii=False) + "\n")

    # -- the run
    def train(self) -> SFTResult:
        # From the first metrics logger on (JAX reports compile times to TensorBoard
        # from the trainer's construction), a writer thread that dies stops the run.
        with FaultWatch.for_run(self.run_dir) as self.watch:
            return self._train()

    def _train(self) -> SFTResult:
        sft = self.config.sft
        claim_directory(self.run_dir, self.config, ("data", "sft"))
        if self.loaded is None:
            self.loaded = load_model(sft.model, dtype=sft.dtype, weights=sft.weights or None, seed=sft.seed)
        tokenizer = self.loaded.tokenizer
        train_traces, self.validation = self._traces()
        examples, too_long = tokenize_traces(train_traces, tokenizer, self.config.data.max_tokens,
                                             loop_share=sft.loop_share, seed=sft.seed)
        if not examples:
            raise TrainingError(f"every training trace is longer than data.max_tokens={self.config.data.max_tokens}")
        self.steps = total_steps(sft, [len(e.ids) for e in examples])
        self.schedule = learning_rate_schedule(sft, self.steps)

        mesh = mesh_lib.make_mesh(self.config.mesh)
        mesh_lib.check_batch(mesh, sft.micro_batch_size, "sft.micro_batch_size")
        mesh_lib.check_heads(mesh, self.loaded.config.num_heads, self.loaded.name)
        _, model = lora_on_mesh(self.loaded.model, sft.lora, sft.seed, mesh)
        # Tunix's train step hands back new arrays for every weight, the frozen base
        # included: holding on to the base model here would keep a second backbone
        # alive from the first update on. The LoRA model is all the run needs.
        self.loaded = dataclasses.replace(self.loaded, model=None)
        self.metrics_logger = tunix_metrics.MetricsLogger(metrics_options(self.run_dir / "tensorboard", self.watch))
        # A damaged newest checkpoint (a kill during a save, a bad disk) is moved
        # aside before the trainer restores: it resumes from the newest intact one.
        set_aside_damaged_checkpoints(self.run_dir / "checkpoints")
        training = peft_trainer.TrainingConfig(
            eval_every_n_steps=1 << 30,  # held-out generation replaces Tunix's eval loss
            max_steps=self.steps,
            gradient_accumulation_steps=sft.grad_accum if sft.grad_accum > 1 else None,
            checkpoint_root_directory=str((self.run_dir / "checkpoints").resolve()),
            checkpointing_options=checkpoint_options(sft.checkpoint_minutes, sft.checkpoint_steps, sft.keep_checkpoints),
            pbar_description="sft",
        )
        with restoring(self.run_dir / "checkpoints"):  # Tunix restores the newest checkpoint here
            trainer = Trainer(model, optimizer(self.schedule, sft.max_grad_norm), training, metrics_logger=self.metrics_logger)
        trainer.update_done = {}
        pad_id = tokenizer.pad_id
        trainer.with_loss_fn(LOSSES[sft.logprobs], has_aux=True)
        trainer.with_gen_model_input_fn(lambda batch: model_inputs(batch, pad_id=pad_id))
        trainer.with_training_hooks(RunHooks(self))
        resumed = trainer.train_steps
        kept = truncate_metrics(self.metrics_path, resumed)
        self.best = BestAdapters(self.run_dir / "best", "eval/", sft.select == "best", kept)
        if resumed:
            print(f"resuming {self.run_dir} from step {resumed}/{self.steps}", file=sys.stderr)
        elif sft.eval_every_steps:
            self.evaluate(0, model)
        looped = f", {sum(e.loop is not None for e in examples)} with a written-in loop" if sft.loop_share else ""
        print(f"sft: {len(examples)} traces ({too_long} longer than {self.config.data.max_tokens} tokens dropped{looped}), "
              f"{self.steps} updates of {sft.batch_size} ({sft.grad_accum} x {sft.micro_batch_size}), "
              f"LoRA rank {sft.lora.rank} on {self.loaded.name}, {mesh_lib.describe(mesh)}", file=sys.stderr)

        with StopFlag() as stop:
            self.batches = Batches(examples, sft, pad_id, self.steps * sft.grad_accum, stop)
            try:
                with mesh_lib.active(mesh):
                    trainer.train(self.batches)  # its last save waits for the in-flight ones
                check_saves(trainer.checkpoint_manager, self.run_dir / "checkpoints")
            except BaseException as error:
                failure = failed_run(error, self.run_dir / "checkpoints", trainer.checkpoint_manager.close, self.metrics_logger.close)
                if failure is error:
                    raise
                raise failure from None
        if stop.signum is not None:
            raise Interrupted(stop.signum, trainer.train_steps, self.run_dir)
        return self._finish(model, trainer)

    def _finish(self, model: nnx.Module, trainer: Trainer) -> SFTResult:
        sft = self.config.sft
        evaluation = self.evaluate(trainer.train_steps, model) if sft.eval_examples else {}
        adapter_dir, merged_dir, exported = self.best.export(model, self.loaded, sft.lora, self.run_dir, stage="sft",
                                                             step=trainer.train_steps)
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        losses = [json.loads(line) for line in lines if line.strip()]
        losses = [r["loss"] for r in losses if "loss" in r]
        real, padded = sum(self.batches.real_tokens), sum(self.batches.padded_tokens)
        result = SFTResult(
            run_dir=self.run_dir, steps=trainer.train_steps, final_loss=losses[-1] if losses else None,
            evals=self.evals, merged_dir=merged_dir, adapter_dir=adapter_dir,
            seconds=time.perf_counter() - self.started, padding_share=1 - real / padded if padded else 0.0,
        )
        if is_primary():
            write_json({"steps": result.steps, "final_loss": result.final_loss, "final_eval": evaluation,
                        "exported_step": exported, "select": sft.select, "best": self.best.record,
                        "reward_weights": self.config.rewards.as_dict(),
                        "seconds": result.seconds, "padding_share": result.padding_share}, self.run_dir / "summary.json")
        return result


def train_sft(config: Config, run_dir: Path, *, loaded: LoadedModel | None = None) -> SFTResult:
    """Train (or resume) the SFT stage of ``config`` in ``run_dir``."""
    return SFTRun(config, run_dir, loaded=loaded).train()
