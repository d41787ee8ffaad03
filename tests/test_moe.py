"""Sparse mixture of experts (Mixtral): routing and its ties, the gather / tiled / grouped /
ragged paths against the dense reference (also on int8 / fp8 and unmerged-LoRA experts,
which the sparse paths read expert by expert, never dequantizing the layer), parity with transformers' MixtralForCausalLM
(PyTorch, float32) in both folder layouts, decode through the cache, the bytes a decode
step reads, and clear errors for bad MoE configs and checkpoints."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    both_layouts,
    random_mistral_state,
    rel_err,
    run_on_cpu_devices,
    tiny_moe_args,
    torch_logits,
    write_hf_folder,
    write_mistral_folder,
)

from mistral_jax.args import MoeArgs
from mistral_jax.errors import CheckpointError, ConfigError, UserInputError
from mistral_jax.model import init_params
from mistral_jax.moe import MoeFeedForward, default_decode_kernel, moe, moe_strategy, route
from mistral_jax.moe_experts import ExpertWeight, dense_weight, moe_dense, moe_gather
from mistral_jax.moe_gmm import gmm_block_rows, moe_gmm, moe_ragged
from mistral_jax.moe_paths import (
    MAX_BLOCK,
    MIN_BLOCK,
    grouped_block_size,
    moe_grouped,
    moe_tiled,
)
from mistral_jax.quantize import quantize_array, quantize_params, resolve_mode
from mistral_jax.transformer import Transformer

# Random tiny Mixtral configs, all with GQA (4 query heads over 2 KV heads).
CONFIGS = {
    "e4_top2": dict(moe=MoeArgs(4, 2)),
    "e8_top2_win8": dict(moe=MoeArgs(8, 2), sliding_window=8, n_layers=3),
    "e4_top1": dict(moe=MoeArgs(4, 1), rope_theta=1e4),
    "e8_top1": dict(moe=MoeArgs(8, 1)),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def mixtral(request, tmp_path_factory):
    """One random Mixtral in both layouts, plus transformers' model of the HF folder."""
    args = tiny_moe_args(**CONFIGS[request.param])
    state, mistral, hf, ref = both_layouts(tmp_path_factory.mktemp(request.param), args,
                                           seed=len(request.param))
    return args, state, mistral, hf, ref


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layout", ["mistral", "hf"])
def test_prefill_logits_match_transformers_float32(mixtral, layout):
    args, _, mistral, hf, ref = mixtral
    model = Transformer.from_folder(mistral if layout == "mistral" else hf, dtype="float32")
    assert model.args.moe == args.moe
    tokens = np.random.default_rng(1).integers(0, args.vocab_size, (2, 24))
    assert moe_strategy(tokens.size, args.moe.num_experts_per_tok, args.moe.num_experts) == "grouped"
    assert rel_err(model.logits(tokens), torch_logits(ref, tokens)) <= 1e-5


# Two configs (top-1 and top-2, 4 and 8 experts, a window) keep CI fast.
@pytest.mark.parametrize("mixtral", ["e8_top2_win8", "e4_top1"], indirect=True)
def test_decode_steps_match_full_forward_and_transformers(mixtral):
    """Prefill 6 tokens (grouped path), then decode 10 one at a time (gather path)."""
    args, _, mistral, _, ref = mixtral
    model = Transformer.from_folder(mistral, dtype="float32")
    tokens = np.random.default_rng(2).integers(0, args.vocab_size, (2, 16))
    assert moe_strategy(2, args.moe.num_experts_per_tok, args.moe.num_experts) == "gather"
    pos = np.broadcast_to(np.arange(16), tokens.shape)
    cache = model.init_cache(2, 32)
    out, cache = model.forward(tokens[:, :6], pos[:, :6], cache)
    steps = [np.asarray(out)]
    for i in range(6, 16):
        out, cache = model.forward(tokens[:, i:i + 1], pos[:, i:i + 1], cache)
        steps.append(np.asarray(out))
    decoded = np.concatenate(steps, axis=1)
    assert rel_err(decoded, model.logits(tokens)) <= 1e-5
    assert rel_err(decoded, torch_logits(ref, tokens)) <= 1e-5


def test_transformers_merges_the_per_expert_tensors_it_loads(mixtral):
    """transformers 5 turns block_sparse_moe.experts.E.w{1,2,3} into fused gate_up/down
    tensors; check it loaded exactly the checkpoint's weights, so parity means something."""
    args, state, _, _, ref = mixtral
    for i, layer in enumerate(ref.model.layers):
        experts = layer.mlp.experts
        gate_up, down = experts.gate_up_proj.detach().numpy(), experts.down_proj.detach().numpy()
        np.testing.assert_array_equal(layer.mlp.gate.weight.detach().numpy(),
                                      state[f"layers.{i}.feed_forward.gate.weight"])
        for e in range(args.moe.num_experts):
            p = f"layers.{i}.feed_forward.experts.{e}."
            want = np.concatenate([state[p + "w1.weight"], state[p + "w3.weight"]])
            np.testing.assert_array_equal(gate_up[e], want)
            np.testing.assert_array_equal(down[e], state[p + "w2.weight"])


