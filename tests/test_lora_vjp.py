"""LoRA's gradient through lora_vjp equals qwix's own computation, and every adapter
of Gemma 3 takes that path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracetune import lora_vjp
from tracetune.config import LoraConfig
from tracetune.lora import MERGE_SPECS, apply_lora
from tracetune.models.params import build_model
from tracetune.models.tiny import tiny_config, tiny_params

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _model():
    """The tiny Gemma 3 with adapters on every projection, A and B not zero."""
    config = tiny_config()
    model = apply_lora(build_model(config, tiny_params(config), "test"), LoraConfig(rank=4, alpha=8.0), 0)
    state = nnx.state(model, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
    return model


def _loss_and_grads(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))[None].repeat(tokens.shape[0], 0)
    weights = jax.random.normal(jax.random.key(2), (*tokens.shape, model.config.num_embed))

    def loss(m):
        logits, _ = m(tokens, positions, None, mask)
        return jnp.sum(jax.nn.log_softmax(logits) * weights)

    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    return value, jax.tree.leaves(grads)


def test_lora_values_and_gradients_equal_qwixs_own():
    model = _model()
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 1000, (2, 11)), jnp.int32)
    ours = _loss_and_grads(model, tokens)
    lora_vjp.uninstall()
    try:
        theirs = _loss_and_grads(model, tokens)
    finally:
        lora_vjp.install()
    np.testing.assert_allclose(ours[0], theirs[0], **TOL)
    assert len(ours[1]) == len(theirs[1]) == 2 * len(MERGE_SPECS) * model.config.num_layers  # A and B of each
    for a, b in zip(ours[1], theirs[1]):
        # float32 sums in another order: within 1e-5 of each gradient's scale
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_every_gemma_adapter_goes_through_the_2d_delta(monkeypatch):
    calls = []
    real = lora_vjp.delta_2d
    monkeypatch.setattr(lora_vjp, "delta_2d", lambda *a: calls.append(a[0].shape) or real(*a))
    model = _model()
    calls.clear()
    _loss_and_grads(model, jnp.ones((1, 5), jnp.int32))
    # per layer: q, kv (one einsum), attention output, gate, up, down
    assert len(calls) == len(MERGE_SPECS) * model.config.num_layers


@pytest.mark.parametrize("spec, lhs, a, b", [
    ("BTD,Dr,rNH->BTNH", (2, 3, 8), (8, 4), (4, 2, 5)),  # q_einsum
    ("BSD,Dr,rCKH->CBSKH", (2, 3, 8), (8, 4), (4, 2, 1, 5)),  # kv_einsum: the output leads with C
    ("BTNH,NHr,rD->BTD", (2, 3, 2, 5), (2, 5, 4), (4, 8)),  # attn_vec_einsum: two contracted letters
    ("BTNH,NHr,rND->BTND", (2, 3, 2, 5), (2, 5, 4), (4, 2, 8)),  # N contracted and kept: jnp.einsum's path
])
def test_lora_einsum_equals_jnp_einsum(spec, lhs, a, b):
    keys = jax.random.split(jax.random.key(0), 4)
    x, A, B = (jax.random.normal(k, s) for k, s in zip(keys, (lhs, a, b)))
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, A, B)).shape
    w = jax.random.normal(keys[3], out_shape)
    ours = jax.value_and_grad(lambda *o: jnp.sum(lora_vjp.lora_einsum(spec, *o) * w), argnums=(0, 1, 2))(x, A, B)
    theirs = jax.value_and_grad(lambda *o: jnp.sum(jnp.einsum(spec, *o) * w), argnums=(0, 1, 2))(x, A, B)
    np.testing.assert_allclose(ours[0], theirs[0], **TOL)
    for p, q in zip(ours[1], theirs[1]):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-5)
