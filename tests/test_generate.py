"""Generation on the tiny model: same arithmetic as Tunix, fixed shapes, log-probs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracetune import generate
from tracetune.generate import Generator, SamplingConfig, _argmax, _categorical, _decode, _prefill, _take
from tracetune.models.registry import load_model

PROMPTS = ["Q: What is 2 + 3?\nA:\n", "Q: Natalia sold 48 clips in April and half as many in May. How many?\nA:\n", "Q: 7?\nA:\n"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def gen(tiny):
    return Generator(tiny.model, tiny.tokenizer, max_batch=4)


def tunix_next_token_logprobs(loaded, prompt: str) -> np.ndarray:
    """log-softmax of Tunix's own Gemma3 forward at the last prompt position."""
    ids = loaded.tokenizer.encode(prompt)
    T = len(ids)
    logits, _ = loaded.model(jnp.array([ids]), jnp.arange(T)[None], None, jnp.tril(jnp.ones((1, T, T), bool)))
    return np.asarray(jax.nn.log_softmax(logits[0, -1].astype(jnp.float32)))


def test_first_token_and_logprob_match_tunix_forward_in_a_padded_batch(tiny, gen):
    out = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=1, stop_strings=()))
    for prompt, result in zip(PROMPTS, out):
        reference = tunix_next_token_logprobs(tiny, prompt)
        assert result.token_ids[0] == int(reference.argmax())
        assert result.token_logprobs[0] == pytest.approx(float(reference.max()), abs=1e-4)


def test_greedy_does_not_depend_on_the_rest_of_the_batch(gen):
    sampling = SamplingConfig(max_new_tokens=40, stop_strings=())
    together = gen.generate(PROMPTS, sampling)
    alone = [gen.generate([p], sampling)[0] for p in PROMPTS]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_outputs_are_consistent(gen, tiny):
    for result in gen.generate(PROMPTS, SamplingConfig(max_new_tokens=37, stop_strings=())):
        assert len(result.token_ids) == 37 and result.finish_reason == "length"
        assert "".join(result.token_texts) == result.text == tiny.tokenizer.decode(result.token_ids)
        assert len(result.token_logprobs) == 37 and all(lp <= 0 for lp in result.token_logprobs)


def test_sampling_is_deterministic_per_seed_and_rows_differ(gen):
    def run(seed, **kw):
        return [r.token_ids for r in gen.generate(["Q: 1?\nA:\n"] * 4, SamplingConfig(max_new_tokens=24, temperature=1.0, seed=seed, stop_strings=(), **kw))]

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    assert len({tuple(x) for x in a}) > 1  # G copies of one prompt get different samples
    t1, t2 = run(3, top_k=5, top_p=0.9), run(3, top_k=5, top_p=0.9)
    assert t1 == t2


@pytest.mark.parametrize("vocab", [1024, 1000])  # 4 blocks of 256; 125 blocks of 8 (gcd with the block)
def test_temperature_sampling_draws_from_the_softmax(vocab):
    """The inverse-CDF sampler's frequencies over 40,000 draws match softmax(scaled)
    within sampling noise (total variation), and tokens of zero weight never come up."""
    rng = np.random.default_rng(0)
    scaled = rng.normal(0, 2.0, (vocab, 2)).astype(np.float32)  # [V, B]
    scaled[::7, 1] = -1e30  # row 1: every 7th token has weight exp(-1e30) = 0
    keys = jax.random.split(jax.random.key(3), (40_000, 2))  # one key per row, per draw
    draws = jax.jit(jax.vmap(_categorical, in_axes=(None, 0)))(jnp.asarray(scaled), keys)
    draws = np.asarray(draws)  # [N, B]
    for row in range(2):
        expected = np.asarray(jax.nn.softmax(scaled[:, row]))
        seen = np.bincount(draws[:, row], minlength=vocab) / len(draws)
        assert 0.5 * np.abs(seen - expected).sum() < 0.06  # noise alone: about 0.04 at N=40k, V=1k
        assert seen.argmax() == expected.argmax()
    assert not np.isin(draws[:, 1], np.arange(0, vocab, 7)).any()
    assert draws.min() >= 0 and draws.max() < vocab


def test_top_k_one_is_greedy(gen):
    greedy = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=16, stop_strings=()))
    topk1 = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=16, temperature=0.7, top_k=1, stop_strings=()))
    assert [r.token_ids for r in greedy] == [r.token_ids for r in topk1]