def test_both_layouts_load_the_same_stacked_expert_params(mixtral):
    args, _, mistral, hf, _ = mixtral
    a = Transformer.from_folder(mistral, dtype="float32").params
    b = Transformer.from_folder(hf, dtype="float32").params
    ffn = a["layers_0"]["feed_forward"]
    e, d, f = args.moe.num_experts, args.dim, args.hidden_dim
    assert ffn["w1"].shape == ffn["w3"].shape == (e, d, f) and ffn["w2"].shape == (e, f, d)
    assert ffn["gate"]["kernel"].shape == (d, e)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_greedy_generation_equals_teacher_forced_argmax():
    from mistral_jax.generate import generate

    args = tiny_moe_args(vocab_size=128)
    model = Transformer(args, init_params(args, 3))
    prompts = [[5, 17, 99, 3, 42]]  # batch 1: the decode loop takes the gather path
    tokens, _ = generate(prompts, model, max_tokens=6, temperature=0.0)
    for prompt, out in zip(prompts, tokens):
        assert len(out) == 6
        logits = np.asarray(model.logits(np.array(prompt + out[:-1])))
        np.testing.assert_array_equal(logits[len(prompt) - 1:].argmax(-1), out)


# ----------------------------------------------------------------------------- routing


def test_route_ties_go_to_the_lower_expert_index():
    weights, experts = route(jnp.zeros((1, 8)), 2)
    np.testing.assert_array_equal(experts, [[0, 1]])
    np.testing.assert_allclose(weights, [[0.5, 0.5]])
    # A tie across the k-th place: the lower indices of the tied group are selected, in order.
    _, experts = route(jnp.array([[1.0, 3.0, 0.5, 3.0, 3.0]], jnp.bfloat16), 2)
    np.testing.assert_array_equal(experts, [[1, 3]])
    _, experts = route(jnp.array([[2.0, 1.0, 1.0, 1.0]]), 3)
    np.testing.assert_array_equal(experts, [[0, 1, 2]])


def test_tied_routing_gives_the_same_output_on_every_path():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((4, 16, 24)) / 4, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((4, 24, 16)) / 5, jnp.float32)
    weights, experts = route(jnp.zeros((3, 4)), 2)
    want = moe_dense(x, weights, experts, w1, w2, w3)
    for fn in (moe_gather, SMALL_TILES, moe_grouped, moe_ragged):
        assert rel_err(jax.jit(fn)(x, weights, experts, w1, w2, w3), want) <= 1e-6


def test_route_equals_transformers_softmax_then_topk_then_renormalise():
    import torch

    logits = np.random.default_rng(4).standard_normal((64, 8)).astype(np.float32)
    weights, experts = route(jnp.asarray(logits), 2)
    probs = torch.softmax(torch.from_numpy(logits), dim=-1)
    top, idx = torch.topk(probs, 2, dim=-1)
    np.testing.assert_array_equal(np.asarray(experts), idx.numpy())
    np.testing.assert_allclose(np.asarray(weights), (top / top.sum(-1, keepdim=True)).numpy(),
                               rtol=1e-6)
    assert weights.dtype == jnp.float32 and experts.dtype == jnp.int32


def test_route_softmax_runs_in_float32_on_bfloat16_gate_logits():
    """A bfloat16 model's gate logits are bfloat16; the routing weights must still be the
    float32 softmax of those logits, not one rounded to bfloat16's 8-bit mantissa."""
    rng = np.random.default_rng(7)
    logits = np.concatenate([[[1.0, 0.0, -3.0, -5.0]],  # softmax(1, 0) = 0.7310586 vs 0.7304688
                             rng.standard_normal((15, 4))]).astype(jnp.bfloat16)
    weights, experts = route(jnp.asarray(logits), 2)
    assert weights.dtype == jnp.float32
    # The float32 computation from the same bfloat16 logits, in numpy.
    f32 = logits.astype(np.float32)
    idx = np.argsort(-f32, axis=-1, kind="stable")[:, :2]
    np.testing.assert_array_equal(np.asarray(experts), idx)
    top = np.take_along_axis(f32, idx, axis=-1)
    e = np.exp(top - top.max(-1, keepdims=True))
    want = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(weights), want, rtol=0, atol=1e-6)
    # A softmax left in bfloat16 is visibly different: the case above tells them apart.
    in_bf16 = jax.nn.softmax(jax.lax.top_k(jnp.asarray(logits), 2)[0], axis=-1)
    assert np.abs(np.asarray(in_bf16, np.float32)[0] - want[0]).max() > 1e-4


