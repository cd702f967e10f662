"""The chunked log-prob path equals Tunix's own computation, in values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.rl import algo_core
from tunix.rl import common as rl_common
from tunix.rl.grpo import grpo_learner

from tracetune import logprobs
from tracetune.config import LoraConfig
from tracetune.models.params import build_model
from tracetune.models.tiny import tiny_config, tiny_params
from tracetune.lora import apply_lora

PAD, EOS = 0, 1
TOL = {"rtol": 1e-5, "atol": 1e-5}


def lora_model(config, params, seed=0):
    """A LoRA model whose adapters are not zero (B = 0 would hide errors in the LoRA path)."""
    model = apply_lora(build_model(config, params, "test"), LoraConfig(rank=4, alpha=8.0), seed)
    state = nnx.state(model, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
    return model


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    return lora_model(config, tiny_params(config))


def batch(rng, B=4, P=6, C=9, vocab=1024):
    """Left-padded prompts and right-padded completions: row 0 has prompt padding,
    row 1 ends at EOS early, row 2 is cut by the budget (no EOS), row 3 is one token."""
    prompt = rng.integers(4, vocab, (B, P)).astype(np.int32)
    prompt[0, :3] = PAD
    completion = rng.integers(4, vocab, (B, C)).astype(np.int32)
    completion[1, 4], completion[1, 5:] = EOS, PAD
    completion[3, 0], completion[3, 1:] = EOS, PAD
    return prompt, completion


def tunix_logps(model, prompt, completion, temperature=1.0, stop_gradient=True):
    graphdef, state = nnx.split(model)
    return rl_common.compute_per_token_logps(graphdef, state, prompt_tokens=jnp.asarray(prompt), completion_tokens=jnp.asarray(completion),
                                             pad_id=PAD, eos_id=EOS, stop_gradient=stop_gradient, temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [5, 128])  # chunks that do not divide B*C, and one chunk for all
def test_completion_logprobs_equal_tunix(model, temperature, chunk, monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK", chunk)
    monkeypatch.setattr(logprobs, "VOCAB_BLOCK", 100 if chunk == 5 else 2048)  # the tiny vocabulary in blocks, and whole
    prompt, completion = batch(np.random.default_rng(0))
    ours = nnx.jit(lambda m, p, c: logprobs.completion_logprobs(m, p, c, PAD, temperature=temperature))(model, prompt, completion)
    np.testing.assert_allclose(ours, tunix_logps(model, prompt, completion, temperature), **TOL)


@pytest.mark.parametrize("vocab_block", [7, 16, 2048])  # blocks with a tail, blocks that divide it, one block
def test_head_logprobs_chunk_gives_the_same_values(vocab_block, monkeypatch):
    monkeypatch.setattr(logprobs, "VOCAB_BLOCK", vocab_block)
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(3, 7, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 7)))
    full = jax.nn.log_softmax(hidden @ head.T, axis=-1)
    expected = np.take_along_axis(np.asarray(full), np.asarray(targets)[..., None], -1)[..., 0]
    probs = np.exp(np.asarray(full))
    for chunk in (1, 4, 21, 64):
        got, entropy = logprobs.head_logprobs(hidden, head, targets, entropy=True, chunk=chunk)
        np.testing.assert_allclose(got, expected, **TOL)
        np.testing.assert_allclose(entropy, -(probs * np.asarray(full)).sum(-1), **TOL)


@pytest.mark.parametrize("vocab_block", [4, 7, 2048])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_head_logprobs_gradient_is_the_full_log_softmaxs(temperature, vocab_block, monkeypatch):
    """The custom VJP's gradient with respect to the hidden states, for a weighted sum
    of log-probs (how every loss uses them), at chunks that do not divide B*K and
    vocabulary blocks that do not divide V."""
    monkeypatch.setattr(logprobs, "VOCAB_BLOCK", vocab_block)
    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(30, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 30, (2, 5)))
    weights = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)

    def full(h):
        logp = jax.nn.log_softmax(h @ head.T / temperature, axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights)

    expected = jax.grad(full)(hidden)
    for chunk in (3, 10, 64):
        got = jax.grad(lambda h: jnp.sum(logprobs.head_logprobs(h, head, targets, temperature=temperature, chunk=chunk) * weights))(hidden)
        np.testing.assert_allclose(got, expected, **TOL)
        with_entropy = jax.grad(lambda h: jnp.sum(logprobs.head_logprobs(h, head, targets, temperature=temperature, chunk=chunk,
                                                                         entropy=True)[0] * weights))(hidden)
        np.testing.assert_allclose(with_entropy, expected, **TOL)


def test_head_logprobs_skips_chunks_without_an_active_position():
    """With ``active``, a chunk with no active position is skipped (0 there) and
    the active positions keep their values and gradients; the skip is a real branch
    in the compiled program, not a computed-then-masked one."""
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(30, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 30, (2, 8)))
    active = np.zeros((2, 8), bool)
    active[0, :5] = active[1, 1:3] = True  # chunks of 4: rows 0-3, 4-7 live, 8-11 live, 12-15 not
    weights = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32) * active

    def loss(h, **kwargs):
        return jnp.sum(logprobs.head_logprobs(h, head, targets, chunk=4, **kwargs) * weights)

    values = logprobs.head_logprobs(hidden, head, targets, chunk=4, active=jnp.asarray(active))
    plain = logprobs.head_logprobs(hidden, head, targets, chunk=4)
    np.testing.assert_allclose(np.asarray(values)[active], np.asarray(plain)[active], **TOL)
    assert not np.asarray(values)[1, 4:].any()  # the last chunk was skipped
    assert np.asarray(values)[0, 5:8].all()  # inactive positions in a live chunk are still computed
    np.testing.assert_allclose(jax.grad(lambda h: loss(h, active=jnp.asarray(active)))(hidden), jax.grad(loss)(hidden), **TOL)
    program = jax.jit(jax.grad(lambda h, a: loss(h, active=a))).lower(hidden, jnp.asarray(active)).as_text()
    assert "case" in program or "conditional" in program


def lora_grads(model, fn):
    """d fn(model) / d LoRA params, as a flat list."""
    grads = nnx.grad(fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    return jax.tree.leaves(grads)


@pytest.mark.parametrize("vocab_block", [2048, 100])  # the tiny vocabulary in one block, and in blocks with a tail
def test_completion_logprobs_gradients_equal_tunix(model, vocab_block, monkeypatch):
    monkeypatch.setattr(logprobs, "VOCAB_BLOCK", vocab_block)
    prompt, completion = batch(np.random.default_rng(2))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=completion.shape), jnp.float32) * (completion != PAD)

    def ours(m):
        return jnp.sum(logprobs.completion_logprobs(m, jnp.asarray(prompt), jnp.asarray(completion), PAD, temperature=0.9) * weights)

    def theirs(m):
        graphdef, state = nnx.split(m)
        lp = rl_common.compute_per_token_logps(graphdef, state, prompt_tokens=jnp.asarray(prompt), completion_tokens=jnp.asarray(completion),
                                               pad_id=PAD, eos_id=EOS, stop_gradient=False, temperature=0.9)
        return jnp.sum(lp * weights)

    a, b = lora_grads(model, ours), lora_grads(model, theirs)
    assert len(a) == len(b) == 2 * 6 * 2  # A and B on 6 projections in each of 2 layers
    assert all(float(jnp.abs(x).max()) > 0 for x in a)  # every adapter gets a gradient
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, **TOL)


@pytest.mark.parametrize("rows", [1, 2])
def test_row_passes_give_the_batchs_values_and_gradients(model, rows):
    """rows_per_pass: the rows go through the model a few at a time, each pass
    checkpointed; values, entropies and LoRA gradients are the whole batch's."""
    prompt, completion = map(jnp.asarray, batch(np.random.default_rng(2)))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=completion.shape), jnp.float32) * (completion != PAD)

    def run(rows_per_pass):
        def loss(m):
            logps, entropy = logprobs.completion_logprobs(m, prompt, completion, PAD, temperature=0.9, entropy=True,
                                                          rows_per_pass=rows_per_pass)
            return jnp.sum(logps * weights), (logps, entropy)

        (_, (logps, entropy)), grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(model)
        return logps, entropy, jax.tree.leaves(grads)

    whole, passes = run(0), run(rows)
    np.testing.assert_allclose(passes[0], whole[0], **TOL)
    np.testing.assert_allclose(passes[1], whole[1], **TOL)
    assert float(jnp.abs(whole[2][0]).max()) > 0
    for x, y in zip(passes[2], whole[2]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)  # gradients of size ~10: float32 sums in another order
    with pytest.raises(ValueError, match="rows_per_pass=3 must divide the batch's 4 rows"):
        logprobs.completion_logprobs(model, prompt, completion, PAD, rows_per_pass=3)