def test_no_recompilation_within_buckets(gen):
    sampling = SamplingConfig(max_new_tokens=32, stop_strings=())
    gen.generate(PROMPTS[:3], sampling)
    before = (_prefill._cache_size(), _decode._cache_size())
    gen.generate(PROMPTS + ["Q: 9?\nA:\n"], sampling)  # batch 4: same bucket as 3
    gen.generate(["Q: " + "very " * 20 + "long?\nA:\n", "Q: x?\nA:\n", "Q: y\nA:\n"], sampling)  # other lengths, same bucket
    assert (_prefill._cache_size(), _decode._cache_size()) == before


def test_stop_string_cuts_the_completion_and_its_tokens(gen, tiny):
    text = "<reasoning>Step 1: 2 + 3 = 5</reasoning>\n<answer>5</answer> and then more text"
    ids = np.array(tiny.tokenizer.encode(text, add_bos=False))
    result = gen._finish("p", 3, ids, np.full(len(ids), -0.5), SamplingConfig(max_new_tokens=500))
    assert result.text == "<reasoning>Step 1: 2 + 3 = 5</reasoning>\n<answer>5</answer>"
    assert result.finish_reason == "stop" and "".join(result.token_texts) == result.text
    assert len(result.token_ids) == len(result.token_logprobs) == len(result.token_texts)


@pytest.mark.parametrize(("prompt", "completion", "kept"), [
    ("Q: 2 + 3?\nA:\n", "Q: 7 + 1?\nA:\n", "Q:"),  # a new question at once: the prompt's newline starts the stop string
    ("Q: 2 + 3?\nA:\n", "5\nQ: 7 + 1?", "5\nQ:"),  # ... or after an answer
    ("Q: 2 + 3?\nA:", "Q: 7 + 1?", "Q: 7 + 1?"),  # no newline before it: no stop
])
def test_a_stop_string_may_start_with_the_prompts_newline(gen, tiny, prompt, completion, kept):
    ids = np.array(tiny.tokenizer.encode(completion, add_bos=False))
    result = gen._finish(prompt, 3, ids, np.zeros(len(ids)), SamplingConfig(max_new_tokens=500, stop_strings=("\nQ:",)))
    assert result.text == kept and "".join(result.token_texts) == kept
    assert result.finish_reason == ("stop" if kept != completion else "length")


def test_eos_ends_a_completion(gen, tiny):
    ids = np.array(tiny.tokenizer.encode("Step 1: ok", add_bos=False) + [tiny.tokenizer.eos_id, 7, 7])
    result = gen._finish("p", 3, ids, np.zeros(len(ids)), SamplingConfig(max_new_tokens=500))
    assert result.finish_reason == "eos" and result.text == "Step 1: ok"


def test_bad_sampling_settings():
    for kwargs in ({"top_k": 65}, {"top_p": 0}, {"temperature": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingConfig(**kwargs)


def test_blocked_argmax_picks_the_first_most_likely_token_like_jnp_argmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.integers(0, 50, (1000, 6)).astype(np.float32))  # [V, B], many ties
    assert (np.asarray(_argmax(logits)) == np.asarray(jnp.argmax(logits, axis=0))).all()


def test_freed_rows_take_the_next_prompts_and_every_result_is_as_in_one_batch(tiny):
    """Five prompts through two rows: a row whose prompt stops early (a stop string
    taken from its own completion) takes the next prompt while the other row decodes
    on at its own cache slot; greedy and sampled results equal those of one batch
    holding all five (a row draws from its own key: seed, prompt index, position)."""
    prompts = PROMPTS + ["Q: 5 + 8?\nA:\n", "Q: Ten apples, three eaten?\nA:\n"]
    two_rows, wide = (Generator(tiny.model, tiny.tokenizer, max_batch=b) for b in (2, 8))
    for sampling in (SamplingConfig(max_new_tokens=40, stop_strings=()),
                     SamplingConfig(max_new_tokens=40, temperature=1.0, seed=7, stop_strings=())):
        free = wide.generate(prompts, sampling)
        stop = "".join(free[1].token_texts[:3])  # prompt 1 stops within the first chunk, prompt 0 runs on
        assert stop and stop not in free[0].text and free[0].finish_reason == "length"
        sampling = dataclasses.replace(sampling, stop_strings=(stop,))
        order = [index for index, _ in two_rows.stream(prompts, sampling)]
        together = two_rows.generate(prompts, sampling)
        at_once = wide.generate(prompts, sampling)
        assert sorted(order) == list(range(5)) and order.index(1) < order.index(0)  # the early stop is handed back first
        assert together[1].finish_reason == "stop" and len(together[1].token_ids) <= 3
        assert [r.token_ids for r in together] == [r.token_ids for r in at_once]
        for a, b in zip(together, at_once):
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)


