"""Batched generation: prefill the prompts through the KV cache, then one jitted decode loop.

Mirrors mistral-inference's `generate(encoded_prompts, model, *, max_tokens, temperature,
chunk_size, eos_id) -> (tokens, logprobs)`, with top-p / top-k / seed added.

The path, top to bottom:
  host: validate, bucket shapes, right-pad prompts (positions -1 on padding)
  `prefill` (jitted): fill the cache chunk by chunk, sample the first token -> SamplingState
  `decode` (jitted, cache donated): one `lax.while_loop` feeding each row its last token
      and sampling the next, until every row hit eos or max_tokens were sampled
  host: cut each row at its eos.

Shapes are bucketed so that new prompt lengths, batch sizes or max_tokens reuse the
compiled programs: prompt length, cache length and the token buffer are rounded up to
a power of two (at least 16), the batch to a power of two (dummy rows start as done).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.cache import init_cache as model_init_cache
from mistral_jax.errors import UserInputError
from mistral_jax.kernels import Kernels
from mistral_jax.mesh import gather, mesh_of
from mistral_jax.model import forward as model_forward
from mistral_jax.partitioning import use_mesh
from mistral_jax.sampling import FirstIds, Strategy, check_seed, make_strategy, prng_key

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


# ----------------------------------------------------------------------------- pure functions


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


# ----------------------------------------------------------------------------- host side


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _as_batch(prompts: Any) -> Sequence[Sequence[int]]:
    """prompts as a sequence of prompts: a list (or tuple) of token-id sequences, or a 2-D
    integer array [B, T] (its rows). A flat list of ids is refused: wrap one prompt as [ids]."""
    if hasattr(prompts, "__array__") and not isinstance(prompts, Sequence):
        arr = np.asarray(prompts)
        if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer) and arr.size > 0:
            return arr.tolist()
        if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
            raise UserInputError(
                "prompts must be a batch of prompts, got a 1-D array of token ids: wrap one "
                "prompt as [ids]")
        raise UserInputError(
            f"prompts must be a batch of prompts (a list of token-id lists, or a 2-D integer "
            f"array [B, T]), got an array of shape {arr.shape} and dtype {arr.dtype}")
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or not prompts:
        raise UserInputError("prompts must be a non-empty list of token-id lists")
    if all(_is_int(p) or isinstance(p, np.integer) for p in prompts):
        raise UserInputError(
            "prompts must be a batch of prompts (a list of token-id lists), got a flat list "
            "of ints: wrap one prompt as [ids]")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__"):
            raise UserInputError(f"prompts[{i}] must be a flat list of integer token ids, "
                                 f"got {type(p).__name__}")
    return prompts


def _validate(prompts, max_tokens, args, eos_id, chunk_size, seed) -> None:
    """Raise UserInputError for a bad argument; `prompts` already went through `_as_batch`."""
    if not _is_int(max_tokens) or max_tokens < 1:
        raise UserInputError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise UserInputError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    vocab, max_len = args.vocab_size, getattr(args, "max_seq_len", None)
    if eos_id is not None and not (_is_int(eos_id) and 0 <= eos_id < vocab):
        raise UserInputError(
            f"eos_id must be None or a token id in [0, vocab_size={vocab}), got {eos_id!r}")
    check_seed(seed)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserInputError(f"prompts[{i}] is empty: every prompt needs at least one token")
        ids = np.asarray(p)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise UserInputError(f"prompts[{i}] must be a flat list of integer token ids")
        if ids.min() < 0 or ids.max() >= vocab:
            raise UserInputError(
                f"prompts[{i}] holds token id {int(ids.min() if ids.min() < 0 else ids.max())} "
                f"outside [0, vocab_size={vocab})"
            )
        if max_len is not None and len(p) + max_tokens > max_len:
            raise UserInputError(
                f"prompts[{i}] has {len(p)} tokens; with max_tokens={max_tokens} that needs "
                f"{len(p) + max_tokens} positions, beyond the model's max_seq_len={max_len}"
            )


def _start(
    params,
    args,
    prompts,
    *,
    max_tokens,
    strategy,
    seed,
    eos_id,
    chunk_size,
    dtype,
    forward,
    init_cache,
    kernels=None,
):
    """Validate, bucket, pad and prefill. Returns (state, eos, static kwargs for decoding)."""
    prompts = _as_batch(prompts)
    _validate(prompts, max_tokens, args, eos_id, chunk_size, seed)
    if isinstance(strategy, FirstIds) and strategy.n > args.vocab_size:
        raise UserInputError(f"vocab_limit must be at most vocab_size={args.vocab_size}, "
                             f"got {strategy.n}")
    lengths = [len(p) for p in prompts]
    n_rows = bucket(len(prompts), minimum=1)
    T = bucket(max(lengths))
    chunk = T if chunk_size is None else min(chunk_size, T)
    T = math.ceil(T / chunk) * chunk
    cache_len = bucket(max(lengths) + max_tokens)
    if getattr(args, "max_seq_len", None) is not None:
        cache_len = min(cache_len, args.max_seq_len)

    tokens = np.zeros((n_rows, T), np.int32)
    positions = np.full((n_rows, T), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        positions[i, : len(p)] = np.arange(len(p))
    positions[len(prompts) :, 0] = 0  # dummy rows hold one token, so no row is all padding
    done = np.arange(n_rows) >= len(prompts)
    eos = jnp.int32(-1 if eos_id is None else eos_id)

    static = dict(args=args, forward=forward, strategy=strategy, kernels=kernels)
    # Params sharded over a mesh: trace under it, so the KV cache and the MoE layers are
    # split like the weights (sharding.py); a no-op on one device.
    with use_mesh(mesh_of(params)):
        state = prefill_jit(
            params,
            tokens,
            positions,
            done,
            prng_key(seed),
            eos,
            init_cache=init_cache,
            cache_len=cache_len,
            dtype=jnp.dtype(dtype),
            chunk_size=chunk,
            n_buf=bucket(max_tokens),
            **static,
        )
    return state, eos, static


def generate_from_params(
    params: Any,
    args: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    chunk_size: int | None = None,
    vocab_limit: int | None = None,
    dtype: Any = jnp.float32,
    forward: ForwardFn = model_forward,
    init_cache: InitCacheFn = model_init_cache,
    kernels: Kernels | None = None,
    on_first_token: Callable[[], None] | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """`generate` with explicit params and args; `dtype` is the KV cache's dtype.

    `forward` / `init_cache` (static under jit) default to `mistral_jax.model`'s; any pair
    with the same contract works, e.g. a toy model in tests. `kernels` (static) goes to
    `forward` as its `kernels=` (None: not passed). `on_first_token()` is called
    once the prefill has produced every row's first token (e.g. to time it).
    """
    strategy = make_strategy(temperature, top_p, top_k, vocab_limit)
    state, eos, static = _start(
        params,
        args,
        prompts,
        max_tokens=max_tokens,
        strategy=strategy,
        seed=seed,
        eos_id=eos_id,
        chunk_size=chunk_size,
        dtype=dtype,
        forward=forward,
        init_cache=init_cache,
        kernels=kernels,
    )
    if on_first_token is not None:
        jax.block_until_ready(state.tokens)
        on_first_token()
    with use_mesh(mesh_of(params)):
        state = decode_jit(params, state, eos, jnp.int32(max_tokens), **static)
    tokens, logprobs = gather(state.tokens), gather(state.logprobs)  # all processes, multi-host
    tokens, logprobs = tokens[: len(prompts), :max_tokens], logprobs[: len(prompts), :max_tokens]
    stop = (tokens == -1) | (tokens == (-1 if eos_id is None else eos_id))  # [B, N]
    lengths = np.where(stop.any(axis=1), stop.argmax(axis=1), max_tokens)
    out_tokens = [row[:n].tolist() for row, n in zip(tokens, lengths)]
    out_logprobs = [row[:n].tolist() for row, n in zip(logprobs, lengths)]
    return out_tokens, out_logprobs


def generate(
    prompts: Sequence[Sequence[int]],
    model: Any,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    chunk_size: int | None = None,
    vocab_limit: int | None = None,
    on_first_token: Callable[[], None] | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Generate up to `max_tokens` ids after each prompt with a `Transformer`.

    `prompts` is a batch of B prompts: a list of token-id lists (one prompt: `[ids]`) or
    a 2-D integer array [B, T]. Returns, per prompt, the generated ids (stopped at that
    row's `eos_id`, which is excluded) and their logprobs (log_softmax of the untempered
    logits). temperature 0 is greedy; `seed` is any integer in [-2**63, 2**63) (see
    `sampling.prng_key`); `chunk_size` feeds the prompts through the cache that many
    tokens at a time (None: the whole prompt at once). `vocab_limit` samples only ids
    below it: the tokenizer's size when the model's vocabulary is padded past it (the
    command-line tools pass it). Logprobs stay over the model's whole vocabulary.
    """
    return generate_from_params(
        model.params,
        model.args,
        prompts,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        eos_id=eos_id,
        chunk_size=chunk_size,
        vocab_limit=vocab_limit,
        dtype=model.dtype,
        kernels=getattr(model, "kernels", None),
        on_first_token=on_first_token,
    )


