"""The benchmark entry point and the fast attention paths it relies on.

The fused prefill path (cuDNN on GPUs) is exercised on the CPU through XLA's
implementation of `jax.nn.dot_product_attention`, forced with MISTRAL_JAX_ATTENTION.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.bench import costs, probes, vs_transformers
from mistral_jax.bench import flags as bench_flags
from mistral_jax.bench import run as bench
from mistral_jax.cache import init_cache
from mistral_jax.errors import UserInputError
from mistral_jax.kernels import Kernels, kernels_from_env
from mistral_jax.layers import (
    attend,
    attention_implementation,
    attention_mask,
    fused_causal_attend,
    plain_causal,
)
from mistral_jax.model import abstract_params, causal_positions, forward, init_params
from tests.helpers import rel_err, tiny_args, tiny_moe_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(b=2, t=12, h=4, k=2, hd=16, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (b, t, h, hd)), jax.random.normal(kk, (b, t, k, hd)),
            jax.random.normal(kv, (b, t, k, hd)))


@pytest.mark.parametrize("window", [None, 1, 4, 12, 50])
def test_fused_causal_attend_equals_reference_attend(window):
    q, k, v = _qkv()
    positions = causal_positions(q[..., 0, 0]) + 7  # any start: only differences matter
    heads_major = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # attend takes the cache layout
    ref = attend(q, *heads_major, attention_mask(positions, positions, window))
    out = fused_causal_attend(q, k, v, window, "xla")
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5


def test_fused_causal_attend_equals_reference_on_right_padded_rows():
    q, k, v = _qkv()
    positions = causal_positions(q[..., 0, 0]).at[0, 9:].set(-1)  # row 0: 9 tokens + padding
    ref = attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
                 attention_mask(positions, positions, 4))
    out = fused_causal_attend(q, k, v, 4, "xla")
    valid = np.asarray(positions >= 0)
    assert float(np.max(np.abs(np.asarray(out - ref)[valid]))) <= 1e-5


def test_plain_causal_detects_masks_the_fused_kernel_cannot_express():
    pos = causal_positions(jnp.zeros((2, 6), jnp.int32))
    empty = jnp.full((2, 8), -1, jnp.int32)
    assert bool(plain_causal(pos, None))
    assert bool(plain_causal(pos, empty))
    assert bool(plain_causal(pos + 5, None))  # a prompt continuing at an offset
    assert bool(plain_causal(pos.at[1, 4:].set(-1), empty))  # right padding
    assert not bool(plain_causal(pos, empty.at[0, 3].set(2)))  # a key already cached
    left = pos.at[0].set(jnp.array([-1, -1, 0, 1, 2, 3]))
    assert not bool(plain_causal(left, None))  # left padding: index order != positions
    assert not bool(plain_causal(pos.at[1, 3].set(9), None))  # a gap
    assert not bool(plain_causal(pos.at[1, 2].set(-1), None))  # a hole before real tokens


def test_attention_implementation_is_chosen_statically(monkeypatch):
    assert attention_implementation(jnp.bfloat16, 128, 128) is None  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_implementation(jnp.bfloat16, 128, 128) == "cudnn"
    assert attention_implementation(jnp.float16, 2, 64) == "cudnn"
    assert attention_implementation(jnp.bfloat16, 1, 128) is None  # decode stays on XLA
    assert attention_implementation(jnp.float32, 128, 128) is None  # cuDNN takes half only
    assert attention_implementation(jnp.bfloat16, 128, 12) is None  # head_dim % 8
    assert attention_implementation(jnp.bfloat16, 128, 128, "reference") is None
    assert attention_implementation(jnp.float32, 128, 128, "xla") == "xla"
    assert attention_implementation(jnp.float32, 1, 128, "xla") is None
    with pytest.raises(UserInputError, match="attention='flash'"):
        Kernels(attention="flash")
    with pytest.raises(UserInputError, match="MISTRAL_JAX_ATTENTION"):
        kernels_from_env({"MISTRAL_JAX_ATTENTION": "flash"})
    assert kernels_from_env({"MISTRAL_JAX_ATTENTION": "XLA"}) == Kernels(attention="xla")


def _logits(monkeypatch, choice, args, params, tokens, positions, cache):
    kernels = Kernels(attention=choice)  # static: one trace per choice, in one process
    fn = jax.jit(lambda p, t, q, c: forward(p, t, q, c, args=args, kernels=kernels))
    return fn(params, tokens, positions, cache)


@pytest.mark.parametrize("case", ["no_cache", "empty_cache_window_wraps", "left_padded",
                                  "cached_prefix"])
def test_forward_with_fused_prefill_equals_reference(monkeypatch, case):
    args = tiny_args(vocab_size=256, sliding_window=5, n_layers=1)
    params = init_params(args, 0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, args.vocab_size)
    positions = causal_positions(tokens)
    cache = None if case == "no_cache" else init_cache(args, 2, 8, jnp.float32)
    if case == "left_padded":  # must fall back to the reference inside the jitted step
        positions = positions.at[0].set(jnp.arange(12) - 3).at[0, :3].set(-1)
    if case == "cached_prefix":
        _, cache = _logits(monkeypatch, "reference", args, params, tokens[:, :4],
                           positions[:, :4], cache)
        tokens, positions = tokens[:, 4:], positions[:, 4:]
    ref, ref_cache = _logits(monkeypatch, "reference", args, params, tokens, positions, cache)
    out, out_cache = _logits(monkeypatch, "xla", args, params, tokens, positions, cache)
    valid = np.asarray(positions >= 0)
    assert rel_err(np.asarray(out)[valid], np.asarray(ref)[valid]) <= 1e-5
    if cache is not None:
        for a, b in zip(jax.tree_util.tree_leaves(out_cache), jax.tree_util.tree_leaves(ref_cache)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("window,t,fresh", [(None, 64, True), (16, 64, True), (16, 64, False),
                                             (4096, 8192, True)])
def test_forward_lowers_for_cuda_with_cudnn_prefill_attention(monkeypatch, window, t, fresh):
    """The whole bf16 prefill lowered for CUDA from this CPU, with JAX's trace-time cuDNN
    probes (version, GPU generation) answered as on an H100: every layer's attention is
    one cuDNN flash-attention call, causal, with Mistral's window as cuDNN's sliding
    window, and shapes/GQA/head_dim pass JAX's own checks. Compiling it needs a GPU."""
    from jax import export

    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not all(hasattr(fa, n) for n in ("check_cudnn_version", "check_compute_capability")):
        pytest.skip("this JAX probes cuDNN differently")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
    # 7B head geometry (32 query heads over 8 KV heads of 128), two thin layers.
    args = tiny_args(dim=256, n_layers=2, head_dim=128, n_heads=32, n_kv_heads=8,
                     hidden_dim=512, vocab_size=256, sliding_window=window)
    s = jax.ShapeDtypeStruct
    params = abstract_params(args, jnp.bfloat16)
    cache = jax.eval_shape(lambda: init_cache(args, 1, t, dtype=jnp.bfloat16))
    fn = jax.jit(functools.partial(forward, args=args, fresh_prefill=fresh,
                                   kernels=Kernels(attention="cudnn")))
    target = "__cudnn$fmhaSoftmax"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to XLA's attention
        exp = export.export(fn, platforms=["cuda"],
                            disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
            params, s((1, t), jnp.int32), s((1, t), jnp.int32), cache)
    calls = [line for line in exp.mlir_module().splitlines() if f"custom_call @{target}" in line]
    assert len(calls) == args.n_layers
    for call in calls:
        config = call.replace("\\22", '"')
        assert '"mask_type": "CAUSAL"' in config
        length = window if window is not None and window < t else 0
        assert f'"sliding_window_length": {length},' in config


