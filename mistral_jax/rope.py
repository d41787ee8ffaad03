"""Rotary position embeddings in Mistral's interleaved layout.

mistral-inference rotates consecutive pairs (x[2i], x[2i+1]) (a complex view of the
head); Hugging Face checkpoints permute the q/k projection rows so that the same
rotation becomes "rotate half". We keep the interleaved layout and undo the HF
permutation when loading (see `checkpoint.py`).
"""

from __future__ import annotations

import jax.numpy as jnp


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