# ----------------------------------------------------------------------------- paths

# The tiled decode path with blocks small enough for several loop steps on these tiny layers.
SMALL_TILES = functools.partial(moe_tiled, block_bytes=4096)


def _layer(n, e, d=16, f=24, dtype=jnp.float32, seed=0, skew=False):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)), dtype)
    logits = rng.standard_normal((n, e))
    if skew:  # every token prefers expert 1: one large group, empty experts
        logits[:, 1] += 10.0
    w1, w3 = (jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), dtype) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), dtype)
    return x, jnp.asarray(logits, jnp.float32), w1, w2, w3


@pytest.mark.parametrize("n,e,k,block,skew", [
    (1, 8, 2, None, False),   # one decode token
    (4, 8, 2, None, False),   # N*k == E
    (37, 8, 2, 4, False),     # several blocks per expert, a partial last block
    (37, 4, 1, 2, False),
    (19, 8, 2, 4, True),      # one expert takes every token; the others are empty
    (64, 8, 2, None, False),  # the automatic block size
])
def test_sparse_paths_equal_the_dense_reference(n, e, k, block, skew):
    x, logits, w1, w2, w3 = _layer(n, e, skew=skew)
    weights, experts = route(logits, k)
    want = moe_dense(x, weights, experts, w1, w2, w3)
    grouped = functools.partial(moe_grouped, block_size=block)
    # The gather and tiled paths unroll their N*k assignments: meant for (and compiled here
    # at) small N.
    gmm = functools.partial(moe_gmm, impl="pallas-interpret", block_size=block)
    for fn in ((moe_gather, moe_tiled, SMALL_TILES) if n * k <= 16 else ()) + (grouped,
                                                                              moe_ragged, gmm):
        got = jax.jit(fn)(x, weights, experts, w1, w2, w3)
        assert rel_err(got, want) <= 1e-6


def test_sparse_paths_in_bfloat16_stay_close_to_float32():
    x, logits, w1, w2, w3 = _layer(24, 8, dtype=jnp.bfloat16)
    weights, experts = route(logits, 2)
    f32 = [a.astype(jnp.float32) for a in (x, w1, w2, w3)]
    want = moe_dense(f32[0], weights, experts, *f32[1:])
    for fn, n in ((moe_dense, 24), (moe_grouped, 24), (moe_gather, 2), (SMALL_TILES, 2)):
        got = jax.jit(fn)(x[:n], weights[:n], experts[:n], w1, w2, w3)
        assert got.dtype == jnp.bfloat16
        assert rel_err(got, want[:n]) <= 2e-2


@pytest.mark.parametrize("shape", [(2, 1), (2, 9)])
def test_moe_layer_every_strategy_equals_dense(shape):
    args = tiny_moe_args(moe=MoeArgs(8, 2))
    x = jax.random.normal(jax.random.PRNGKey(1), (*shape, args.dim))
    params = MoeFeedForward(args).init(jax.random.PRNGKey(0), x)
    want = jax.jit(MoeFeedForward(args, strategy="dense").apply)(params, x)
    few = shape[0] * shape[1] * 2 <= 8  # the gather path is for decode-sized steps
    for strategy in ("auto", "grouped", "ragged", "gmm-interpret") + (("gather", "tiled")
                                                                        if few else ()):
        got = jax.jit(MoeFeedForward(args, strategy=strategy).apply)(params, x)
        assert got.shape == x.shape
        assert rel_err(got, want) <= 1e-6
    with pytest.raises(UserInputError, match="strategy must be one of"):
        MoeFeedForward(args, strategy="sparse").apply(params, x)


def test_path_choice_is_static_in_the_token_count():
    assert moe_strategy(1, 2, 8) == "gather" and moe_strategy(4, 2, 8) == "gather"
    assert moe_strategy(5, 2, 8) == "grouped" and moe_strategy(512, 2, 8) == "grouped"
    x, logits, w1, w2, w3 = _layer(1, 8)
    weights, experts = route(logits, 2)
    decode = str(jax.make_jaxpr(moe)(x, weights, experts, w1, w2, w3))
    x, logits, w1, w2, w3 = _layer(40, 8)
    weights, experts = route(logits, 2)
    prefill = str(jax.make_jaxpr(moe)(x, weights, experts, w1, w2, w3))
    assert "sort" not in decode  # per-token expert reads only
    assert "scan" in prefill and "sort" in prefill  # tokens grouped by expert


