"""Sparse mixture of experts (Mixtral): a bias-free gate, top-k experts per token,
their SwiGLU outputs mixed by a float32 softmax over the selected gate logits.

Ties between equal gate logits go to the lower expert index (`jax.lax.top_k`).
Expert weights are stacked per layer as [E, ...] so the expert axis can be sharded.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.args import ModelArgs
from mistral_jax.layers import Dtype, Linear, scaled_normal


def route(gate_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """gate_logits [N, E] -> (weights [N, k] float32, experts [N, k] int32)."""
    top, idx = jax.lax.top_k(gate_logits.astype(jnp.float32), k)
    return jax.nn.softmax(top, axis=-1), idx


def moe_dense(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3) -> jax.Array:
    """Reference path: every expert on every token, mixed by the routing weights.

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    """
    n_experts = w1.shape[0]
    combine = jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32)
                      * weights[..., None], axis=1)  # [N, E]
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w1)) * jnp.einsum("nd,edf->nef", x, w3)
    out = jnp.einsum("nef,efd->ned", hidden, w2)
    return jnp.einsum("ned,ne->nd", out, combine.astype(x.dtype))


class MoeFeedForward(nn.Module):
    args: ModelArgs
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.args
        d, f, e = a.dim, a.hidden_dim, a.moe.num_experts
        gate = Linear((d, e), ("embed", None), "nd,de->ne", dtype=self.dtype, name="gate")
        w1 = self.param("w1", nn.with_logical_partitioning(scaled_normal(d), ("expert", "embed", "mlp")),
                        (e, d, f), self.dtype)
        w3 = self.param("w3", nn.with_logical_partitioning(scaled_normal(d), ("expert", "embed", "mlp")),
                        (e, d, f), self.dtype)
        w2 = self.param("w2", nn.with_logical_partitioning(scaled_normal(f), ("expert", "mlp", "embed")),
                        (e, f, d), self.dtype)
        b, t, _ = x.shape
        flat = x.reshape(b * t, d)
        weights, experts = route(gate(flat), a.moe.num_experts_per_tok)
        w1, w2, w3 = (self._plain_weight(n, w, x.dtype) for n, w in (("w1", w1), ("w2", w2),
                                                                    ("w3", w3)))
        out = moe_dense(flat, weights, experts, w1.astype(x.dtype), w2.astype(x.dtype),
                        w3.astype(x.dtype))
        return out.reshape(b, t, d)

    def _plain_weight(self, name: str, w: jax.Array, dtype) -> jax.Array:
        """Expert weights [E, in, out] as plain arrays: dequantized when stored int8/fp8 with
        a `<name>_scale` (quant.py), plus an unmerged LoRA adapter's delta (lora.py).

        Both materialize the layer's full expert weights per call; reading only the
        selected experts' int8/fp8 weights needs the paths above to take the scales.
        """
        from mistral_jax.lora import lora_delta
        from mistral_jax.quant import dequantize

        scale = self.get_variable("params", f"{name}_scale")
        if scale is not None:
            w = dequantize(w, scale, (1,), dtype)
        if self.has_variable("params", f"{name}_lora_a"):
            delta = lora_delta(self.get_variable("params", f"{name}_lora_a"),
                               self.get_variable("params", f"{name}_lora_b"), n_lead=1)
            w = (w.astype(jnp.float32) + delta).astype(dtype)
        return w
