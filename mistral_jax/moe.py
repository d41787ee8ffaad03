"""Sparse mixture of experts (Mixtral): a bias-free gate, top-k experts per token,
their SwiGLU outputs mixed by a float32 softmax over the selected gate logits.

    weights, experts = route(gate_logits, k)            # [N, k] f32, [N, k] int32
    out = moe(x, weights, experts, w1, w2, w3)          # x [N, D] -> [N, D]

Expert weights are stacked per layer, w1/w3 [E, D, F] and w2 [E, F, D], so the
expert axis can be sharded. Interchangeable paths compute the same function:

- `moe_gather` (few tokens, decode): each (token, slot) reads its expert's weights
  with `lax.dynamic_index_in_dim` and runs one SwiGLU; N*k experts are read.
- `moe_tiled` (few tokens, decode on the CPU): the same reads in row blocks of a few
  MB inside a loop, so XLA's copy of each selected slice stays in cache.
- `moe_grouped` (many tokens, prefill): the N*k (token, expert) assignments are
  sorted by expert, each expert's group is padded to a multiple of a row block, and
  a `lax.scan` over the blocks runs each block through its one expert: about N*k
  rows of compute (plus padding) instead of N*E.
- `moe_dense`: every expert on every token, mixed by the routing weights. The
  readable reference, used in tests.
- `moe_pallas` (decode on GPUs, opt-in): the gather path as a Pallas (Triton) kernel
  (kernels.moe_decode_pallas) that reads each selected expert's weights in place by
  index, without XLA's copy of the slice; MISTRAL_JAX_MOE_KERNEL=pallas makes 'auto'
  use it wherever it would gather. Not yet run on a GPU, so off by default.

The choice is static, so every path is pure and jit-able: by N*k against E
(`moe_strategy`), then for decode-sized steps by MISTRAL_JAX_MOE_KERNEL, else by the
backend and the expert kernels' dtype (`default_decode_kernel`). `moe_ragged` (`jax.lax.ragged_dot`) is available on request (strategy
'ragged'): on TPU a native grouped matmul; on CPU JAX lowers it to a masked product
over all experts, and on an H100 it measured no faster than dense (GPU_NOTES.md).

Plain XLA copies each dynamically selected expert slice before its matmul, so the
gather path reads k/E of the expert weights but moves about 3x that many bytes
(benchmarks/moe_bytes.py); reading experts in place needs a kernel: `moe_pallas`. On
the 2-core CPU those whole-expert copies made the gather path slower than computing
every expert, and `moe_tiled`'s block copies run at a third of dense's time for a
Mixtral-8x7B layer in float32 (BENCHMARKS.md): decode steps there take it for float32
and int8 experts (`default_decode_kernel`).

Each stacked weight is a plain array or an
`ExpertWeight(kernel, scale, lora_a, lora_b, input_scale)`: an int8/fp8 kernel with its
per-output-channel scale [E, out] (quant.py) and/or an unmerged LoRA adapter's factors
[E, in, r] / [E, r, out] (lora.py). The sparse paths select experts first and then read
only the selected experts' quantized slices, scale rows and factors:
(x @ q) * scale + (x @ a) @ b, never the layer's dequantized experts. `moe_dense` and
`moe_ragged` materialize the dense weights (`dense_weight`).

A quantized expert weight may also quantize its input (compressed-tensors W8A8, e.g.
FP8-dynamic): `input_scale` f32 [E], 0 meaning per token, as for a dense Linear
(`quant.quantize_activations`). Every path quantizes each input row of an expert matmul
to the kernel's dtype with the scale max |row| / qmax before multiplying: x's rows for
w1/w3, each (token, expert) SwiGLU row h for w2. Per-row quantization commutes with
selecting rows, so the gather, tiled, grouped, dense and ragged paths compute the same
function; `moe_pallas` takes the gather path for such experts.

Ties between equal gate logits go to the lower expert index (`jax.lax.top_k` keeps
the first of equal values), so routing is deterministic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.args import ModelArgs
from mistral_jax.errors import UserInputError
from mistral_jax.layers import Dtype, Linear, scaled_normal
from mistral_jax.sharding import expert_parallel

STRATEGIES = ("auto", "gather", "tiled", "grouped", "dense", "ragged", "pallas",
              "pallas-interpret")
# How 'auto' decodes (where it would gather): 'xla' (`moe_gather`), 'tiled' (`moe_tiled`),
# 'pallas' or 'pallas-interpret' (`moe_pallas`). Unset: `default_decode_kernel`.
MOE_KERNEL_ENV = "MISTRAL_JAX_MOE_KERNEL"
MOE_KERNEL_CHOICES = ("xla", "tiled", "pallas", "pallas-interpret")
# Expert kernel dtypes `moe_tiled` was measured faster for on the CPU backend (float32:
# 6.9x the gather path, a third of dense; int8: 6.0x). XLA's CPU backend copied bfloat16
# and fp8 blocks element by element through float32, several times slower than the
# gather path's one copy of each expert (benchmarks/moe_bytes.py, BENCHMARKS.md).
TILED_CPU_DTYPES = ("float32", "int8")
# Rows of a block whose SwiGLU compute takes about as long as reading (and, in plain
# XLA, copying) one expert's weights: ~256 on GPUs/TPUs (compute / bandwidth balance),
# ~32 measured on a 2-core CPU (benchmarks/moe_bytes.py). The grouped path's block
# size minimises blocks x (weight read + block compute) under this balance.
BALANCE_ROWS = {"cpu": 32}
# Bytes of expert weights `moe_tiled` reads per loop step, over all its (token, slot)
# matmuls: small enough for XLA's copies of the slices to stay in cache (timed on the
# 2-core CPU, Mixtral-8x7B layer, benchmarks/moe_bytes.py).
TILED_BLOCK_BYTES = 8 << 20
DEFAULT_BALANCE_ROWS = 256
MIN_BLOCK, MAX_BLOCK = 16, 512


def route(gate_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """gate_logits [N, E] -> (weights [N, k] float32, experts [N, k] int32).

    Top-k of the logits in float32, ties to the lower expert index; the weights are
    a softmax over the k selected logits (= softmax over all, top-k, renormalised).
    """
    top, idx = jax.lax.top_k(gate_logits.astype(jnp.float32), k)
    return jax.nn.softmax(top, axis=-1), idx.astype(jnp.int32)


class ExpertWeight(NamedTuple):
    """One stacked expert weight with its optional siblings (a pytree; None = absent).

    kernel [E, in, out] (float, or int8/fp8 with `scale`), scale f32 [E, out],
    lora_a [E, in, r], lora_b [E, r, out] (scaling folded in), input_scale f32 [E]
    (quantized kernels only: activations quantized too; 0 = per token, > 0 = that static
    scale). Indexed by one expert (`_expert`) every field loses its leading E axis.
    """

    kernel: jax.Array
    scale: jax.Array | None = None
    lora_a: jax.Array | None = None
    lora_b: jax.Array | None = None
    input_scale: jax.Array | None = None


Weight = jax.Array | ExpertWeight
AxisNames = str | tuple[str, ...]


def _kernel(w: Weight) -> jax.Array:
    return w.kernel if isinstance(w, ExpertWeight) else w


def dense_weight(w: Weight, dtype) -> jax.Array:
    """A stacked weight as one plain array [E, in, out] in `dtype`: dequantized, plus the
    LoRA delta. Materializes every expert: for the reference paths only."""
    if not isinstance(w, ExpertWeight):
        return w.astype(dtype)
    from mistral_jax.lora import lora_delta
    from mistral_jax.quant import dequantize

    k = w.kernel
    if w.scale is not None:
        k = dequantize(k, w.scale, (1,), dtype)
    if w.lora_a is not None:
        k = (k.astype(jnp.float32) + lora_delta(w.lora_a, w.lora_b, n_lead=1)).astype(dtype)
    return k.astype(dtype)


def quantized_input(x: jax.Array, w: Weight, pick: Callable[[jax.Array], jax.Array],
                    axis_name: AxisNames = ()) -> jax.Array:
    """x [..., in] as the expert weight `w` sees it: each row quantized to the kernel's
    dtype and back (`quant.quantize_activations` over the last axis, then times its
    scale) when `w` carries an `input_scale`; else x itself. For the dense paths, which
    multiply by the dequantized weight. `pick(w.input_scale)` maps the [E] scales to one
    that broadcasts against x [..., 1]: [E, 1, 1] for x [E, N, in], [M, 1] per row.
    `axis_name`: mesh axes the `in` axis is split over (inside shard_map), so that a
    per-row scale takes the max over the whole row.
    """
    if not isinstance(w, ExpertWeight) or w.input_scale is None:
        return x
    from mistral_jax.quant import quantize_activations

    xq, s = quantize_activations(x, (x.ndim - 1,), w.kernel.dtype, pick(w.input_scale),
                                 axis_name)
    return (xq.astype(jnp.float32) * s).astype(x.dtype)


def expert_matmul(x: jax.Array, w: Weight, axis_name: AxisNames = ()) -> jax.Array:
    """x [M, in] @ one expert's weight [in, out] -> [M, out] in x's dtype.

    A quantized kernel is multiplied as stored (cast to x's dtype) and its output scaled
    per channel; with an `input_scale`, each row of x is quantized first (scale per row,
    `quant.qeinsum`). A LoRA adapter adds (x @ a) @ b on the unquantized x, as `Linear`
    does. Nothing [in, out]-sized is dequantized. `axis_name`: see `quantized_input`.
    """
    if not isinstance(w, ExpertWeight):
        return x @ w.astype(x.dtype)
    if w.scale is not None:
        from mistral_jax.quant import qeinsum

        y = qeinsum("mi,io->mo", x, w.kernel, w.scale, w.input_scale, axis_name=axis_name)
    else:
        y = x @ w.kernel.astype(x.dtype)
    if w.lora_a is not None:
        y = y + (x @ w.lora_a.astype(x.dtype)) @ w.lora_b.astype(x.dtype)
    return y


def expert_ffn(x: jax.Array, w1: Weight, w2: Weight, w3: Weight,
               hidden_axes: AxisNames = ()) -> jax.Array:
    """One expert's SwiGLU: x [M, D], w1/w3 [D, F], w2 [F, D] -> [M, D] in x's dtype.

    Each weight is a plain array or one expert's `ExpertWeight` (see `expert_matmul`).
    `hidden_axes`: mesh axes F is split over (see `moe`).
    """
    h = jax.nn.silu(expert_matmul(x, w1)) * expert_matmul(x, w3)
    return expert_matmul(h, w2, hidden_axes)


def _expert(w: Weight, e: jax.Array) -> Weight:
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
               hidden_axes: AxisNames = ()) -> jax.Array:
    """Decode path: each (token, slot) reads only its selected expert's weights (for an
    `ExpertWeight`: its quantized kernel slice, scale row and LoRA factors).

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    Unrolled over the N*k assignments, so meant for N*k <= E (see `moe_strategy`).
    """
    n, k = experts.shape
    ys = [expert_ffn(x[i:i + 1], _expert(w1, e), _expert(w2, e), _expert(w3, e), hidden_axes)
          for i in range(n) for e in (experts[i, j] for j in range(k))]
    return mix_slots(jnp.concatenate(ys, axis=0).reshape(n, k, -1), weights)


def _block_rows(n: int, target: int) -> int:
    """The largest divisor of n that is at most `target` (n itself when n <= target)."""
    return max(b for b in range(1, min(n, target) + 1) if n % b == 0)


def _tiled_matmuls(jobs: list[tuple[jax.Array, Weight, jax.Array, AxisNames]],
                   block_bytes: int) -> list[jax.Array]:
    """Each job (x [M, in], w stacked [E, in, out], e, axis_name) -> x @ w's expert e,
    [M, out] in x's dtype, as `expert_matmul(x, _expert(w, e), axis_name)` computes it,
    with every job's kernel read in row slices [block, out] of expert e by one
    `lax.fori_loop`, in float32 (the CPU's fast matmul). Each slice is contiguous in the
    stacked array, and a step's slices together about `block_bytes`, so XLA's copies of
    them stay in cache and each job reads its expert's weight once from memory. All jobs
    share `in`. Index arithmetic is int32 (also under jax_enable_x64).
    """
    from mistral_jax.quant import quantize_activations

    n_in = _kernel(jobs[0][1]).shape[1]
    row_bytes = sum(_kernel(w).shape[2] * _kernel(w).dtype.itemsize for _, w, _, _ in jobs)
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
            kernel = _kernel(w)
            origin = (jnp.asarray(e, jnp.int32), start, jnp.int32(0))
            blk = jax.lax.dynamic_slice(kernel, origin, (1, block, kernel.shape[2]))[0]
            xs = jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)
            out.append(acc + xs.astype(jnp.float32) @ blk.astype(jnp.float32))
        return tuple(out)

    zeros = tuple(jnp.zeros((x.shape[0], _kernel(w).shape[2]), jnp.float32)
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
                block_size: int | None = None, hidden_axes: AxisNames = ()) -> jax.Array:
    """Prefill path: assignments sorted by expert, run block by block through their expert.

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    Each block indexes its expert's slices inside the scan body (quantized kernel, scale
    row, LoRA factors for an `ExpertWeight`). Each expert's group of rows is padded to a multiple of `block_size`, so every block
    belongs to one expert; `lax.scan` runs cdiv(N*k, block) + E - 1 blocks, an upper
    bound on the blocks any routing needs (blocks past the last group hold zeros).
    """
    n, k = experts.shape
    d = x.shape[1]
    n_experts = _kernel(w1).shape[0]
    m = n * k
    block = block_size or grouped_block_size(n, k, n_experts)
    n_blocks = -(-m // block) + n_experts - 1
    flat = experts.reshape(m)
    order = jnp.argsort(flat, stable=True)  # assignment ids grouped by expert
    sizes = jnp.bincount(flat, length=n_experts)  # [E] rows per expert
    padded = -(-sizes // block) * block
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(sizes) - sizes
    sorted_expert = flat[order]
    rank = jnp.arange(m) - start[sorted_expert]  # position inside its expert's group
    dest_sorted = padded_end[sorted_expert] - padded[sorted_expert] + rank
    dest = jnp.zeros(m, jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))  # [N*k]
    token = jnp.arange(m) // k
    xs = jnp.zeros((n_blocks * block, d), x.dtype).at[dest].set(x[token], unique_indices=True)
    block_expert = jnp.searchsorted(padded_end, jnp.arange(n_blocks) * block, side="right")
    block_expert = jnp.minimum(block_expert, n_experts - 1).astype(jnp.int32)

    def run_block(carry, blk):
        xb, e = blk
        return carry, expert_ffn(xb, _expert(w1, e), _expert(w2, e), _expert(w3, e),
                                 hidden_axes)

    _, ys = jax.lax.scan(run_block, None, (xs.reshape(n_blocks, block, d), block_expert))
    return mix_slots(ys.reshape(n_blocks * block, d)[dest].reshape(n, k, d), weights)


def moe_ragged(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
               hidden_axes: AxisNames = ()) -> jax.Array:
    """Grouped path through `jax.lax.ragged_dot` (native grouped matmul on TPU).

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    """
    n, k = experts.shape
    ws = (w1, w2, w3)
    w1, w2, w3 = (dense_weight(w, x.dtype) for w in ws)
    n_experts = w1.shape[0]
    flat = experts.reshape(n * k)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    xs = x[order // k]
    row_expert = flat[order]  # [N*k] the expert of each sorted row

    def rows(v, w, axes=()):  # quantized activations (per row, its expert's scale), if any
        return quantized_input(v, w, lambda s: s[row_expert][:, None], axes)

    hidden = (jax.nn.silu(jax.lax.ragged_dot(rows(xs, ws[0]), w1, sizes))
              * jax.lax.ragged_dot(rows(xs, ws[2]), w3, sizes))
    ys = jax.lax.ragged_dot(rows(hidden, ws[1], hidden_axes), w2, sizes)
    return mix_slots(jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(n, k, -1),
                     weights)


def moe_pallas(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
               interpret: bool = False, hidden_axes: AxisNames = ()) -> jax.Array:
    """Decode path as one Pallas kernel pair (`kernels.moe_decode_pallas`): reads each
    selected expert's weights (or int8/fp8 kernel slice and scale row) in place.

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D]. Experts
    with an unmerged LoRA adapter or quantized activations (`input_scale`) take
    `moe_gather` instead (the kernel has neither a LoRA term nor activation quantization).
    `interpret` runs the kernels in the Pallas interpreter (any backend).
    """
    from mistral_jax.kernels import moe_decode_pallas

    ws = (w1, w2, w3)
    if any(isinstance(w, ExpertWeight) and (w.lora_a is not None or w.input_scale is not None)
           for w in ws):
        return moe_gather(x, weights, experts, w1, w2, w3, hidden_axes=hidden_axes)
    ws = tuple((w.kernel, w.scale) if isinstance(w, ExpertWeight) else w for w in ws)
    return moe_decode_pallas(x, weights, experts, *ws, interpret=interpret)


def moe_strategy(n_tokens: int, k: int, n_experts: int) -> str:
    """The static path for N tokens: 'gather' while N*k <= E, else 'grouped'.

    The gather path reads N*k experts' weights; the grouped path reads at least the
    E-ish experts its blocks cover, so gathering wins while N*k <= E.
    """
    return "gather" if n_tokens * k <= n_experts else "grouped"


def default_decode_kernel(w1, w2, w3) -> str:
    """MISTRAL_JAX_MOE_KERNEL's value when unset: 'tiled' on the CPU backend where every
    expert kernel's dtype is in TILED_CPU_DTYPES, else 'xla' (the gather path)."""
    dtypes = {jnp.dtype(_kernel(w).dtype).name for w in (w1, w2, w3)}
    cpu = jax.default_backend() == "cpu"
    return "tiled" if cpu and dtypes <= set(TILED_CPU_DTYPES) else "xla"


