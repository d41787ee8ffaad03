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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.args import ModelArgs
from mistral_jax.cache import LayerCache, update_layer_cache
from mistral_jax.rope import apply_rope, rope_angles

Dtype = Any


def scaled_normal(fan_in: int):
    return nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


class Linear(nn.Module):
    """x @ kernel through an einsum; the kernel of `shape` has logical `axes`."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    eqn: str
    n_in: int = 1  # how many leading kernel dims are inputs (fan-in for init)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = math.prod(self.shape[: self.n_in])
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(scaled_normal(fan_in), self.axes),
            self.shape, self.dtype)
        return jnp.einsum(self.eqn, x, kernel.astype(x.dtype))


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
    """Grouped-query attention. q [B, T, H, Hd], k/v [B, S, K, Hd], mask [B, T, S] -> [B, T, H, Hd].

    Scores and softmax in float32; a query with no visible key (padding) gets a
    uniform average instead of NaN.
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


class Attention(nn.Module):
    args: ModelArgs
    window: int | None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 cache: LayerCache | None) -> tuple[jax.Array, LayerCache | None]:
        a = self.args
        d, h, kv, hd = a.dim, a.n_heads, a.n_kv_heads, a.head_dim
        q = Linear((d, h, hd), ("embed", "q_heads", "head_dim"), "btd,dhk->bthk",
                   dtype=self.dtype, name="wq")(x)
        k = Linear((d, kv, hd), ("embed", "kv_heads", "head_dim"), "btd,dhk->bthk",
                   dtype=self.dtype, name="wk")(x)
        v = Linear((d, kv, hd), ("embed", "kv_heads", "head_dim"), "btd,dhk->bthk",
                   dtype=self.dtype, name="wv")(x)
        cos, sin = rope_angles(positions, hd, a.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is None:
            keys, values, k_pos = k, v, positions
        else:
            keys = jnp.concatenate([cache["k"].astype(k.dtype), k], axis=1)
            values = jnp.concatenate([cache["v"].astype(v.dtype), v], axis=1)
            k_pos = jnp.concatenate([cache["pos"], positions], axis=1)
            cache = update_layer_cache(cache, k, v, positions)
        out = attend(q, keys, values, attention_mask(positions, k_pos, self.window))
        out = Linear((h, hd, d), ("q_heads", "head_dim", "embed"), "bthk,hkd->btd", n_in=2,
                     dtype=self.dtype, name="wo")(out)
        return out, cache


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    args: ModelArgs
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.args.dim, self.args.hidden_dim
        w1 = Linear((d, f), ("embed", "mlp"), "btd,df->btf", dtype=self.dtype, name="w1")
        w3 = Linear((d, f), ("embed", "mlp"), "btd,df->btf", dtype=self.dtype, name="w3")
        w2 = Linear((f, d), ("mlp", "embed"), "btf,fd->btd", dtype=self.dtype, name="w2")
        return w2(jax.nn.silu(w1(x)) * w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + feed_forward(norm(.))."""

    args: ModelArgs
    window: int | None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 cache: LayerCache | None) -> tuple[jax.Array, LayerCache | None]:
        from mistral_jax.moe import MoeFeedForward  # moe builds on this module

        a = self.args
        h, cache = Attention(a, self.window, self.dtype, name="attention")(
            RMSNorm(a.norm_eps, self.dtype, name="attention_norm")(x), positions, cache)
        x = x + h
        ffn = (MoeFeedForward(a, self.dtype, name="feed_forward") if a.moe
               else FeedForward(a, self.dtype, name="feed_forward"))
        x = x + ffn(RMSNorm(a.norm_eps, self.dtype, name="ffn_norm")(x))
        return x, cache