def _eqns(jaxpr):
    """Every equation of a jaxpr and of its sub-jaxprs (loop bodies, branches)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_tiled_decode_reads_each_selected_expert_in_row_blocks():
    """`moe_tiled` takes every stacked weight in [1, block, out] row blocks inside two
    loops (over D for w1/w3, over F for w2), never a whole expert's [D, F] / [F, D]."""
    e, d, f = 8, 64, 96
    x, logits, *ws = _layer(1, e, d=d, f=f)
    weights, experts = route(logits, 2)
    # w1/w3: 4 matmuls (2 slots x 2 weights) of 96 floats a row, 16 rows a step: 4 steps.
    # w2: 2 matmuls of 64 floats a row, so up to 48 rows a step: 2 steps of 48.
    fn = functools.partial(moe_tiled, block_bytes=16 * 4 * f * 4)
    jaxpr = jax.make_jaxpr(fn)(x, weights, experts, *ws).jaxpr
    eqns = list(_eqns(jaxpr))
    blocks = {tuple(q.params["slice_sizes"]) for q in eqns
              if q.primitive.name == "dynamic_slice" and q.invars[0].aval.ndim == 3}
    assert blocks == {(1, 16, f), (1, 48, d)}
    assert sorted(q.params["length"] for q in eqns if q.primitive.name == "scan") == [2, 4]
    assert not [s for s in _float_shapes(jaxpr) if s[-2:] in ((d, f), (f, d))]
    want = moe_dense(x, weights, experts, *ws)
    assert rel_err(jax.jit(fn)(x, weights, experts, *ws), want) <= 1e-6


def test_decode_on_the_cpu_tiles_float32_and_int8_experts_and_gathers_others(monkeypatch):
    """With Kernels.moe 'auto', a CPU decode step takes `moe_tiled` when every expert
    kernel is float32 or int8 and `moe_gather` otherwise (bfloat16, fp8, or a mix); a named
    kernel overrides the choice either way. A prefill groups whatever the dtype."""
    import mistral_jax.moe as moe_module

    assert jax.default_backend() == "cpu"
    taken = []
    for name in ("moe_gather", "moe_tiled", "moe_grouped"):
        real = getattr(moe_module, name)
        monkeypatch.setattr(moe_module, name,
                            lambda *a, _n=name, _f=real, **kw: taken.append(_n) or _f(*a, **kw))
    x, logits, *ws = _layer(1, 8)
    weights, experts = route(logits, 2)
    int8 = _expert_weights("int8", *ws)
    fp8 = _expert_weights("fp8", *ws)
    bf16 = [w.astype(jnp.bfloat16) for w in ws]
    cases = [(ws, None, "moe_tiled"), (int8, None, "moe_tiled"), (fp8, None, "moe_gather"),
             (bf16, None, "moe_gather"), ([int8[0], bf16[1], ws[2]], None, "moe_gather"),
             (ws, "xla", "moe_gather"), (bf16, "tiled", "moe_tiled")]
    for weights_, kernel, path in cases:
        taken.clear()
        moe(x.astype(_kernel_dtype(weights_[1])), weights, experts, *weights_,
            kernel=kernel or "auto")
        assert taken == [path], (kernel, taken)
    x40, logits40, *_ = _layer(40, 8)
    taken.clear()
    moe(x40, *route(logits40, 2), *ws)
    assert taken == ["moe_grouped"]
    # On GPUs: the Pallas kernel for float experts (measured 1.9x the gather on an H200),
    # the gather path for int8/fp8 experts (not measured) and wherever 'xla' is named.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(moe_module, "moe_pallas",  # recorded only: no Triton on this CPU
                        lambda *a, **kw: taken.append("moe_pallas") or moe_module.moe_gather(
                            *a, **{k: v for k, v in kw.items() if k != "interpret"}))
    for weights_, kernel, path in [(ws, None, "moe_pallas"), (bf16, None, "moe_pallas"),
                                   (int8, None, "moe_gather"), (fp8, None, "moe_gather"),
                                   (bf16, "xla", "moe_gather")]:
        taken.clear()
        moe(x.astype(_kernel_dtype(weights_[1])), weights, experts, *weights_,
            kernel=kernel or "auto")
        assert taken[:1] == [path], (kernel, taken)
    assert default_decode_kernel(*bf16) == "pallas" and default_decode_kernel(*int8) == "xla"


