"""LoRA's gradient as plain 2-D matrix products, installed into qwix.

qwix adds each adapter's delta to its projection as ``dot_general(dot_general(x,
A), B)`` (``nnx.Linear``: the MLP) or as one three-operand ``einsum`` (Gemma's
``Einsum`` modules: attention), and JAX differentiates those. On XLA:CPU the
result is slow: the gradients of A and B contract over the token dimensions of
activations laid out ``[B, T, F]``, and XLA gives the elementwise fusion that
produces the activation gradient a transposed output layout, which it writes
with strided reads (in the 270M's update, one ``f32[2048, T]`` copy fusion per
MLP took 17 ms against 0.4 ms for the same fusion in its own layout). Measured on
the 270M, one row of 328 tokens, alone on the machine (2026-12-06): the trunk's
forward 0.28 s, forward and gradient 1.33 s; with this module 0.83 s.

Here the delta is one function with a custom VJP on 2-D operands: x ``[N, K]``
(the tokens flattened, the contracted dimensions last), A ``[K, r]``, B ``[r, R]``;
its gradients are the same products written as plain matmuls (``x.T @ v``,
``u.T @ dy``), which XLA runs without the transposed copies. The values are
qwix's (the same products; float32 sums in another order), tested against
qwix's own path in values and gradients (``tests/test_lora.py``).

qwix's private names this touches are listed in ``tunix_names.NAMES``: the
module function ``_compute_lora_delta`` (the MLP's path) is replaced, and the
attention path's ``jax.numpy.einsum(lora_einsum_str, ...)`` is reached through
the module's ``jax`` name. Delta layouts other than the ones Gemma 3 uses
(batch dimensions in the weight, contracted dimensions not last) fall back to
qwix's own computation.
"""

from __future__ import annotations

import math
import types
from functools import partial

import jax
import jax.numpy as jnp
from qwix._src.providers import lora as qwix_lora

_QWIX_DELTA = qwix_lora._compute_lora_delta


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def delta_2d(x: jax.Array, a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    """(x @ A) @ B: x [N, K], A [K, r], B [r, R] -> [N, R]."""
    return jnp.dot(jnp.dot(x, a, precision=precision), b, precision=precision)


def _delta_forward(x, a, b, precision):
    u = jnp.dot(x, a, precision=precision)  # [N, r]
    return jnp.dot(u, b, precision=precision), (x, a, b, u)


def _delta_backward(precision, residuals, dy):  # dy [N, R]
    x, a, b, u = residuals
    v = jnp.dot(dy, b.T, precision=precision)  # [N, r]
    return (jnp.dot(v, a.T, precision=precision),  # dx [N, K]
            jnp.dot(x.T, v, precision=precision),  # dA [K, r]
            jnp.dot(u.T, dy, precision=precision))  # dB [r, R]


delta_2d.defvjp(_delta_forward, _delta_backward)


def compute_lora_delta(lhs, lora_a, lora_b, lhs_ca, lhs_ba, contract_shape, batch_shape, remain_shape, rank,
                       precision=None):
    """qwix's ``_compute_lora_delta`` (same arguments, same result) through ``delta_2d``
    when the weight has no batch dimensions and the contracted ones are lhs's last."""
    k = len(lhs_ca)
    if batch_shape or tuple(lhs_ca) != tuple(range(lhs.ndim - k, lhs.ndim)):
        return _QWIX_DELTA(lhs, lora_a, lora_b, lhs_ca, lhs_ba, contract_shape, batch_shape, remain_shape, rank, precision)
    K, R = math.prod(contract_shape), math.prod(remain_shape)
    out = delta_2d(lhs.reshape(-1, K), lora_a.reshape(K, rank), lora_b.reshape(rank, R), precision)
    return out.reshape(*lhs.shape[: lhs.ndim - k], *remain_shape)


def lora_einsum(spec: str, lhs: jax.Array, a: jax.Array, b: jax.Array, **kwargs) -> jax.Array:
    """``jnp.einsum(spec, lhs, a, b)`` for qwix's LoRA spec ``"lhs,a,b->out"`` (a = the
    contracted letters then the rank letter, b = the rank letter then the weight's
    other letters), through ``delta_2d``; any other spec goes to ``jnp.einsum``."""
    inputs, out = spec.split("->")
    lhs_s, a_s, b_s = inputs.split(",")
    rank = a_s[-1:]
    contract, remain = a_s[:-1], b_s[1:]
    lead = "".join(c for c in lhs_s if c not in contract)
    simple = (b_s[:1] == rank and rank not in lhs_s + out and all(c in lhs_s and c not in out for c in contract)
              and not set(remain) & set(lhs_s) and sorted(out) == sorted(lead + remain) and len(set(lhs_s)) == len(lhs_s))
    if not simple or set(kwargs) - {"precision"}:  # other options (a sharding, an output type): jnp's own
        return jnp.einsum(spec, lhs, a, b, **kwargs)
    x = jnp.transpose(lhs, [lhs_s.index(c) for c in lead + contract])  # [lead..., contract...]
    lead_shape = x.shape[: len(lead)]
    K, r, R = math.prod(a.shape[:-1]), a.shape[-1], math.prod(b.shape[1:])
    y = delta_2d(x.reshape(-1, K), a.reshape(K, r), b.reshape(r, R), kwargs.get("precision"))
    y = y.reshape(*lead_shape, *b.shape[1:])  # [lead..., remain...]
    order = lead + remain
    return jnp.transpose(y, [order.index(c) for c in out])


class _Numpy(types.SimpleNamespace):
    """``jax.numpy`` as qwix's LoRA module sees it: ``einsum`` is ``lora_einsum``."""

    def __getattr__(self, name):
        return getattr(jnp, name)


class _Jax(types.SimpleNamespace):
    """The ``jax`` module as qwix's LoRA module sees it: only ``jax.numpy.einsum`` differs."""

    def __getattr__(self, name):
        return getattr(jax, name)


def install() -> None:
    """Route qwix's LoRA deltas through ``delta_2d`` (idempotent; every LoRA model
    tracetune builds goes through ``lora.apply_lora``, which calls this)."""
    if qwix_lora._compute_lora_delta is not compute_lora_delta:
        qwix_lora._compute_lora_delta = compute_lora_delta
    if not isinstance(qwix_lora.jax, _Jax):
        qwix_lora.jax = _Jax(numpy=_Numpy(einsum=lora_einsum))


def uninstall() -> None:
    """qwix's own computation again (tests compare the two)."""
    qwix_lora._compute_lora_delta = _QWIX_DELTA
    qwix_lora.jax = jax
