"""Generation on the tiny model: same arithmetic as Tunix, fixed shapes, log-probs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracetune.generate import Generator, SamplingConfig, _argmax, _decode, _prefill
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


def test_a_prompt_floor_gives_the_same_tokens_and_one_program_for_every_prompt_length(tiny, gen):
    """min_prompt_width (GRPO's rollout sets its prompt budget): batches whose longest
    prompts differ decode with one compiled program, to the same tokens."""
    floored = Generator(tiny.model, tiny.tokenizer, max_batch=4, min_prompt_width=128)
    sampling = SamplingConfig(max_new_tokens=16, stop_strings=())
    short, longer = PROMPTS[:1], ["Q: " + "a long question, " * 12 + "?\nA:\n"]
    assert len(tiny.tokenizer.encode(short[0])) <= 64 < len(tiny.tokenizer.encode(longer[0])) <= 128  # two buckets
    results = [floored.generate(short, sampling)]
    compiled = (_prefill._cache_size(), _decode._cache_size())
    results.append(floored.generate(longer, sampling))
    assert (_prefill._cache_size(), _decode._cache_size()) == compiled  # the longer prompts compiled nothing new
    for prompts, ours in zip((short, longer), results):
        plain = gen.generate(prompts, sampling)
        assert [g.token_ids for g in ours] == [g.token_ids for g in plain]
        np.testing.assert_allclose([g.token_logprobs for g in ours], [g.token_logprobs for g in plain], atol=1e-4)