def test_frozen_logprobs_on_trimmed_batch_equal_tunix_on_the_full_one(model):
    rng = np.random.default_rng(4)
    prompt, completion = batch(rng, P=6, C=9)
    # the rollout's budget: prompts padded to 40 on the left, completions to 50 on the right
    wide_prompt = np.concatenate([np.full((4, 34), PAD, np.int32), prompt], axis=1)
    wide_completion = np.concatenate([completion, np.full((4, 41), PAD, np.int32)], axis=1)
    assert logprobs.trimmed_widths(wide_prompt, wide_completion, PAD, 8) == (8, 16)
    ours = logprobs.frozen_completion_logprobs(model, wide_prompt, wide_completion, PAD, temperature=0.9, multiple=8)
    theirs = tunix_logps(model, wide_prompt, wide_completion, 0.9)
    assert ours.shape == (4, 50)
    valid = wide_completion != PAD
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(theirs)[valid], **TOL)
    assert not np.asarray(ours)[:, 16:].any()


def test_trimmed_widths_never_exceed_the_arrays():
    prompt = np.ones((2, 5), np.int32)
    completion = np.ones((2, 3), np.int32)
    assert logprobs.trimmed_widths(prompt, completion, PAD, 32) == (5, 3)
    assert logprobs.trimmed_widths(prompt, np.zeros((2, 6), np.int32), PAD, 2) == (5, 2)  # an all-padding batch keeps one column


