"""Flax (linen) building blocks of the Mistral transformer, used as pure functions.

Every weight is declared once, here, by `self.param` with its shape, dtype and
logical axes (`nn.with_logical_partitioning`). Random init, abstract shapes for
loading, and shardings are all derived from these declarations (see `model.py`).
Kernels are stored [in..., out...]; checkpoint loaders transpose PyTorch's [out, in].

Shapes: B batch, T new tokens, S cached slots, D dim, H query heads, K kv heads,
G = H // K, Hd head_dim, F hidden_dim, V vocab.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.args import ModelArgs
from mistral_jax.cache import LayerCache, update_layer_cache
from mistral_jax.kernels import Kernels
from mistral_jax.lora import lora_einsum
from mistral_jax.quantize import qeinsum
from mistral_jax.rope import apply_rope, query_scale, rope_tables

Dtype = Any


def scaled_normal(fan_in: int):
    return nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


class Linear(nn.Module):
    """x @ kernel through an einsum; the kernel of `shape` has logical `axes`.

    The params may also hold `scale` (a quantized kernel, quantize.py) and `lora_a` /
    `lora_b` (an unmerged LoRA adapter, lora.py); `forward` follows what they hold.
    `qmatmul` picks the quantized matmul's implementation (`Kernels.qmatmul`).
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    eqn: str
    n_in: int = 1  # how many leading kernel dims are inputs (fan-in for init)
    dtype: Dtype = jnp.float32
    qmatmul: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = math.prod(self.shape[: self.n_in])
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(scaled_normal(fan_in), self.axes),
            self.shape, self.dtype)
        if self.has_variable("params", "scale"):  # int8/fp8 kernel + per-channel scale
            y = qeinsum(self.eqn, x, kernel, self.get_variable("params", "scale"),
                        self.get_variable("params", "input_scale"), impl=self.qmatmul)
        else:
            y = jnp.einsum(self.eqn, x, kernel.astype(x.dtype))
        if self.has_variable("params", "lora_a"):  # an unmerged LoRA adapter
            y = y + lora_einsum(self.eqn, self.n_in, x, self.get_variable("params", "lora_a"),
                                self.get_variable("params", "lora_b"))
        return y


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (as both references do)."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                            (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * weight.astype(x.dtype)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] bool: query at q_pos sees keys k_pos in (q_pos - window, q_pos]; -1 is empty."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B, T, H, Hd], k/v [B, K, S, Hd] (the cache's layout),
    mask [B, T, S] -> [B, T, H, Hd].

    Scores and softmax in float32; a query with no visible key (padding) gets a
    uniform average instead of NaN.
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bksd,bkgts->btkgd", v, probs)
    return out.reshape(b, t, h, hd)


def attention_implementation(dtype: Any, n_queries: int, head_dim: int,
                             choice: str = "auto") -> str | None:
    """Static (trace-time) choice of the fused kernel for a step of `n_queries` new tokens.

    'cudnn' on a GPU for a bfloat16/float16 prefill (n_queries > 1, head_dim a multiple
    of 8 up to 128): cuDNN flash attention (BENCHMARKS.md, "Measurements behind the code's
    defaults"). None (the reference `attend`) otherwise: decode steps,
    where XLA's einsums are as fast, float32, and CPU/TPU. `choice` (`Kernels.attention`:
    'reference', 'xla', 'cudnn') overrides 'auto' for any prefill.
    """
    if n_queries < 2 or choice == "reference":
        return None
    if choice != "auto":
        return choice
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return None


def plain_causal(positions: jax.Array, cache_pos: jax.Array | None) -> jax.Array:
    """bool[]: the position mask is a plain causal mask over the new tokens alone.

    True when the cache (cache_pos [B, S], or None) is empty and every row of
    positions [B, T] counts up by one from its first token, followed only by padding
    (-1): then index order is position order and no cached key is visible.
    """
    t = positions.shape[1]
    valid = positions >= 0
    consecutive = positions == positions[:, :1] + jnp.arange(t, dtype=positions.dtype)
    ok = jnp.all(consecutive | ~valid) & jnp.all(valid[:, :-1] | ~valid[:, 1:])
    if cache_pos is not None:
        ok &= jnp.all(cache_pos < 0)
    return ok


def fused_causal_attend(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None,
                        implementation: str) -> jax.Array:
    """Causal attention over the new tokens only. q [B, T, H, Hd], k/v [B, T, K, Hd] -> [B, T, H, Hd].

    `jax.nn.dot_product_attention` with `is_causal` and, for a window shorter than T,
    `local_window_size=(window - 1, 0)` (keys in (q - window, q], as `attention_mask`).
    Equals `attend` where `plain_causal` holds, except at padding queries (unused).
    """
    t = q.shape[1]
    local = None if window is None or window >= t else (window - 1, 0)
    try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                            implementation=implementation)
    except (NotImplementedError, ValueError, RuntimeError) as e:
        if implementation == "xla":
            raise
        # cuDNN checks shapes, dtype, GPU generation and its own version while tracing.
        warnings.warn(f"cuDNN attention unavailable ({e}); using XLA's", stacklevel=2)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                            implementation="xla")


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings over the cache and the new tokens.

    `fresh_prefill` (static) promises that the cache holds nothing yet and each row's
    positions count up from its first token, followed only by padding (-1), as the
    sampler's prefill guarantees: attention then covers the new tokens alone, with the
    fused kernel on GPUs, and never builds scores over the cache's empty slots.
    """

    args: ModelArgs
    window: int | None
    dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None,
                 fresh_prefill: bool = False) -> tuple[jax.Array, LayerCache | None]:
        a = self.args
        d, h, kv, hd = a.dim, a.n_heads, a.n_kv_heads, a.head_dim
        qm = self.kernels.qmatmul
        q = Linear((d, h, hd), ("embed", "q_heads", "head_dim"), "btd,dhk->bthk",
                   dtype=self.dtype, qmatmul=qm, name="wq")(x)
        k = Linear((d, kv, hd), ("embed", "kv_heads", "head_dim"), "btd,dhk->bthk",
                   dtype=self.dtype, qmatmul=qm, name="wk")(x)
        v = Linear((d, kv, hd), ("embed", "kv_heads", "head_dim"), "btd,dhk->bthk",
                   dtype=self.dtype, qmatmul=qm, name="wv")(x)
        cos, sin = rope_tables(positions, a)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if a.llama_4_scaling is not None:
            q = (q * query_scale(positions, a.llama_4_scaling)).astype(k.dtype)

        cache_pos = None if cache is None else cache["pos"]
        # Keys for `attend` are [B, K, S, Hd], as the cache stores them.
        if cache is None or fresh_prefill:
            keys, values, k_pos = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), positions
            if cache is not None:
                cache = update_layer_cache(cache, k, v, positions)
        elif k.shape[1] == 1 and cache["k"].dtype == k.dtype:
            # Decode: write first, then attend over the cache in place, saving a copy of
            # the whole cache per layer. Exact: the slot overwritten held position p - S,
            # outside the window (S = window) or beyond max_seq_len (S = max_seq_len).
            # (Reading the old cache first and writing after made XLA copy the cache so
            # the in-place write could not clobber what the matmuls still read.)
            cache = update_layer_cache(cache, k, v, positions)
            keys, values, k_pos = cache["k"], cache["v"], cache["pos"]
        else:
            keys = jnp.concatenate([cache["k"].astype(k.dtype), jnp.swapaxes(k, 1, 2)], axis=2)
            values = jnp.concatenate([cache["v"].astype(v.dtype), jnp.swapaxes(v, 1, 2)], axis=2)
            k_pos = jnp.concatenate([cache["pos"], positions], axis=1)
            cache = update_layer_cache(cache, k, v, positions)
        impl = attention_implementation(q.dtype, q.shape[1], hd, self.kernels.attention)
        if impl is None:
            out = attend(q, keys, values, attention_mask(positions, k_pos, self.window))
        elif fresh_prefill:  # plain causal by the caller's promise: no reference branch
            out = fused_causal_attend(q, k, v, self.window, impl)
        else:  # the fused kernel where its causal mask is exact, the reference elsewhere
            out = jax.lax.cond(
                plain_causal(positions, cache_pos),
                lambda: fused_causal_attend(q, k, v, self.window, impl),
                lambda: attend(q, keys, values, attention_mask(positions, k_pos, self.window)))
        out = Linear((h, hd, d), ("q_heads", "head_dim", "embed"), "bthk,hkd->btd", n_in=2,
                     dtype=self.dtype, qmatmul=qm, name="wo")(out)
        return out, cache


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    args: ModelArgs
    dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f, qm = self.args.dim, self.args.hidden_dim, self.kernels.qmatmul
        w1 = Linear((d, f), ("embed", "mlp"), "btd,df->btf", dtype=self.dtype, qmatmul=qm,
                    name="w1")
        w3 = Linear((d, f), ("embed", "mlp"), "btd,df->btf", dtype=self.dtype, qmatmul=qm,
                    name="w3")
        w2 = Linear((f, d), ("mlp", "embed"), "btf,fd->btd", dtype=self.dtype, qmatmul=qm,
                    name="w2")
        return w2(jax.nn.silu(w1(x)) * w3(x))
