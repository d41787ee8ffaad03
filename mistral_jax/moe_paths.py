"""The other MoE execution paths: tiled (CPU decode), grouped (portable prefill), Pallas (GPU decode).

The grouped-matmul paths (ragged_dot, the Pallas grouped matmul) are in moe_gmm.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mistral_jax.gpu_kernels import moe_decode_pallas
from mistral_jax.moe_experts import (
    AxisNames,
    ExpertWeight,
    Weight,
    expert_ffn,
    expert_slice,
    kernel_of,
    mix_slots,
    moe_gather,
)
from mistral_jax.moe_gmm import sort_into_blocks
from mistral_jax.quantize import quantize_activations

# Expert kernel dtypes `moe_tiled` is faster for than the gather path on the CPU backend
# (BENCHMARKS.md, "Mixtral: bytes a MoE layer reads per decode step").
TILED_CPU_DTYPES = ("float32", "int8")


# Rows of a block whose SwiGLU compute takes about as long as reading one expert's
# weights (~256 on GPUs/TPUs, ~32 on a 2-core CPU: benchmarks/moe_bytes.py); the grouped
# path's block size minimises blocks x (weight read + block compute) under it.
BALANCE_ROWS = {"cpu": 32}


# Bytes of expert weights `moe_tiled` reads per loop step: small enough for XLA's copies
# of the slices to stay in cache (benchmarks/moe_bytes.py).
TILED_BLOCK_BYTES = 8 << 20


DEFAULT_BALANCE_ROWS = 256


MIN_BLOCK, MAX_BLOCK = 16, 512


def _block_rows(n: int, target: int) -> int:
    """The largest divisor of n that is at most `target` (n itself when n <= target)."""
    return max(b for b in range(1, min(n, target) + 1) if n % b == 0)


def _tiled_matmuls(jobs: list[tuple[jax.Array, Weight, jax.Array, AxisNames]],
                   block_bytes: int) -> list[jax.Array]:
    """Each job (x [M, in], w stacked [E, in, out], e, axis_name) -> x @ w's expert e,
    [M, out] in x's dtype, as `expert_matmul(x, expert_slice(w, e), axis_name)` computes it,
    with every job's kernel read in row slices [block, out] of expert e by one
    `lax.fori_loop`, in float32 (the CPU's fast matmul). Each slice is contiguous in the
    stacked array, and a step's slices together about `block_bytes`, so XLA's copies of
    them stay in cache and each job reads its expert's weight once from memory. All jobs
    share `in`. Index arithmetic is int32 (also under jax_enable_x64).
    """
    n_in = kernel_of(jobs[0][1]).shape[1]
    row_bytes = sum(kernel_of(w).shape[2] * kernel_of(w).dtype.itemsize for _, w, _, _ in jobs)
    block = _block_rows(n_in, max(1, block_bytes // row_bytes))
    inputs, row_scales = [], []  # what each job multiplies, and its per-row scale (W8A8)
    for x, w, e, axes in jobs:
        if isinstance(w, ExpertWeight) and w.input_scale is not None:
            x, s = quantize_activations(x, (1,), w.kernel.dtype, w.input_scale[e], axes)
            row_scales.append(s)
        else:
            row_scales.append(None)
        inputs.append(x)

    def body(b, accs):
        start = jnp.asarray(b, jnp.int32) * block
        out = []
        for acc, x, (_, w, e, _) in zip(accs, inputs, jobs):
            kernel = kernel_of(w)
            origin = (jnp.asarray(e, jnp.int32), start, jnp.int32(0))
            blk = jax.lax.dynamic_slice(kernel, origin, (1, block, kernel.shape[2]))[0]
            xs = jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)
            out.append(acc + xs.astype(jnp.float32) @ blk.astype(jnp.float32))
        return tuple(out)

    zeros = tuple(jnp.zeros((x.shape[0], kernel_of(w).shape[2]), jnp.float32)
                  for x, w, _, _ in jobs)
    steps = n_in // block
    accs = body(0, zeros) if steps == 1 else jax.lax.fori_loop(0, steps, body, zeros)
    ys = []
    for y, s, (x, w, e, _) in zip(accs, row_scales, jobs):
        if s is not None:
            y = y * s
        if isinstance(w, ExpertWeight) and w.scale is not None:
            y = y * w.scale[e].astype(jnp.float32)
        y = y.astype(x.dtype)
        if isinstance(w, ExpertWeight) and w.lora_a is not None:
            y = y + (x @ w.lora_a[e].astype(x.dtype)) @ w.lora_b[e].astype(x.dtype)
        ys.append(y)
    return ys


def moe_tiled(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
              hidden_axes: AxisNames = (), block_bytes: int = TILED_BLOCK_BYTES) -> jax.Array:
    """Decode path of the CPU: `moe_gather`'s function, each selected expert's weights read
    in row blocks (`_tiled_matmuls`): one loop over D for every (token, slot)'s w1 and w3,
    one over F for w2. XLA copies each dynamically selected slice before a matmul; the
    gather path's whole-expert copies ran at a fraction of the CPU's bandwidth (slower
    than computing every expert), block-sized copies do not (benchmarks/moe_bytes.py).

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    Unrolled over the N*k assignments inside each loop, so meant for N*k <= E.
    """
    n, k = experts.shape
    picks = [(i, experts[i, j]) for i in range(n) for j in range(k)]
    h = _tiled_matmuls([(x[i:i + 1], w, e, ()) for i, e in picks for w in (w1, w3)],
                       block_bytes)
    hidden = [jax.nn.silu(h[2 * a]) * h[2 * a + 1] for a in range(len(picks))]
    ys = _tiled_matmuls([(hs, w2, e, hidden_axes) for hs, (_, e) in zip(hidden, picks)],
                        block_bytes)
    return mix_slots(jnp.concatenate(ys, axis=0).reshape(n, k, -1), weights)


def grouped_block_size(n_tokens: int, k: int, n_experts: int,
                       balance_rows: int | None = None) -> int:
    """Rows per block of `moe_grouped`: a power of two in [MIN_BLOCK, MAX_BLOCK].

    The scan runs cdiv(N*k, b) + E - 1 blocks (enough for any routing), each reading
    one expert's weights and computing b rows; b = sqrt(N*k * balance_rows / E)
    minimises that total. `balance_rows` defaults to the default backend's entry of
    BALANCE_ROWS.
    """
    if balance_rows is None:
        balance_rows = BALANCE_ROWS.get(jax.default_backend(), DEFAULT_BALANCE_ROWS)
    best = math.sqrt(n_tokens * k * balance_rows / n_experts)
    block = 1 << max(0, round(math.log2(max(best, 1.0))))
    return int(min(MAX_BLOCK, max(MIN_BLOCK, block)))


def moe_grouped(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
                block_size: int | None = None, hidden_axes: AxisNames = (),
                qmatmul: str = "auto") -> jax.Array:
    """Prefill path: assignments sorted by expert, run block by block through their expert.

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    Each block indexes its expert's slices inside the scan body (quantized kernel, scale
    row, LoRA factors for an `ExpertWeight`). Each expert's group of rows is padded to a
    multiple of `block_size` (`moe_gmm.sort_into_blocks`), so every block belongs to one
    expert; `lax.scan` runs cdiv(N*k, block) + E - 1 blocks, an upper bound on the blocks
    any routing needs (blocks past the last group hold zeros).
    """
    n, k = experts.shape
    d = x.shape[1]
    n_experts = kernel_of(w1).shape[0]
    block = block_size or grouped_block_size(n, k, n_experts)
    dest, block_expert, _ = sort_into_blocks(experts, n_experts, block)
    n_blocks = block_expert.shape[0]
    xs = jnp.zeros((n_blocks * block, d), x.dtype)
    xs = xs.at[dest].set(x[jnp.arange(n * k) // k], unique_indices=True)

    def run_block(carry, blk):
        xb, e = blk
        return carry, expert_ffn(xb, expert_slice(w1, e), expert_slice(w2, e),
                                 expert_slice(w3, e), hidden_axes, qmatmul)

    _, ys = jax.lax.scan(run_block, None, (xs.reshape(n_blocks, block, d), block_expert))
    return mix_slots(ys.reshape(n_blocks * block, d)[dest].reshape(n, k, d), weights)


def moe_pallas(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
               interpret: bool = False, hidden_axes: AxisNames = ()) -> jax.Array:
    """Decode path as one Pallas kernel pair (`gpu_kernels.moe_decode_pallas`): reads each
    selected expert's weights (or int8/fp8 kernel slice and scale row) in place.

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D]. Experts
    with an unmerged LoRA adapter or quantized activations (`input_scale`) take
    `moe_gather` instead (the kernel has neither a LoRA term nor activation quantization).
    `interpret` runs the kernels in the Pallas interpreter (any backend).
    """
    ws = (w1, w2, w3)
    if any(isinstance(w, ExpertWeight) and (w.lora_a is not None or w.input_scale is not None)
           for w in ws):
        return moe_gather(x, weights, experts, w1, w2, w3, hidden_axes=hidden_axes)
    ws = tuple((w.kernel, w.scale) if isinstance(w, ExpertWeight) else w for w in ws)
    return mix_slots(moe_decode_pallas(x, experts, *ws, interpret=interpret), weights)
