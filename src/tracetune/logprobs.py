"""Per-token log-probabilities without the ``[B, L, V]`` logits.

Every training pass needs ``log p(token | prefix)`` only where a token is scored:
the completion, never the prompt or the padding. Tunix 0.1.7's
``rl.common.compute_per_token_logps`` (and a plain cross-entropy loss) runs the
tied head over every position of the padded sequence and keeps the float32
logits: ``[B, L, 262144]``, 1.6 GB for 4 sequences of 392 tokens, and as much
again for its gradient. On Gemma 3 270M the head is 62% of a token's forward
multiply-adds (168M of 268M).

Here the model's trunk runs once (``hidden_states``: the model's own
``__call__``, so qwix's LoRA interception applies, with the logits left unused
so that XLA drops the head), and the head and log-softmax run only at the scored
positions, ``CHUNK`` positions at a time (``head_logprobs``), each chunk in one
pass over the vocabulary, ``VOCAB_BLOCK`` words at a time with a running
log-sum-exp. In a training step that pass also computes the log-probs' gradient
with respect to the hidden states (a custom VJP), so no more than ``[CHUNK,
VOCAB_BLOCK]`` logits exist at once, forward or backward, and none is computed
twice. Accumulation is in
float32 whatever the weights' dtype: in bfloat16 the log-probability of a likely
token loses most of its digits over a 262k vocabulary.

The three callers:

* ``completion_logprobs``: a GRPO batch (left-padded prompts, right-padded
  completions): the policy's, the old policy's and the reference's log-probs;
* ``tracetune_grpo_loss``: Tunix's GRPO loss on them, registered with Tunix's
  loss registry as ``"tracetune"`` (``grpo.logprobs=chunked`` selects it), with
  the micro-batch's completions ``grpo.rows_per_pass`` at a time (``_row_passes``,
  or each pass's gradient summed: ``_accumulated_loss``);
* ``sft.completion_loss``: the SFT loss at the positions ``sft.pad_batch`` lists.

Tested equal to Tunix's own path (values and gradients) in tests/test_logprobs.py.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.rl import algo_core, common, function_registry

from tracetune import memory

# Scored positions per head call, at most (the chunks are made even): 128, 256 and 512
# ran the 270M's head within 10% of each other per position.
CHUNK = 256
VOCAB_BLOCK = 2048  # head rows per step of a chunk's pass over the vocabulary: [256, 2048] float32 logits, 2 MB


def bucket(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (at least one multiple):
    padded shapes come from a few buckets, so compiles stay bounded."""
    return max(1, math.ceil(length / multiple)) * multiple


# ----------------------------------------------------------------- the trunk


