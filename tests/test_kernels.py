"""Pallas (Triton) GPU kernels, checked without a GPU: each computes what the XLA path
computes when run by the Pallas interpreter, and each lowers for CUDA to a Triton kernel
(what the Triton lowering checks: power-of-two loads, supported ops), not Mosaic GPU,
which a plain `pl.pallas_call` now defaults to and which rejected the quantized matmul's
blocks for the H100's shared memory. Speed is for the GPU benchmark (BENCHMARKS.md)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err, tiny_moe_args
from jax import export

from mistral_jax.args import MoeArgs
from mistral_jax.cache import init_cache
from mistral_jax.errors import UserInputError
from mistral_jax.gpu_kernels import (
    PARTIAL_SHARE,
    gmm_pallas,
    moe_decode_pallas,
    qmatmul_blocks,
    qmatmul_pallas,
)
from mistral_jax.kernels import Kernels, kernels_from_env
from mistral_jax.model import causal_positions, forward, init_params
from mistral_jax.moe import moe, route
from mistral_jax.moe_experts import ExpertWeight, mix_slots, moe_gather
from mistral_jax.moe_gmm import moe_gmm, sort_into_blocks
from mistral_jax.moe_paths import moe_grouped, moe_pallas
from mistral_jax.quantize import qeinsum, quantize_array, quantize_params, resolve_mode

TRITON = "__gpu$xla.gpu.triton"
S = jax.ShapeDtypeStruct


def _layer(n, e, d=64, f=96, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)), dtype)
    logits = jnp.asarray(rng.standard_normal((n, e)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), dtype) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), dtype)
    return x, logits, w1, w2, w3


def _quantized(kind, *ws):
    out = []
    for w in ws:
        q, scale = quantize_array(w, resolve_mode(kind), (1,))
        out.append(ExpertWeight(q, scale))
    return out


@pytest.mark.parametrize("n,e,k,d,f", [
    (1, 8, 2, 64, 96),     # one decode token; F not a multiple of the default block
    (4, 8, 2, 64, 128),    # N*k == E
    (2, 4, 1, 48, 160),    # top-1; D and F of odd powers of two
    (3, 8, 2, 256, 896),   # split of the down product's reduction
])
@pytest.mark.parametrize("kind", ["float32", "int8", "fp8"])
def test_moe_decode_kernel_equals_the_gather_path(n, e, k, d, f, kind):
    x, logits, *ws = _layer(n, e, d, f)
    weights, experts = route(logits, k)
    if kind != "float32":
        ws = _quantized(kind, *ws)
    want = jax.jit(moe_gather)(x, weights, experts, *ws)
    got = jax.jit(functools.partial(moe_pallas, interpret=True))(x, weights, experts, *ws)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) <= 1e-5


def test_moe_decode_kernel_in_bfloat16_stays_close_to_the_gather_path():
    x, logits, *ws = _layer(2, 8, 128, 256, dtype=jnp.bfloat16)
    weights, experts = route(logits, 2)
    want = jax.jit(moe_gather)(x, weights, experts, *ws)
    got = jax.jit(functools.partial(moe_pallas, interpret=True))(x, weights, experts, *ws)
    assert got.dtype == jnp.bfloat16 and rel_err(got, want) <= 2e-2


def test_lora_experts_take_the_gather_path():
    x, logits, *ws = _layer(1, 4)
    weights, experts = route(logits, 2)
    rng = np.random.default_rng(1)
    lora = [ExpertWeight(w, lora_a=jnp.asarray(rng.standard_normal((4, w.shape[1], 2))),
                         lora_b=jnp.asarray(rng.standard_normal((4, 2, w.shape[2]))))
            for w in ws]
    want = moe_gather(x, weights, experts, *lora)
    got = moe_pallas(x, weights, experts, *lora, interpret=True)
    assert rel_err(got, want) <= 1e-6
    jaxpr = str(jax.make_jaxpr(functools.partial(moe_pallas, interpret=True))(
        x, weights, experts, *lora))
    assert "pallas_call" not in jaxpr


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_experts_quantizing_their_activations_take_the_gather_path(kind):
    """W8A8 experts (`input_scale`, compressed-tensors dynamic): the kernel has no
    activation quantization, so moe_pallas gathers, and gives what gathering gives."""
    x, logits, *ws = _layer(1, 4)
    weights, experts = route(logits, 2)
    w8a8 = [ExpertWeight(q, s, input_scale=jnp.zeros((4,), jnp.float32))
            for q, s, *_ in _quantized(kind, *ws)]
    want = moe_gather(x, weights, experts, *w8a8)
    got = moe_pallas(x, weights, experts, *w8a8, interpret=True)
    assert rel_err(got, want) <= 1e-6
    assert rel_err(got, moe_gather(x, weights, experts, *_quantized(kind, *ws))) > 1e-4
    jaxpr = str(jax.make_jaxpr(functools.partial(moe_pallas, interpret=True))(
        x, weights, experts, *w8a8))
    assert "pallas_call" not in jaxpr


def test_mixed_quantized_and_plain_expert_weights_are_refused():
    x, logits, *ws = _layer(1, 4)
    weights, experts = route(logits, 2)
    q = _quantized("int8", ws[0])[0]
    with pytest.raises(ValueError, match="all be quantized or none"):
        moe_decode_pallas(x, experts, tuple(q[:2]), ws[1], ws[2], interpret=True)


def test_moe_kernel_block_sizes_are_checked_and_any_valid_choice_agrees():
    x, logits, *ws = _layer(1, 4, 64, 128)
    weights, experts = route(logits, 2)
    want = moe_gather(x, weights, experts, *ws)
    for blocks in (dict(block_f=128, block_d=16), dict(block_out=16, block_in=128)):
        got = mix_slots(moe_decode_pallas(x, experts, *ws, interpret=True, **blocks), weights)
        assert rel_err(got, want) <= 1e-5
    with pytest.raises(ValueError, match="block_f=48 must be a power of two dividing 128"):
        moe_decode_pallas(x, experts, *ws, block_f=48, interpret=True)


def test_kernel_choices_pick_the_path_and_bad_values_name_themselves():
    x, logits, *ws = _layer(1, 8)
    weights, experts = route(logits, 2)
    prefill_x, prefill_logits, *_ = _layer(40, 8)
    for value, kernel_used in (("xla", False), ("pallas-interpret", True)):
        fn = functools.partial(moe, kernel=Kernels(moe=value).moe)
        decode = str(jax.make_jaxpr(fn)(x, weights, experts, *ws))
        assert ("pallas_call" in decode) == kernel_used
        w, ex = route(prefill_logits, 2)  # a prefill keeps the grouped path either way
        assert "pallas_call" not in str(jax.make_jaxpr(fn)(prefill_x, w, ex, *ws))
    # The prefill's grouped path: Kernels.grouped, 'auto' = the scan on this CPU.
    w, ex = route(prefill_logits, 2)
    for value, kernel_used in (("auto", False), ("scan", False), ("ragged", False),
                               ("pallas-interpret", True)):
        fn = functools.partial(moe, grouped=Kernels(grouped=value).grouped)
        jaxpr = str(jax.make_jaxpr(fn)(prefill_x, w, ex, *ws))
        assert ("pallas_call" in jaxpr) == kernel_used, value
        assert ("ragged_dot" in jaxpr) == (value == "ragged"), value
    with pytest.raises(UserInputError, match="grouped='megablox'"):
        Kernels(grouped="megablox")
    with pytest.raises(UserInputError, match="moe='triton'"):
        Kernels(moe="triton")
    with pytest.raises(UserInputError, match="MISTRAL_JAX_QMATMUL"):
        kernels_from_env({"MISTRAL_JAX_QMATMUL": "fast"})


def test_grouped_prefill_is_the_pallas_grouped_matmul_on_gpus(monkeypatch):
    """'auto' on a GPU backend: the Pallas grouped matmul (traced only: no Triton here)."""
    import mistral_jax.moe as moe_module

    taken = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(moe_module, "moe_gmm", lambda *a, **kw: taken.append(kw) or a[0])
    x, logits, *ws = _layer(40, 8)
    moe(x, *route(logits, 2), *ws)
    assert taken == [{"hidden_axes": ()}]  # impl: its default, 'pallas'
    assert moe_module.default_grouped_kernel() == "pallas"


@pytest.mark.parametrize("kind", ["float32", "int8", "fp8"])
def test_grouped_matmul_kernel_equals_each_blocks_expert_matmul(kind):
    """`gmm_pallas` in the interpreter: each used block of rows times its expert's weight
    (scaled per channel where quantized), blocks past n_used left alone."""
    e, d, f, block = 4, 64, 96, 8
    x, logits, w1, _, _ = _layer(21, e, d, f)
    experts = route(logits, 2)[1]
    dest, block_expert, n_used = sort_into_blocks(experts, e, block)
    xs = jnp.zeros((block_expert.shape[0] * block, d)).at[dest].set(x[jnp.arange(42) // 2])
    w = w1 if kind == "float32" else _quantized(kind, w1)[0]
    dense = w1 if kind == "float32" else w.kernel.astype(jnp.float32) * w.scale[:, None, :]
    arg = w if kind == "float32" else (w.kernel, w.scale)
    got = gmm_pallas(xs, arg, block_expert, n_used, block, block_n=32, block_k=16,
                     interpret=True)
    rows = jnp.repeat(block_expert, block)
    want = jnp.einsum("md,mdf->mf", xs, dense[rows])
    used = int(n_used) * block
    assert used < xs.shape[0]  # some padding blocks to skip
    assert rel_err(got[:used], want[:used]) <= 1e-5
    with pytest.raises(ValueError, match="72 rows, not 9 blocks of 16"):
        gmm_pallas(xs, arg, block_expert, n_used, 16, interpret=True)


@pytest.mark.parametrize("case", ["static", "dynamic+lora"])
def test_grouped_matmul_moe_on_w8a8_and_lora_experts_equals_the_gather_path(case):
    """`moe_gmm` (interpreted) against `moe_gather` with each expert's own static activation
    scale, or per-token scales beside an unmerged LoRA adapter."""
    e = 4
    x, logits, *ws = _layer(6, e, d=32, f=48)
    weights, experts = route(logits, 2)
    rng = np.random.default_rng(5)
    ew = []
    for w in ws:
        q, scale = quantize_array(w, resolve_mode("int8"), (1,))
        if case == "static":
            ew.append(ExpertWeight(q, scale, input_scale=jnp.asarray(
                rng.uniform(0.01, 0.05, e), jnp.float32)))
        else:
            a = jnp.asarray(rng.standard_normal((e, w.shape[1], 4)) / 6, jnp.float32)
            b = jnp.asarray(rng.standard_normal((e, 4, w.shape[2])) * 0.1, jnp.float32)
            ew.append(ExpertWeight(q, scale, a, b, jnp.zeros((e,), jnp.float32)))
    want = jax.jit(moe_gather)(x, weights, experts, *ew)
    for impl in ("ragged", "pallas-interpret"):
        got = jax.jit(functools.partial(moe_gmm, impl=impl, block_size=4))(
            x, weights, experts, *ew)
        assert rel_err(got, want) <= 1e-5, impl


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 256), (5, 512, 384)])
def test_quantized_matmul_kernel_with_and_without_split_k_equals_the_xla_path(mode, m, k, n):
    """Split K 8 ways (float32 partials summed outside) and not at all (x.dtype written by
    the kernel), interpreted, against `qeinsum`'s XLA path, in bfloat16 and float32."""
    rng = np.random.default_rng(7)
    assert qmatmul_blocks(m, k, n)[2] == (8 if k == 4096 else 1)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    q, scale = quantize_array(w, resolve_mode(mode), (0,))
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        want = qeinsum("mk,kn->mn", x, q, scale, impl="xla")
        got = qmatmul_pallas(x, q, scale, interpret=True)
        assert got.dtype == dtype
        assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) <= tol


