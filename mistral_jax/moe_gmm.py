"""MoE prefill and batched decode as grouped matmuls: the (token, expert) assignments sorted
by expert, then one grouped matmul per projection, so that each expert's weights are read
once per step however many tokens chose it.

    y = moe_gmm(x, weights, experts, w1, w2, w3, impl="pallas")   # x [N, D] -> [N, D]

Two grouped matmuls, both taking int8/fp8 expert kernels as stored (converted inside the
matmul, each output channel scaled by its expert's scale: nothing [E, in, out]-sized is
dequantized), LoRA adapters and quantized activations (`input_scale`) as `expert_matmul`:
- 'pallas' / 'pallas-interpret': `gpu_kernels.gmm_pallas` over row blocks of one expert each
  (the GPU's path; the interpreter on any backend);
- 'ragged': `jax.lax.ragged_dot` over the sorted rows. XLA lowers it natively on TPUs; on
  CPUs, and on CUDA GPUs in jaxlib 0.10 (the rewrite XLA falls back to), it becomes a dense
  dot over every expert for every row: E times the FLOPs, so it is no GPU default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mistral_jax.gpu_kernels import gmm_pallas
from mistral_jax.moe_experts import (
    AxisNames,
    ExpertWeight,
    Weight,
    kernel_of,
    mix_slots,
    quantized_input,
)

IMPLS = ("ragged", "pallas", "pallas-interpret")

# Rows per block of the Pallas path: about the rows per expert (a power of two), within
# [GMM_MIN_ROWS, GMM_MAX_ROWS]: 16 is the smallest Triton dot, 128 its usual tile.
GMM_MIN_ROWS, GMM_MAX_ROWS = 16, 128


def gmm_block_rows(n_tokens: int, k: int, n_experts: int) -> int:
    """Rows per block for N tokens: the power of two at or above N*k/E, clipped to
    [GMM_MIN_ROWS, GMM_MAX_ROWS]. Padding costs at most E * (block - 1) rows."""
    per_expert = -(-n_tokens * k // n_experts)
    block = 1 << max(0, (per_expert - 1).bit_length())
    return int(min(GMM_MAX_ROWS, max(GMM_MIN_ROWS, block)))


def sort_into_blocks(experts: jax.Array, n_experts: int, block: int):
    """Assignments [N, k] laid out by expert, each expert's rows padded to whole blocks.

    Returns (dest int32 [N*k]: the padded row of each assignment, block_expert int32 [B],
    n_used int32: blocks holding rows, B = cdiv(N*k, block) + E - 1 static: enough for
    any routing). Blocks from n_used on belong to no one (their expert is clipped to E-1).
    """
    m = experts.size
    flat = experts.reshape(m)
    n_blocks = -(-m // block) + n_experts - 1
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=n_experts)
    padded = -(-sizes // block) * block
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(sizes) - sizes
    sorted_expert = flat[order]
    rank = jnp.arange(m) - start[sorted_expert]
    dest_sorted = padded_end[sorted_expert] - padded[sorted_expert] + rank
    dest = jnp.zeros(m, jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))
    block_expert = jnp.searchsorted(padded_end, jnp.arange(n_blocks) * block, side="right")
    block_expert = jnp.minimum(block_expert, n_experts - 1).astype(jnp.int32)
    return dest, block_expert, (padded_end[-1] // block).astype(jnp.int32)


def _lora_rows(x: jax.Array, w: Weight, row_expert: jax.Array) -> jax.Array | float:
    """Each row's (x @ a[e]) @ b[e] for its expert e, [M, out] (0 without LoRA): x times
    every expert's a [E, in, r] (E*r columns: a few percent of the projection), masked to
    the row's expert, times the stacked b as one [E*r, out] matrix."""
    if not isinstance(w, ExpertWeight) or w.lora_a is None:
        return 0.0
    u = jnp.einsum("mi,eir->mer", x, w.lora_a.astype(x.dtype))
    u = u * jax.nn.one_hot(row_expert, w.lora_a.shape[0], dtype=x.dtype)[..., None]
    return jnp.einsum("mer,ero->mo", u, w.lora_b.astype(x.dtype))


def _project(x: jax.Array, w: Weight, row_expert: jax.Array, matmul, axes: AxisNames = ()):
    """x [M, in] (rows of experts `row_expert` [M]) @ their experts' w -> [M, out] in x.dtype.
    `matmul(x, kernel, scale)` is the grouped matmul, scale None for a float kernel."""
    xin = quantized_input(x, w, lambda s: s[row_expert][:, None], axes)
    scale = w.scale if isinstance(w, ExpertWeight) else None
    y = matmul(xin, kernel_of(w), scale)
    return (y + _lora_rows(x, w, row_expert)).astype(x.dtype)


def _ffn(xs, w1, w2, w3, row_expert, matmul, hidden_axes):
    h = (jax.nn.silu(_project(xs, w1, row_expert, matmul))
         * _project(xs, w3, row_expert, matmul))
    return _project(h, w2, row_expert, matmul, hidden_axes)


def moe_gmm(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
            impl: str = "pallas", block_size: int | None = None,
            hidden_axes: AxisNames = ()) -> jax.Array:
    """The MoE layer through grouped matmuls (`impl` one of IMPLS, see the module docstring).

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] (plain arrays or
    `ExpertWeight`s) -> [N, D] in x.dtype. `block_size`: rows per block of the Pallas path
    (a power of two; default `gmm_block_rows`).
    """
    if impl not in IMPLS:
        raise ValueError(f"moe_gmm: impl must be one of {IMPLS}, got {impl!r}")
    n, k = experts.shape
    d = x.shape[1]
    n_experts = kernel_of(w1).shape[0]
    flat = experts.reshape(n * k)
    if impl == "ragged":
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)

        def matmul(v, kernel, scale):
            y = jax.lax.ragged_dot(v, kernel, sizes, preferred_element_type=jnp.float32)
            return y if scale is None else y * scale[flat[order]].astype(jnp.float32)

        ys = _ffn(x[order // k], w1, w2, w3, flat[order], matmul, hidden_axes)
        ys = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)
    else:
        block = block_size or gmm_block_rows(n, k, n_experts)
        dest, block_expert, n_used = sort_into_blocks(experts, n_experts, block)
        xs = jnp.zeros((block_expert.shape[0] * block, d), x.dtype)
        xs = xs.at[dest].set(x[jnp.arange(n * k) // k], unique_indices=True)

        def matmul(v, kernel, scale):
            w = kernel if scale is None else (kernel, scale)
            return gmm_pallas(v, w, block_expert, n_used, block,
                              interpret=impl == "pallas-interpret")

        row_expert = jnp.repeat(block_expert, block)
        ys = _ffn(xs, w1, w2, w3, row_expert, matmul, hidden_axes)[dest]
    return mix_slots(ys.reshape(n, k, d), weights)


def moe_ragged(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
               hidden_axes: AxisNames = ()) -> jax.Array:
    """`moe_gmm` through `jax.lax.ragged_dot` (TPU's native grouped matmul)."""
    return moe_gmm(x, weights, experts, w1, w2, w3, impl="ragged", hidden_axes=hidden_axes)
