"""Stage 1: batching, the loss, LoRA merge, and proof that SFT teaches the format
and resumes exactly. Slow tests train the tiny model (CI runs them)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import adapter_weights, finish, start_tracetune, wait_for, wait_for_save_in_flight
from tracetune.config import ConfigError, LoraConfig, SFTConfig, load_config
from tracetune.data import arithmetic_examples, curate, load_examples
from tracetune.errors import TrainingError
from tracetune.generate import Generator, SamplingConfig
from tracetune.models.params import build_model
from tracetune.models.registry import load_model
from tracetune.models.tiny import tiny_config, tiny_params
from tracetune.scoring import aggregate, score_sample
from tracetune.lora import apply_lora, merged_params
from tracetune.runs import StopFlag
from tracetune.sft import (
    LOSSES,
    Batches,
    Tokenized,
    conclusion_start,
    epoch_order,
    model_inputs,
    pack_batch,
    pack_order,
    pad_batch,
    scored_positions,
    tokenize_traces,
    total_steps,
    train_sft,
)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def rows(*lengths_and_prompts):
    return [Tokenized(np.arange(1, n + 1, dtype=np.int32), p) for n, p in lengths_and_prompts]


# ----------------------------------------------------------------- batching


def test_epoch_order_is_fixed_by_seed_and_epoch_and_covers_every_example():
    lengths = list(np.random.default_rng(0).integers(10, 300, size=200))
    first = epoch_order(lengths, 8, seed=42, epoch=0)
    assert first == epoch_order(lengths, 8, seed=42, epoch=0)  # the resume guarantee
    assert first != epoch_order(lengths, 8, seed=42, epoch=1)
    assert first != epoch_order(lengths, 8, seed=7, epoch=0)
    assert sorted(i for batch in first for i in batch) == list(range(200))


def test_epoch_order_groups_similar_lengths():
    lengths = list(np.random.default_rng(0).integers(10, 300, size=512))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch_order(lengths, 8, 42, 0)])
    rng = np.random.default_rng(1)
    random_spread = np.mean([np.ptp(rng.choice(lengths, 8)) for _ in range(64)])
    assert spread < random_spread / 5  # e.g. ~25 tokens instead of ~230


def test_pad_batch_masks_prompt_and_padding():
    batch = pad_batch(rows((5, 2), (3, 1)), micro_batch=3, multiple=4, pad_id=0)
    assert batch["tokens"].shape == (3, 8)  # longest row 5 -> 8; a third row of padding
    np.testing.assert_array_equal(batch["tokens"][0], [1, 2, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])  # completion only
    np.testing.assert_array_equal(batch["loss_mask"][1], [0, 1, 1, 0, 0, 0, 0, 0])
    assert not batch["loss_mask"][2].any() and not batch["tokens"][2].any()


def test_the_conclusion_line_gets_its_own_loss_weight(tiny):
    """From "Therefore" to EOS the tokens weigh sft.conclusion_weight; the ids are
    those of the whole completion, and the weight's start decodes to the conclusion."""
    traces = curate(arithmetic_examples("test")[:5], val_fraction=0).train
    kept, _ = tokenize_traces(traces, tiny.tokenizer, max_tokens=10_000)
    for trace, row in zip(traces, kept):
        whole = tiny.tokenizer.encode(trace.completion, add_bos=False) + [tiny.tokenizer.eos_id]
        assert row.ids[row.n_prompt :].tolist() == whole
        assert tiny.tokenizer.decode(row.ids[row.conclusion :]).startswith("Therefore")
        assert "Therefore" not in tiny.tokenizer.decode(row.ids[row.n_prompt : row.conclusion])
    batch = pad_batch(kept[:2], micro_batch=2, multiple=8, pad_id=0, conclusion_weight=4.0)
    row = kept[0]
    weights = batch["loss_mask"][0]
    assert not weights[: row.n_prompt].any() and not weights[len(row.ids) :].any()
    assert set(weights[row.n_prompt : row.conclusion]) == {1.0}
    assert set(weights[row.conclusion : len(row.ids)]) == {4.0}
    plain = pad_batch(kept[:2], micro_batch=2, multiple=8, pad_id=0)  # the default: every completion token 1
    assert set(plain["loss_mask"][0][row.n_prompt : len(row.ids)]) == {1.0}
    assert conclusion_start(tiny.tokenizer, "Step 1: 2 + 2 = 4", [1, 2]) is None  # no conclusion line