def test_decode_attending_in_place_equals_full_forward_across_window_wrap():
    args = tiny_args(vocab_size=256, sliding_window=(3, None))
    params = init_params(args, 2)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 10), 0, args.vocab_size)
    fwd = jax.jit(functools.partial(forward, args=args))
    full, _ = fwd(params, tokens, causal_positions(tokens), None)
    cache = init_cache(args, 2, 10, jnp.float32)  # window layers hold 3 slots: they wrap
    steps = []
    for i in range(10):
        logits, cache = fwd(params, tokens[:, i:i + 1], jnp.full((2, 1), i, jnp.int32), cache)
        steps.append(logits[:, 0])
    assert rel_err(jnp.stack(steps, axis=1), full) <= 1e-5


def test_prefill_flops_and_decode_bytes_follow_the_shapes():
    args = tiny_args(vocab_size=256)
    params = abstract_params(args)
    b, p = 3, 10
    leaves = jax.tree_util.tree_leaves(params)
    n_matmul = sum(x.size for x in leaves if x.ndim >= 2) - params["embedding"].size
    head = params["output"]["kernel"].size  # the output head runs on the last token only
    attention = args.n_layers * 4 * args.n_heads * args.head_dim * (p * (p + 1) // 2)
    expected = 2 * (n_matmul - head) * b * p + 2 * head * b + b * attention
    assert bench.prefill_flops(args, b, p) == expected
    moved = bench.decode_bytes(args, params, b, 16, jnp.float32)
    weights = sum(x.size for x in leaves) * 4 - params["embedding"].size * 4 + b * args.dim * 4
    assert moved["weights"] == weights
    assert moved["kv"] == args.n_layers * (2 * b * 16 * args.n_kv_heads * args.head_dim * 4
                                           + b * 16 * 4)
    moe = tiny_moe_args()
    assert costs.expected_expert_fraction(moe.moe, 1) == pytest.approx(0.5)
    assert costs.expected_expert_fraction(moe.moe, 64) == pytest.approx(1.0)
    few = bench.decode_bytes(moe, abstract_params(moe), 1, 16, jnp.float32)["weights"]
    many = bench.decode_bytes(moe, abstract_params(moe), 64, 16, jnp.float32)["weights"]
    assert few < many


@pytest.mark.parametrize("args", [tiny_args(vocab_size=256, sliding_window=6), tiny_moe_args()],
                         ids=["mistral", "mixtral"])
def test_transformers_model_built_from_our_params_gives_the_same_logits(args):
    params = init_params(args, 4)
    model = bench.build_transformers_model(params, args, "cpu")
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, (1, 12))
    assert bench.hf_logits_rel_err(model, params, args, tokens) <= 1e-5


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_cli_reports_every_figure_for_each_batch_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--preset", "tiny", "--batch", "1", "2", "--prompt-len", "8",
                     "--gen-len", "3", "--repeats", "1", "--vs-transformers",
                     "--no-compile-cache", "--copy-mib", "8", "--matmul-n", "128",
                     "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| B | P | G |" in printed
    result = json.loads(out.read_text())
    # stdout is for people: the table, and no JSON line (the JSON goes to --json only)
    assert not [line for line in printed.splitlines() if line.lstrip().startswith("{")]
    assert len(printed) < 3000 and set(result) == {"meta", "results"}
    meta = result["meta"]
    for key in ("copy_bandwidth_gbps", "matmul_tflops_measured", "peak_tflops", "weight_bytes"):
        assert _finite_positive(meta[key]), key
    # probed before and after the workload; the higher counts, and MFU is taken against it
    assert len(meta["copy_bandwidth_gbps_probes"]) == len(meta["matmul_tflops_probes"]) == 2
    assert meta["copy_bandwidth_gbps"] == max(meta["copy_bandwidth_gbps_probes"])
    assert meta["matmul_tflops_measured"] == max(meta["matmul_tflops_probes"])
    assert meta["peak_tflops"] == meta["matmul_tflops_measured"]
    assert meta["peak_source"] == "measured 128^3 float32 matmul"
    # on a CPU without --torch-threads: torch's own thread count and one thread, the faster kept
    assert 1 in meta["torch_threads"] and all(n >= 1 for n in meta["torch_threads"])
    assert "peak mem GB (XLA est.)" in printed  # the CPU reports no allocator peak
    assert meta["jax"] == jax.__version__ and meta["device"] and meta["date"]
    assert meta["command"].startswith("python -m mistral_jax.bench --preset tiny")
    assert meta["hf_logits_rel_err"] <= 1e-5
    assert [r["batch"] for r in result["results"]] == [1, 2]
    for row in result["results"]:
        for key in ("compile_prefill_s", "compile_decode_s", "compile_step_s", "ttft_ms",
                    "prefill_tok_s", "step_dispatch_ms",
                    "prefill_tflops", "prefill_mfu_pct", "decode_ms_step", "decode_tok_s",
                    "decode_bytes_per_step", "bandwidth_floor_ms", "pct_of_bandwidth_floor",
                    "generate_s", "generate_tok_s", "peak_memory_bytes", "hf_ttft_ms",
                    "hf_generate_tok_s", "vs_hf_generate", "vs_hf_ttft"):
            assert _finite_positive(row[key]), key
        assert row["compile_generate_s"] >= 0
        assert 0 <= row["hf_greedy_rows_equal"] <= 1
        assert row["memory_source"] == bench.MEMORY_ESTIMATE
        for flag in ("prefill_above_peak", "decode_above_bandwidth", "hf_noisy"):
            assert isinstance(row[flag], bool), flag
        assert row["prefill_above_peak"] == (row["prefill_mfu_pct"] > 100)
        low, high = row["hf_ttft_ms_range"]
        assert low <= row["hf_ttft_ms"] <= high
        assert sorted(map(int, row["hf_by_threads"])) == meta["torch_threads"]
        by = row["hf_by_threads"]
        assert by[str(row["hf_torch_threads"])]["hf_generate_tok_s"] == row["hf_generate_tok_s"]
        assert by[str(row["hf_ttft_torch_threads"])]["hf_ttft_ms"] == row["hf_ttft_ms"]
        assert meta["rows_above_peak"] == sum(r["prefill_above_peak"] for r in result["results"])