def test_tiled_decode_equals_gather_on_w8a8_experts_with_lora_and_per_expert_scales():
    """`moe_tiled` against `moe_gather` where each expert has its own static activation scale
    (input_scale[e] must be the selected expert's), per-token scales (0), and an unmerged LoRA
    adapter beside W8A8 (fed the unquantized input, as `expert_matmul` does)."""
    e = 8
    x, logits, *ws = _layer(2, e, d=32, f=48)
    weights, experts = route(logits, 2)
    rng = np.random.default_rng(5)
    static = [jnp.asarray(rng.uniform(0.01, 0.05, e), jnp.float32) for _ in range(3)]
    lora = _expert_weights("lora", *ws)
    for case in ("static", "dynamic+lora"):
        ew = []
        for i, w in enumerate(ws):
            q, scale = quantize_array(w, resolve_mode("int8"), (1,))
            if case == "static":
                ew.append(ExpertWeight(q, scale, input_scale=static[i]))
            else:
                ew.append(ExpertWeight(q, scale, lora[i].lora_a, lora[i].lora_b,
                                       jnp.zeros((e,), jnp.float32)))
        want = jax.jit(moe_gather)(x, weights, experts, *ew)
        got = jax.jit(SMALL_TILES)(x, weights, experts, *ew)
        assert rel_err(got, want) <= 1e-6, case
        if case == "static":  # every expert's own scale counts: one shared scale differs
            shared = [w._replace(input_scale=jnp.full((e,), w.input_scale[0])) for w in ew]
            assert rel_err(jax.jit(moe_gather)(x, weights, experts, *shared), want) > 1e-3


def test_tiled_decode_runs_with_64_bit_indices():
    """Under jax_enable_x64 the loop counter is int64 and the expert index int32: the
    block offsets are taken in int32 either way."""
    x, logits, *ws = _layer(2, 8, d=32, f=48)
    weights, experts = route(logits, 2)
    want = moe_gather(x, weights, experts, *ws)
    with jax.enable_x64(True):
        got = jax.jit(functools.partial(moe_tiled, block_bytes=2048))(x, weights, experts, *ws)
    assert rel_err(got, want) <= 1e-6


def _kernel_dtype(w):
    return jnp.float32 if isinstance(w, ExpertWeight) else w.dtype


def test_grouped_block_size_is_a_bounded_power_of_two_growing_with_tokens():
    sizes = [grouped_block_size(n, 2, 8) for n in (1, 16, 256, 4096, 1 << 20)]
    assert all(MIN_BLOCK <= s <= MAX_BLOCK and s & (s - 1) == 0 for s in sizes)
    assert sizes == sorted(sizes) and sizes[0] == MIN_BLOCK and sizes[-1] == MAX_BLOCK
    assert grouped_block_size(512, 2, 8, balance_rows=32) == 64


# ----------------------------------------------------------------------------- bytes


def _bytes_accessed(fn, n, d, f, e, k):
    s = jax.ShapeDtypeStruct
    inputs = (s((n, d), jnp.float32), s((n, k), jnp.float32), s((n, k), jnp.int32),
              s((e, d, f), jnp.float32), s((e, f, d), jnp.float32), s((e, d, f), jnp.float32))
    cost = jax.jit(fn).lower(*inputs).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"])


def test_decode_step_reads_only_the_selected_experts():
    """XLA's cost analysis of one decode token on a Mixtral-proportioned layer (D:F = 1:3.5).

    Dense reads all E experts; the gather path's bytes do not grow with E, halve from
    top-2 to top-1, and stay within 3 * k/E of dense: the selected experts are read once,
    and plain XLA copies each selected slice before its matmul (written, read again).
    """
    d, f = 256, 896
    dense8, dense16 = (_bytes_accessed(moe_dense, 1, d, f, e, 2) for e in (8, 16))
    gather8, gather16 = (_bytes_accessed(moe_gather, 1, d, f, e, 2) for e in (8, 16))
    top1 = _bytes_accessed(moe_gather, 1, d, f, 8, 1)
    weights8 = 3 * 8 * d * f * 4
    assert dense8 >= weights8 and dense16 / dense8 > 1.9
    assert abs(gather16 / gather8 - 1) < 0.01
    assert abs(top1 / gather8 - 0.5) < 0.02
    assert gather8 >= weights8 * 2 / 8  # it does read the two selected experts
    assert gather8 / dense8 <= 3 * 2 / 8 + 0.02
    assert gather16 / dense16 <= 3 * 2 / 16 + 0.02


# ----------------------------------------------------------------------------- int8 / fp8 / LoRA experts


def _expert_weights(kind, w1, w2, w3, rank=3, seed=1):
    """The layer's stacked weights as ExpertWeights: quantized ('int8' / 'fp8') or with an
    unmerged LoRA adapter ('lora': random factors, lora_a [E, in, r], lora_b [E, r, out])."""
    rng = np.random.default_rng(seed)
    out = []
    for w in (w1, w2, w3):
        if kind == "lora":
            e, i, o = w.shape
            a = jnp.asarray(rng.standard_normal((e, i, rank)) / np.sqrt(i), jnp.float32)
            b = jnp.asarray(rng.standard_normal((e, rank, o)) * 0.1, jnp.float32)
            out.append(ExpertWeight(w, lora_a=a, lora_b=b))
        else:
            q, scale = quantize_array(w, resolve_mode(kind), (1,))
            out.append(ExpertWeight(q, scale))
    return out


