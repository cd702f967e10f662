"""Batched sampling with per-token log-probabilities, at fixed shapes.

Rollouts dominate GRPO and evaluation time, so tracetune decodes with its own
jitted loop over the weights of Tunix's ``Gemma3`` (the same parameters, the same
arithmetic, checked against Tunix's forward pass in the tests) instead of Tunix's
``Sampler``. On this 2-core CPU the difference comes from four places
(measured, see bench/generate.py):

* prefill computes the final layer's output and the vocabulary projection for
  the last prompt position only, not for all of them ([B, P, 262144] floats is
  8.6 GB at B=32, P=256);
* weights and caches are laid out for plain matmuls (Tunix's einsum layouts made
  XLA:CPU transpose weights and caches on every step), and the caches are read-only
  inside the decode loop: a chunk's keys and values collect in small buffers that
  are written into the caches once per chunk;
* activations are feature-major ([D, B*T], weights [out, in]) and the logits
  vocabulary-major ([V, B]): XLA:CPU runs a matmul of a weight with a few rows
  20-50% faster with the weight as the left operand (the [262144, 640] head at
  B=32: 139 vs 208 ms);
* sampling over the 262k vocabulary never sorts it: greedy is an argmax (in
  blocks: XLA:CPU's own argmax does not vectorise, 35 ms at B=32), plain
  temperature sampling draws by cumulative mass in blocks (one random number
  per row and step, not 262k of Gumbel noise), and top-k /
  top-p look only at the ``CANDIDATES`` most likely tokens (``lax.top_k``).

A prompt repeated in a call (GRPO's G completions of each) runs its prefill once and
its cache is copied to its rows, each row drawing its own tokens: a GRPO rollout of
2 prompts x 4 prefilled in 0.21 s instead of 0.66-0.70 s on the 270M.

Shapes are padded to buckets (batch to a power of two, prompt length to a
multiple of 64) so that a new batch size or prompt length does not recompile.
Prompts are left-padded to the call's prompt bucket; each row has its own cache
slot. Decoding runs in chunks of ``CHUNK`` steps (the last one only as many as its rows
still need, a loop bound rather than a shape); between chunks the host checks
stop strings (``</answer>``), hands back the rows that have stopped, and, when a
call has more prompts than rows, refills freed rows with the next prompts (in
groups of a quarter of the batch: one more prefill shape). A batch is then no
longer as slow as its longest completion: in the 2026-12-05 evaluations of 250
GSM8K problems, a greedy loop to the 320-token budget held most batches of 32 at
320 steps, 2,512 decode steps at B=32 for 1,235 steps' worth of tokens after SFT
(2,560 for 497 zero-shot).
Each row draws from its own key, fixed by (seed, prompt index, position): a
prompt's sample does not depend on the rows beside it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tracetune import memory
from tracetune.models.params import ModelConfig
from tracetune.models.tokenizer import Tokenizer

CANDIDATES = 64  # top-k / top-p consider at most this many most likely tokens
CHUNK = 16  # decode steps per jitted call; stop strings are checked between calls (16: 2-4% faster steps than 32)
PROMPT_BUCKET = 64
ARGMAX_BLOCK = 256  # vocabulary block of the greedy argmax, see _argmax
K_MASK = -2.3819763e38  # Tunix's masked-logit value, for identical softmax results
LOCAL, GLOBAL = 0, 1
ATTENTION_PATTERN = (LOCAL, LOCAL, LOCAL, LOCAL, LOCAL, GLOBAL)  # Gemma 3: 5 sliding : 1 global


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample. temperature 0 is greedy.

    top_k / top_p restrict sampling to the most likely tokens; both look at no more
    than the CANDIDATES (64) most likely, so top_k must be <= 64 and top_p is the
    nucleus within those 64 (which hold nearly all the mass at GRPO temperatures).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    # A stop string may start with the prompt's final newline (see _lead).
    stop_strings: tuple[str, ...] = ("</answer>",)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 <= self.top_k <= CANDIDATES:
            raise ValueError(f"top_k must be in [0, {CANDIDATES}] (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def mode(self) -> str:
        if self.temperature == 0:
            return "greedy"
        return "truncated" if (self.top_k or self.top_p < 1) else "full"


@dataclass
class Generation:
    """One completion. ``token_texts`` concatenate to ``text``; ``token_logprobs``
    are log p(token) under the model (temperature 1), the confidence reward's input."""

    prompt: str
    text: str
    token_ids: list[int]
    token_texts: list[str]
    token_logprobs: list[float]
    finish_reason: str  # "stop" (a stop string), "eos", or "length"
    prompt_tokens: int = 0
    finite: bool = True  # every sampled token's log-prob, the stop token's included, was finite