def test_best_seconds_takes_the_fastest_call(monkeypatch):
    """The probes report the best call, not the median: a busy machine only adds time."""
    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # calls of 3 s, 1 s, 2 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert probes._best_seconds(lambda: None, 3) == 1.0


def _row(**over):
    row = {"batch": 1, "prompt_len": 8, "gen_len": 3, "compile_prefill_s": 0.1,
           "compile_decode_s": 0.1, "ttft_ms": 1000.0, "prefill_flops": 2e9,
           "decode_ms_step": 1000.0, "decode_bytes_per_step": 5e8, "peak_memory_bytes": 10**9,
           "memory_source": bench.MEMORY_ESTIMATE}
    return {**row, **over}


def test_rates_above_the_probe_are_flagged_in_the_json_and_the_table():
    hw = bench.Hardware(copy_bandwidth=1e9, matmul_flops=1e9, peak_flops=1e9,
                        peak_source="measured 64^3 float32 matmul")
    within = _row(prefill_flops=0.5e9, decode_bytes_per_step=0.25e9)  # 50%, 25%
    above = _row(prefill_flops=3e9, decode_bytes_per_step=2e9)  # 2 GFLOP/s on a 1 GFLOP/s probe
    for row in (within, above):
        row.update(bench.hardware_fractions(row, hw))
    assert within["prefill_mfu_pct"] == pytest.approx(50)
    assert within["pct_of_bandwidth_floor"] == pytest.approx(25)
    assert within["bandwidth_floor_ms"] == pytest.approx(250)
    assert not within["prefill_above_peak"] and not within["decode_above_bandwidth"]
    assert above["prefill_mfu_pct"] == pytest.approx(300)  # kept, not clipped: flagged
    assert above["prefill_above_peak"] and above["decode_above_bandwidth"]
    table = bench.format_table([within, above]).splitlines()
    assert "| 50.0 |" in table[2] and "*" not in table[2]
    assert "| 300.0* |" in table[3] and "| 200.0* |" in table[3]
    assert any(line.startswith("Marked *: above 100%") for line in table)
    assert not any(line.startswith("Marked") for line in
                   bench.format_table([within]).splitlines())