@pytest.mark.parametrize("kind", ["int8", "fp8", "lora"])
@pytest.mark.parametrize("n,e,k,block", [(1, 8, 2, None), (37, 8, 2, 4), (19, 4, 1, 2)])
def test_quantized_and_lora_experts_sparse_paths_equal_dense_on_the_dense_weights(kind, n, e, k,
                                                                                  block):
    x, logits, *ws = _layer(n, e)
    weights, experts = route(logits, k)
    ew = _expert_weights(kind, *ws)
    plain = [dense_weight(w, jnp.float32) for w in ew]  # dequantized / merged, every expert
    want = moe_dense(x, weights, experts, *plain)
    assert rel_err(jax.jit(moe_dense)(x, weights, experts, *ew), want) <= 1e-6
    grouped = functools.partial(moe_grouped, block_size=block)
    gmm = functools.partial(moe_gmm, impl="pallas-interpret", block_size=block)
    for fn in ((moe_gather, SMALL_TILES) if n * k <= 16 else ()) + (grouped, moe_ragged, gmm):
        got = jax.jit(fn)(x, weights, experts, *ew)
        assert rel_err(got, want) <= 1e-5, fn


@pytest.mark.parametrize("kind", ["int8", "fp8", "lora"])
def test_quantized_and_lora_moe_layer_every_strategy_equals_dense(kind):
    """A tiny Mixtral's MoE layer with quant.py's `w1_scale` / lora.py's `w1_lora_a` leaves."""
    args = tiny_moe_args(moe=MoeArgs(8, 2))
    params = init_params(args, jax.random.PRNGKey(0))
    if kind == "lora":
        ff = dict(params["layers_0"]["feed_forward"])
        rng = np.random.default_rng(2)
        for name in ("w1", "w2", "w3"):
            e, i, o = ff[name].shape
            ff[f"{name}_lora_a"] = jnp.asarray(rng.standard_normal((e, i, 4)) / np.sqrt(i))
            ff[f"{name}_lora_b"] = jnp.asarray(rng.standard_normal((e, 4, o)) * 0.1)
    else:
        ff = quantize_params(params, kind)["layers_0"]["feed_forward"]
        assert ff["w1"].dtype != jnp.float32 and ff["w1_scale"].shape == (8, args.hidden_dim)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 3, args.dim))  # N*k = 6 <= E: 'auto' gathers
    want = jax.jit(MoeFeedForward(args, strategy="dense").apply)({"params": ff}, x)
    for strategy in ("auto", "gather", "tiled", "grouped", "ragged", "gmm-interpret"):
        got = jax.jit(MoeFeedForward(args, strategy=strategy).apply)({"params": ff}, x)
        assert rel_err(got, want) <= 1e-5, strategy