def hidden_states(model: nnx.Module, tokens: jax.Array, positions: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The final-norm hidden states ``[B, T, D]`` (what the tied head multiplies).

    tokens, positions [B, T]; attention_mask [B, T, T]. The model's ``__call__``
    runs (LoRA is applied by intercepting it); its logits are not used, so under
    ``jit`` XLA removes the head's matmul. The sown intermediate is popped again:
    the module leaves the call as it came.
    """
    model(tokens, positions, None, attention_mask, output_hidden_states=True)
    (hidden,) = nnx.pop(model, nnx.Intermediate)["all_hidden_states"].get_value()
    return hidden


def embedding(model: nnx.Module) -> jax.Array:
    """The tied input embedding / output head ``[V, D]``."""
    return model.embedder.input_embedding[...]


# ------------------------------------------------------------------ the head


def _chunks(hidden: jax.Array, targets: jax.Array, chunk: int, active: jax.Array | None = None):
    """[B, K, D], [B, K] -> [chunks, size, D], [chunks, size] (zero-padded), B*K, and
    with ``active`` [B, K] whether each chunk holds an active position [chunks] (else None).
    There are as few chunks as ``chunk`` positions each allow, all of one size."""
    B, K, D = hidden.shape
    n = B * K
    chunks = max(1, math.ceil(n / chunk))
    chunk = math.ceil(n / chunks)  # as even as they can be: 800 positions in 4 chunks of 200, not 4 of 256
    rows = jnp.pad(hidden.reshape(n, D), ((0, chunks * chunk - n), (0, 0))).reshape(chunks, chunk, D)
    ids = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, chunks * chunk - n)).reshape(chunks, chunk)
    live = None if active is None else jnp.pad(active.reshape(n), (0, chunks * chunk - n)).reshape(chunks, chunk).any(axis=1)
    return rows, ids, n, live


def _when(live, compute, *like):
    """``compute()``, or zeros shaped like ``like`` where ``live`` is False: XLA runs only
    the branch taken, so a chunk of unused positions costs no head matmul. ``live``
    None: always computed."""
    if live is None:
        return compute()
    return jax.lax.cond(live, compute, lambda: tuple(jnp.zeros(x.shape, x.dtype) for x in like))


def _chunk_terms(h: jax.Array, t: jax.Array, head: jax.Array, temperature: float, with_entropy: bool,
                 with_grad: bool = False):
    """One chunk's log p(t) [chunk], entropy [chunk] (zeros without ``with_entropy``) and,
    with ``with_grad``, d log p(t) / d h [chunk, D], in float32.

    The vocabulary goes through in blocks of ``VOCAB_BLOCK`` rows of the head with a
    running maximum and running sums (the online softmax of flash attention): each
    block's logits [chunk, block] are made, folded into the normaliser, the
    entropy's sum and the softmax-weighted sum of head rows (the gradient's
    expectation), and dropped while the block's rows are still in cache. On this
    2-core CPU, for 128 positions of the 270M: 146 ms forward against 195 ms with
    the [128, 262144] logits whole, 263 against 561 ms with the gradient, whose
    product ``softmax @ head`` over the whole vocabulary ran at half the forward
    matmul's rate (2026-12-06, alone)."""
    N, D = h.shape
    V = head.shape[0]
    scale = 1.0 if temperature in (0.0, 1.0) else 1.0 / temperature  # Tunix's convention: 0 means greedy, scored at 1

    def fold(carry, rows):  # rows [block, D] of the head
        top, mass, weighted, expected = carry  # [N], [N], [N], [N, D]
        logits = jnp.dot(h, rows.T, preferred_element_type=jnp.float32) * scale  # [N, block]
        new_top = jnp.maximum(top, logits.max(axis=-1))
        shrink = jnp.exp(top - new_top)  # rescales the sums so far to the new maximum
        weight = jnp.exp(logits - new_top[:, None])  # [N, block]
        mass = mass * shrink + weight.sum(axis=-1)
        if with_entropy:
            weighted = weighted * shrink + (weight * logits).sum(axis=-1)
        if with_grad:
            expected = expected * shrink[:, None] + jnp.dot(weight.astype(head.dtype), rows, preferred_element_type=jnp.float32)
        return new_top, mass, weighted, expected

    block = min(VOCAB_BLOCK, V)
    full, tail = divmod(V, block)
    zeros = jnp.zeros((N,), jnp.float32)
    carry = (jnp.full((N,), -jnp.inf, jnp.float32), zeros, zeros, jnp.zeros((N, D) if with_grad else (0,), jnp.float32))
    carry = jax.lax.fori_loop(0, full, lambda i, c: fold(c, jax.lax.dynamic_slice_in_dim(head, i * block, block)), carry)
    if tail:
        carry = fold(carry, head[full * block :])
    top, mass, weighted, expected = carry
    normaliser = top + jnp.log(mass)  # logsumexp of the chunk's logits [N]
    target = head[t].astype(jnp.float32)  # [N, D]
    picked = jnp.sum(h.astype(jnp.float32) * target, axis=-1) * scale - normaliser
    spread = normaliser - weighted / mass if with_entropy else zeros
    if not with_grad:
        return picked, spread
    return picked, spread, (target - expected / mass[:, None]) * scale


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _picked(rows: jax.Array, head: jax.Array, ids: jax.Array, live: jax.Array | None, temperature: float, with_entropy: bool):
    """(log p(ids), entropy) [chunks, chunk] each, one chunk of logits at a time (0 in
    chunks that ``live`` [chunks] marks unused)."""
    return _over_chunks(rows, head, ids, live, temperature, with_entropy, with_grad=False)