def test_the_last_rows_decode_on_in_a_smaller_batch_with_the_same_results(tiny, monkeypatch):
    """Five prompts in a batch of 8 where four stop in the first chunk: the one left
    moves to a batch of 1 (``_take``) and decodes on to the same tokens as alone."""
    prompts = PROMPTS + ["Q: 5 + 8?\nA:\n", "Q: Ten apples, three eaten?\nA:\n"]
    wide = Generator(tiny.model, tiny.tokenizer, max_batch=8)
    free = wide.generate(prompts, SamplingConfig(max_new_tokens=40, stop_strings=()))
    stops = tuple("".join(r.token_texts[:3]) for r in free[1:])
    assert not any(stop in free[0].text for stop in stops)
    sampling = SamplingConfig(max_new_tokens=40, stop_strings=stops)
    shrunk = []
    monkeypatch.setattr(generate, "_take", lambda caches, valid, rows: shrunk.append(len(rows)) or _take(caches, valid, rows))
    together = wide.generate(prompts, sampling)
    assert shrunk == [1]  # from 8 rows to 1, once
    assert [r.finish_reason for r in together] == ["length"] + ["stop"] * 4
    alone = [Generator(tiny.model, tiny.tokenizer, max_batch=1).generate([p], sampling)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_a_prompt_repeated_in_the_batch_runs_its_prefill_once(tiny, monkeypatch):
    """GRPO's G copies of a prompt: the distinct prompts run through the model once
    (2 rows, not 8) and each row still draws its own sample; every row's first token
    and log-prob are those of the prompt run on its own row."""
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    rows_run = []
    real = generate._run_prefill
    def counted(params, tokens, *args, **kwargs):
        rows_run.append(tokens.shape[0])
        return real(params, tokens, *args, **kwargs)

    monkeypatch.setattr(generate, "_run_prefill", counted)
    wide = Generator(tiny.model, tiny.tokenizer, max_batch=8)
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, seed=5, stop_strings=())
    shared = wide.generate(prompts, sampling)
    assert rows_run == [2]
    assert len({tuple(r.token_ids) for r in shared[:4]}) > 1  # G copies still differ
    # The same rows with the prompts all distinct (each run on its own row): the first
    # token of each row is drawn from the same logits with the same key.
    monkeypatch.setattr(generate, "_bucket_batch", lambda n: 8)  # no sharing: U is padded up to the batch
    rows_run.clear()
    unshared = wide.generate(prompts, sampling)
    assert rows_run == [8]
    assert [r.token_ids for r in shared] == [r.token_ids for r in unshared]
    for a, b in zip(shared, unshared):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)


def test_the_last_chunk_runs_only_the_steps_the_rows_need(tiny, monkeypatch):
    """200 new tokens are 1 from the prefill and 199 decode steps, not 13 chunks of 16;
    the results are those of full chunks cut to the budget."""
    counts = []
    real = generate._run_decode
    monkeypatch.setattr(generate, "_run_decode", lambda *a, **k: counts.append(int(a[9])) or real(*a, **k))
    gen = Generator(tiny.model, tiny.tokenizer, max_batch=4)
    out = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=37, stop_strings=()))
    assert all(len(r.token_ids) == 37 for r in out)
    assert counts == [16, 16, 4]  # 36 decode steps after the prefill's token
    monkeypatch.setattr(generate, "_run_decode", lambda *a, **k: real(*a[:9], jnp.int32(16), *a[10:], **k))
    assert [r.token_ids for r in gen.generate(PROMPTS, SamplingConfig(max_new_tokens=37, stop_strings=()))] == \
        [r.token_ids for r in out]  # whole chunks, cut to the budget: the same tokens
    monkeypatch.setattr(generate, "_run_decode", lambda *a, **k: counts.append(int(a[9])) or real(*a, **k))
    one = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=1, stop_strings=()))
    assert all(len(r.token_ids) == 1 for r in one) and counts[-1] == 0  # the prefill's token is all there is
