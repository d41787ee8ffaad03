"""Rotary position embeddings in Mistral's interleaved layout.

mistral-inference rotates consecutive pairs (x[2i], x[2i+1]) (a complex view of the
head); Hugging Face checkpoints permute the q/k projection rows so that the same
rotation becomes "rotate half". We keep the interleaved layout and undo the HF
permutation when loading (see `checkpoint.py`). `rope_tables` adds YaRN scaling and
`query_scale` Ministral3's position-dependent query scale, both read from `ModelArgs`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def rope_angles(positions: jnp.ndarray, head_dim: int, theta: float):
    """cos, sin of shape [B, T, head_dim // 2] (float32) for positions [B, T]."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.float32(theta) ** exponents)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, H, Hd] by the angles [B, T, Hd/2]; computed in float32."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def inv_frequencies(head_dim: int, theta: float, yarn=None) -> np.ndarray:
    """The rotation frequencies [head_dim // 2] (float32), YaRN-blended when `yarn` (a
    `YarnArgs`) is given: each frequency interpolated (divided by `factor`) or kept,
    by a ramp between the dimensions that turn beta_fast and beta_slow times over
    `original_max_position_embeddings` positions (transformers' `_compute_yarn_parameters`,
    computed in float32 as there)."""
    pos_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if yarn is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(yarn.original_max_position_embeddings
                                    / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # (as transformers: no division by zero)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)  # 1: keep the frequency
    interpolation = (1.0 / (np.float32(yarn.factor) * pos_freqs)).astype(np.float32)
    return (interpolation * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)


def rope_tables(positions: jnp.ndarray, args) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [B, T, head_dim // 2] (float32) for positions [B, T] under `args`' rope
    (theta, YaRN with its attention factor on both)."""
    inv_freq = jnp.asarray(inv_frequencies(args.head_dim, args.rope_theta, args.yarn))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if args.yarn is not None and args.yarn.attention_factor != 1.0:
        cos, sin = cos * args.yarn.attention_factor, sin * args.yarn.attention_factor
    return cos, sin


def query_scale(positions: jnp.ndarray, scaling) -> jnp.ndarray:
    """[B, T, 1, 1] float32: 1 + beta * log(1 + floor(pos / original_max)) for positions
    [B, T] (`QueryScaleArgs`); padding (-1) gets 1."""
    pos = jnp.maximum(positions, 0).astype(jnp.float32)
    scale = 1 + scaling.beta * jnp.log1p(jnp.floor(pos / scaling.original_max_position_embeddings))
    return scale[:, :, None, None]