def _float_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every floating-point value a jaxpr (and its sub-jaxprs) makes."""
    shapes = []
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = v.aval
            if hasattr(aval, "shape") and jnp.issubdtype(aval.dtype, jnp.floating):
                shapes.append(tuple(aval.shape))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _float_shapes(inner)
    return shapes


@pytest.mark.parametrize("strategy,n", [("gather", 1), ("tiled", 1), ("grouped", 40),
                                        ("ragged", 40), ("gmm-interpret", 40)])
def test_int8_sparse_paths_never_dequantize_the_layer(strategy, n):
    """No float value holding more than one expert's [D, F] / [F, D] weights (the stacked
    [E, D, F] a dequantize-first layer makes): only the selected slices are cast, or (the
    grouped matmuls) the int8 kernels go into the matmul as stored."""
    e, d, f = 8, 64, 96
    x, logits, *ws = _layer(n, e, d=d, f=f)
    weights, experts = route(logits, 2)
    ew = _expert_weights("int8", *ws)
    fn = functools.partial(moe, strategy=strategy)
    def stacked(shapes):
        return [s for s in shapes if s[-2:] in ((d, f), (f, d)) and np.prod(s) > d * f]

    sparse = _float_shapes(jax.make_jaxpr(fn)(x, weights, experts, *ew).jaxpr)
    dense = _float_shapes(jax.make_jaxpr(moe_dense)(x, weights, experts, *ew).jaxpr)
    assert (e, d, f) in stacked(dense)  # the check sees a dequantized layer where there is one
    if strategy in ("gather", "tiled", "grouped"):  # the grouped matmuls take the int8 whole
        assert any(s in ((d, f), (f, d)) for s in sparse)  # the selected experts' slices
    assert stacked(sparse) == []


def _int8_decode_bytes(fn, e, d, f):
    s = jax.ShapeDtypeStruct
    ws = [ExpertWeight(s(shape, jnp.int8), s((e, shape[2]), jnp.float32))
          for shape in ((e, d, f), (e, f, d), (e, d, f))]
    cost = jax.jit(fn).lower(s((1, d), jnp.bfloat16), s((1, 2), jnp.float32),
                             s((1, 2), jnp.int32), *ws).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"])


def test_int8_decode_step_bytes_do_not_grow_with_the_experts():
    """XLA's cost analysis of one bfloat16 decode token on int8 experts (D:F = 1:3.5): the
    gather path's bytes stay flat in E and far below dequantizing every expert before
    selecting (the previous layer), whose bytes grow with E."""
    d, f = 256, 896

    def dequantize_first(x, weights, experts, *ws):
        return moe_gather(x, weights, experts, *(dense_weight(w, x.dtype) for w in ws))

    gather8, gather16 = (_int8_decode_bytes(moe_gather, e, d, f) for e in (8, 16))
    before8, before16 = (_int8_decode_bytes(dequantize_first, e, d, f) for e in (8, 16))
    assert before8 >= 3 * 8 * d * f * 2  # every expert written in bfloat16
    assert before16 / before8 > 1.5
    assert abs(gather16 / gather8 - 1) < 0.05
    assert gather8 <= before8 / 3


EXPERT_PARALLEL_SCRIPT = """
import sys
import jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
from helpers import rel_err
from test_moe import _expert_weights, _layer
from mistral_jax.moe_experts import dense_weight, moe_dense
from mistral_jax.moe import moe, route
from mistral_jax.partitioning import expert_parallel, use_mesh
from mistral_jax.mesh import make_mesh
assert jax.device_count() == 8
mesh = make_mesh("expert=4,tensor=2")
for kind in ("int8", "lora", "mixed"):
    for n in (1, 24):  # gather, grouped
        x, logits, *ws = _layer(n, 8)
        weights, experts = route(logits, 2)
        if kind == "mixed":  # w1 int8, w2 plain, w3 with an adapter
            ew = [_expert_weights("int8", *ws)[0], ws[1], _expert_weights("lora", *ws)[2]]
        else:
            ew = _expert_weights(kind, *ws)
        want = moe_dense(x, weights, experts, *(dense_weight(w, jnp.float32) for w in ew))
        with use_mesh(mesh):
            got = jax.jit(lambda *a: expert_parallel(moe, *a))(x, weights, experts, *ew)
        err = float(rel_err(got, want))
        assert err <= 1e-5, (kind, n, err)
        print(kind, n, err)
"""


def test_expert_parallel_splits_scales_and_lora_factors_with_their_experts(tmp_path):
    """sharding.expert_parallel on 8 host devices (expert=4, tensor=2) with int8, LoRA and
    mixed (plain beside ExpertWeight) weights: each device's scale rows / factors follow its experts and F slice."""
    from pathlib import Path

    script = tmp_path / "expert_parallel.py"
    script.write_text(EXPERT_PARALLEL_SCRIPT)
    out = run_on_cpu_devices(str(script), str(Path(__file__).parent))
    assert len(out.splitlines()) == 6  # every case ran


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def moe_folder(tmp_path):
    args = tiny_moe_args(vocab_size=64)
    return write_mistral_folder(tmp_path / "m", args, random_mistral_state(args)), args


def _edit_json(path, change):
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,message", [
    (lambda c: c["moe"].pop("num_experts_per_tok"),
     "moe block is missing required field 'num_experts_per_tok'"),
    (lambda c: c["moe"].pop("num_experts"), "moe block is missing required field 'num_experts'"),
    (lambda c: c.update(moe={}), "moe block is missing required field 'num_experts'"),
    (lambda c: c["moe"].update(num_experts_per_tok=5),
     r"moe.num_experts_per_tok must be in \[1, moe.num_experts=4\], got 5"),
    (lambda c: c["moe"].update(num_experts_per_tok=0),
     "moe.num_experts_per_tok must be a positive integer, got 0"),
    (lambda c: c["moe"].update(num_experts=-1), "moe.num_experts must be a positive integer"),
])
def test_bad_params_json_moe_block_is_named(moe_folder, change, message):
    folder, _ = moe_folder
    _edit_json(folder / "params.json", change)
    with pytest.raises(ConfigError, match=r"params.json: " + message):
        Transformer.from_folder(folder)