def moe(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
        strategy: str = "auto", hidden_axes: AxisNames = ()) -> jax.Array:
    """Mix the selected experts' SwiGLU outputs. x [N, D], weights/experts [N, k] -> [N, D].

    w1/w3 [E, D, F], w2 [E, F, D]: plain arrays or `ExpertWeight`s (quantized / LoRA).

    `strategy` is one of STRATEGIES; 'auto' picks by `moe_strategy` (static in N), and
    where that is 'gather', MISTRAL_JAX_MOE_KERNEL (`MOE_KERNEL_CHOICES`, read at trace
    time) picks the decode path: `moe_gather` ('xla'), `moe_tiled` ('tiled') or
    `moe_pallas`; unset, `default_decode_kernel` picks.

    `hidden_axes`: mesh axes that split F inside a shard_map (`sharding.expert_parallel`
    with tensor > 1), so that the per-row activation scale of w2's input (`input_scale`)
    is the max over the whole row, as without the split; () elsewhere.
    """
    from mistral_jax.kernels import env_choice

    if strategy not in STRATEGIES:
        raise UserInputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        strategy = moe_strategy(x.shape[0], experts.shape[1], _kernel(w1).shape[0])
        if strategy == "gather":
            kernel = env_choice(MOE_KERNEL_ENV, MOE_KERNEL_CHOICES,
                                default_decode_kernel(w1, w2, w3))
            strategy = strategy if kernel == "xla" else kernel
    fn = {"gather": moe_gather, "tiled": moe_tiled, "grouped": moe_grouped, "dense": moe_dense,
          "ragged": moe_ragged, "pallas": moe_pallas,
          "pallas-interpret": functools.partial(moe_pallas, interpret=True)}[strategy]
    return fn(x, weights, experts, w1, w2, w3, hidden_axes=hidden_axes)