def test_quantized_matmul_blocks_at_7b_shapes_fill_the_gpu_within_the_partials_budget():
    """At Mistral-7B's decode shapes (B=1, int8): enough programs for two per SM of an H200
    where the partial sums allow, 128-byte weight rows, partials <= 1/8 of the weights."""
    for k, n in ((4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024), (4096, 32768)):
        block_n, block_k, split = qmatmul_blocks(1, k, n)
        assert block_n == 128 and block_k == 64, (k, n)
        assert split * 16 * n * 4 <= PARTIAL_SHARE * k * n
        assert n // block_n * split >= (256 if n >= 4096 else 64), (k, n, split)
    assert qmatmul_blocks(1, 4096, 32768)[2] == 1  # the output head: no partials at all


@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_mixtral_prefill_logits_with_each_grouped_path_equal_the_scan(kind):
    """A tiny Mixtral's prefill (6 tokens, top 2 of 4 experts: the grouped paths) with
    Kernels.grouped 'ragged' and 'pallas-interpret' against the scan, in float32."""
    args = tiny_moe_args(moe=MoeArgs(4, 2))
    params = init_params(args, jax.random.PRNGKey(0))
    if kind == "int8":
        params = quantize_params(params, "int8")
    tokens = jnp.asarray([[5, 9, 2, 7, 1, 3]], jnp.int32)
    fwd = jax.jit(forward, static_argnames=("args", "kernels"))
    run = functools.partial(fwd, params, tokens, causal_positions(tokens), None, args=args)
    want = run(kernels=Kernels(grouped="scan"))[0]
    for grouped in ("ragged", "pallas-interpret"):
        assert rel_err(run(kernels=Kernels(grouped=grouped))[0], want) <= 1e-5, grouped