def test_loop_share_writes_loops_the_loss_skips(tiny):
    """sft.loop_share: that share of traces gets a repeated step whose tokens weigh 0;
    what follows it is trained. The choice is fixed by the seed; the ids are the
    looped completion's own encoding; a loop that would not fit leaves the trace plain."""
    traces = curate(load_examples("gsm8k", "train", limit=200).examples, val_fraction=0).train

    def tokenize(budget=10_000, share=0.5, seed=42):
        return tokenize_traces(traces, tiny.tokenizer, max_tokens=budget, loop_share=share, seed=seed)[0]

    plain, looped = tokenize(share=0.0), tokenize()
    with_loops = [i for i, row in enumerate(looped) if row.loop is not None]
    assert 70 <= len(with_loops) <= 130  # about half of 200
    assert [row.loop for row in tokenize()] == [row.loop for row in looped]  # a resumed run sees the same data
    assert [row.loop for row in tokenize(seed=7)] != [row.loop for row in looped]
    assert all(plain[i].loop is None and np.array_equal(plain[i].ids, looped[i].ids)
               for i in range(len(traces)) if i not in with_loops)
    for i in with_loops[:20]:
        row, trace = looped[i], traces[i]
        text = tiny.tokenizer.decode(row.ids[row.n_prompt :].tolist())
        assert row.ids[row.n_prompt :].tolist() == tiny.tokenizer.encode(text, add_bos=False) + [tiny.tokenizer.eos_id]
        loop = tiny.tokenizer.decode(row.ids[row.loop[0] : row.loop[1]].tolist())
        assert loop.startswith("Step ") and loop.endswith("\n")
        assert loop.split("\n")[0].split(": ", 1)[1] in trace.completion  # a real step, written again
        assert text.count("Step ") > trace.n_steps
        assert row.n_prompt < row.loop[0] < row.loop[1] <= row.conclusion
        weights = pad_batch([row], micro_batch=1, multiple=8, pad_id=0)["loss_mask"][0]
        assert not weights[row.loop[0] : row.loop[1]].any()
        assert weights[row.n_prompt : row.loop[0]].all() and weights[row.loop[1] : len(row.ids)].all()
    budget = max(len(row.ids) for row in plain)  # every plain trace fits; some looped ones do not
    tight = tokenize(budget, share=1.0)
    assert len(tight) == len(traces)
    assert 0 < sum(row.loop is None for row in tight) < len(traces)
    assert all(len(row.ids) <= budget for row in tight)


def test_batches_stop_only_at_update_boundaries():
    config = SFTConfig(batch_size=4, micro_batch_size=2, pad_multiple=4)  # 2 micro-batches per update
    stop = StopFlag()
    batches = Batches(rows(*[(6, 2)] * 20), config, pad_id=0, total_micro=10, stop=stop)
    seen = 0
    for _ in batches:
        seen += 1
        if seen == 3:
            stop.signum = signal.SIGTERM  # arrives in the middle of update 2
    assert seen == 4  # update 2 is completed, nothing after it


def test_batches_run_over_epochs_until_the_step_budget():
    config = SFTConfig(batch_size=2, micro_batch_size=2, pad_multiple=4)
    batches = Batches(rows(*[(6, 2)] * 5), config, pad_id=0, total_micro=7, stop=StopFlag())
    assert len(list(batches)) == 7  # 3 micro-batches per epoch (the last one short)
    assert total_steps(SFTConfig(epochs=2, batch_size=4, micro_batch_size=2, max_steps=0), [20] * 10) == 5  # 2 epochs x 5 micro-batches / 2 per update
    assert total_steps(SFTConfig(max_steps=17), [20] * 10) == 17


