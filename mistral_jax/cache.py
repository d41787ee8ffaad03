"""The rotating KV cache: a plain pytree, passed into `forward` and returned by it.

Each layer keeps `size` slots: `sliding_window` for windowed layers, `max_seq_len`
otherwise. The token at absolute position p lives in slot p % size, and `pos`
records which absolute position each slot holds (-1: empty), so attention masks
by positions rather than by slot order and rows of a batch may sit at different
positions. Prefilling more tokens than the window stays exact because attention
runs over the cache *before* the write plus the new keys (as in mistral-inference);
only the newest `size` tokens of a row are then written.

Keys and values are stored heads before slots, [B, K, S, Hd], as attention's batched
matmuls read them (BENCHMARKS.md, "KV cache stored heads before slots").
"""

from __future__ import annotations

from typing import TypedDict

import jax
import jax.numpy as jnp

from mistral_jax.args import ModelArgs
from mistral_jax.partitioning import constrain_cache_layer


class LayerCache(TypedDict):
    k: jax.Array  # [B, K, S, Hd]
    v: jax.Array  # [B, K, S, Hd]
    pos: jax.Array  # [B, S] int32, absolute position held by each slot, -1 if empty


Cache = list[LayerCache]


def cache_sizes(args: ModelArgs, max_seq_len: int) -> list[int]:
    """Slots per layer: the layer's window (if smaller) or max_seq_len."""
    return [max_seq_len if w is None else min(w, max_seq_len) for w in args.layer_windows]


def init_cache(args: ModelArgs, batch_size: int, max_seq_len: int, dtype=jnp.bfloat16) -> Cache:
    """An empty cache for `batch_size` rows and positions below `max_seq_len`."""
    cache = []
    for size in cache_sizes(args, max_seq_len):
        shape = (batch_size, args.n_kv_heads, size, args.head_dim)
        # Under a mesh (partitioning.use_mesh): batch along data, KV heads along tensor.
        cache.append(constrain_cache_layer(LayerCache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            pos=jnp.full((batch_size, size), -1, jnp.int32),
        )))
    return cache


def update_layer_cache(layer: LayerCache, k: jax.Array, v: jax.Array,
                       positions: jax.Array) -> LayerCache:
    """Write new keys/values k, v [B, T, K, Hd] at positions [B, T] (-1: padding, skipped).

    Only the newest `size` valid tokens of each row are written, so every written
    slot is distinct and the scatter is deterministic.
    """
    size = layer["pos"].shape[1]
    newest = jnp.max(positions, axis=1, keepdims=True)
    keep = (positions >= 0) & (positions > newest - size)
    slot = jnp.where(keep, positions % size, size)  # index `size` is out of range: dropped

    def write_pos(buf, idx, val):  # one row: buf [S], idx/val [T]
        return buf.at[idx].set(val, mode="drop")

    def write_kv(buf, idx, val):  # one row: buf [K, S, Hd], idx [T], val [T, K, Hd]
        return buf.at[:, idx].set(jnp.swapaxes(val, 0, 1).astype(buf.dtype), mode="drop")

    return LayerCache(
        k=jax.vmap(write_kv)(layer["k"], slot, k),
        v=jax.vmap(write_kv)(layer["v"], slot, v),
        pos=jax.vmap(write_pos)(layer["pos"], slot, positions),
    )
