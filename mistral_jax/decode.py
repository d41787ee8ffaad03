"""The sampler's device side: one `SamplingState` carried through a jitted prefill and decode loop.

    state = prefill(params, tokens, positions, done, rng, eos_id, ...)   # first token sampled
    state = decode(params, state, eos_id, max_steps, ...)                # lax.while_loop

Pure functions; `generate.py` is the host side (validation, buckets, padding, results).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from mistral_jax.compile_notice import announce
from mistral_jax.kernels import Kernels
from mistral_jax.sampling import Strategy

MIN_BUCKET = 16


# forward(params, tokens [B, T], positions [B, T], cache, *, args) -> (logits [B, T, V], cache)
ForwardFn = Callable[..., tuple[jax.Array, Any]]


# init_cache(args, batch_size, max_seq_len, dtype) -> cache
InitCacheFn = Callable[..., Any]


@flax.struct.dataclass
class SamplingState:
    """Everything the decode loop carries, as one pytree.

    tokens:    int32[B, N] sampled ids; -1 where nothing was sampled (row done, step not reached).
    logprobs:  f32[B, N] log_softmax of the untempered logits at each sampled id (0 where -1).
    cache:     the model's KV cache for B rows.
    positions: int32[B] absolute position of each row's latest sampled token (fed next).
    done:      bool[B] row has sampled eos, or is a dummy row padding the batch.
    rng:       PRNG key, split once per step.
    step:      int32[] number of tokens sampled so far: the column written next.
    """

    tokens: jax.Array
    logprobs: jax.Array
    cache: Any
    positions: jax.Array
    done: jax.Array
    rng: jax.Array
    step: jax.Array


def _kernels_kw(kernels: Kernels | None) -> dict:
    """`forward`'s kernels keyword: absent for None, so any forward with the plain contract
    (a toy model in tests) works."""
    return {} if kernels is None else {"kernels": kernels}


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _record(state: SamplingState, logits: jax.Array, eos_id: jax.Array, strategy: Strategy):
    """Sample column `state.step` from logits f32[B, V] for the rows not done yet."""
    rng, key = jax.random.split(state.rng)
    logits = logits.astype(jnp.float32)
    token = strategy(logits, key)  # [B]
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)
    active = ~state.done
    token = jnp.where(active, token, -1)
    logprob = jnp.where(active, logprob[:, 0], 0.0)
    return state.replace(
        tokens=state.tokens.at[:, state.step].set(token),
        logprobs=state.logprobs.at[:, state.step].set(logprob),
        done=state.done | (active & (token == eos_id)),
        rng=rng,
        step=state.step + 1,
    )


def prefill(
    params: Any,
    tokens: jax.Array,
    positions: jax.Array,
    done: jax.Array,
    rng: jax.Array,
    eos_id: jax.Array,
    *,
    args: Any,
    forward: ForwardFn,
    init_cache: InitCacheFn,
    strategy: Strategy,
    kernels: Kernels | None = None,
    cache_len: int,
    dtype: Any,
    chunk_size: int,
    n_buf: int,
) -> SamplingState:
    """Run right-padded prompts through a fresh cache and sample each row's first token.

    tokens int32[B, T], positions int32[B, T] (0..L-1 then -1 padding, T a multiple of
    chunk_size), done bool[B] (True for dummy rows). The prompt is fed in chunks of
    `chunk_size` tokens; each row's next-token logits are taken at its last real token.
    Returns the state after one sampled token, with a token buffer of `n_buf` columns.
    """
    B, T = tokens.shape
    announce("prefill", batch=B, prompt_len=T, cache_len=cache_len, new_tokens=n_buf)
    cache = init_cache(args, B, cache_len, dtype)
    lengths = jnp.sum(positions >= 0, axis=1).astype(jnp.int32)  # [B]
    last_idx = lengths - 1

    n_chunks = T // chunk_size

    def run_chunk(carry, chunk):
        cache, last_logits = carry
        tok, pos, start = chunk  # [B, C], [B, C], []
        idx = last_idx - start
        here = (idx >= 0) & (idx < chunk_size)
        # Only each row's last prompt token goes through the output head: [B, 1, V]. A
        # single chunk fills a fresh cache from position 0 with right padding only.
        logits, cache = forward(
            params,
            tok,
            pos,
            cache,
            args=args,
            logits_index=jnp.clip(idx, 0, chunk_size - 1),
            fresh_prefill=n_chunks == 1,
            **_kernels_kw(kernels),
        )
        picked = logits[:, 0]
        last_logits = jnp.where(here[:, None], picked.astype(jnp.float32), last_logits)
        return (cache, last_logits), None

    carry = (cache, jnp.zeros((B, args.vocab_size), jnp.float32))
    if n_chunks == 1:
        carry, _ = run_chunk(carry, (tokens, positions, jnp.int32(0)))
    else:

        def split(x):  # [B, T] -> [n_chunks, B, C]
            return x.reshape(B, n_chunks, chunk_size).transpose(1, 0, 2)

        starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk_size
        carry, _ = jax.lax.scan(run_chunk, carry, (split(tokens), split(positions), starts))
    cache, last_logits = carry

    state = SamplingState(
        tokens=jnp.full((B, n_buf), -1, jnp.int32),
        logprobs=jnp.zeros((B, n_buf), jnp.float32),
        cache=cache,
        positions=lengths,
        done=done,
        rng=rng,
        step=jnp.int32(0),
    )
    return _record(state, last_logits, eos_id, strategy)


def decode_step(
    params: Any,
    state: SamplingState,
    eos_id: jax.Array,
    *,
    args: Any,
    forward: ForwardFn,
    strategy: Strategy,
    kernels: Kernels | None = None,
) -> SamplingState:
    """Feed each live row its latest token (done rows feed padding) and sample the next."""
    announce("decode step", batch=state.tokens.shape[0], new_tokens=state.tokens.shape[1])
    last = jax.lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1)  # [B, 1]
    pos = jnp.where(state.done, -1, state.positions)[:, None]  # [B, 1]
    logits, cache = forward(params, jnp.maximum(last, 0), pos, state.cache, args=args,
                            **_kernels_kw(kernels))
    state = state.replace(cache=cache, positions=state.positions + (~state.done).astype(jnp.int32))
    return _record(state, logits[:, -1], eos_id, strategy)


def decode(
    params: Any,
    state: SamplingState,
    eos_id: jax.Array,
    max_steps: jax.Array,
    *,
    args: Any,
    forward: ForwardFn,
    strategy: Strategy,
    kernels: Kernels | None = None,
) -> SamplingState:
    """Decode until `max_steps` tokens are sampled (<= the buffer's N) or every row is done."""
    announce("decode", batch=state.tokens.shape[0], new_tokens=state.tokens.shape[1])

    def cond(s: SamplingState) -> jax.Array:
        return (s.step < max_steps) & ~jnp.all(s.done)

    def body(s: SamplingState) -> SamplingState:
        return decode_step(params, s, eos_id, args=args, forward=forward, strategy=strategy,
                           kernels=kernels)

    return jax.lax.while_loop(cond, body, state)


_STATIC_MODEL = ("args", "forward", "kernels")  # the strategy is a pytree (sampling.py)


prefill_jit = jax.jit(
    prefill,
    static_argnames=(*_STATIC_MODEL, "init_cache", "cache_len", "dtype", "chunk_size", "n_buf"),
)


decode_jit = jax.jit(decode, static_argnames=_STATIC_MODEL, donate_argnames=("state",))


decode_step_jit = jax.jit(decode_step, static_argnames=_STATIC_MODEL, donate_argnames=("state",))