def test_pack_order_puts_every_example_in_one_row_fixed_by_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(50, 231, 600).tolist()  # GSM8K traces under 256 tokens: 80-230
    micro = pack_order(lengths, 256, 2, seed=42, epoch=0)
    assert micro == pack_order(lengths, 256, 2, seed=42, epoch=0)  # the resume guarantee
    assert micro != pack_order(lengths, 256, 2, seed=42, epoch=1)
    packed_rows = [row for m in micro for row in m]
    assert sorted(i for row in packed_rows for i in row) == list(range(600))
    assert all(sum(lengths[i] for i in row) <= 256 for row in packed_rows)
    assert all(len(m) == 2 for m in micro[:-1])
    # Less padding than one trace per row, even with rows grouped by length and cut to a multiple of 64
    packed_padding = 1 - sum(lengths) / (256 * len(packed_rows))
    apart = epoch_order(lengths, 1, 42, 0)
    apart_padding = 1 - sum(lengths) / sum(-(-lengths[m[0]] // 64) * 64 for m in apart)
    assert packed_padding < apart_padding / 2, (packed_padding, apart_padding)


def test_pack_batch_lays_traces_one_after_another_with_their_weights():
    traces = [Tokenized(np.arange(1, 7, dtype=np.int32), 2, conclusion=5), Tokenized(np.arange(1, 6, dtype=np.int32), 3, loop=(3, 4))]
    batch = pack_batch([traces], micro_batch=2, width=16, pad_id=0, conclusion_weight=2.0)
    assert batch["tokens"].shape == batch["segments"].shape == (2, 16)
    np.testing.assert_array_equal(batch["segments"][0], [1] * 6 + [2] * 5 + [0] * 5)
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 2] + [0, 0, 0, 0, 1] + [0] * 5)
    assert not batch["segments"][1].any()  # the missing row is padding
    inputs = model_inputs(batch, pad_id=0)
    assert "segments" not in inputs  # the losses take their arguments by position
    np.testing.assert_array_equal(inputs["positions"][0, :11], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4])
    mask = np.asarray(inputs["attention_mask"][0])
    assert mask[7, 6] and not mask[7, 5] and not mask[4, 5] and mask[5, 0]  # causal, and within its own trace
    with pytest.raises(ValueError, match="more than its width"):
        pack_batch([traces], micro_batch=1, width=10, pad_id=0)


@pytest.mark.parametrize("path", sorted(LOSSES))
def test_a_packed_row_trains_as_its_traces_alone(path):
    """Loss and LoRA gradients of traces packed into one row equal those of the same
    traces one per row (a LoRA model with B != 0, loop and conclusion weights)."""
    config = tiny_config()
    model = apply_lora(build_model(config, tiny_params(config), "t"), LoraConfig(rank=4, alpha=8.0), 0)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(x.size), x.shape), state))
    traces = [Tokenized(np.arange(1, 10, dtype=np.int32), 4, conclusion=7), Tokenized(np.arange(3, 9, dtype=np.int32), 3, loop=(4, 5)),
              Tokenized(np.arange(2, 14, dtype=np.int32), 2)]
    apart = pad_batch(traces, micro_batch=3, multiple=4, pad_id=0, conclusion_weight=2.0)
    packed = pack_batch([traces], micro_batch=1, width=32, pad_id=0, conclusion_weight=2.0)
    grad = nnx.jit(nnx.value_and_grad(lambda m, inputs: LOSSES[path](m, **inputs)[0], argnums=nnx.DiffState(0, nnx.LoRAParam)))
    results = [grad(model, {k: jnp.asarray(v) for k, v in model_inputs(batch, pad_id=0).items()}) for batch in (apart, packed)]
    np.testing.assert_allclose(float(results[0][0]), float(results[1][0]), rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_packed_batches_cover_the_data_and_count_rows_per_update():
    config = SFTConfig(batch_size=2, micro_batch_size=1, pack_tokens=16, max_steps=0, epochs=1)
    examples = rows(*[(6, 2)] * 10)  # 2 per row of 16: 5 rows, an update of 2 rows
    assert total_steps(config, [6] * 10) == 3
    batches = list(Batches(examples, config, pad_id=0, total_micro=5, stop=StopFlag()))
    assert all(b["tokens"].shape == (1, 16) for b in batches)
    assert sum(int((b["segments"] > 0).sum()) for b in batches) == 60  # every token of every trace, once
    with pytest.raises(ConfigError, match="pack_tokens"):
        load_config("tiny", ["sft.pack_tokens=8"])


def test_tokenize_drops_traces_over_the_budget(tiny):
    traces = curate(arithmetic_examples("test")[:10], val_fraction=0).train
    kept, dropped = tokenize_traces(traces, tiny.tokenizer, max_tokens=10_000)
    assert dropped == 0 and len(kept) == 10
    assert kept[0].ids[0] == tiny.tokenizer.bos_id and kept[0].ids[-1] == tiny.tokenizer.eos_id
    assert tiny.tokenizer.decode(kept[0].ids[kept[0].n_prompt :]).startswith("<reasoning>")
    _, dropped = tokenize_traces(traces, tiny.tokenizer, max_tokens=20)
    assert dropped == 10


# ---------------------------------------------------------------- loss and LoRA


@pytest.mark.parametrize("path", sorted(LOSSES))
def test_completion_loss_weighs_tokens_by_the_mask(tiny, path):
    batch = pad_batch(rows((9, 4)), micro_batch=1, multiple=4, pad_id=0)
    weighted = batch["loss_mask"].copy()
    weighted[0, 7:9] = 3.0
    inputs = model_inputs(batch, pad_id=0)
    logits, _ = tiny.model(inputs["tokens"], inputs["positions"], None, inputs["attention_mask"])
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))[0, :-1],
                              batch["tokens"][0, 1:, None], axis=-1)[:, 0]
    w = weighted[0, 1:]
    reweighted = {**batch, "loss_mask": weighted, **scored_positions(weighted, 4)}
    loss, _ = LOSSES[path](tiny.model, **model_inputs(reweighted, pad_id=0))
    np.testing.assert_allclose(float(loss), float((nll * w).sum() / w.sum()), rtol=1e-5)


