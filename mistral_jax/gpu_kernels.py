"""Pallas GPU kernels (Triton) for the decode step's memory-bound matmuls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Triton: 4 warps, 2 pipeline stages for the in-kernel loops over the reduced dim.
NUM_WARPS, NUM_STAGES = 4, 2


MIN_PROGRAMS = 256  # aim for about two programs per SM on an H100 (132 SMs)


def _pallas_call(kernel, *, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES, **kwargs):
    """`pl.pallas_call` lowered through Triton on GPUs (see the module docstring)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.triton as pltriton

    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(kernel, compiler_params=params, **kwargs)


def _block(size: int, largest: int) -> int:
    """The largest power of two <= `largest` that divides `size` (Triton loads need powers
    of two)."""
    b = largest
    while size % b:
        b //= 2
    return b


def _split(blocks: int, programs: int) -> int:
    """How many ways to split a reduction of `blocks` blocks so that `programs` * split
    reaches MIN_PROGRAMS (a power of two dividing `blocks`, at most 16)."""
    split = 1
    while programs * split < MIN_PROGRAMS and blocks % (2 * split) == 0 and split < 16:
        split *= 2
    return split


# qmatmul tiles (kernel dtype of 1 byte): [QMATMUL_BLOCK_K, QMATMUL_BLOCK_N] = 8 K elements, so
# that a 4-warp program holds the tile converted to bf16 in 64 registers a thread; 128
# columns = one 128-byte line per weight row; 4 stages keep ~32 KB of it in flight.
QMATMUL_BLOCK_N, QMATMUL_BLOCK_K, QMATMUL_STAGES = 128, 64, 4


# Split-K partial sums (float32 [split, 16, N], written then summed by XLA) stay within
# this share of the weight bytes.
PARTIAL_SHARE = 1 / 8


def qmatmul_blocks(m: int, k: int, n: int, itemsize: int = 1) -> tuple[int, int, int]:
    """(block_n, block_k, split_k) of `qmatmul_pallas` for x [m, k] @ q [k, n] of
    `itemsize`-byte elements: the tiles above (halved until they divide), then split K
    into powers of two until about MIN_PROGRAMS programs run (<= 16 ways), so long as the
    partial sums stay within PARTIAL_SHARE of the weight bytes."""
    block_n, block_k = _block(n, QMATMUL_BLOCK_N), _block(k, QMATMUL_BLOCK_K)
    rows = _rows(m)
    split = 1
    while (n // block_n * split < MIN_PROGRAMS and (k // block_k) % (2 * split) == 0
           and split < 16 and 2 * split * rows * n * 4 <= PARTIAL_SHARE * k * n * itemsize):
        split *= 2
    return block_n, block_k, split


def _rows(m: int) -> int:
    """Rows x is padded to: a multiple of 16, the smallest dot Triton emits."""
    return max(16, -(-m // 16) * 16)


def _qmatmul_kernel(x_ref, q_ref, s_ref, o_ref, *, block_k: int, steps: int):
    import jax.experimental.pallas as pl

    rows, block_n = o_ref.shape[1], o_ref.shape[2]
    base = pl.program_id(1) * steps * block_k

    def body(i, acc):
        k = pl.ds(base + i * block_k, block_k)
        x = x_ref[:, k]
        return acc + jnp.dot(x, q_ref[k, :].astype(x.dtype), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, block_n), jnp.float32))
    o_ref[0] = (acc * s_ref[...].astype(jnp.float32)[None, :]).astype(o_ref.dtype)


