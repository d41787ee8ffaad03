"""Expert weights and the two plain MoE paths: every expert (reference) and gather (decode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mistral_jax.lora import lora_delta
from mistral_jax.quantize import dequantize, qeinsum, quantize_activations


class ExpertWeight(NamedTuple):
    """One stacked expert weight with its optional siblings (a pytree; None = absent).

    kernel [E, in, out] (float, or int8/fp8 with `scale`), scale f32 [E, out],
    lora_a [E, in, r], lora_b [E, r, out] (scaling folded in), input_scale f32 [E]
    (quantized kernels only: activations quantized too; 0 = per token, > 0 = that static
    scale). Indexed by one expert (`expert_slice`) every field loses its leading E axis.
    """

    kernel: jax.Array
    scale: jax.Array | None = None
    lora_a: jax.Array | None = None
    lora_b: jax.Array | None = None
    input_scale: jax.Array | None = None


Weight = jax.Array | ExpertWeight


AxisNames = str | tuple[str, ...]


def kernel_of(w: Weight) -> jax.Array:
    return w.kernel if isinstance(w, ExpertWeight) else w


def dense_weight(w: Weight, dtype) -> jax.Array:
    """A stacked weight as one plain array [E, in, out] in `dtype`: dequantized, plus the
    LoRA delta. Materializes every expert: for the reference paths only."""
    if not isinstance(w, ExpertWeight):
        return w.astype(dtype)
    k = w.kernel
    if w.scale is not None:
        k = dequantize(k, w.scale, (1,), dtype)
    if w.lora_a is not None:
        k = (k.astype(jnp.float32) + lora_delta(w.lora_a, w.lora_b, n_lead=1)).astype(dtype)
    return k.astype(dtype)


def quantized_input(x: jax.Array, w: Weight, pick: Callable[[jax.Array], jax.Array],
                    axis_name: AxisNames = ()) -> jax.Array:
    """x [..., in] as the expert weight `w` sees it: each row quantized to the kernel's
    dtype and back (`quantize.quantize_activations` over the last axis, then times its
    scale) when `w` carries an `input_scale`; else x itself. For the dense paths, which
    multiply by the dequantized weight. `pick(w.input_scale)` maps the [E] scales to one
    that broadcasts against x [..., 1]: [E, 1, 1] for x [E, N, in], [M, 1] per row.
    `axis_name`: mesh axes the `in` axis is split over (inside shard_map), so that a
    per-row scale takes the max over the whole row.
    """
    if not isinstance(w, ExpertWeight) or w.input_scale is None:
        return x
    xq, s = quantize_activations(x, (x.ndim - 1,), w.kernel.dtype, pick(w.input_scale),
                                 axis_name)
    return (xq.astype(jnp.float32) * s).astype(x.dtype)


def expert_matmul(x: jax.Array, w: Weight, axis_name: AxisNames = (), *,
                  qmatmul: str = "auto") -> jax.Array:
    """x [M, in] @ one expert's weight [in, out] -> [M, out] in x's dtype.

    A quantized kernel is multiplied as stored (cast to x's dtype) and its output scaled
    per channel; with an `input_scale`, each row of x is quantized first (scale per row,
    `quantize.qeinsum`). A LoRA adapter adds (x @ a) @ b on the unquantized x, as `Linear`
    does. Nothing [in, out]-sized is dequantized. `axis_name`: see `quantized_input`;
    `qmatmul`: `Kernels.qmatmul`, for `quantize.qeinsum`.
    """
    if not isinstance(w, ExpertWeight):
        return x @ w.astype(x.dtype)
    if w.scale is not None:
        y = qeinsum("mi,io->mo", x, w.kernel, w.scale, w.input_scale, axis_name=axis_name,
                    impl=qmatmul)
    else:
        y = x @ w.kernel.astype(x.dtype)
    if w.lora_a is not None:
        y = y + (x @ w.lora_a.astype(x.dtype)) @ w.lora_b.astype(x.dtype)
    return y


def expert_ffn(x: jax.Array, w1: Weight, w2: Weight, w3: Weight,
               hidden_axes: AxisNames = (), qmatmul: str = "auto") -> jax.Array:
    """One expert's SwiGLU: x [M, D], w1/w3 [D, F], w2 [F, D] -> [M, D] in x's dtype.

    Each weight is a plain array or one expert's `ExpertWeight` (see `expert_matmul`).
    `hidden_axes`: mesh axes F is split over (see `moe`).
    """
    h = (jax.nn.silu(expert_matmul(x, w1, qmatmul=qmatmul))
         * expert_matmul(x, w3, qmatmul=qmatmul))
    return expert_matmul(h, w2, hidden_axes, qmatmul=qmatmul)


def expert_slice(w: Weight, e: jax.Array) -> Weight:
    """Expert `e`'s slice of a stacked weight (every present field of an ExpertWeight)."""
    def take(a):
        return None if a is None else jax.lax.dynamic_index_in_dim(a, e, axis=0, keepdims=False)
    if isinstance(w, ExpertWeight):
        return ExpertWeight(*(take(a) for a in w))
    return take(w)


def moe_dense(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
              hidden_axes: AxisNames = ()) -> jax.Array:
    """Reference path: every expert on every token, mixed by the routing weights.

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    """
    ws = (w1, w2, w3)
    w1, w2, w3 = (dense_weight(w, x.dtype) for w in ws)
    n_experts = w1.shape[0]
    combine = jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32)
                      * weights[..., None], axis=1)  # [N, E]
    xe = jnp.broadcast_to(x, (n_experts, *x.shape))  # expert as the batch dim of each matmul

    def rows(v, w, axes=()):  # quantized activations (per expert and row), if w has them
        return quantized_input(v, w, lambda s: s[:, None, None], axes)

    hidden = (jax.nn.silu(jnp.einsum("end,edf->enf", rows(xe, ws[0]), w1))
              * jnp.einsum("end,edf->enf", rows(xe, ws[2]), w3))
    out = jnp.einsum("enf,efd->end", rows(hidden, ws[1], hidden_axes), w2)
    return jnp.einsum("end,ne->nd", out, combine.astype(x.dtype))


def mix_slots(y: jax.Array, weights: jax.Array) -> jax.Array:
    """Each token's expert outputs y [N, k, D] mixed by its routing weights [N, k] -> [N, D]
    in y's dtype, summed in slot order: every sparse path mixes here, so they agree bit for
    bit where their expert outputs do."""
    mix = weights.astype(y.dtype)
    out = y[:, 0] * mix[:, :1]
    for j in range(1, y.shape[1]):
        out = out + y[:, j] * mix[:, j:j + 1]
    return out


def moe_gather(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
               hidden_axes: AxisNames = (), qmatmul: str = "auto") -> jax.Array:
    """Decode path: each (token, slot) reads only its selected expert's weights (for an
    `ExpertWeight`: its quantized kernel slice, scale row and LoRA factors).

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    Unrolled over the N*k assignments, so meant for N*k <= E (see `moe_strategy`).
    """
    n, k = experts.shape
    ys = [expert_ffn(x[i:i + 1], expert_slice(w1, e), expert_slice(w2, e), expert_slice(w3, e),
                     hidden_axes, qmatmul)
          for i in range(n) for e in (experts[i, j] for j in range(k))]
    return mix_slots(jnp.concatenate(ys, axis=0).reshape(n, k, -1), weights)