def test_a_bucket_within_one_multiple_of_the_budget_becomes_the_budget():
    """cpu-demo's completions: a budget of 200 in buckets of 64 gives 64, 128 or 200."""
    widths = []
    for length in (1, 64, 65, 128, 129, 150, 192, 200):
        completion = np.zeros((2, 200), np.int32)
        completion[1, :length] = 7
        widths.append(logprobs.trimmed_widths(np.ones((2, 192), np.int32), completion, PAD, 64)[1])
    assert widths == [64, 64, 128, 128, 200, 200, 200, 200]
    prompt = np.zeros((1, 192), np.int32)
    prompt[0, -130:] = 7
    assert logprobs.trimmed_widths(prompt, np.ones((1, 8), np.int32), PAD, 64)[0] == 192  # the budget is a multiple


def test_one_prompt_width_whenever_the_prompts_fit_it():
    """grpo.prompt_width: 128 for any prompt up to 128 tokens, the budget past it; the
    completion keeps its buckets."""
    widths = []
    for length in (1, 64, 65, 128, 129):
        prompt = np.zeros((2, 192), np.int32)
        prompt[1, -length:] = 7
        widths.append(logprobs.trimmed_widths(prompt, np.ones((2, 64), np.int32), PAD, 64, prompt_width=128))
    assert widths == [(128, 64)] * 4 + [(192, 64)]


def train_example(model, rng, *, old=False, ref=True):
    prompt, completion = batch(rng)
    mask = completion != PAD
    shift = jnp.asarray(rng.normal(scale=0.05, size=completion.shape), jnp.float32)
    current = tunix_logps(model, prompt, completion, 0.9)
    return grpo_learner.TrainExample(
        prompt_ids=jnp.asarray(prompt), prompt_mask=jnp.asarray(prompt != PAD),
        completion_ids=jnp.asarray(completion), completion_mask=jnp.asarray(mask),
        advantages=jnp.asarray([1.0, -0.5, 0.25, -1.5], jnp.float32),
        ref_per_token_logps=current + shift if ref else None,
        old_per_token_logps=current - 2 * shift if old else None,
    )