def test_two_kernel_choices_live_in_one_process_and_agree():
    """The same int8 Mixtral forward with the default kernels and with both Pallas kernels
    (interpreted), one after the other in one process: each choice is its own trace (a
    static argument), neither leaks into the other, and the logits agree."""
    args = tiny_moe_args(moe=MoeArgs(4, 2))
    params = quantize_params(init_params(args, jax.random.PRNGKey(0)), "int8")
    tokens = jnp.asarray([[5, 9, 2, 7]], jnp.int32)
    fwd = jax.jit(forward, static_argnames=("args", "kernels"))
    fast = Kernels(moe="pallas-interpret", qmatmul="pallas-interpret")
    decode = (params, tokens[:, :1], jnp.zeros((1, 1), jnp.int32), None)
    plain = fwd(*decode, args=args, kernels=Kernels())[0]
    kernel = fwd(*decode, args=args, kernels=fast)[0]
    again = fwd(*decode, args=args, kernels=Kernels())[0]
    assert rel_err(kernel, plain) <= 1e-5
    np.testing.assert_array_equal(np.asarray(again), np.asarray(plain))
    jaxprs = [str(jax.make_jaxpr(functools.partial(forward, args=args, kernels=k))(*decode))
              for k in (Kernels(), fast)]
    assert "pallas_call" not in jaxprs[0] and "pallas_call" in jaxprs[1]


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_mixtral_decode_with_the_kernel_equals_the_default_decode(monkeypatch, kind):
    """A tiny Mixtral: prefill, then two decode steps, default MoE path against the kernel
    (interpreted), logits compared at every step."""
    args = tiny_moe_args(moe=MoeArgs(4, 2))
    dtype = jnp.bfloat16 if kind == "bfloat16" else jnp.float32
    params = init_params(args, jax.random.PRNGKey(0), dtype=dtype)
    if kind == "int8":
        params = quantize_params(params, "int8")
    tokens = jnp.asarray([[5, 9, 2, 7, 1], [3, 3, 8, 4, 6]], jnp.int32)

    def run(kernels):
        step = jax.jit(functools.partial(forward, args=args, kernels=kernels))
        cache = init_cache(args, 2, 16, dtype=dtype)
        logits, cache = step(params, tokens[:, :3], causal_positions(tokens[:, :3]), cache)
        out = [logits]
        for t in range(3, 5):
            logits, cache = step(params, tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32),
                                 cache)
            out.append(logits)
        return out

    want = run(Kernels(moe="xla"))
    got = run(Kernels(moe="pallas-interpret"))
    tol = 2e-2 if kind == "bfloat16" else 1e-5
    for g, w in zip(got, want):
        assert rel_err(g.astype(jnp.float32), w.astype(jnp.float32)) <= tol