@pytest.mark.parametrize("path", sorted(LOSSES))
def test_completion_loss_is_the_mean_nll_of_completion_tokens(tiny, path):
    batch = pad_batch(rows((9, 4), (6, 3)), micro_batch=2, multiple=4, pad_id=0)
    inputs = model_inputs(batch, pad_id=0)
    loss, aux = LOSSES[path](tiny.model, **inputs)
    logits, _ = tiny.model(inputs["tokens"], inputs["positions"], None, inputs["attention_mask"])
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    expected = []
    for b in range(2):
        for t in range(1, 12):
            if batch["loss_mask"][b, t]:
                expected.append(-logp[b, t - 1, batch["tokens"][b, t]])
    assert len(expected) == (9 - 4) + (6 - 3)  # prompt and padding positions excluded
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
    assert float(aux) == float(loss)


def test_pad_batch_lists_the_scored_positions():
    batch = pad_batch(rows((9, 4), (6, 3)), micro_batch=3, multiple=4, pad_id=0)
    # row 0: tokens 4..8 are scored, predicted from positions 3..7; row 1: 3..5 from 2..4
    np.testing.assert_array_equal(batch["scored"][:2, :8], [[3, 4, 5, 6, 7, 0, 0, 0], [2, 3, 4, 0, 0, 0, 0, 0]])
    assert not batch["scored_weight"][:, 5:].any()
    np.testing.assert_array_equal(batch["scored_weight"][:2].sum(1), [5, 3])
    # 5 positions -> K rounded to CHUNK // 3 (3 x K still one head chunk), capped at T - 1 = 11;
    # the padding row scores nothing
    assert batch["scored"].shape == (3, 11) and not batch["scored_weight"][2].any()


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
def test_scored_positions_fill_whole_head_chunks(micro_batch):
    """50 scored positions per row: K is rounded up to a multiple of
    ``logprobs.CHUNK // micro_batch`` (at least the multiple, at most T - 1), so the
    micro-batch's positions fill whole head chunks and fewer shapes (compiled
    programs) serve the same work."""
    from tracetune import logprobs

    batch = pad_batch(rows(*[(200, 150)] * micro_batch), micro_batch=micro_batch, multiple=64, pad_id=0)
    assert batch["tokens"].shape == (micro_batch, 256)
    expected_k = min(255, max(64, logprobs.CHUNK // micro_batch))
    assert batch["scored"].shape == (micro_batch, expected_k)
    assert batch["scored_weight"].sum() == micro_batch * 50


def test_chunked_sft_loss_has_the_full_losss_gradient():
    """Values and LoRA gradients of both SFT losses agree on a LoRA model (B != 0),
    with a conclusion weight, padding rows and a chunk smaller than the batch."""
    config = tiny_config()
    model = apply_lora(build_model(config, tiny_params(config), "t"), LoraConfig(rank=4, alpha=8.0), 0)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(x.size), x.shape), state))
    batch = pad_batch(rows((9, 4), (6, 3), (12, 2)), micro_batch=4, multiple=4, pad_id=0)
    batch["loss_mask"][0, 6:9] = 2.0
    batch.update(scored_positions(batch["loss_mask"], 4))
    inputs = {k: jnp.asarray(v) for k, v in model_inputs(batch, pad_id=0).items()}
    results = [nnx.value_and_grad(lambda m, fn=fn: fn(m, **inputs)[0], argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
               for fn in (LOSSES["chunked"], LOSSES["full"])]
    np.testing.assert_allclose(float(results[0][0]), float(results[1][0]), rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_merged_weights_compute_what_the_lora_model_computes(tiny):
    lora = LoraConfig(rank=4, alpha=8.0)
    model = apply_lora(tiny.model, lora, seed=0)
    # B starts at zero; give every adapter a non-zero B so the merge has work to do.
    state = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    nnx.update(model, jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * 0.05, state))
    merged = build_model(tiny.config, merged_params(model, lora), "merged")
    tokens = jnp.asarray([[2, 17, 33, 99, 250, 7, 8, 9]])
    positions = jnp.arange(8)[None]
    mask = jnp.tril(jnp.ones((8, 8), bool))[None]
    expected, _ = model(tokens, positions, None, mask)
    actual, _ = merged(tokens, positions, None, mask)
    base, _ = tiny.model(tokens, positions, None, mask)
    assert float(jnp.max(jnp.abs(expected - base))) > 1e-2  # the adapters matter
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=1e-4)