def generate_stream(
    prompt: Sequence[int],
    model: Any,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    chunk_size: int | None = None,
    vocab_limit: int | None = None,
    forward: ForwardFn = model_forward,
    init_cache: InitCacheFn = model_init_cache,
) -> Iterator[int]:
    """Yield the ids generated after one prompt, one at a time (for interactive chat).

    Same tokens as `generate([prompt], ...)`, but dispatches one jitted step per token,
    each before the previous token is read back (the host round trip overlaps a step).
    Inputs are validated and the prompt prefilled when this is called, not on first `next`.
    """
    strategy = make_strategy(temperature, top_p, top_k, vocab_limit)
    state, eos, static = _start(
        model.params,
        model.args,
        [prompt],
        max_tokens=max_tokens,
        strategy=strategy,
        seed=seed,
        eos_id=eos_id,
        chunk_size=chunk_size,
        dtype=model.dtype,
        forward=forward,
        init_cache=init_cache,
        kernels=getattr(model, "kernels", None) if forward is model_forward else None,
    )

    def tokens(state: SamplingState) -> Iterator[int]:
        # Step i+1 is dispatched before token i is read back, so the device computes the
        # next token while the host waits for, decodes and prints this one (one step is
        # computed in vain when a row stops at eos_id).
        pending = state.tokens[0, 0]  # a device scalar, sliced before `state` is donated
        for i in range(max_tokens):
            if i + 1 < max_tokens:
                with use_mesh(mesh_of(model.params)):
                    state = decode_step_jit(model.params, state, eos, **static)
                following = state.tokens[0, i + 1]
            token = int(pending)
            if eos_id is not None and token == eos_id:
                return
            yield token
            if i + 1 < max_tokens:
                pending = following

    return tokens(state)