@pytest.mark.parametrize("change,message", [
    # (Left out, it is MixtralConfig's default, 2: tests/test_model.py; null is no value.)
    (lambda c: c.update(num_experts_per_tok=None),
     "required field 'num_experts_per_tok' is missing"),
    (lambda c: c.update(num_experts_per_tok=9),
     r"num_experts_per_tok must be in \[1, num_local_experts=4\], got 9"),
])
def test_bad_hf_config_moe_fields_are_named(tmp_path, change, message):
    args = tiny_moe_args(vocab_size=64)
    folder = write_hf_folder(tmp_path / "h", args, random_mistral_state(args))
    _edit_json(folder / "config.json", change)
    with pytest.raises(ConfigError, match=r"config.json: .*" + message):
        Transformer.from_folder(folder)


# What the dense fields refuse (ModelArgs: a positive integer, not a bool or a float), the
# expert counts refuse too, in each layout named as its config file names them.
NOT_POSITIVE_INTEGERS = ["two", "2", 2.7, 2.0, True]
FIELD_NAMES = {"mistral": {"num_experts": "moe.num_experts",
                           "num_experts_per_tok": "moe.num_experts_per_tok"},
               "hf": {"num_experts": "num_local_experts",
                      "num_experts_per_tok": "num_experts_per_tok"}}


@pytest.mark.parametrize("value", NOT_POSITIVE_INTEGERS)
@pytest.mark.parametrize("field", ["num_experts", "num_experts_per_tok"])
@pytest.mark.parametrize("layout", ["mistral", "hf"])
def test_expert_counts_must_be_positive_integers_in_both_layouts(tmp_path, layout, field, value):
    args = tiny_moe_args(vocab_size=64)
    state = random_mistral_state(args)
    name = FIELD_NAMES[layout][field]
    if layout == "mistral":
        folder = write_mistral_folder(tmp_path / "m", args, state)
        _edit_json(folder / "params.json", lambda c: c["moe"].update({field: value}))
        file = "params.json"
    else:
        folder = write_hf_folder(tmp_path / "h", args, state)
        _edit_json(folder / "config.json", lambda c: c.update({name: value}))
        file = "config.json"
    message = f"{folder / file}: {name} must be a positive integer, got {value!r}"
    with pytest.raises(ConfigError) as info:
        Transformer.from_folder(folder)
    assert str(info.value) == message
    if layout == "hf":
        assert "moe." not in str(info.value)


def test_missing_expert_tensor_is_named_in_checkpoint_terms(tmp_path):
    args = tiny_moe_args(vocab_size=64)
    state = random_mistral_state(args)
    del state["layers.1.feed_forward.experts.3.w2.weight"]
    mistral = write_mistral_folder(tmp_path / "m", args, state)
    with pytest.raises(CheckpointError, match=r"1 weights missing .*: "
                       r"layers\.1\.feed_forward\.experts\.3\.w2\.weight \(layers_1/"):
        Transformer.from_folder(mistral)
    hf = write_hf_folder(tmp_path / "h", args, state)
    with pytest.raises(CheckpointError,
                       match=r"model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight"):
        Transformer.from_folder(hf)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("layers.0.feed_forward.gate.weight"), r"layers\.0\.feed_forward\.gate\.weight"),
    (lambda s: s.update({"layers.0.feed_forward.experts.4.w1.weight": np.zeros((128, 64), np.float32)}),
     r"unexpected tensor 'layers\.0\.feed_forward\.experts\.4\.w1\.weight'"),
    (lambda s: s.update({"layers.1.feed_forward.experts.2.w3.weight": np.zeros((64, 64), np.float32)}),
     r"'layers\.1\.feed_forward\.experts\.2\.w3\.weight' has shape \[64, 64\], expected \[128, 64\]"),
    (lambda s: s.update({"layers.0.feed_forward.w1.weight": np.zeros((128, 64), np.float32)}),
     r"unexpected tensor 'layers\.0\.feed_forward\.w1\.weight'"),
])
def test_bad_expert_checkpoint_is_named(tmp_path, change, message):
    args = tiny_moe_args(vocab_size=64)
    state = random_mistral_state(args)
    change(state)
    with pytest.raises(CheckpointError, match=message):
        Transformer.from_folder(write_mistral_folder(tmp_path / "m", args, state))


def test_grouped_matmul_block_rows_follow_the_rows_per_expert():
    """About N*k/E rows per block (a power of two at or above it), within Triton's
    16..128: few rows per expert pad little, many fill 128-row tiles."""
    assert gmm_block_rows(1, 2, 8) == 16 and gmm_block_rows(64, 2, 8) == 16
    assert gmm_block_rows(200, 2, 8) == 64 and gmm_block_rows(2048, 2, 8) == 128
    assert gmm_block_rows(8 * 512, 2, 8) == 128