# ----------------------------------------------------------------------------- CUDA lowering


def _triton_calls(fn, *args) -> list[str]:
    """The Triton custom calls of `fn` lowered for CUDA (exported from this CPU machine:
    lowered, not compiled)."""
    exp = export.export(jax.jit(fn), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    return [line for line in exp.mlir_module().splitlines() if TRITON in line]


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "fp8"])
@pytest.mark.parametrize("shape", ["8x7b", "8x22b"])
def test_moe_decode_kernel_lowers_to_triton_for_cuda_at_mixtral_shapes(kind, shape):
    d, f = {"8x7b": (4096, 14336), "8x22b": (6144, 16384)}[shape]
    e, k, n = 8, 2, 1
    bf = jnp.bfloat16

    def weight(in_, out):
        if kind == "bfloat16":
            return S((e, in_, out), bf)
        return (S((e, in_, out), jnp.int8 if kind == "int8" else jnp.float8_e4m3fn),
                S((e, out), jnp.float32))

    calls = _triton_calls(moe_decode_pallas, S((n, d), bf), S((n, k), jnp.int32),
                          weight(d, f), weight(f, d), weight(d, f))
    assert len(calls) == 2  # gate/up + SwiGLU, then down


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "fp8"])
@pytest.mark.parametrize("k,n", [(4096, 14336), (14336, 4096)])
def test_grouped_matmul_kernel_lowers_to_triton_for_cuda_at_mixtral_shapes(kind, k, n):
    e, block, blocks = 8, 128, 40
    if kind == "bfloat16":
        w = S((e, k, n), jnp.bfloat16)
    else:
        w = (S((e, k, n), jnp.int8 if kind == "int8" else jnp.float8_e4m3fn),
             S((e, n), jnp.float32))
    calls = _triton_calls(functools.partial(gmm_pallas, block_m=block),
                          S((blocks * block, k), jnp.bfloat16), w, S((blocks,), jnp.int32),
                          S((), jnp.int32))
    assert len(calls) == 1