def test_unknown_lora_target_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="lora.targets"):
        apply_lora(tiny.model, LoraConfig(targets="q_einsum|o_proj"), seed=0)


def test_sft_config_checks_batch_sizes():
    with pytest.raises(ConfigError, match="multiple of sft.micro_batch_size"):
        SFTConfig(batch_size=10, micro_batch_size=4)
    assert load_config("recipe-1b").sft.grad_accum == 4  # 32 = 4 x 8
    assert load_config("recipe-1b").sft.learning_rate == 1e-5


def test_a_run_directory_refuses_another_config(tmp_path, tiny):
    config = load_config("tiny", ["sft.max_steps=1", "sft.eval_examples=0", "sft.eval_every_steps=0"])
    train_sft(config, tmp_path, loaded=tiny)
    other = load_config("tiny", ["sft.max_steps=1", "sft.eval_examples=0", "sft.eval_every_steps=0", "sft.learning_rate=0.5"])
    with pytest.raises(TrainingError, match="sft.learning_rate"):
        train_sft(other, tmp_path, loaded=tiny)


# ------------------------------------------------------------ proof that it teaches


@pytest.mark.slow
def test_sft_teaches_the_trace_format_on_held_out_problems(tmp_path):
    result = train_sft(load_config("tiny"), tmp_path / "run")
    # select=last (the default) exports the last step, and names the held-out best
    best = max(result.evals, key=lambda e: (e["eval/accuracy"], e["eval/composite"]))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["exported_step"] == result.steps and summary["best"]["step"] == best["step"]
    assert json.loads((result.adapter_dir / "adapter.json").read_text())["selected"] == "last step"
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])  # e.g. 1.4 vs 4+
    # The exported merged checkpoint, scored with the foundation's harness on the
    # synthetic task's test split (never trained on).
    before, after = load_model("tiny", seed=42), load_model(str(result.merged_dir))
    problems = arithmetic_examples("test")[:64]
    prompts = [t.prompt for t in curate(problems, val_fraction=0).train]
    rates = []
    for loaded in (before, after):
        outputs = Generator(loaded.model, loaded.tokenizer).generate(prompts, SamplingConfig(max_new_tokens=96))
        scores = [score_sample(p.question, p.reference, o.text) for p, o in zip(problems, outputs)]
        rates.append(aggregate(scores)["format_rate"].mean)
    assert rates[0] <= 0.05 and rates[1] >= 0.95, rates
    assert result.evals[0]["eval/format_rate"] <= 0.05 and result.evals[-1]["eval/format_rate"] >= 0.95


def sft_process(run_dir: Path, *overrides: str) -> subprocess.Popen:
    settings = ["sft.max_steps=30", "sft.checkpoint_steps=10", "sft.eval_every_steps=0", "sft.eval_examples=0", *overrides]
    return start_tracetune("sft", run_dir, "--preset", "tiny", settings=settings)


def finish_sft(process: subprocess.Popen) -> subprocess.CompletedProcess:
    return finish(process, timeout=600)


