"""The serving engine's jitted programs: a decode step over slots and a chunked prefill.

Both are pure functions of (params, cache, ...) over one KV cache for all slots,
`init_cache(args, max_batch, max_seq_len)`, rows = slots. Per-slot sampling values
(temperature, top_p, top_k, seed, penalties) are arrays, so a new request never
recompiles: the programs depend only on the decode bucket (rows stepped) and the
prefill chunk size, both from declared buckets.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax.model import forward as model_forward

N_TOP_LOGPROBS = 20  # OpenAI's most top_logprobs


def _rows(cache, b: int):
    """The first b rows of every cache leaf (all of them when b is the cache's batch)."""
    if cache[0]["pos"].shape[0] == b:
        return cache
    return jax.tree.map(lambda x: x[:b], cache)


def _put_rows(cache, rows, start):
    """`rows` written back into `cache` at row `start` (in place when the cache is donated)."""
    return jax.tree.map(
        lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part.astype(full.dtype),
                                                                start, axis=0),
        cache, rows)


def sample_rows(logits, temperature, top_p, top_k, key_data, counter):
    """One id per row. logits f32[B, V]; temperature, top_p f32[B]; top_k int32[B] (0: off);
    key_data uint32[B, 2] (each row's seed key); counter int32[B] (tokens the row sampled).

    Rows at temperature 0 take the argmax. The others sample softmax(logits / T) cut to
    the top_k ids, then to the smallest prefix of mass >= top_p (the top id always kept),
    with the key fold_in(seed key, counter): a row's draws depend on its seed and its own
    progress only, never on the other rows.
    """
    # top_k(1), not argmax: the same id (the lowest on ties), but XLA's CPU argmax over a
    # 32k vocabulary took 8 ms for 16 rows where top_k took 1 ms.
    greedy = jax.lax.top_k(logits, 1)[1][:, 0].astype(jnp.int32)

    def sampled():
        vocab = logits.shape[-1]
        t = jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny)[:, None]
        scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / t
        order = jnp.argsort(-scaled, axis=-1, stable=True)  # ties: lowest id first
        ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V], decreasing
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
        ranked = jnp.where(jnp.arange(vocab)[None] < k, ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        ranked = jnp.where(mass_before < top_p[:, None], ranked, -jnp.inf)
        keys = jax.vmap(lambda kd, n: jax.random.fold_in(jax.random.wrap_key_data(kd), n))(
            key_data, counter)
        choice = jax.vmap(jax.random.categorical)(keys, ranked)
        picked = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature > 0, picked, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def decode_step(params, cache, counts, prev, feed, positions, temperature, top_p, top_k,
                key_data, counter, presence, frequency, fresh, want_logprobs, *,
                args: Any, forward=model_forward, vocab_limit: int | None = None):
    """Feed every slot of the bucket one token and sample the next.

    cache: the whole cache (S slots); counts int32[S, V] ids each slot generated (for the
    penalties, counted for rows with one); prev int32[S] the last step's samples. The other
    arrays are [b] for the first b slots (the bucket): feed int32 (-1: feed prev, the
    pipelined case), positions int32 (-1: slot idle, nothing written), the sampling values,
    fresh bool (unused, kept for the call's shape), want_logprobs bool.
    Returns (cache, counts, prev int32[S] (for the next step), tokens int32[b] (the same
    samples, to read back: prev is donated to the next step), logprob f32[b], top_ids
    int32[b, 20], top_logprobs f32[b, 20]). Logprobs are of the model's distribution (log_softmax of
    the logits before temperature and penalties).
    """
    b = feed.shape[0]
    tokens = jnp.where(feed >= 0, feed, prev[:b])
    active = positions >= 0
    rows = _rows(cache, b)
    logits, rows = forward(params, tokens[:, None], positions[:, None], rows, args=args)
    cache = _put_rows(cache, rows, 0)
    logits = logits[:, -1]
    if vocab_limit is not None:
        logits = logits[:, :vocab_limit]
    penalties = (presence != 0) | (frequency != 0)

    def penalized():
        row_counts = counts[:b]
        return (logits - presence[:, None] * (row_counts > 0)
                - frequency[:, None] * row_counts.astype(jnp.float32))

    # Without any penalty, no [b, V] pass over the counts (the cond's branches only read
    # them: a branch returning the counts made XLA copy all of them, 2 MB, every step).
    scored = jax.lax.cond(jnp.any(penalties & active), penalized, lambda: logits)
    new = sample_rows(scored, temperature, top_p, top_k, key_data, counter)
    # Counted only for rows with a penalty; `reset_counts` zeroes a slot's row on admission.
    counts = counts.at[jnp.arange(b), new].add((active & penalties).astype(jnp.int32))

    def with_logprobs():
        lp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_ids = jax.lax.top_k(lp, N_TOP_LOGPROBS)
        return (jnp.take_along_axis(lp, new[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32),
                top_lp)

    def without():
        return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, N_TOP_LOGPROBS), jnp.int32),
                jnp.zeros((b, N_TOP_LOGPROBS), jnp.float32))

    chosen, top_ids, top_lp = jax.lax.cond(jnp.any(want_logprobs & active), with_logprobs,
                                           without)
    prev = prev.at[:b].set(new)
    return cache, counts, prev, new, chosen, top_ids, top_lp