def qmatmul_pallas(x: jax.Array, q: jax.Array, scale: jax.Array, *, block_n: int | None = None,
                   block_k: int | None = None, split_k: int | None = None,
                   interpret: bool = False) -> jax.Array:
    """(x @ q.astype(x.dtype)) * scale in one pass over q: the weight-only int8/fp8 matmul
    of a decode step (few rows). x [M, K], q int8/fp8 [K, N], scale [N] -> [M, N] in x.dtype.

    Grid (N / block_n, split_k): each program reads a [K / split_k, block_n] slab of q once
    in [block_k, block_n] tiles, converts each in registers, multiplies by x's rows (padded
    to 16) on the tensor cores in float32; the scale is applied once per output channel.
    With split_k > 1 the float32 partial sums are added by XLA afterwards; with 1 the kernel
    writes x.dtype itself. Defaults: `qmatmul_blocks`.

    Why the first version ran at 0.57x bf16 on an H200 (7.94 ms/step for 7B int8 against
    a 1.76 ms read floor), from its shapes: its [256, 32] tiles put 32 bytes of a weight row
    in each program, and the x rows it multiplies them by ([16, 256] bf16, 8 KB) were as many
    bytes as the weight tile (8 KB): each program loaded twice what it had to, half from L2;
    2 stages of 8 KB left ~16 KB in flight per program at ~2 programs per SM (256 programs),
    too little to cover HBM latency; and its split-K always wrote float32 partials. Now a
    [64, 128] tile (8 KB int8) comes with a 2 KB x tile (25%), 4 stages put ~32 KB in
    flight, and partials are capped at 1/8 of the weight bytes (none for the output head).

    Expected at 7B shapes (B=1, int8): w1/w3 [4096, 14336] 58.7 MB each, 14.2 us at 4.14
    TB/s (112 column blocks x split 4 = 448 programs); wq/wo [4096, 4096] 16.8 MB, 4.1 us
    (32 x 8); wk/wv [4096, 1024] 4.2 MB, 1.0 us, launch-bound; a layer 218 MB = 53 us, the
    step's 7.3 GB = 1.76 ms, plus per matmul the pad of x and (split > 1) the partials'
    sum, ~2 small XLA kernels each: 2.3-3 ms expected (1.5-1.9x bf16's 4.49 ms). Untimed:
    benchmarks/gpu_suite.py's int8 and fp8 steps take it.
    """
    import jax.experimental.pallas as pl

    m, k = x.shape
    n = q.shape[1]
    auto_n, auto_k, auto_split = qmatmul_blocks(m, k, n, jnp.dtype(q.dtype).itemsize)
    block_n, block_k = block_n or auto_n, block_k or auto_k
    if split_k is None:
        split_k = auto_split if (block_n, block_k) == (auto_n, auto_k) else \
            _split(k // block_k, n // block_n)
    if n % block_n or k % (block_k * split_k):
        raise ValueError(f"qmatmul_pallas: K={k}, N={n} do not divide into blocks "
                         f"{block_k}x{split_k}, {block_n}")
    rows = _rows(m)
    xp = jnp.pad(x, ((0, rows - m), (0, 0)))
    out_dtype = x.dtype if split_k == 1 else jnp.float32
    out = _pallas_call(
        functools.partial(_qmatmul_kernel, block_k=block_k, steps=k // (block_k * split_k)),
        num_stages=QMATMUL_STAGES,
        grid=(n // block_n, split_k),
        in_specs=[pl.BlockSpec((rows, k), lambda j, s: (0, 0)),
                  pl.BlockSpec((k, block_n), lambda j, s: (0, j)),
                  pl.BlockSpec((block_n,), lambda j, s: (j,))],
        out_specs=pl.BlockSpec((1, rows, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((split_k, rows, n), out_dtype),
        interpret=interpret,
    )(xp, q, scale)
    return (out[0] if split_k == 1 else out.sum(0))[:m].astype(x.dtype)


def _matvec_step(v: jax.Array, w: jax.Array) -> jax.Array:
    """v [b_in] (float32) @ w [b_in, b_out] -> [b_out] float32, as multiply + reduce: one
    row of activations needs no tensor-core dot (and Triton's dot needs >= 16 rows)."""
    return jnp.sum(v[:, None] * w.astype(jnp.float32), axis=0)


def _moe_up_kernel(idx_ref, x_ref, w1_ref, w3_ref, *rest, block_d: int, steps: int,
                   scaled: bool):
    """Program (a, j): h[a, F-block j] = silu(x[a] @ w1[e]) * (x[a] @ w3[e]), e = idx[a]."""
    import jax.experimental.pallas as pl

    s1_ref, s3_ref, h_ref = rest if scaled else (None, None, *rest)
    a, j = pl.program_id(0), pl.program_id(1)
    e = idx_ref[a]
    block_f = h_ref.shape[-1]
    f = pl.ds(j * block_f, block_f)

    def body(i, acc):
        d = pl.ds(i * block_d, block_d)
        v = x_ref[a, d].astype(jnp.float32)
        return acc[0] + _matvec_step(v, w1_ref[e, d, f]), acc[1] + _matvec_step(v, w3_ref[e, d, f])

    zero = jnp.zeros((block_f,), jnp.float32)
    g, u = jax.lax.fori_loop(0, steps, body, (zero, zero))
    if scaled:
        g = g * s1_ref[e, f].astype(jnp.float32)
        u = u * s3_ref[e, f].astype(jnp.float32)
    h_ref[0, :] = (jax.nn.silu(g) * u).astype(h_ref.dtype)


def _moe_down_kernel(idx_ref, h_ref, w2_ref, *rest, block_f: int, steps: int, scaled: bool):
    """Program (a, j, s): y[s, a, D-block j] = h[a, F-part s] @ w2[e][F-part s, D-block j]."""
    import jax.experimental.pallas as pl

    s2_ref, y_ref = rest if scaled else (None, *rest)
    a, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = idx_ref[a]
    block_d = y_ref.shape[-1]
    d = pl.ds(j * block_d, block_d)
    base = s * steps * block_f

    def body(i, acc):
        f = pl.ds(base + i * block_f, block_f)
        return acc + _matvec_step(h_ref[a, f].astype(jnp.float32), w2_ref[e, f, d])

    y = jax.lax.fori_loop(0, steps, body, jnp.zeros((block_d,), jnp.float32))
    if scaled:
        y = y * s2_ref[e, d].astype(jnp.float32)
    y_ref[0, 0, :] = y


def moe_decode_pallas(x: jax.Array, experts: jax.Array, w1, w2, w3, *,
                      block_f: int | None = None, block_d: int | None = None,
                      block_out: int | None = None, block_in: int | None = None,
                      interpret: bool = False) -> jax.Array:
    """One MoE layer for few tokens, reading only the selected experts' weights, in place.

    x [N, D], experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, k, D] in x.dtype: each
    (token, slot)'s expert output, for the caller to mix (`moe_experts.mix_slots`).
    Each w may also be a pair (kernel int8/fp8, scale f32 [E, out]): the kernel tile is
    converted in registers and the output scaled per channel. Two kernels: the gate/up
    products and SwiGLU for each assignment's F-blocks (h [A, F] in x.dtype, as the XLA
    path rounds it), then the down product split over F (partial sums added here).
    Accumulates in float32. Blocks
    (powers of two dividing their dim; None: the defaults below): gate/up reads
    [block_d, block_f] tiles, down reads [block_in, block_out] tiles.
    """
    import jax.experimental.pallas as pl

    def parts(w):
        return (w[0], w[1]) if isinstance(w, tuple) else (w, None)

    (k1, s1), (k2, s2), (k3, s3) = parts(w1), parts(w2), parts(w3)
    scaled = s1 is not None
    if (s2 is not None) != scaled or (s3 is not None) != scaled:
        raise ValueError("moe_decode_pallas: w1, w2 and w3 must all be quantized or none")
    n, k = experts.shape
    _, d, f = k1.shape
    a = n * k
    idx = experts.reshape(a).astype(jnp.int32)
    xa = jnp.repeat(x, k, axis=0)  # [A, D]: the token row of each assignment
    whole = pl.no_block_spec  # the kernels index the whole arrays themselves

    block_f = block_f or _block(f, 64)
    block_d = block_d or _block(d, 64)
    block_out = block_out or _block(d, 128)
    block_in = block_in or _block(f, 64)
    for name, b, size in (("block_f", block_f, f), ("block_d", block_d, d),
                          ("block_out", block_out, d), ("block_in", block_in, f)):
        if size % b or b & (b - 1):
            raise ValueError(f"moe_decode_pallas: {name}={b} must be a power of two dividing {size}")

    # Gate/up: A x F/block_f programs, each reading [D, block_f] of w1[e] and of w3[e].
    up_in = [idx, xa, k1, k3] + ([s1, s3] if scaled else [])
    h = _pallas_call(
        functools.partial(_moe_up_kernel, block_d=block_d, steps=d // block_d, scaled=scaled),
        grid=(a, f // block_f),
        in_specs=[whole] * len(up_in),
        out_specs=pl.BlockSpec((1, block_f), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((a, f), x.dtype),
        interpret=interpret,
    )(*up_in)

    # Down: A x D/block_out x split programs, each reading [F / split, block_out] of w2[e].
    split = _split(f // block_in, a * (d // block_out))
    down_in = [idx, h, k2] + ([s2] if scaled else [])
    y = _pallas_call(
        functools.partial(_moe_down_kernel, block_f=block_in, steps=f // (block_in * split),
                          scaled=scaled),
        grid=(a, d // block_out, split),
        in_specs=[whole] * len(down_in),
        out_specs=pl.BlockSpec((1, 1, block_out), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((split, a, d), jnp.float32),
        interpret=interpret,
    )(*down_in)

    return y.sum(0).astype(x.dtype).reshape(n, k, d)


# Grouped matmul tiles: [GMM_BLOCK_N] output columns, [GMM_BLOCK_K] of the reduction a step.
# Rows per tile are the caller's group block (at most 128). 8 warps, 3 stages: Triton's own
# matmul tutorial configuration for 128 x 128 x 64 bf16 tiles (96 KB of shared memory).
GMM_BLOCK_N, GMM_BLOCK_K = 128, 64
GMM_WARPS, GMM_STAGES = 8, 3


def _gmm_kernel(meta_ref, x_ref, w_ref, *rest, block_k: int, steps: int, scaled: bool):
    """Program (j, i): out[row block i, column block j] = x[block i] @ w[e_i][:, block j]."""
    import jax.experimental.pallas as pl

    s_ref, o_ref = rest if scaled else (None, *rest)
    j, i = pl.program_id(0), pl.program_id(1)
    block_m, block_n = o_ref.shape

    @pl.when(i < meta_ref[0])  # blocks past the last group: nothing to compute
    def _():
        e = meta_ref[1 + i]
        rows, cols = pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)

        def body(t, acc):
            kk = pl.ds(t * block_k, block_k)
            x = x_ref[rows, kk]
            w = w_ref[e, kk, cols].astype(x.dtype)
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
        if scaled:
            acc = acc * s_ref[e, cols].astype(jnp.float32)[None, :]
        o_ref[...] = acc.astype(o_ref.dtype)


def gmm_pallas(x: jax.Array, w, block_expert: jax.Array, n_used: jax.Array, block_m: int, *,
               block_n: int | None = None, block_k: int | None = None,
               interpret: bool = False) -> jax.Array:
    """Grouped matmul over row blocks: x [B * block_m, K] (rows sorted and padded so that each
    block of `block_m` rows belongs to one expert), w [E, K, N] or a pair (kernel int8/fp8
    [E, K, N], scale f32 [E, N]), block_expert int32 [B], n_used int32 scalar (blocks past it
    are padding: skipped, their rows left unwritten) -> [B * block_m, N] in x.dtype.

    Grid (N / block_n, B), row blocks fastest: the programs in flight at once share one
    column tile [K, block_n] of each expert's weight, so that an expert's weights come from
    HBM about once per call and its other row blocks read them from L2. A quantized kernel
    tile is converted in registers and the output scaled per channel; float32 accumulation.

    Expected cost, Mixtral-8x7B w1 (K=4096, N=14336, E=8) for a B=1 P=2048 prefill (4096
    assignments, 128-row blocks: 32 used): 2 * 4096 * 4096 * 14336 = 0.48 TFLOP, 0.73 ms at
    the H200's ~660 TFLOP/s measured bf16 matmul; weights 0.94 GB bf16 (0.47 GB int8), 0.23 ms
    at 4.14 TB/s: compute-bound, so the time is what Triton's tiles reach of the peak
    (untimed: benchmarks/gpu_suite.py). At 16 assignments per expert (B=8 decode), 8 blocks
    of 16 rows read each expert once: 0.94 GB, ~0.23 ms, bandwidth-bound.
    """
    import jax.experimental.pallas as pl

    kernel, scale = w if isinstance(w, tuple) else (w, None)
    m, k = x.shape
    n = kernel.shape[2]
    blocks = block_expert.shape[0]
    if m != blocks * block_m:
        raise ValueError(f"gmm_pallas: x has {m} rows, not {blocks} blocks of {block_m}")
    block_n = block_n or _block(n, GMM_BLOCK_N)
    block_k = block_k or _block(k, GMM_BLOCK_K)
    meta = jnp.concatenate([jnp.reshape(n_used, (1,)), block_expert]).astype(jnp.int32)
    ins = [meta, x, kernel] + ([scale] if scale is not None else [])
    return _pallas_call(
        functools.partial(_gmm_kernel, block_k=block_k, steps=k // block_k,
                          scaled=scale is not None),
        grid=(n // block_n, blocks),
        num_warps=GMM_WARPS, num_stages=GMM_STAGES,
        in_specs=[pl.no_block_spec] * len(ins),
        out_specs=pl.BlockSpec((block_m, block_n), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        interpret=interpret,
    )(*ins)