def test_grouped_mixtral_prefill_lowers_for_cuda(monkeypatch):
    """A bf16 Mixtral prefill (B=2, P=16: N*k > E) with Kernels(grouped='pallas'), lowered
    for CUDA: three grouped-matmul Triton calls per MoE layer."""
    args = tiny_moe_args(moe=MoeArgs(8, 2), dim=128, hidden_dim=256, head_dim=32)
    params = jax.eval_shape(lambda: init_params(args, jax.random.PRNGKey(0),
                                                dtype=jnp.bfloat16))
    tokens = S((2, 16), jnp.int32)
    calls = _triton_calls(functools.partial(forward, args=args,
                                            kernels=Kernels(grouped="pallas")),
                          params, tokens, tokens, None)
    assert len(calls) == 3 * args.n_layers


@pytest.mark.parametrize("m,k,n", [(1, 4096, 14336), (8, 14336, 4096), (64, 4096, 6144)])
def test_quantized_matmul_kernel_lowers_to_triton_for_cuda(m, k, n):
    calls = _triton_calls(qmatmul_pallas, S((m, k), jnp.bfloat16), S((k, n), jnp.int8),
                          S((n,), jnp.float32))
    assert len(calls) == 1


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("kind", ["bfloat16", "int8", "fp8"])
def test_kernels_compiled_on_gpu_equal_the_xla_paths(monkeypatch, kind):
    """The Triton kernels, compiled for this GPU, at Mixtral-like proportions."""
    x, logits, *ws = _layer(2, 8, 1024, 3584, dtype=jnp.bfloat16)
    weights, experts = route(logits, 2)
    if kind != "bfloat16":
        ws = _quantized(kind, *ws)
    want = jax.jit(moe_gather)(x, weights, experts, *ws)
    got = jax.jit(moe_pallas)(x, weights, experts, *ws)
    assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) <= 2e-2
    if kind != "bfloat16":
        q, scale = ws[0].kernel[0], ws[0].scale[0]  # one expert's [D, F] int8/fp8 kernel
        want = jax.jit(lambda a: qeinsum("nd,df->nf", a, q, scale, impl="xla"))(x)
        got = jax.jit(lambda a: qeinsum("nd,df->nf", a, q, scale, impl="pallas"))(x)
        assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) <= 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("kind", ["bfloat16", "int8", "fp8"])
def test_grouped_matmul_compiled_on_gpu_equals_the_scan_path(kind):
    """The Triton grouped matmul, compiled for this GPU, against the scan over row blocks:
    a 96-token prefill of a Mixtral-proportioned layer (D:F = 1:3.5, 8 experts, top 2)."""
    x, logits, *ws = _layer(96, 8, 512, 1792, dtype=jnp.bfloat16)
    weights, experts = route(logits, 2)
    if kind != "bfloat16":
        ws = _quantized(kind, *ws)
    want = jax.jit(moe_grouped)(x, weights, experts, *ws)
    got = jax.jit(moe_gmm)(x, weights, experts, *ws)
    assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) <= 2e-2


def test_quantized_mixtral_decode_step_with_both_kernels_lowers_for_cuda(monkeypatch):
    """A whole int8 Mixtral decode step (bf16 activations, B=2) with Kernels(qmatmul='pallas',
    moe='pallas'), lowered for CUDA: every attention projection and every MoE layer becomes
    Triton calls inside the model, as the GPU run will compile it."""
    args = tiny_moe_args(moe=MoeArgs(8, 2), dim=128, hidden_dim=256, head_dim=32)
    params = jax.eval_shape(lambda: quantize_params(
        init_params(args, jax.random.PRNGKey(0), dtype=jnp.bfloat16), "int8"))
    cache = jax.eval_shape(lambda: init_cache(args, 2, 64, dtype=jnp.bfloat16))
    token = S((2, 1), jnp.int32)
    kernels = Kernels(moe="pallas", qmatmul="pallas")
    calls = _triton_calls(functools.partial(forward, args=args, kernels=kernels), params, token,
                          token, cache)
    # Per layer: wq, wk, wv, wo through qmatmul, the MoE layer's two kernels.
    assert len(calls) == args.n_layers * (4 + 2)