def _over_chunks(rows, head, ids, live, temperature: float, with_entropy: bool, with_grad: bool):
    """``_chunk_terms`` of every chunk, in a loop (``lax.map``), zeros in the chunks
    that ``live`` marks unused."""

    def one(args):
        h, t, on = args
        zero = jnp.zeros(t.shape, jnp.float32)
        like = (zero, zero, jnp.zeros(h.shape, jnp.float32)) if with_grad else (zero, zero)
        return _when(on, lambda: _chunk_terms(h, t, head, temperature, with_entropy, with_grad), *like)

    return jax.lax.map(one, (rows, ids, live))


def _picked_forward(rows, head, ids, live, temperature, with_entropy):
    """The forward pass of a training step also computes d log p / d hidden for each
    position: ``(head[t] - softmax @ head) / temperature`` [chunk, D], in the same
    pass over the vocabulary as the log-probs (``_chunk_terms``). The backward pass
    then only scales it by the incoming cotangent: each chunk's logits are computed
    once in the whole step, and what is kept is [positions, D], not [positions, V]."""
    picked, spread, grad = _over_chunks(rows, head, ids, live, temperature, with_entropy, with_grad=True)
    return (picked, spread), (grad, head, ids, live)


def _picked_backward(temperature, with_entropy, residuals, cotangents):
    grad, head, ids, live = residuals
    d_picked, _ = cotangents  # the entropy is a metric: no gradient flows from it
    d_rows = (d_picked[..., None] * grad).astype(head.dtype)  # [chunks, chunk, D]
    # The head is the frozen tied embedding (tracetune trains LoRA adapters only):
    # its cotangent is zero, which XLA drops with the unused gradient.
    d_live = None if live is None else np.zeros(live.shape, jax.dtypes.float0)
    return d_rows, jnp.zeros_like(head), np.zeros(ids.shape, jax.dtypes.float0), d_live


_picked.defvjp(_picked_forward, _picked_backward)