@dataclass
class GenerateStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Arch:
    """The static facts of a Gemma 3 config the forward pass needs (hashable, for jit)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_window_size: int
    local_base_frequency: float
    global_base_frequency: float
    local_scale_factor: float
    global_scale_factor: float
    query_scale: float

    @classmethod
    def of(cls, config: ModelConfig) -> Arch:
        by_head_dim = config.query_pre_attn_norm.name == "BY_ONE_OVER_SQRT_HEAD_DIM"
        return cls(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            sliding_window_size=config.sliding_window_size or 1 << 30,
            local_base_frequency=config.local_base_frequency,
            global_base_frequency=config.global_base_frequency,
            local_scale_factor=config.local_scale_factor,
            global_scale_factor=config.global_scale_factor,
            query_scale=(config.head_dim if by_head_dim else config.embed_dim // config.num_heads) ** -0.5,
        )


def decode_layout(tree: dict, config: ModelConfig) -> dict:
    """Tunix's einsum weights re-laid as transposed plain matrices [out, in], once per Generator.

    XLA on CPU copies and transposes an einsum weight such as q [N, D, H] on every
    call (0.5 ms vs 0.1 ms for the same matmul per layer and step, measured); plain
    matrices avoid it. They are stored [out, in] because the forward pass keeps its
    activations feature-major (see _layer). q and kv share one matrix, gate and up
    another: one matmul each, whose outputs split along the leading axis for free.
    The arithmetic is unchanged.
    """
    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    layers = []
    for i in range(config.num_layers):
        p = tree["layers"][i]
        attn = p["attn"]
        wq = jnp.transpose(attn["q_einsum"]["w"], (0, 2, 1)).reshape(n * h, d)  # [N, D, H] -> [N*H, D]
        wkv = jnp.transpose(attn["kv_einsum"]["w"], (0, 1, 3, 2)).reshape(2 * k * h, d)  # [2, K, D, H] -> [2*K*H, D]
        layers.append({
            "wqkv": jnp.concatenate([wq, wkv]),  # [(N + 2K)*H, D]
            "wo": attn["attn_vec_einsum"]["w"].reshape(n * h, d).T,  # [N, H, D] -> [D, N*H]
            "query_norm": attn["_query_norm"]["scale"],
            "key_norm": attn["_key_norm"]["scale"],
            "gate_up": jnp.concatenate([p["mlp"]["gate_proj"]["kernel"].T, p["mlp"]["up_proj"]["kernel"].T]),  # [2F, D]
            "down": p["mlp"]["down_proj"]["kernel"].T,  # [D, F]
            **{name: p[name]["scale"] for name in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")},
        })
    return {"embedding": tree["embedder"]["input_embedding"], "final_norm": tree["final_norm"]["scale"], "layers": layers}


def _bucket_batch(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _bucket_prompt(n: int) -> int:
    return max(PROMPT_BUCKET, math.ceil(n / PROMPT_BUCKET) * PROMPT_BUCKET)


# ------------------------------------------------------------- the forward pass
# The arithmetic of tunix.models.gemma3.model, written over the parameter tree.


def _rms_norm(x, scale, axis: int = 0):  # normalises x along axis; scale [x.shape[axis]]
    var = jnp.mean(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(var + 1e-06) * (1 + scale.reshape(scale.shape + (1,) * (x.ndim - 1 - axis)))


def _rope(x, positions, base_frequency: float, scale_factor: float):  # x [N, H, B, T], positions [B, T]
    head_dim = x.shape[1]
    fraction = 2 * jnp.arange(0, head_dim // 2) / head_dim
    timescale = base_frequency**fraction
    sinusoid = positions[None] / timescale[:, None, None]  # [H/2, B, T]
    sinusoid = sinusoid[None] / scale_factor  # [1, H/2, B, T]
    sin, cos = jnp.sin(sinusoid), jnp.cos(sinusoid)
    first, second = jnp.split(x, 2, axis=1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=1).astype(x.dtype)


def _layer(p, config: Arch, kind: int, x, positions, sources, own_mask, last_only: bool):
    """One decoder layer over T new tokens of B rows.

    x [D, B*T]; positions [B, T]; sources: (keys [B, K, H, S_i], values [B, K, S_i, H],
    mask [B, T, S_i]) of the tokens before these, read-only; own_mask [B, T, T] among
    the new tokens. Returns x [D, B*T] ([D, B] if last_only: the output at each row's
    last position alone, all the final layer needs to give) and the new keys
    [B, K, H, T] / values [B, K, T, H].

    Activations are feature-major, [D, B*T]: with the weight as the left operand,
    XLA:CPU runs these matmuls 20-40% faster at 8-32 rows (18 layers of gate/up/down
    at B=32: 17.8 + 15.8 ms vs 22.6 + 21.2 ms) and a little faster at prefill sizes.
    Sources are never written here: updating a cache inside the decode loop made XLA
    copy it on every step (~90 ms per step at B=32).
    """
    B, T = positions.shape
    q, k_new, v_new = _project(p, config, kind, _rms_norm(x, p["pre_attention_norm"]), positions)
    dtype = sources[0][0].dtype if sources else x.dtype
    k_new, v_new = k_new.astype(dtype), v_new.astype(dtype)
    sources = [*sources, (k_new, v_new, own_mask)]
    if last_only:
        x, q = x.reshape(-1, B, T)[:, :, -1], q[..., -1:]  # [D, B], [N, H, B, 1]
        sources = [(keys, vals, mask[:, -1:]) for keys, vals, mask in sources]
    x = x + _rms_norm(p["wo"] @ _attend(q, sources, config.num_kv_heads), p["post_attention_norm"])
    h = _rms_norm(x, p["pre_ffw_norm"])
    gate, up = jnp.split(p["gate_up"] @ h, 2)  # [F, B*T] each
    h = p["down"] @ (jax.nn.gelu(gate) * up)  # tanh approximation, as nnx.gelu
    return x + _rms_norm(h, p["post_ffw_norm"]), k_new, v_new


def _project(p, config: Arch, kind: int, h, positions):
    """h [D, B*T] -> queries [N, H, B, T] (roped, scaled), keys [B, K, H, T], values [B, K, T, H].

    Keys are laid out [B, K, H, S] and values [B, K, S, H] for plain batched matmuls:
    a [B, S, K, H] cache made XLA transpose it per layer and step (117 ms vs 25 ms for
    18 layers at B=32).
    """
    B, T = positions.shape
    K, H = config.num_kv_heads, config.head_dim
    qkv = (p["wqkv"] @ h).reshape(-1, H, B, T)  # [N + 2K, H, B, T]
    N = qkv.shape[0] - 2 * K
    q = _rms_norm(qkv[:N], p["query_norm"], axis=1)  # [N, H, B, T]
    k = _rms_norm(qkv[N : N + K], p["key_norm"], axis=1)  # [K, H, B, T]
    v = qkv[N + K :]  # [K, H, B, T]
    base = config.local_base_frequency if kind == LOCAL else config.global_base_frequency
    scale = config.local_scale_factor if kind == LOCAL else config.global_scale_factor
    q = _rope(q, positions, base, scale) * config.query_scale
    k = _rope(k, positions, base, scale)
    return q, k.transpose(2, 0, 1, 3), v.transpose(2, 0, 3, 1)


def _attend(q, sources, K: int):
    """q [N, H, B, T] over sources (keys [B, K, H, S_i], values [B, K, S_i, H], mask
    [B, T, S_i]), one softmax over all their keys -> [N*H, B*T]."""
    N, H, B, T = q.shape
    G = N // K  # query heads sharing one KV head
    qg = q.reshape(K, G, H, B, T).transpose(3, 0, 4, 1, 2).reshape(B, K, T * G, H)  # [B, K, T*G, H]
    scores = [
        jnp.where(mask[:, None, :, None, :], (qg @ keys).reshape(B, K, T, G, -1), K_MASK)  # [B, K, T, G, S_i]
        for keys, _, mask in sources
    ]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(sources[0][1].dtype)  # one softmax over all keys
    encoded, start = 0, 0
    for _, vals, _ in sources:
        width = vals.shape[2]
        encoded = encoded + probs[..., start : start + width].reshape(B, K, T * G, width) @ vals  # [B, K, T*G, H]
        start += width
    return encoded.reshape(B, K, T, G, H).transpose(1, 3, 4, 0, 2).reshape(N * H, B * T)  # [N*H, B*T]


def _window(query, keys, size: int):  # query [T], keys [S] slots -> [T, S]: inside the sliding window
    return keys[None, :] > query[:, None] - size


def _forward(params, config: Arch, tokens, positions, new_valid, write_at, sources_of):
    """All layers over T new tokens at cache slots write_at..write_at+T-1.

    tokens, positions, new_valid [B, T] (new_valid: not padding). sources_of(layer,
    query_slots, local) gives that layer's read-only (keys, values, mask) sources.
    Returns the logits of the last new token [V, B] and each layer's new (k, v).
    """
    emb = params["embedding"]  # [V, D]
    B, T = tokens.shape
    x = (emb[tokens] * jnp.sqrt(emb.shape[-1]).astype(emb.dtype)).reshape(B * T, -1).T  # [D, B*T]
    query = write_at + jnp.arange(T)  # [T] slots of the new tokens
    own = new_valid[:, None, :] & jnp.tril(jnp.ones((T, T), bool))[None]  # [B, T, T]
    own_local = own & _window(query, query, config.sliding_window_size)[None]
    new_kv = []
    for i in range(config.num_layers):
        local = ATTENTION_PATTERN[i % len(ATTENTION_PATTERN)] == LOCAL
        sources = sources_of(i, query, local)
        x, k_new, v_new = _layer(params["layers"][i], config, LOCAL if local else GLOBAL, x, positions, sources,
                                 own_local if local else own, last_only=i == config.num_layers - 1)
        new_kv.append((k_new, v_new))
    x = _rms_norm(x, params["final_norm"])  # [D, B]: only the last position is projected
    return _head(x, emb), new_kv


def _head(x, emb):
    """The tied vocabulary projection of x [D, B] -> logits [V, B], float32 (for stable log-probs).

    Vocabulary-major: with the 262k embedding rows as the matmul's long side, XLA:CPU
    runs it in 139 ms instead of 208 ms at B=32 (59 vs 103 ms at B=8); a single row
    is faster as a vector-matrix product (26 vs 36 ms), whose [1, V] result is already
    laid out as [V, 1]; that product re-reads x per output, so x must not be a strided
    view (a column of [D, B*T] made it 136 ms, hence the final layer's last_only).
    """
    if x.shape[1] == 1:
        return (x.T @ emb.T).T.astype(jnp.float32)  # [V, 1]
    return (emb @ x).astype(jnp.float32)  # [V, B]


def _argmax(logits):
    """The first most likely token [B] of logits [V, B], as jnp.argmax picks it.

    jnp.argmax is a (value, index) reduction that XLA:CPU does not vectorise (35 ms
    for [32, 262144]); a max, then the first block of ARGMAX_BLOCK holding it, then the
    position inside that block picks the same token in 2 ms.
    """
    V, B = logits.shape
    block = math.gcd(V, ARGMAX_BLOCK)
    blocks = logits.reshape(V // block, block, B)
    block_max = jnp.max(blocks, axis=1)  # [V/block, B]
    top = jnp.max(block_max, axis=0)  # [B]
    first = jnp.argmax(block_max == top, axis=0)  # [B]
    inside = jnp.take_along_axis(blocks, first[None, None, :], axis=0)[0]  # [block, B]
    return first * block + jnp.argmax(inside == top, axis=0)


def _categorical(scaled, keys):
    """A token [B] drawn from softmax(scaled) over the vocabulary, scaled [V, B] (float32), keys [B].

    Inverse-CDF sampling in two levels, with one uniform number per row: the block of
    ARGMAX_BLOCK tokens whose running mass passes u, then the token inside it. Exact,
    like the Gumbel-max trick it replaces, whose noise is V random numbers and two
    logarithms per row and step (on [262144, 8] on this CPU: 39 ms against 7 ms for
    this, greedy's argmax 13 ms). A token of zero weight (exp underflow) is never drawn.
    """
    V, B = scaled.shape
    block = math.gcd(V, ARGMAX_BLOCK)
    weights = jnp.exp(scaled - jnp.max(scaled, axis=0)).reshape(V // block, block, B)  # the top token weighs 1
    cumulative = jnp.cumsum(jnp.sum(weights, axis=1), axis=0)  # [V/block, B]
    total = cumulative[-1]
    u = jnp.minimum(jax.vmap(jax.random.uniform)(keys) * total, jnp.nextafter(total, 0.0))  # [B] in [0, total)
    chosen = jnp.sum(cumulative <= u, axis=0)  # [B]: the first block whose running mass exceeds u
    before = jnp.where(chosen > 0, jnp.take_along_axis(cumulative, jnp.maximum(chosen - 1, 0)[None], axis=0)[0], 0.0)
    inside = jnp.cumsum(jnp.take_along_axis(weights, chosen[None, None, :], axis=0)[0], axis=0)  # [block, B]
    rest = jnp.minimum(u - before, jnp.nextafter(inside[-1], 0.0))  # rounding between the two sums stays inside
    return chosen * block + jnp.sum(inside <= rest, axis=0)


def _choose(logits, keys, mode: str, temperature, top_k, top_p):
    """Next token [B] from logits [V, B] (float32) with one key per row (keys [B]),
    and its log-probability at temperature 1."""
    V, B = logits.shape
    if mode == "greedy":
        token = _argmax(logits)
    elif mode == "full":
        token = _categorical(logits / temperature, keys)
    else:  # top-k / top-p among the CANDIDATES most likely tokens
        top_logits, top_ids = jax.lax.top_k(logits.T, CANDIDATES)  # [B, C], sorted descending
        scaled = top_logits / temperature
        rank = jnp.arange(CANDIDATES)[None, :]
        keep = rank < jnp.where(top_k > 0, top_k, CANDIDATES)
        probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        keep &= before < top_p  # the nucleus: the smallest prefix with mass >= top_p
        choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, scaled, -jnp.inf))  # [B]
        token = jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0]
    # log p(token) = logit - logsumexp(logits): no [V, B] array of log-probs is written.
    logprob = logits[token, jnp.arange(B)] - _logsumexp(logits)
    return token.astype(jnp.int32), logprob


def _logsumexp(logits):  # [V, B] -> [B]
    if logits.shape[1] == 1:  # along the contiguous axis of [1, V]: 0.2 ms, not 6.7 ms down [V, 1]
        return jax.nn.logsumexp(logits.T, axis=-1)
    return jax.nn.logsumexp(logits, axis=0)


def _row_keys(key, rows, positions):
    """One key per row [B] for the token after ``positions`` [B] of prompts ``rows`` [B]:
    a row's draws depend on (seed, prompt index, position) alone."""
    return jax.vmap(lambda row, position: jax.random.fold_in(jax.random.fold_in(key, row), position))(rows, positions)


@functools.partial(jax.jit, static_argnames=("config", "mode", "cache_size"))
def _prefill(params, tokens, key, rows, source, temperature, top_k, top_p, *, config: Arch, mode: str, cache_size: int):
    """tokens [U, P] left-padded with 0, each output row's prompt index ``rows`` [B] and
    its row of ``tokens`` ``source`` [B] -> first new token [B], its log-prob, caches
    of ``cache_size`` slots, key_valid [B, S], last positions [B].

    A prompt repeated in the batch (GRPO samples G completions of each) runs through
    the model once and its cache is copied to its rows; each row still draws its
    first token with its own key. With U == B rows, source is the identity.
    """
    logits, caches, key_valid, last = _prefill_rows(params, tokens, config, cache_size)  # [V, U], ..., [U]
    if tokens.shape[0] != rows.shape[0]:  # the U distinct prompts ran: each is copied to its rows
        caches = tuple((k[source], v[source]) for k, v in caches)
        logits, key_valid, last = logits[:, source], key_valid[source], last[source]
    token, logprob = _choose(logits, _row_keys(key, rows, last), mode, temperature, top_k, top_p)
    return token, logprob, caches, key_valid, last


def _prefill_rows(params, tokens, config: Arch, cache_size: int):
    """The prompt pass of ``_prefill`` over tokens [B, P]: (last logits [V, B], caches,
    key_valid [B, S], last positions [B])."""
    B, P = tokens.shape
    valid = tokens != 0  # [B, P]
    positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)  # RoPE positions start at 0 per row
    # An empty cache: the prompt tokens attend only among themselves.
    logits, new_kv = _forward(params, config, tokens, positions, valid, 0, lambda i, query, local: [])
    dtype = params["embedding"].dtype
    pad = cache_size - P
    caches = tuple(
        (jnp.pad(k.astype(dtype), ((0, 0), (0, 0), (0, 0), (0, pad))), jnp.pad(v.astype(dtype), ((0, 0), (0, 0), (0, pad), (0, 0))))
        for k, v in new_kv
    )  # keys [B, K, H, S], values [B, K, S, H]
    key_valid = jnp.pad(valid, ((0, 0), (0, pad)), constant_values=True)  # [B, S]
    return logits, caches, key_valid, positions[:, -1]


@functools.partial(jax.jit, donate_argnames=("caches", "key_valid"))
def _insert(caches, key_valid, rows, new_caches, new_valid):
    """Replace rows ``rows`` [R] of the caches and key_valid [B, S] with a prefill's [R, ...] (in place)."""
    caches = tuple((kc.at[rows].set(nk), vc.at[rows].set(nv)) for (kc, vc), (nk, nv) in zip(caches, new_caches))
    return caches, key_valid.at[rows].set(new_valid)


@functools.partial(jax.jit, static_argnames=("config", "mode", "steps", "stop_ids"), donate_argnames=("caches",))
def _decode(params, caches, key_valid, token, last_position, slot, done, key, rows, count, temperature, top_k, top_p, *,
            config: Arch, mode: str, steps: int, stop_ids: tuple[int, ...]):
    """``count`` (at most ``steps``) decode steps from ``token``, whose key goes to each
    row's cache ``slot``.

    token, last_position, slot, done, rows (prompt indices) [B]; returns tokens and
    log-probs [B, steps] (0 past ``count``), the next token, the updated state and
    caches. ``count`` is an argument, not a shape: the last chunk of a call runs only
    the steps its rows still need in the same program (200 new tokens in chunks of 16
    ran 208 decode steps). Rows that are done emit padding (0). Inside the loop the
    caches are read-only; the chunk's keys and values collect in small buffers,
    written into the caches once after the loop, each row at its own slot.
    """
    B = token.shape[0]
    K, H = config.num_kv_heads, config.head_dim
    stops = jnp.asarray(stop_ids, jnp.int32)
    new_valid = jnp.ones((B, 1), bool)
    dtype = caches[0][0].dtype
    slots = jnp.arange(key_valid.shape[1])
    chunk_slots = jnp.arange(steps)
    earlier = key_valid[:, None, :] & (slots[None, :] < slot[:, None])[:, None, :]  # [B, 1, S]: written before this chunk
    buffers = tuple((jnp.zeros((B, K, H, steps), dtype), jnp.zeros((B, K, steps, H), dtype)) for _ in caches)

    def step(i, carry):
        token, position, done, buffers, out_tokens, out_logprobs = carry
        position = position + 1
        in_chunk = jnp.broadcast_to((chunk_slots < i)[None, None, :], (B, 1, steps))  # earlier steps of this chunk

        def sources_of(layer, query, local):
            cache_mask, buffer_mask = earlier, in_chunk
            if local:  # each row's window ends at its own slot: [B, 1, S] and [B, 1, steps]
                cache_mask = cache_mask & (slots[None, :] > (slot + i - config.sliding_window_size)[:, None])[:, None, :]
                buffer_mask = buffer_mask & (chunk_slots > i - config.sliding_window_size)[None, None, :]
            (k_cache, v_cache), (k_buf, v_buf) = caches[layer], buffers[layer]
            return [(k_cache, v_cache, cache_mask), (k_buf, v_buf, buffer_mask)]

        # write_at only places the new token among the new tokens (T = 1); the slots are per row, in sources_of.
        logits, new_kv = _forward(params, config, token[:, None], position[:, None], new_valid, 0, sources_of)
        buffers = tuple(
            (jax.lax.dynamic_update_slice(kb, k, (0, 0, 0, i)), jax.lax.dynamic_update_slice(vb, v, (0, 0, i, 0)))
            for (kb, vb), (k, v) in zip(buffers, new_kv)
        )
        nxt, logprob = _choose(logits, _row_keys(key, rows, position), mode, temperature, top_k, top_p)
        done = done | jnp.isin(token, stops)
        nxt = jnp.where(done, 0, nxt)
        logprob = jnp.where(done, 0.0, logprob)
        out_tokens = out_tokens.at[:, i].set(nxt)
        out_logprobs = out_logprobs.at[:, i].set(logprob)
        return nxt, position, done, buffers, out_tokens, out_logprobs

    init = (token, last_position, done, buffers, jnp.zeros((B, steps), jnp.int32), jnp.zeros((B, steps), jnp.float32))
    token, position, done, buffers, out_tokens, out_logprobs = jax.lax.fori_loop(0, count, step, init)
    write_keys = jax.vmap(lambda c, b, at: jax.lax.dynamic_update_slice(c, b, (0, 0, at)))  # one row [K, H, S] at its slot
    write_values = jax.vmap(lambda c, b, at: jax.lax.dynamic_update_slice(c, b, (0, at, 0)))  # [K, S, H]
    caches = tuple((write_keys(kc, kb, slot), write_values(vc, vb, slot)) for (kc, vc), (kb, vb) in zip(caches, buffers))
    return out_tokens, out_logprobs, token, position, done, caches


@jax.jit
def _take(caches, key_valid, rows):
    """Rows ``rows`` [B'] of the caches and key_valid [B, S]: a smaller batch."""
    return tuple((kc[rows], vc[rows]) for kc, vc in caches), key_valid[rows]


# Each new shape compiles before it runs, its compile's memory handed back first.
_run_prefill, _run_decode = memory.CompileFirst(_prefill), memory.CompileFirst(_decode)


def _lead(prompt: str) -> str:
    """The prompt's last character when it is a newline, which stop strings see before
    the completion: "\nQ:" stops a completion that starts a new question right after
    a prompt ending "A:\n" (the cut keeps the stop string's characters that are the
    completion's own)."""
    return "\n" if prompt.endswith("\n") else ""


class Generator:
    """Batched generation for one model; reuses compiled programs across calls.

    >>> gen = Generator(loaded.model, loaded.tokenizer)  # doctest: +SKIP
    >>> gen.generate(["Q: 2 + 3?\\nA:\\n"], SamplingConfig(max_new_tokens=64))[0].text  # doctest: +SKIP
    """

    def __init__(self, model: nnx.Module, tokenizer: Tokenizer, *, max_batch: int = 32, with_weights: bool = True):
        """``with_weights=False``: no weights until ``set_params`` (an RL rollout engine
        sets the live policy's before each rollout)."""
        self.config = Arch.of(model.config)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.model_config = model.config
        self.params = decode_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config) if with_weights else None
        self.stats = GenerateStats()

    def set_params(self, tree: dict) -> None:
        """Decode with new weights (a plain Gemma 3 parameter tree of the same shapes,
        e.g. a policy during RL); compiled programs are reused."""
        memory.release()  # an RL step's update temporaries, freed, before the decode's
        self.params = decode_layout(tree, self.model_config)

    def drop_params(self) -> None:
        """Free the decode-layout weights (a whole model's worth) until the next ``set_params``."""
        self.params = None
        memory.release()

    def generate(
        self,
        prompts: Sequence[str],
        sampling: SamplingConfig = SamplingConfig(),
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """Generate for every prompt, in their order; ``progress(n)`` is called as n
        more prompts finish."""
        out: list[Generation | None] = [None] * len(prompts)
        for index, generation in self.stream(prompts, sampling):
            out[index] = generation
            if progress:
                progress(1)
        return out  # type: ignore[return-value]

    def stream(self, prompts: Sequence[str], sampling: SamplingConfig = SamplingConfig()) -> Iterator[tuple[int, Generation]]:
        """(prompt index, generation) for every prompt, as each finishes: ``max_batch``
        rows decode together, and a row that stops takes the next prompt (see the
        module docstring)."""
        if self.params is None:
            raise ValueError("this Generator holds no weights: call set_params first")
        if not prompts:
            return
        start = time.perf_counter()
        encoded = [self.tokenizer.encode(p) for p in prompts]
        n = len(prompts)
        B = _bucket_batch(min(n, self.max_batch))
        R = max(1, B // 4)  # rows refilled together: one [R, P] prefill
        P = _bucket_prompt(max(len(e) for e in encoded))
        steps = math.ceil(sampling.max_new_tokens / CHUNK) * CHUNK
        key = jax.random.key(sampling.seed)
        args = (jnp.float32(max(sampling.temperature, 1e-6)), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))

        def prefill(indices: list[int], size: int):
            """The first token of prompts ``indices``, in ``size`` rows (the rest one BOS each, unused).
            A prompt repeated among them runs once (``_prefill``'s ``source``)."""
            distinct: dict[tuple[int, ...], int] = {}
            source = np.array([distinct.setdefault(tuple(encoded[i]), len(distinct)) for i in indices]
                              + [len(distinct)] * (size - len(indices)), np.int32)  # unused rows share one BOS row
            U = _bucket_batch(int(source.max()) + 1)
            if U >= size:
                U, source = size, np.arange(size, dtype=np.int32)
            tokens = np.zeros((U, P), np.int32)
            tokens[:, -1] = self.tokenizer.bos_id
            for r, index in zip(source, indices):
                tokens[r, P - len(encoded[index]) :] = encoded[index]
            rows = np.full(size, -1, np.int32)
            rows[: len(indices)] = indices
            return _run_prefill(self.params, jnp.asarray(tokens), key, jnp.asarray(rows), jnp.asarray(source), *args,
                                config=self.config, mode=sampling.mode, cache_size=P + steps)

        # Host state per row: which prompt (-1: none), its tokens and log-probs so far.
        row_prompt = np.full(B, -1)
        ids: list[list[np.ndarray]] = [[] for _ in range(B)]
        logprobs: list[list[np.ndarray]] = [[] for _ in range(B)]
        first = list(range(min(n, B)))
        token, logprob, caches, key_valid, position = prefill(first, B)
        token, logprob, position = np.asarray(token), np.asarray(logprob), np.asarray(position)
        slot = np.full(B, P, np.int32)
        done = np.ones(B, bool)
        for r, index in enumerate(first):
            row_prompt[r], done[r], ids[r], logprobs[r] = index, False, [token[r : r + 1]], [logprob[r : r + 1]]
        pending = n - len(first)
        while True:
            # The steps the rows still need, when no prompt waits for a free row: the last chunk runs no more.
            count = CHUNK if pending else min(CHUNK, max(sampling.max_new_tokens - sum(map(len, ids[r]))
                                                         for r in np.flatnonzero(row_prompt >= 0)))
            chunk_tokens, chunk_logprobs, token, position, done_dev, caches = _run_decode(
                self.params, caches, key_valid, jnp.asarray(token), jnp.asarray(position), jnp.asarray(slot),
                jnp.asarray(done), key, jnp.asarray(np.maximum(row_prompt, 0).astype(np.int32)), jnp.int32(count), *args,
                config=self.config, mode=sampling.mode, steps=CHUNK, stop_ids=self.tokenizer.stop_ids,
            )
            chunk_tokens, chunk_logprobs = np.asarray(chunk_tokens)[:, :count], np.asarray(chunk_logprobs)[:, :count]
            token, position, done = np.asarray(token).copy(), np.asarray(position).copy(), np.asarray(done_dev).copy()
            slot += count
            for r in np.flatnonzero(row_prompt >= 0):
                index = int(row_prompt[r])
                ids[r].append(chunk_tokens[r])
                logprobs[r].append(chunk_logprobs[r])
                generated = np.concatenate(ids[r])
                if not done[r] and sampling.stop_strings:
                    text = _lead(prompts[index]) + self.tokenizer.decode(generated)
                    done[r] = any(s in text for s in sampling.stop_strings)
                if done[r] or len(generated) >= sampling.max_new_tokens:
                    done[r], row_prompt[r] = True, -1
                    result = self._finish(prompts[index], len(encoded[index]), generated, np.concatenate(logprobs[r]), sampling)
                    self.stats.prompt_tokens += len(encoded[index])
                    self.stats.generated_tokens += len(result.token_ids)
                    yield index, result
            free = list(np.flatnonzero(row_prompt < 0))
            while pending and (len(free) >= R or len(free) == B):
                indices = list(range(n - pending, n - pending + min(pending, R)))
                rows, free = free[:R], free[R:]
                pending -= len(indices)
                new_token, new_logprob, new_caches, new_valid, new_position = prefill(indices, R)
                caches, key_valid = _insert(caches, key_valid, jnp.asarray(np.array(rows, np.int32)), new_caches, new_valid)
                new_token, new_logprob, new_position = np.asarray(new_token), np.asarray(new_logprob), np.asarray(new_position)
                for j, r in enumerate(rows[: len(indices)]):
                    row_prompt[r], done[r], slot[r] = indices[j], False, P
                    token[r], position[r] = new_token[j], new_position[j]
                    ids[r], logprobs[r] = [new_token[j : j + 1]], [new_logprob[j : j + 1]]
            if (row_prompt < 0).all():
                break
            active = np.flatnonzero(row_prompt >= 0)
            if not pending and _bucket_batch(len(active)) <= B // 4:
                # The last rows decode on in a smaller batch instead of carrying 32 rows'
                # work for one or two (the head alone: 26 ms for a row, 139 ms for 32; _head).
                B = _bucket_batch(len(active))
                keep = np.concatenate([active, np.flatnonzero(row_prompt < 0)])[:B]
                caches, key_valid = _take(caches, key_valid, jnp.asarray(keep.astype(np.int32)))
                row_prompt, token, position, slot, done = (a[keep] for a in (row_prompt, token, position, slot, done))
                ids, logprobs = [ids[r] for r in keep], [logprobs[r] for r in keep]
        self.stats.seconds += time.perf_counter() - start  # (a consumer that stops early leaves it uncounted)

    def _finish(self, prompt: str, prompt_tokens: int, ids: np.ndarray, logprobs: np.ndarray, sampling: SamplingConfig) -> Generation:
        """Cut a row at its first stop token or stop string, within the token budget."""
        ids = [int(i) for i in ids[: sampling.max_new_tokens]]
        logprobs = [float(x) for x in logprobs[: len(ids)]]
        reason, end = "length", len(ids)
        for index, token in enumerate(ids):
            if token in self.tokenizer.stop_ids:
                reason, end = "eos", index
                break
        # The stop token's log-prob counts too: NaN logits often "sample" a stop token first.
        finite = all(map(math.isfinite, logprobs[: end + 1]))
        ids, logprobs = ids[:end], logprobs[:end]
        texts = self.tokenizer.token_texts(ids)
        if sampling.stop_strings:
            text, end = _lead(prompt), None
            for index, piece in enumerate(texts):
                text += piece
                hits = [text.find(s) + len(s) for s in sampling.stop_strings if s in text]
                if hits:
                    end = index + 1
                    texts[index] = piece[: len(piece) - (len(text) - min(hits))]  # text after the stop string is cut
                    break
            if end is not None:
                ids, logprobs, texts, reason = ids[:end], logprobs[:end], texts[:end], "stop"
        return Generation(prompt, "".join(texts), ids, texts, logprobs, reason, prompt_tokens, finite)