def test_table_marks_noisy_transformers_timings_and_estimated_memory():
    rows = [_row(vs_hf_generate=2.0, hf_noisy=False, hf_generate_tok_s=1.0),
            _row(vs_hf_generate=681.0, hf_noisy=True, hf_generate_tok_s=1.0)]
    lines = bench.format_table(rows).splitlines()
    assert "peak mem GB (XLA est.)" in lines[0]
    assert lines[2].endswith("| 2.00x |") and lines[3].endswith("| 681.00x~ |")
    assert any(line.startswith("Marked ~:") for line in lines)
    # where the device reports its allocator's peak, the header says nothing of an estimate
    device = dict(rows[0], memory_source="device peak_bytes_in_use")
    assert "(XLA est.)" not in bench.format_table([device])


def test_transformers_keeps_its_faster_thread_setting(monkeypatch):
    torch = pytest.importorskip("torch")
    speed = {1: 50.0, 2: 20.0}  # as on a busy CPU: two threads stall

    def fake(model, tokens, gen_len, repeats):
        n = torch.get_num_threads()
        return {"hf_ttft_ms": 100.0 / speed[n] if n == 1 else 1.0, "hf_ttft_ms_range": [n, n],
                "hf_generate_tok_s": speed[n], "hf_noisy": False, "hf_tokens": None}

    monkeypatch.setattr(vs_transformers, "bench_transformers", fake)
    before = torch.get_num_threads()
    try:
        out = bench.bench_transformers_threads(None, None, 3, 1, [1, 2])
        assert out["hf_torch_threads"] == 1 and out["hf_generate_tok_s"] == 50.0
        assert out["hf_by_threads"]["2"]["hf_generate_tok_s"] == 20.0
        # the first token came faster with two threads: that figure is taken from there
        assert out["hf_ttft_torch_threads"] == 2 and out["hf_ttft_ms"] == 1.0
        assert out["hf_ttft_ms_range"] == [2, 2]
        speed.update({1: 20.0, 2: 50.0})  # a quiet CPU: the threads help
        assert bench.bench_transformers_threads(None, None, 3, 1, [1, 2])["hf_torch_threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_first_probes_run_before_the_weights_load(monkeypatch, capsys):
    """The copy probe's buffer (1 GiB on a GPU) must not sit beside the weights: each row's
    peak memory is the allocator's peak since the start, so a probe after loading added its
    buffer to every row's figure."""
    order = []
    load, copy, read = bench._load_model, bench.measure_copy_bandwidth, bench.measure_read_bandwidth
    monkeypatch.setattr(bench, "_load_model", lambda *a: order.append("load") or load(*a))
    monkeypatch.setattr(bench, "measure_copy_bandwidth",
                        lambda *a: order.append("copy probe") or copy(*a))
    monkeypatch.setattr(bench, "measure_read_bandwidth",
                        lambda n: order.append(("read probe", n)) or read(n))
    assert bench.main(["--preset", "tiny", "--prompt-len", "4", "--gen-len", "2",
                       "--repeats", "1", "--no-compile-cache", "--copy-mib", "8"]) == 0
    read_probe = ("read probe", 8 << 20)  # the tiny weights are smaller than the copy probe
    assert order == ["copy probe", read_probe, "load", "copy probe", read_probe]


def test_read_floor_is_the_best_probe_and_the_datasheet_floor_is_beside_it():
    """The floor is taken against the highest bandwidth any probe reached (read-only or the
    copy's read + write): a low probe would make "% of floor" over-state efficiency, as the
    copy probe did on an H200 (3.2 TB/s against torch's 4.14 read). The datasheet's floor
    comes beside it for known GPUs."""
    hw = bench.Hardware(copy_bandwidth=3.2e12, matmul_flops=1e15, peak_flops=1e15,
                        peak_source="x", read_bandwidth=4.0e12, stated_bandwidth=4.8e12)
    assert hw.floor_bandwidth == 4.0e12
    row = _row(decode_bytes_per_step=14.4e9, decode_ms_step=4.5)
    row.update(bench.hardware_fractions(row, hw))
    assert row["bandwidth_floor_ms"] == pytest.approx(3.6)
    assert row["pct_of_bandwidth_floor"] == pytest.approx(80)
    assert row["datasheet_floor_ms"] == pytest.approx(3.0)
    assert row["pct_of_datasheet_floor"] == pytest.approx(100 * 3.0 / 4.5)
    copy_best = bench.Hardware(5e9, 1e9, 1e9, "x", read_bandwidth=2e9)
    assert copy_best.floor_bandwidth == 5e9
    assert "datasheet_floor_ms" not in bench.hardware_fractions(_row(), copy_best)
    assert "| 14.400 | 80.0 | 66.7 |" in bench.format_table([row])
    for kind, bw in (("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12),
                     ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H100 NVL", 3.9e12),
                     ("NVIDIA A100-SXM4-80GB", 2.039e12), ("cpu", None)):
        assert probes.stated_bandwidth(kind) == bw, kind


def test_read_probe_reads_the_buffer_it_is_given_with_each_reduction(monkeypatch):
    """Bytes per probe = the [rows, 8192] float32 buffer, over the best call's seconds."""
    monkeypatch.setattr(probes, "_best_seconds", lambda fn, repeats: float(fn().size))
    got = probes.measure_read_bandwidth(4 * 8192 * 10)
    # sum -> 1 value, sum over rows -> 8192, max over columns -> 10: bytes / output size
    assert got == {"sum": 4 * 8192 * 10, "sum over rows": 40.0, "max over columns": 8192 * 4}


def test_moe_decode_bytes_per_path():
    """Per decode step of B tokens: the decode kernels read B*k experts (repeats included),
    the grouped paths each chosen expert once, dense every expert; the step takes the
    first while B*k <= E (moe.moe_strategy)."""
    moe = tiny_moe_args()  # 4 experts, top 2
    params = abstract_params(moe)
    ff = [x for k, x in params["layers_0"]["feed_forward"].items() if k.startswith("w")]
    experts = moe.n_layers * sum(x.size for x in ff) * 4
    one = bench.decode_bytes(moe, params, 1, 16, jnp.float32)
    base = one["by_path"]["dense"] - experts
    assert one["path"] == "per assignment" and one["total"] == one["by_path"]["grouped"]
    assert one["by_path"]["per assignment"] == pytest.approx(base + experts / 2)
    eight = bench.decode_bytes(moe, params, 8, 16, jnp.float32)
    assert eight["path"] == "grouped"
    assert eight["by_path"]["per assignment"] > eight["by_path"]["dense"]  # 16 reads of 4
    assert eight["total"] == eight["by_path"]["grouped"] <= eight["by_path"]["dense"]
    assert "by_path" not in bench.decode_bytes(tiny_args(), abstract_params(tiny_args()), 1,
                                               16, jnp.float32)


def test_mfu_peak_is_the_stated_one_where_there_is_one():
    assert bench.choose_peak(1e12, 1024, jnp.float32, "cpu", 2.5) == (2.5e12, "--peak-tflops")
    peak, source = bench.choose_peak(1e12, 8192, jnp.bfloat16, "NVIDIA H100 80GB HBM3", None)
    assert peak == 989.4e12 and source.startswith("datasheet")
    for kind, flops in (("NVIDIA H200", 989.4e12), ("NVIDIA H200 NVL", 835e12),
                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12)):
        assert probes.stated_peak_flops(kind, jnp.bfloat16) == flops, kind
    assert bench.choose_peak(1e12, 64, jnp.float32, "cpu", None) == (
        1e12, "measured 64^3 float32 matmul")


def test_bench_compile_cache_flags():
    ns = bench.parse_args(["--compile-cache", "/tmp/a"])
    assert ns.compile_cache == bench.Path("/tmp/a") and ns.cache_min_compile_secs is None
    assert bench.parse_args(["--compile-cache-dir", "/tmp/b"]).compile_cache == bench.Path("/tmp/b")
    helps = {a.option_strings[0]: a.help for a in bench_flags.build_parser()._actions}
    assert "--compile-cache-dir" in helps["--compile-cache"]
    assert helps["--no-compile-cache"]


def test_bench_respects_jax_min_compile_time_env_unless_the_flag_is_given(tmp_path):
    """JAX reads its environment once, at import: hence a fresh interpreter."""
    code = ("import sys, jax; from mistral_jax.bench import run as bench; "
            "bench.enable_cache(bench.parse_args(sys.argv[1:])); "
            "print(jax.config.jax_persistent_cache_min_compile_time_secs)")
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="7.5")
    cache = ["--compile-cache", str(tmp_path / "cache")]
    for flags, expected in (([], "7.5"), (["--cache-min-compile-secs", "0"], "0.0")):
        proc = subprocess.run([sys.executable, "-c", code, *cache, *flags], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == [expected]


def test_bench_rejects_a_json_path_it_cannot_write_before_any_work(tmp_path, capsys):
    """--json under a file, or naming a folder, used to fail after the whole run (the
    folder case leaving its .tmp file behind)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for path, message in ((tmp_path / "afile" / "x.json", "afile is a file, not a directory"),
                          (tmp_path / "adir", "is a directory; give a file name")):
        assert bench.main(["--preset", "tiny", "--json", str(path), "--no-compile-cache"]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]
    assert not any((tmp_path / "adir").iterdir())


def test_bench_rejects_bad_lengths_before_any_work(capsys):
    assert bench.main(["--preset", "tiny", "--gen-len", "1", "--no-compile-cache"]) == 2
    assert "--gen-len" in capsys.readouterr().err
    assert bench.main(["--ckpt", "/nonexistent/folder", "--no-compile-cache"]) == 2
    assert "/nonexistent/folder" in capsys.readouterr().err
    assert bench.main(["--preset", "tiny", "--quantize", "int8", "--vs-transformers",
                       "--no-compile-cache"]) == 2
    assert "--quantize cannot be combined with --vs-transformers" in capsys.readouterr().err
    for bad in (["--preset", "tiny", "--layers", "0"], ["--ckpt", ".", "--layers", "1"]):
        assert bench.main(bad + ["--no-compile-cache"]) == 2
        assert "--layers must be >= 1, and applies to a --preset" in capsys.readouterr().err


def test_bench_quantized_preset_counts_int8_weight_bytes(tmp_path, capsys):
    runs = {}
    for mode in (None, "int8"):
        out = tmp_path / f"{mode}.json"
        argv = ["--preset", "tiny", "--batch", "1", "--prompt-len", "4", "--gen-len", "2",
                "--repeats", "1", "--no-compile-cache", "--copy-mib", "8", "--matmul-n", "128",
                "--json", str(out)] + (["--quantize", mode] if mode else [])
        assert bench.main(argv) == 0
        runs[mode] = json.loads(out.read_text())
    capsys.readouterr()
    assert runs["int8"]["meta"]["model"] == "tiny int8"
    assert runs["int8"]["meta"]["moe_kernel"] is None  # a dense model
    full = runs[None]["results"][0]["decode_bytes_per_step"]
    int8 = runs["int8"]["results"][0]["decode_bytes_per_step"]
    assert int8 < 0.8 * full  # the float32 attention/FFN kernels became int8 + scales
    assert _finite_positive(runs["int8"]["results"][0]["decode_tok_s"])


def test_bench_layers_flag_runs_the_preset_shapes_with_fewer_layers(tmp_path, capsys):
    """--layers N: the preset's shapes with N layers (a Mixtral-8x7B layer on a small device),
    named so in the JSON, with the weights and bytes of N layers."""
    runs = {}
    for layers in (None, 1):
        out = tmp_path / f"{layers}.json"
        argv = ["--preset", "tiny-moe", "--batch", "1", "--prompt-len", "4", "--gen-len", "2",
                "--repeats", "1", "--no-compile-cache", "--copy-mib", "8", "--matmul-n", "128",
                "--json", str(out)] + (["--layers", str(layers)] if layers else [])
        assert bench.main(argv) == 0
        runs[layers] = json.loads(out.read_text())
    capsys.readouterr()
    one, full = runs[1]["meta"], runs[None]["meta"]
    assert one["model"] == "tiny-moe (1 layer)" and one["args"]["n_layers"] == 1
    assert full["args"]["n_layers"] == bench.PRESETS["tiny-moe"].n_layers == 2
    assert one["args"]["moe"] == full["args"]["moe"] and one["args"]["dim"] == full["args"]["dim"]
    assert one["n_params"] < full["n_params"]
    assert one["moe_kernel"] == full["moe_kernel"] == "tiled (default)"  # float32 on the CPU


def test_bench_runs_the_pallas_kernels_when_asked_and_records_the_choice(tmp_path, capsys,
                                                                        monkeypatch):
    """--qmatmul / --moe-kernel (here the interpreted kernels on tiny-moe int8) reach the
    decode step as a Kernels value, are recorded in the JSON, and touch no environment."""
    monkeypatch.delenv("MISTRAL_JAX_MOE_KERNEL", raising=False)
    monkeypatch.setenv("MISTRAL_JAX_QMATMUL", "xla")
    out = tmp_path / "kernels.json"
    assert bench.main(["--preset", "tiny-moe", "--quantize", "int8", "--batch", "1",
                       "--prompt-len", "4", "--gen-len", "2", "--repeats", "1",
                       "--qmatmul", "pallas-interpret", "--moe-kernel", "pallas-interpret",
                       "--no-compile-cache", "--copy-mib", "8", "--matmul-n", "64",
                       "--json", str(out)]) == 0
    capsys.readouterr()
    meta = json.loads(out.read_text())["meta"]
    assert meta["qmatmul"] == "pallas-interpret" and meta["moe_kernel"] == "pallas-interpret"
    assert _finite_positive(json.loads(out.read_text())["results"][0]["decode_ms_step"])
    assert os.environ["MISTRAL_JAX_QMATMUL"] == "xla"
    assert "MISTRAL_JAX_MOE_KERNEL" not in os.environ


def test_bench_module_runs_and_fills_the_persistent_compilation_cache(tmp_path):
    cache_dir = tmp_path / "jax_cache"
    cmd = [sys.executable, "-m", "mistral_jax.bench", "--preset", "tiny-moe", "--batch", "1",
           "--prompt-len", "4", "--gen-len", "2", "--repeats", "1", "--copy-mib", "8",
           "--matmul-n", "64", "--compile-cache-dir", str(cache_dir),  # the old name
           "--cache-min-compile-secs", "0", "--json", str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["meta"]["compile_cache_dir"] == str(cache_dir)
    assert result["meta"]["args"]["moe"] == {"num_experts": 4, "num_experts_per_tok": 2}
    assert _finite_positive(result["results"][0]["decode_ms_step"])
    assert any(cache_dir.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_cudnn_prefill_matches_reference_on_gpu(monkeypatch):
    args = tiny_args(vocab_size=256, sliding_window=48)
    params = init_params(args, 0, jnp.bfloat16)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 128), 0, args.vocab_size)
    positions = causal_positions(tokens)
    assert attention_implementation(jnp.bfloat16, 128, args.head_dim) == "cudnn"
    hlo = jax.jit(lambda p, t, q: forward(p, t, q, None, args=args)).lower(
        params, tokens, positions).as_text()
    assert "cudnn" in hlo.lower()
    out, _ = _logits(monkeypatch, "auto", args, params, tokens, positions, None)
    ref, _ = _logits(monkeypatch, "reference", args, params, tokens, positions, None)
    assert rel_err(out, ref) <= 3e-2


def test_gpu_suite_runs_its_steps_and_writes_a_summary(tmp_path):
    """benchmarks/gpu_suite.py (the one prepared GPU run) on CPU stand-ins: each step's
    exit status, wall time and headline figures land in summary.json."""
    cmd = [sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--out", str(tmp_path),
           "--work", str(tmp_path.parent / "suite_work"), "--budget", "500", "--only",
           "mixtral8x7b-int8", "mixtral8x7b-xla", "kernel-sweep", "quant-quality-7b"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["step"] for e in summary] == ["mixtral8x7b-int8", "mixtral8x7b-xla",
                                            "kernel-sweep", "quant-quality-7b"]
    assert all(entry["rc"] == 0 and entry["wall_s"] > 0 for entry in summary)
    for entry in summary[:2]:
        assert entry["results"] and _finite_positive(entry["results"][0]["decode_ms_step"])
    assert "--moe-kernel pallas-interpret" in summary[0]["command"]
    assert summary[0]["bench"]["meta"]["moe_kernel"] == "pallas-interpret"
    assert summary[1]["bench"]["meta"]["moe_grouped"] == "scan"
    assert summary[1]["bench"]["meta"]["moe_kernel"] == "xla"
    sweep = summary[2]["json_lines"][0]["results"]  # kernel_sweep.py: every case timed
    assert {r["kernel"] for r in sweep} == {"qmatmul", "moe"}
    assert any(r["case"].startswith("pallas") for r in sweep)
    assert all(_finite_positive(r["us"]) for r in sweep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.txt", "summary.json"]
    assert "===== quant-quality-7b" in (tmp_path / "logs.txt").read_text()
    reports = summary[3]["json_lines"]  # quant.py's quality report, one line per mode
    assert [r["mode"] for r in reports] == ["int8", "fp8", "fp8-tensor"]
    assert all(0 <= r["greedy_agreement"] <= 1 for r in reports)


def test_gpu_suite_runs_issue_18s_table_first_within_9_minutes():
    """One step per row of issue #18's target table (and the GPU tests) lead the suite, and
    their time caps fit the 9 minutes the default budget stays within."""
    gpu_suite = _import_gpu_suite()
    names = [step[0] for step in gpu_suite.STEPS]
    table = ["gpu-tests", "mixtral8x7b", "mistral7b-int8-pallas", "mixtral8x7b-int8",
             "mixtral-prefill2048", "mistral7b", "mixtral8x7b-xla", "mistral7b-fp8-pallas"]
    assert names[:len(table)] == table
    assert sum(step[3] for step in gpu_suite.STEPS[:len(table)]) <= 540
    assert gpu_suite.BUDGET <= 540
    argv = dict((step[0], step[2]) for step in gpu_suite.STEPS)
    assert "--moe-kernel" not in argv["mixtral8x7b"]  # the defaults, as users get them
    assert argv["mixtral8x7b-xla"][argv["mixtral8x7b-xla"].index("--moe-grouped") + 1] == "scan"
    tiny = gpu_suite.step_argv(argv["mixtral8x7b-int8"], gpu_suite.Path("W"), tiny=True)
    assert "tiny-moe" in tiny and "pallas-interpret" in tiny and "pallas" not in tiny


def test_gpu_suite_skips_what_the_budget_cannot_fit(tmp_path):
    cmd = [sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--out", str(tmp_path),
           "--budget", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary) > 5 and all(e["skipped"] == "budget spent" for e in summary)


def test_gpu_suite_keeps_going_past_a_json_line_cut_short():
    """A step killed at its time limit can leave its last JSON line half written: the
    suite records the complete lines and drops that one instead of stopping."""
    gpu_suite = _import_gpu_suite()
    assert gpu_suite._json_or_none('{"device": "H200", "results": [') is None
    assert gpu_suite._json_or_none('{"device": "H200", "results": []}') == {
        "device": "H200", "results": []}


def _import_gpu_suite():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.pop(0)
    return gpu_suite


def test_gpu_suite_list_shows_the_tiny_commands_with_tiny(capsys):
    gpu_suite = _import_gpu_suite()
    assert gpu_suite.main(["--list"]) == 0
    full = capsys.readouterr().out
    assert gpu_suite.main(["--list", "--tiny"]) == 0
    tiny = capsys.readouterr().out
    assert "--preset mistral-7b" in full and "--preset tiny" not in full
    assert "--preset mistral-7b" not in tiny and "--preset tiny" in tiny
    assert "--qmatmul pallas-interpret" in tiny


@pytest.mark.parametrize("script", ["moe_bytes.py", "kernel_sweep.py", "stream_latency.py"])
def test_benchmark_scripts_import_this_checkout(tmp_path, script):
    """Run from elsewhere with another `mistral_jax` first on the path, a script still
    imports the one of the checkout it sits in (BENCHMARKS.md's commands, as written)."""
    fake = tmp_path / "elsewhere" / "mistral_jax"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not this checkout')\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--help"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_stream_latency_times_the_demo_model():
    """benchmarks/stream_latency.py runs generate_stream on the demo model and prints one
    line with a positive ms/token figure."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "stream_latency.py"),
                           "--max-tokens", "4", "--repeats", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("demo_model: ") and float(line.split()[1]) > 0, line
    assert "4 tokens, float32" in line