def head_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                  entropy: bool = False, chunk: int | None = None,
                  active: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``log softmax(hidden @ head.T / temperature)[targets]`` ``[B, K]`` in float32,
    and with ``entropy`` the distribution's entropy ``[B, K]`` too (a metric: no
    gradient flows from it).

    hidden [B, K, D]; head [V, D]; targets [B, K] int. The B*K positions go
    through the head ``chunk`` (default ``CHUNK``) at a time. Differentiated, the
    forward pass computes each position's gradient with its logits (a custom VJP),
    so no [B, K, V] array exists forward or backward and no logits are recomputed;
    the head itself gets no gradient (it is the frozen embedding). ``active`` [B, K]
    bool: the positions whose results are used; a chunk with none of them is skipped
    at run time (0 there), so one padded K serves batches that need fewer chunks.
    """
    B, K, _ = hidden.shape
    rows, ids, n, live = _chunks(hidden, targets, chunk or CHUNK, active)
    picked, spread = _picked(rows, head, ids, live, float(temperature), entropy)
    picked = picked.reshape(-1)[:n].reshape(B, K)
    if not entropy:
        return picked
    return picked, jax.lax.stop_gradient(spread.reshape(-1)[:n].reshape(B, K))


# ------------------------------------------------------------ GRPO batches


def completion_logprobs(model: nnx.Module, prompt_tokens: jax.Array, completion_tokens: jax.Array, pad_id: int, *,
                        temperature: float = 1.0, entropy: bool = False, rows_per_pass: int = 0):
    """Log-probs ``[B, C]`` of each completion token (and entropies with ``entropy``),
    the same values as Tunix's ``compute_per_token_logps`` on the same inputs.

    prompt_tokens [B, P] left-padded; completion_tokens [B, C] right-padded with
    ``pad_id``. Positions and the causal mask come from the padding, as Tunix
    builds them; hidden state t predicts token t + 1, so the completion is
    scored from positions P - 1 .. P + C - 2.

    ``rows_per_pass`` (a divisor of B; 0 = all rows at once): the rows go through
    the model that many at a time, each pass under ``jax.checkpoint`` (see
    ``_row_passes``), so a gradient keeps one pass's activations, not the batch's.
    """
    B = prompt_tokens.shape[0]
    if rows_per_pass and rows_per_pass < B:
        hidden = _row_passes(model, prompt_tokens, completion_tokens, pad_id, rows_per_pass)
    else:
        hidden = _completion_hidden(model, prompt_tokens, completion_tokens, pad_id)
    return head_logprobs(hidden, embedding(model), completion_tokens, temperature=temperature, entropy=entropy)


def _completion_hidden(model: nnx.Module, prompt_tokens: jax.Array, completion_tokens: jax.Array, pad_id: int) -> jax.Array:
    """The final hidden states that score the completion ``[B, C, D]``: positions
    P - 1 .. P + C - 2 of the trunk over prompt and completion."""
    P, C = prompt_tokens.shape[1], completion_tokens.shape[1]
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)  # [B, P + C]
    valid = tokens != pad_id
    hidden = hidden_states(model, tokens, common.build_positions_from_mask(valid), common.make_causal_attn_mask(valid))
    return hidden[:, P - 1 : P + C - 1]


def _row_passes(model, prompt_tokens, completion_tokens, pad_id: int, rows: int) -> jax.Array:
    """``_completion_hidden`` ``rows`` rows at a time, in a loop (``lax.map``) whose
    body is checkpointed: the backward pass recomputes one pass's activations inside
    the loop's own backward iteration, where XLA cannot move them next to the
    forward pass. (Checkpointing each decoder layer with ``jax.checkpoint``, or
    Tunix's ``RematConfig``, saved nothing on XLA:CPU: its scheduler ran every
    layer's recomputation beside the forward pass, 2.5 GB of temporaries either
    way for 4 x 256 tokens of the 270M.) Costs about one more forward pass.

    The head stays out of the loop (the caller applies it to all rows): inside it,
    XLA:CPU hoisted a transposed copy of the tied embedding, f32[640, 262144] for
    the 270M, 671 MB of the GRPO update's temporaries (its buffer assignment).

    The body works on a copy of the model merged inside its own trace: Gemma 3
    sows its hidden states and qwix notes each einsum on the module, and nnx
    refuses those writes on a module of an outer trace.
    """
    B, C = completion_tokens.shape
    graphdef, state = nnx.split(model)

    @jax.checkpoint
    def one_pass(tokens):
        prompt, completion = tokens  # [rows, P], [rows, C]
        return _completion_hidden(nnx.merge(graphdef, state), prompt, completion, pad_id)  # [rows, C, D]

    hidden = jax.lax.map(one_pass, _in_passes((prompt_tokens, completion_tokens), rows))
    return hidden.reshape(B, C, hidden.shape[-1])


def _in_passes(tree, rows: int):
    """The arrays of ``tree``, each [B, ...], as [B // rows, rows, ...]: the passes of
    ``rows_per_pass``, for a loop over the first axis."""
    B = jax.tree.leaves(tree)[0].shape[0]
    if B % rows:
        raise ValueError(f"rows_per_pass={rows} must divide the batch's {B} rows")
    return jax.tree.map(lambda x: x.reshape(B // rows, rows, *x.shape[1:]), tree)


@partial(jax.jit, static_argnames=("pad_id", "temperature"))
def _frozen_completion_logprobs(graphdef, state, prompt_tokens, completion_tokens, pad_id: int, temperature: float):
    model = nnx.merge(graphdef, state)
    return jax.lax.stop_gradient(completion_logprobs(model, prompt_tokens, completion_tokens, pad_id, temperature=temperature))


_run_frozen = memory.CompileFirst(_frozen_completion_logprobs)  # compile, hand the compile's memory back, run


def frozen_completion_logprobs(model: nnx.Module, prompt_tokens, completion_tokens, pad_id: int, *,
                               temperature: float = 1.0, multiple: int = 32, prompt_width: int = 0) -> jax.Array:
    """``completion_logprobs`` of a model not being trained (reference, old policy),
    on the batch with its all-padding columns cut: prompt columns from the left,
    completion columns from the right, down to ``bucket(longest, multiple)`` (the
    prompt to ``prompt_width`` where set: ``trimmed_widths``). The result has the
    full ``[B, C]`` shape again, 0 in the cut columns (padding)."""
    prompt_tokens, completion_tokens = np.asarray(prompt_tokens), np.asarray(completion_tokens)
    P, C = trimmed_widths(prompt_tokens, completion_tokens, pad_id, multiple, prompt_width)
    graphdef, state = nnx.split(model)
    out = _run_frozen(graphdef, state, jnp.asarray(prompt_tokens[:, -P:]), jnp.asarray(completion_tokens[:, :C]),
                      pad_id, float(temperature))
    return jnp.pad(out, ((0, 0), (0, completion_tokens.shape[1] - C)))


def trimmed_widths(prompt_tokens: np.ndarray, completion_tokens: np.ndarray, pad_id: int, multiple: int,
                   prompt_width: int = 0) -> tuple[int, int]:
    """(P, C): the longest prompt and the longest completion of the batch, each rounded
    up to ``multiple``, and to the array's own width (the budget) when that is less
    than a multiple further: a budget of 200 in buckets of 64 gives 64, 128 or 200,
    not also 192, which would compile one more program to save 8 columns.

    ``prompt_width`` (0: off) fixes P instead: that width whenever the prompts fit
    it, else the budget (``GrpoConfig.prompt_width``: one width, one compile).

    prompt_tokens [B, P0] left-padded; completion_tokens [B, C0] right-padded.
    """
    prompt_len = int((prompt_tokens != pad_id).sum(axis=1).max(initial=1))
    used = np.flatnonzero((completion_tokens != pad_id).any(axis=0))
    completion_len = int(used[-1]) + 1 if used.size else 1

    def width(length: int, budget: int) -> int:
        rounded = bucket(length, multiple)
        return rounded if rounded + multiple <= budget else budget

    budget = prompt_tokens.shape[1]
    if prompt_width:
        P = prompt_width if prompt_len <= prompt_width <= budget else budget
    else:
        P = width(prompt_len, budget)
    return P, width(completion_len, completion_tokens.shape[1])


# ------------------------------------------------------------ the GRPO loss


@function_registry.register_policy_loss_fn("tracetune")
def tracetune_grpo_loss(model, train_example, algo_config, pad_id, eos_id, **kwargs):
    """Tunix 0.1.7's GRPO policy loss (``algo_core.grpo_loss_fn``: clipped ratio,
    optional dual clip and GSPO-token, KL to the reference, the configured loss
    aggregation), on log-probs and entropies from ``completion_logprobs``.

    With ``row_gradients="accumulate"`` (and ``rows_per_pass``) the gradient is
    accumulated over the micro-batch's row passes instead (``_accumulated_loss``).
    Returns (loss, aux) with the aux keys Tunix logs. Tested equal to Tunix's in
    value and gradient.
    """
    rows = getattr(algo_config, "rows_per_pass", 0)
    example = _Example.of(train_example)
    if rows and getattr(algo_config, "row_gradients", "recompute") == "accumulate":
        loss, logps, entropy = _accumulated_loss(model, example, algo_config, pad_id, rows)
        return loss, _aux(_token_terms(logps, example, algo_config), entropy, example.mask, algo_config)
    logps, entropy = completion_logprobs(model, example.prompt, example.completion, pad_id, temperature=algo_config.temperature,
                                         entropy=True, rows_per_pass=rows)  # [B, C] each
    terms = _token_terms(logps, example, algo_config)
    aux = _aux(terms, entropy, example.mask, algo_config)
    loss = aux["pg_loss"] + (algo_config.beta * aux["kl_loss"] if terms.kl is not None and algo_config.beta else 0.0)
    return loss, aux


class _Example(NamedTuple):
    """The arrays of Tunix's ``TrainExample`` the loss reads (a pytree: a slice of
    rows is ``jax.tree.map``)."""

    prompt: jax.Array  # [B, P] left-padded
    completion: jax.Array  # [B, C] right-padded
    mask: jax.Array  # [B, C]
    advantages: jax.Array  # [B] or [B, C]
    old: jax.Array | None  # [B, C]: the old policy's log-probs, or None (on-policy)
    reference: jax.Array | None  # [B, C]
    weights: jax.Array | None  # [B, C]: sampler importance weights

    @classmethod
    def of(cls, example) -> _Example:
        return cls(example.prompt_ids, example.completion_ids, example.completion_mask, example.advantages,
                   example.old_per_token_logps, example.ref_per_token_logps, getattr(example, "sampler_is_weights", None))


class _Terms(NamedTuple):
    per_token: jax.Array  # [B, C]: the policy-gradient loss of each token, before aggregation
    kl: jax.Array | None  # [B, C]: KL to the reference, or None without one
    clipped: jax.Array  # [B, C] bool: the clipped term was taken
    lower: jax.Array  # [B, C] float: the dual clip's floor was taken
    ppo_kl: jax.Array  # [B, C]: -log ratio


def _token_terms(logps: jax.Array, example: _Example, algo_config) -> _Terms:
    """Tunix's GRPO loss per token, from the policy's log-probs [B, C]."""
    epsilon = algo_config.epsilon
    epsilon_high = getattr(algo_config, "epsilon_high", epsilon)
    epsilon_c = getattr(algo_config, "epsilon_c", None)
    mask = example.mask
    advantages = example.advantages.astype(jnp.float32)
    adv = advantages if advantages.ndim == 2 else advantages[:, None]  # [B, 1] or [B, C]
    old = jax.lax.stop_gradient(logps) if example.old is None else example.old.astype(jnp.float32)
    log_ratio = logps - old  # [B, C]
    ppo_kl = -log_ratio
    log_ratio = jnp.clip(log_ratio, -20.0, 20.0)
    if algo_config.loss_algo == "gspo-token":  # one sequence-level ratio, token-level gradients
        sequence = (log_ratio * mask).sum(axis=-1) / jnp.clip(mask.sum(-1), min=1)  # [B]
        log_ratio = jnp.clip(logps - jax.lax.stop_gradient(logps) + jax.lax.stop_gradient(sequence)[:, None], max=10.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = jnp.maximum(unclipped, clipped).astype(jnp.float32)  # [B, C]
    floor = -epsilon_c * adv if epsilon_c is not None else per_token  # dual clip (negative advantages)
    lower = ((per_token > floor) & (adv < 0.0)).astype(jnp.float32)
    per_token = jnp.where(adv < 0.0, jnp.minimum(floor, per_token), per_token)
    if example.weights is not None:
        per_token = per_token * example.weights.astype(jnp.float32)
    kl = None
    if example.reference is not None:
        kl = common.compute_kl_divergence(logps, example.reference, algo_config.kl_loss_mode,
                                          clamp_value=getattr(algo_config, "kl_clamp_value", None))  # [B, C]
    return _Terms(per_token, kl, jnp.greater(clipped, unclipped), lower, ppo_kl)


def _norm(algo_config) -> dict:
    # "sequence-mean-token-scale" divides by a constant: the token budget (loss_norm),
    # not the width of a batch whose padding was trimmed (Tunix's default).
    scale = algo_config.loss_agg_mode == "sequence-mean-token-scale" and getattr(algo_config, "loss_norm", None)
    return {"norm": algo_config.loss_norm} if scale else {}


def _aux(terms: _Terms, entropy: jax.Array, mask: jax.Array, algo_config) -> dict:
    """The metrics Tunix's loss returns beside it; ``pg_loss`` and ``kl_loss`` are the
    aggregated terms (loss = pg_loss + beta * kl_loss)."""
    mode, norm = algo_config.loss_agg_mode, _norm(algo_config)
    aux = {
        "kl": 0.0,
        "kl_loss": 0.0,
        "pg_loss": common.aggregate_loss(terms.per_token, mask, mode, **norm),
        "pg_clipfrac": algo_core.masked_mean(terms.clipped, mask),
        "pg_clipfrac_lower": common.aggregate_loss(terms.lower, mask, mode, **norm),
        "ppo_kl": algo_core.masked_mean(terms.ppo_kl, mask),
        "entropy": common.aggregate_loss(entropy, mask, mode, **norm),
    }
    if terms.kl is not None:
        aux["kl"] = ((terms.kl * mask).sum() / jnp.clip(mask.sum(), min=1)).astype(jnp.float32)
        aux["kl_loss"] = common.aggregate_loss(terms.kl, mask, mode, **norm)
    return aux


def _accumulated_loss(model, example: _Example, algo_config, pad_id: int, rows: int):
    """(loss, log-probs [B, C], entropies [B, C]) with the loss's gradient accumulated
    over passes of ``rows`` completions, each pass's gradient taken in the forward pass.

    Every aggregation of Tunix's loss is linear in the per-token terms for a fixed
    mask, so the loss is sum(W * (pg + beta * kl)) with W [B, C] the aggregation's
    weights (its gradient at zero), and each pass contributes its rows' share. A
    ``lax.scan`` runs each pass's ``value_and_grad`` and sums the adapters' gradients,
    so a pass's activations are freed before the next: the memory of ``rows``
    completions, without ``rows_per_pass``'s recomputation of the forward pass in the
    backward one (one trunk forward per completion less). A custom VJP hands the
    summed gradient to the trainer's differentiation.
    """
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    mask = example.mask
    weights = jax.grad(lambda x: common.aggregate_loss(x, mask, algo_config.loss_agg_mode, **_norm(algo_config)))(
        jnp.zeros(mask.shape, jnp.float32))  # [B, C]
    beta = algo_config.beta if example.reference is not None else 0.0
    passes = _in_passes((example, weights), rows)

    def scan(adapters):
        def one_pass(total, batch):
            part, part_weights = batch

            def pass_loss(adapters):
                m = nnx.merge(graphdef, adapters, rest)
                hidden = _completion_hidden(m, part.prompt, part.completion, pad_id)
                logps, entropy = head_logprobs(hidden, embedding(m), part.completion, temperature=algo_config.temperature,
                                               entropy=True)  # [rows, C] each
                terms = _token_terms(logps, part, algo_config)
                per_token = terms.per_token + beta * terms.kl if beta else terms.per_token
                return jnp.sum(part_weights * per_token), (logps, entropy)

            (value, outputs), grads = jax.value_and_grad(pass_loss, has_aux=True)(adapters)
            loss, grad_sum = total
            return (loss + value, jax.tree.map(jnp.add, grad_sum, grads)), outputs

        start = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, adapters))
        (loss, grads), (logps, entropy) = jax.lax.scan(one_pass, start, passes)
        return loss, grads, logps.reshape(mask.shape), entropy.reshape(mask.shape)

    @jax.custom_vjp
    def run(adapters):
        loss, _, logps, entropy = scan(adapters)
        return loss, logps, entropy

    def run_forward(adapters):
        loss, grads, logps, entropy = scan(adapters)
        return (loss, logps, entropy), grads

    def run_backward(grads, cotangents):
        d_loss = cotangents[0]  # the log-probs and entropies feed metrics only
        return (jax.tree.map(lambda g: g * d_loss, grads),)

    run.defvjp(run_forward, run_backward)
    loss, logps, entropy = run(lora)
    return loss, jax.lax.stop_gradient(logps), jax.lax.stop_gradient(entropy)