class MoeFeedForward(nn.Module):
    """Mixtral's sparse feed-forward: gate [D, E], experts w1/w3 [E, D, F], w2 [E, F, D]."""

    args: ModelArgs
    dtype: Dtype = jnp.float32
    strategy: str = "auto"  # see `moe`; tests pin 'dense' as the reference

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
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
        w1, w2, w3 = (self._expert_weight(n, w) for n, w in (("w1", w1), ("w2", w2),
                                                              ("w3", w3)))
        # Split over the mesh's expert axis when there is one (sharding.py), else plain `moe`.
        out = expert_parallel(functools.partial(moe, strategy=self.strategy), flat, weights,
                              experts, w1, w2, w3)
        return out.reshape(b, t, d)

    def _expert_weight(self, name: str, w: jax.Array) -> Weight:
        """The stacked weight `name` [E, in, out] as stored: a plain array, or an
        `ExpertWeight` with its `<name>_scale` [E, out] and `<name>_input_scale` [E]
        (int8/fp8, quant.py) and/or unmerged `<name>_lora_a` / `<name>_lora_b` (lora.py)
        leaves, for the paths to select from."""
        scale = self.get_variable("params", f"{name}_scale")
        input_scale = self.get_variable("params", f"{name}_input_scale")
        lora_a = self.get_variable("params", f"{name}_lora_a")
        lora_b = self.get_variable("params", f"{name}_lora_b")
        if input_scale is not None and scale is None:
            where = "/".join((*self.scope.path, f"{name}_input_scale"))
            raise UserInputError(f"params {where}: activation scales need a quantized "
                                 f"{name} (with {name}_scale)")
        if scale is None and lora_a is None:
            return w
        return ExpertWeight(w, scale, lora_a, lora_b, input_scale)