def prefill_chunk(params, cache, slot, tokens, positions, fresh, *, args: Any,
                  forward=model_forward):
    """Write one chunk of a prompt into slot `slot`'s rows of the cache.

    tokens, positions int32[1, C] (positions -1 on padding after the prompt's end);
    fresh bool[]: the prompt's first chunk, so whatever the slot held before is dropped.
    Only the cache is kept: the prompt's last token is fed by the next decode step.
    """
    row = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0), cache)
    row = [dict(layer, pos=jnp.where(fresh, -1, layer["pos"])) for layer in row]
    _, row = forward(params, tokens, positions, row, args=args,
                     logits_index=jnp.zeros((1,), jnp.int32))
    return _put_rows(cache, row, slot)


def reset_counts(counts, slot):
    """Slot `slot`'s generated-id counts zeroed (a new request with a penalty)."""
    return counts.at[slot].set(0)


def clear_slot(cache, slot):
    """Slot `slot` emptied (every position -1): a one-token prompt needs no prefill."""
    return [dict(layer, pos=layer["pos"].at[slot].set(-1)) for layer in cache]


_STATIC = ("args", "forward")
decode_step_jit = jax.jit(decode_step, static_argnames=(*_STATIC, "vocab_limit"),
                          donate_argnames=("cache", "counts", "prev"))
prefill_chunk_jit = jax.jit(prefill_chunk, static_argnames=_STATIC, donate_argnames=("cache",))
clear_slot_jit = jax.jit(clear_slot, donate_argnames=("cache",))
reset_counts_jit = jax.jit(reset_counts, donate_argnames=("counts",))


@functools.cache
def decode_buckets(max_batch: int, sub_batches: bool = False) -> tuple[int, ...]:
    """Rows a decode step may run over: all max_batch slots; with sub_batches, also the
    powers of two below it (a step over the first b slots only).

    Off by default: on the CPU, a 1-row step sliced from a 16-slot cache took 7-8 ms where
    the whole 16-row step took 4.8 ms (the slice and its write-back cost more than the
    rows they save; demo model, float32, 2 loaded cores). On GPUs, where a step reads the
    whole cache, sub-batches may pay: still to be measured.
    """
    out, b = [], 1
    while sub_batches and b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


@functools.cache
def chunk_buckets(max_chunk: int) -> tuple[int, ...]:
    """Prefill chunk sizes: powers of two from 16 below max_chunk, then max_chunk."""
    out, c = [], 16
    while c < max_chunk:
        out.append(c)
        c *= 2
    return (*out, max_chunk)