def wait_for_checkpoint(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    wait_for(run_dir / "checkpoints" / str(step) / "commit_success.txt", process, timeout=300)


@pytest.mark.slow
def test_killed_and_stopped_runs_resume_to_the_same_weights(tmp_path):
    """SIGKILL during a checkpoint save, at a seeded random moment, and after the newest
    checkpoint was damaged; SIGTERM at a checkpoint: every re-run reaches the
    uninterrupted run's weights and losses."""
    reference = finish_sft(sft_process(tmp_path / "straight"))
    assert reference.returncode == 0, reference.stderr
    expected = adapter_weights(tmp_path / "straight")

    killed, root = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    process = sft_process(killed)
    wait_for_save_in_flight(root, 10, process)
    process.send_signal(signal.SIGKILL)  # mid-save: orbax's temporary directory is left behind
    process.wait()
    process = sft_process(killed)
    wait_for_checkpoint(killed, 20, process)
    time.sleep(random.Random(7).uniform(0.0, 2.0))  # a seeded point somewhere after checkpoint 20
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    data = max((f for f in (root / str(newest) / "model_params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)  # and a bad disk damaged the newest checkpoint
    resumed = finish_sft(sft_process(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {newest} is damaged" in resumed.stderr and "resuming" in resumed.stderr, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert (tmp_path / "killed" / "checkpoints.damaged" / str(newest)).is_dir()

    stopped = sft_process(tmp_path / "stopped")
    wait_for_checkpoint(tmp_path / "stopped", 10, stopped)
    stopped.send_signal(signal.SIGTERM)
    result = finish_sft(stopped)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "checkpoint saved" in result.stderr and "Traceback" not in result.stderr
    saved = max(int(p.name) for p in (tmp_path / "stopped" / "checkpoints").iterdir() if p.name.isdigit())
    assert 10 <= saved < 30
    assert finish_sft(sft_process(tmp_path / "stopped")).returncode == 0

    losses = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for run in ("killed", "stopped"):
        weights = adapter_weights(tmp_path / run)
        assert weights.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(weights[name], expected[name], err_msg=f"{run}: {name}")
        assert losses(run) == losses("straight"), run


@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = finish_sft(sft_process(tmp_path / "run", "sft.learning_rate=1e30", "sft.checkpoint_steps=1", "sft.warmup_fraction=0"))
    assert result.returncode == 2, result.stderr
    assert "loss is" in result.stderr and "Last good checkpoint" in result.stderr and "Traceback" not in result.stderr
    failed_at = int(result.stderr.split(" at step ")[1].split(";")[0])
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved, default=0) < failed_at


def test_a_finished_run_directory_loads_as_a_model(tmp_path, tiny):
    config = load_config("tiny", ["sft.max_steps=2", "sft.eval_examples=0", "sft.eval_every_steps=0"])
    result = train_sft(config, tmp_path / "run", loaded=tiny)
    loaded = load_model(str(tmp_path / "run"))
    assert loaded.source == str(result.merged_dir)
    assert json.loads((tmp_path / "run" / "export" / "adapter" / "adapter.json").read_text())["rank"] == 16
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["padding_share"] < 0.5
    assert any((tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.slow
def test_a_checkpoint_with_the_older_optimizer_layout_stops_in_one_line(tmp_path, monkeypatch):
    """runs.optimizer keeps Adam's moments as one vector (optax.flatten); a run saved
    by the version that kept them per adapter stops with a line naming the
    checkpoint, not orbax's page of mismatched trees."""
    import shutil

    import optax

    from tracetune import sft as sft_module
    from tracetune.sft import train_sft

    def per_adapter(learning_rate, max_grad_norm):  # runs.optimizer before optax.flatten
        return optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(max_grad_norm),
                                                 optax.adamw(learning_rate, weight_decay=0.0)), max_consecutive_errors=1 << 30)

    config = load_config("tiny", ["sft.max_steps=4", "sft.checkpoint_steps=2", "sft.eval_every_steps=0", "sft.eval_examples=0"])
    monkeypatch.setattr(sft_module, "optimizer", per_adapter)
    train_sft(config, tmp_path / "run")
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # as if stopped after step 2
    with pytest.raises(TrainingError, match=r"checkpoints/2 does not fit this version's model and optimizer \(first difference: opt_state"):
        train_sft(config, tmp_path / "run")