GRPO_CASES = {
    "recipe": {},
    "token-mean": {"loss_agg_mode": "token-mean"},
    "no reference": {"beta": 0.0},
    "low-var kl": {"kl_loss_mode": "low_var_kl"},
    "gspo-token": {"loss_algo": "gspo-token"},
    "dual clip": {"epsilon_c": 3.0},
    "asymmetric clip": {"epsilon_high": 0.28},
    "tight clip": {"epsilon": 0.01},
    "one row per pass": {"rows_per_pass": 1},  # grpo.rows_per_pass: Tunix's loss ignores it
    "two rows per pass": {"rows_per_pass": 2, "loss_agg_mode": "token-mean"},
    # grpo.row_gradients=accumulate: each pass's gradient in its forward pass, summed
    "accumulated, one row per pass": {"rows_per_pass": 1, "row_gradients": "accumulate"},
    "accumulated, two rows, token-mean": {"rows_per_pass": 2, "row_gradients": "accumulate", "loss_agg_mode": "token-mean"},
    "accumulated, Dr. GRPO's scale": {"rows_per_pass": 2, "row_gradients": "accumulate",
                                      "loss_agg_mode": "sequence-mean-token-scale", "loss_norm": 9},
    "accumulated, gspo-token, dual clip": {"rows_per_pass": 1, "row_gradients": "accumulate", "loss_algo": "gspo-token",
                                           "epsilon_c": 3.0},
    "accumulated, no reference": {"rows_per_pass": 1, "row_gradients": "accumulate", "beta": 0.0},
}


@pytest.mark.parametrize("case", GRPO_CASES)
@pytest.mark.parametrize("old", [False, True], ids=["on-policy", "old-policy"])
def test_grpo_loss_equals_tunix(model, case, old):
    config = grpo_learner.GRPOConfig(num_generations=2, beta=0.03)
    for key, value in GRPO_CASES[case].items():  # epsilon_c is read with getattr, not a field
        setattr(config, key, value)
    config.temperature = 0.9
    example = train_example(model, np.random.default_rng(5), old=old, ref=config.beta != 0.0)

    def run(fn):
        def loss(m):
            return fn(m, example, config, PAD, EOS)

        (value, aux), grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(model)
        return value, aux, jax.tree.leaves(grads)

    ours, theirs = run(logprobs.tracetune_grpo_loss), run(algo_core.grpo_loss_fn)
    np.testing.assert_allclose(ours[0], theirs[0], **TOL)
    for key in ours[1]:
        np.testing.assert_allclose(ours[1][key], theirs[1][key], **TOL, err_msg=key)
    assert float(jnp.abs(ours[2][0]).max()) > 0
    for x, y in zip(ours[2], theirs[2]):
        np.testing.assert_allclose(x, y, **TOL)


def test_hidden_states_leave_the_model_unchanged(model):
    prompt, completion = batch(np.random.default_rng(6))
    before = nnx.state(model)
    logprobs.completion_logprobs(model, jnp.asarray(prompt), jnp.asarray(completion), PAD)
    assert not nnx.state(model, nnx.Intermediate)
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(before)


@pytest.mark.slow
def test_the_270m_logprobs_and_gradients_equal_tunix():
    """On the real 270M (262,144-word tied head), with adapters that are not zero."""
    from tracetune.models.registry import load_model

    loaded = load_model("gemma3-270m")
    model = apply_lora(loaded.model, LoraConfig(rank=4, alpha=8.0), 0)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: 0.02 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), state))
    tokenizer = loaded.tokenizer
    texts = ["Natalia sold clips to 48 of her friends in April.", "A robe takes 2 bolts of blue fiber and half that much white fiber."]
    P = 24
    prompt = np.full((2, P), tokenizer.pad_id, np.int32)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text)[:P]
        prompt[row, P - len(ids):] = ids
    completion = np.asarray([tokenizer.encode(" Step 1: 48 / 2 = 24 clips in May.", add_bos=False)[:12]] * 2, np.int32)
    completion[1, 7], completion[1, 8:] = tokenizer.eos_id, tokenizer.pad_id  # a row that ends at EOS, then padding
    weights = jnp.asarray(completion != tokenizer.pad_id, jnp.float32)

    def ours(m):
        return logprobs.completion_logprobs(m, jnp.asarray(prompt), jnp.asarray(completion), tokenizer.pad_id, temperature=0.9)

    def theirs(m):
        graphdef, st = nnx.split(m)
        return rl_common.compute_per_token_logps(graphdef, st, prompt_tokens=jnp.asarray(prompt), completion_tokens=jnp.asarray(completion),
                                                 pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, stop_gradient=False, temperature=0.9)

    np.testing.assert_allclose(nnx.jit(ours)(model), nnx.jit(theirs)(model), **TOL)
    a = lora_grads(model, lambda m: jnp.sum(ours(m) * weights))
    b = lora_grads(model, lambda m: jnp.sum(theirs(m) * weights))
    for x, y in zip(a, b):
        # float32 sums over 262,144 words in a different order: within 2e-5 of the gradient's scale
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5 * float(np.abs(y).max()))
