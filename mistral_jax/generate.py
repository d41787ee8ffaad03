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

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.cache import init_cache as model_init_cache
from mistral_jax.decode import (
    ForwardFn,
    InitCacheFn,
    SamplingState,
    bucket,
    decode_jit,
    decode_step_jit,
    prefill_jit,
)
from mistral_jax.errors import UserInputError
from mistral_jax.kernels import Kernels
from mistral_jax.mesh import gather, mesh_of
from mistral_jax.model import forward as model_forward
from mistral_jax.partitioning import use_mesh
from mistral_jax.sampling import FirstIds, check_seed, make_strategy, prng_key

# ----------------------------------------------------------------------------- pure functions


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
        check_fits(len(p), max_tokens, max_len, f"prompts[{i}]")


def check_fits(n_prompt: int, max_tokens: int, max_seq_len: int | None, name: str, *,
               max_tokens_name: str = "max_tokens") -> None:
    """UserInputError unless a prompt of `n_prompt` tokens plus `max_tokens` new ones fits the
    model's context (`max_seq_len`, None: unbounded). The message names the prompt (`name`)
    and the knob to turn (`max_tokens_name`: the keyword, or a command's flag)."""
    if max_seq_len is None:
        return
    if n_prompt >= max_seq_len:  # no max_tokens fits: the prompt is what is too long
        raise UserInputError(
            f"{name} is too long: {n_prompt} tokens, and the model's context of {max_seq_len} "
            f"must hold the prompt and at least one new token; shorten it by at least "
            f"{n_prompt - max_seq_len + 1} tokens")
    if n_prompt + max_tokens > max_seq_len:
        raise UserInputError(
            f"{name} is {n_prompt} tokens; with {max_tokens_name} {max_tokens} that is "
            f"{n_prompt + max_tokens} positions, beyond the model's context of {max_seq_len}: "
            f"shorten it or lower {max_tokens_name} (at most {max_seq_len - n_prompt})")


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
    # split like the weights (partitioning.py); a no-op on one device.
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
