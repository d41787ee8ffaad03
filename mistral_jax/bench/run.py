"""The benchmark command: prefill, decode and generate speed against the hardware's limits.

    python -m mistral_jax.bench --preset mistral-7b --batch 1 8 64 --prompt-len 512 --gen-len 128

It times generate's own prefill, decode loop and single decode step, and `generate`
end to end, for each batch, prompt and generation length; docs/design/benchmark.md
says what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.args import ModelArgs
from mistral_jax.bench.costs import decode_bytes, nbytes, prefill_flops, weight_bytes
from mistral_jax.bench.flags import chosen_kernels, parse_args, validate
from mistral_jax.bench.probes import (
    Hardware,
    choose_peak,
    device_free_bytes,
    device_peak_memory,
    hardware_fractions,
    measure_copy_bandwidth,
    measure_matmul_flops,
    measure_read_bandwidth,
    memory_estimate,
    stated_bandwidth,
)
from mistral_jax.bench.report import MEMORY_ESTIMATE, format_header, format_table
from mistral_jax.bench.vs_transformers import (
    bench_transformers_threads,
    build_transformers_model,
    hf_logits_rel_err,
)
from mistral_jax.cache import init_cache
from mistral_jax.cli.common import enable_compilation_cache
from mistral_jax.cli.common import run as run_command
from mistral_jax.decode import decode as generate_decode
from mistral_jax.decode import decode_step as generate_decode_step
from mistral_jax.decode import prefill as generate_prefill
from mistral_jax.dtypes import resolve_dtype
from mistral_jax.errors import UserInputError
from mistral_jax.generate import generate_from_params
from mistral_jax.kernels import Kernels
from mistral_jax.model import causal_positions, forward, random_params
from mistral_jax.moe import default_decode_kernel, default_grouped_kernel
from mistral_jax.presets import PRESETS
from mistral_jax.sampling import Greedy, prng_key
from mistral_jax.transformer import Transformer

# ----------------------------------------------------------------------------- one configuration


def bench_config(params, args: ModelArgs, *, batch: int, prompt_len: int, gen_len: int,
                 repeats: int, seed: int, kernels: Kernels | None = None, hf_model=None,
                 torch_threads: Sequence[int | None] = (None,)) -> dict:
    """All figures for one (batch, prompt_len, gen_len); see the module docstring. MFU
    and % of the bandwidth floor come later (`hardware_fractions`), once the probes
    have run again after the workload."""
    dtype = params["embedding"].dtype
    cache_len = prompt_len + gen_len
    rng = np.random.default_rng(seed)
    tokens_np = rng.integers(0, args.vocab_size, (batch, prompt_len), dtype=np.int32)
    tokens = jnp.asarray(tokens_np)
    row: dict[str, Any] = {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}

    # generate's own programs: its prefill, its decode loop, its one-step decode (greedy).
    kw = dict(args=args, forward=forward, strategy=Greedy(), kernels=kernels)
    positions = causal_positions(tokens)
    done, rng, eos = jnp.zeros((batch,), bool), prng_key(seed), jnp.int32(-1)  # eos: never
    max_steps = jnp.int32(gen_len)
    n_steps = gen_len - 1  # the prefill samples the first token

    def prefill_fn(p, t, pos, d, key, e):
        return generate_prefill(p, t, pos, d, key, e, init_cache=init_cache, cache_len=cache_len,
                                dtype=dtype, chunk_size=prompt_len, n_buf=gen_len, **kw)

    start = time.perf_counter()
    prefill = jax.jit(prefill_fn).lower(params, tokens, positions, done, rng, eos).compile()
    row["compile_prefill_s"] = time.perf_counter() - start
    state = prefill(params, tokens, positions, done, rng, eos)
    start = time.perf_counter()
    loop = jax.jit(lambda p, st, e, m: generate_decode(p, st, e, m, **kw),
                   donate_argnums=(1,)).lower(params, state, eos, max_steps).compile()
    row["compile_decode_s"] = time.perf_counter() - start
    start = time.perf_counter()
    step = jax.jit(lambda p, st, e: generate_decode_step(p, st, e, **kw),
                   donate_argnums=(1,)).lower(params, state, eos).compile()
    row["compile_step_s"] = time.perf_counter() - start
    del state

    ttfts, loops, steps = [], [], []
    for r in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        state = prefill(params, tokens, positions, done, rng, eos)
        np.asarray(state.tokens[:, 0])  # the first token reaches the host
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        state = jax.block_until_ready(loop(params, state, eos, max_steps))
        loop_s = (time.perf_counter() - start) / n_steps
        del state
        state = jax.block_until_ready(prefill(params, tokens, positions, done, rng, eos))
        start = time.perf_counter()
        for _ in range(n_steps):  # dispatched asynchronously: no host round trip per token
            state = step(params, state, eos)
        jax.block_until_ready(state.tokens)
        step_s = (time.perf_counter() - start) / n_steps
        del state
        if r:
            ttfts.append(ttft)
            loops.append(loop_s)
            steps.append(step_s)

    ttft, loop_s = statistics.median(ttfts), statistics.median(loops)
    flops = prefill_flops(args, batch, prompt_len)
    moved = decode_bytes(args, params, batch, cache_len, dtype)
    row.update(
        ttft_ms=ttft * 1e3,
        prefill_tok_s=batch * prompt_len / ttft,
        prefill_flops=flops,
        prefill_tflops=flops / ttft / 1e12,
        decode_ms_step=loop_s * 1e3,
        decode_tok_s=batch / loop_s,
        step_dispatch_ms=statistics.median(steps) * 1e3,
        decode_bytes_per_step=moved["total"],
        decode_kv_bytes_per_step=moved["kv"],
    )
    if "by_path" in moved:  # MoE: what each expert path would read, and the one taken
        row.update(decode_bytes_by_path=moved["by_path"], moe_decode_reads=moved["path"])

    prompts = tokens_np.tolist()
    gen = functools.partial(generate_from_params, params, args, prompts, max_tokens=gen_len,
                            dtype=dtype, kernels=kernels)
    start = time.perf_counter()
    ours_tokens, _ = gen()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        gen()
        runs.append(time.perf_counter() - start)
    gen_s = statistics.median(runs)
    row.update(generate_s=gen_s, generate_tok_s=batch * gen_len / gen_s,
               compile_generate_s=max(first - gen_s, 0.0))

    peak = device_peak_memory()
    if peak is not None:
        row.update(peak_memory_bytes=peak, memory_source="device peak_bytes_in_use")
    else:
        estimates = [m for m in map(memory_estimate, (prefill, loop, step)) if m]
        row.update(peak_memory_bytes=max(estimates) if estimates else None,
                   memory_source=MEMORY_ESTIMATE)

    if hf_model is not None:
        hf = bench_transformers_threads(hf_model, tokens_np, gen_len, repeats, torch_threads)
        hf_tokens = hf.pop("hf_tokens")
        row.update(hf)
        row["vs_hf_generate"] = row["generate_tok_s"] / row["hf_generate_tok_s"]
        row["vs_hf_ttft"] = row["hf_ttft_ms"] / row["ttft_ms"]
        row["hf_greedy_rows_equal"] = float(np.mean(
            [list(h) == o for h, o in zip(hf_tokens.tolist(), ours_tokens)]))
    return row


# ----------------------------------------------------------------------------- CLI


def _load_model(ns: argparse.Namespace, dtype) -> tuple[ModelArgs, Any, str]:
    if ns.ckpt is not None:
        model = Transformer.from_folder(ns.ckpt, dtype=dtype, quantize=ns.quantize)
        return model.args, model.params, str(ns.ckpt)
    args, name = PRESETS[ns.preset], ns.preset
    if ns.layers is not None:
        plural = "s" if ns.layers > 1 else ""
        # the first layers' windows (a per-layer pattern need not divide --layers)
        windows = args.sliding_window
        if isinstance(windows, tuple):
            windows = args.layer_windows[:ns.layers] if ns.layers < args.n_layers else windows
        args = dataclasses.replace(args, n_layers=ns.layers, sliding_window=windows)
        name = f"{name} ({ns.layers} layer{plural})"
    params = random_params(args, ns.seed, dtype, ns.quantize)
    return args, params, f"{name} {ns.quantize}" if ns.quantize else name


def planned_weight_bytes(ns: argparse.Namespace, dtype) -> int:
    """Bytes of the weights the run will load, known before loading them (for the read
    probe's size): the preset's shapes (quantized as asked), or the checkpoint's files."""
    if ns.ckpt is not None:
        return sum(f.stat().st_size for f in ns.ckpt.iterdir()
                   if f.suffix in (".safetensors", ".pth", ".pt", ".bin"))
    args = PRESETS[ns.preset]
    if ns.layers is not None:
        args = dataclasses.replace(args, n_layers=ns.layers)
    return weight_bytes(args, dtype, ns.quantize)


def moe_kernel_used(args: ModelArgs, params: Any, kernels: Kernels) -> str | None:
    """The MoE decode path a decode step takes (None for a dense model): `kernels.moe`, or
    for 'auto' moe.default_decode_kernel's choice for the first layer's experts, named
    e.g. 'pallas (default)'."""
    if args.moe is None:
        return None
    if kernels.moe != "auto":
        return kernels.moe
    ff = params["layers_0"]["feed_forward"]
    return f"{default_decode_kernel(ff['w1'], ff['w2'], ff['w3'])} (default)"


def enable_cache(ns: argparse.Namespace) -> Path | None:
    """Turn on JAX's persistent compilation cache as the flags say; returns its folder.
    Without --cache-min-compile-secs, JAX's own threshold stands (its
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, else 1 s)."""
    if ns.no_compile_cache:
        return None
    return enable_compilation_cache(ns.compile_cache, ns.cache_min_compile_secs)


def run(ns: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed CLI arguments; returns {'meta', 'results'}."""
    validate(ns)
    kernels = chosen_kernels(ns)
    cache_dir = enable_cache(ns)
    on_gpu = jax.default_backend() == "gpu"
    dtype = resolve_dtype(ns.dtype)
    copy_bytes = (ns.copy_mib or (1024 if on_gpu else 256)) << 20
    read_bytes = (ns.read_mib << 20 if ns.read_mib
                  else max(planned_weight_bytes(ns, dtype), copy_bytes))
    matmul_n = ns.matmul_n or (8192 if on_gpu else 1024)
    # Probed before and again after the workload; the higher of the two counts, since a
    # busy machine can only make a probe read low. The first probes run before the weights
    # load, so that their buffers (1 GiB on a GPU) never sit beside the weights and raise
    # the allocator's peak that each row reports.
    copy_probes = [measure_copy_bandwidth(copy_bytes)]
    read_probes = [measure_read_bandwidth(read_bytes)]
    matmul_probes = [measure_matmul_flops(dtype, matmul_n)]
    args, params, model_name = _load_model(ns, dtype)
    if args.max_seq_len is not None and max(ns.prompt_len) + max(ns.gen_len) > args.max_seq_len:
        raise UserInputError(f"prompt + generation length exceeds max_seq_len={args.max_seq_len}")
    device = jax.devices()[0]

    hf_model = None
    torch_threads: list[int | None] = [None]  # None: as set (--torch-threads) or torch's own
    meta: dict[str, Any] = {}
    if ns.vs_transformers:
        import torch
        import transformers

        hf_device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        if ns.torch_threads:
            torch.set_num_threads(ns.torch_threads)
        elif hf_device == "cpu":  # torch's own count (all cores, as XLA's) and one thread
            torch_threads = sorted({1, torch.get_num_threads()})
        hf_model = build_transformers_model(params, args, hf_device)
        n = min(min(ns.prompt_len), 64)
        probe = np.random.default_rng(ns.seed).integers(0, args.vocab_size, (1, n))
        meta.update(torch=torch.__version__, transformers=transformers.__version__,
                    hf_device=hf_device,
                    torch_threads=[n or torch.get_num_threads() for n in torch_threads],
                    hf_logits_rel_err=hf_logits_rel_err(hf_model, params, args, probe))

    results = []
    for batch in sorted(ns.batch):
        for prompt_len in ns.prompt_len:
            for gen_len in ns.gen_len:
                results.append(bench_config(
                    params, args, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
                    repeats=ns.repeats, seed=ns.seed, kernels=kernels, hf_model=hf_model,
                    torch_threads=torch_threads))

    copy_probes.append(measure_copy_bandwidth(copy_bytes))
    free = device_free_bytes()
    if free is None or free > 1.25 * read_bytes:  # beside the weights, where it fits
        read_probes.append(measure_read_bandwidth(read_bytes))
    matmul_probes.append(measure_matmul_flops(dtype, matmul_n))
    copy_bw, matmul = max(copy_probes), max(matmul_probes)
    read_best = {way: max(p[way] for p in read_probes) for way in read_probes[0]}
    hw = Hardware(copy_bw, matmul, *choose_peak(matmul, matmul_n, dtype, device.device_kind,
                                                ns.peak_tflops),
                  read_bandwidth=max(read_best.values()),
                  stated_bandwidth=stated_bandwidth(device.device_kind))
    for row in results:
        row.update(hardware_fractions(row, hw))

    weight_bytes = sum(nbytes(x) for x in jax.tree_util.tree_leaves(params))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m mistral_jax.bench " + " ".join(ns.argv),
        "model": model_name, "args": dataclasses.asdict(args),
        "dtype": jnp.dtype(dtype).name,
        "n_params": sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)),
        "weight_bytes": weight_bytes,
        "device": device.device_kind, "platform": device.platform,
        "n_devices": jax.device_count(), "host": platform.node(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "attention": kernels.attention,
        "qmatmul": kernels.qmatmul,
        "moe_kernel": moe_kernel_used(args, params, kernels),
        "moe_grouped": None if args.moe is None else kernels.grouped if kernels.grouped != "auto"
        else f"{default_grouped_kernel()} (default)",
        "copy_bandwidth_gbps": copy_bw / 1e9, "copy_bytes": copy_bytes,
        "copy_bandwidth_gbps_probes": [x / 1e9 for x in copy_probes],
        "read_bandwidth_gbps": hw.read_bandwidth / 1e9, "read_bytes": read_bytes,
        "read_bandwidth_gbps_by_probe": {k: v / 1e9 for k, v in read_best.items()},
        "read_probes_run": len(read_probes),
        "floor_bandwidth_gbps": hw.floor_bandwidth / 1e9,
        "stated_bandwidth_gbps": hw.stated_bandwidth / 1e9 if hw.stated_bandwidth else None,
        "matmul_tflops_measured": matmul / 1e12, "matmul_n": matmul_n,
        "matmul_tflops_probes": [x / 1e12 for x in matmul_probes],
        "peak_tflops": hw.peak_flops / 1e12, "peak_source": hw.peak_source,
        "rows_above_peak": sum(bool(r["prefill_above_peak"]) for r in results),
        "rows_above_bandwidth": sum(bool(r["decode_above_bandwidth"]) for r in results),
        "compile_cache_dir": str(cache_dir) if cache_dir else None,
        "compile_cache_min_compile_secs":
            jax.config.jax_persistent_cache_min_compile_time_secs if cache_dir else None,
        **meta,
    }
    return {"meta": meta, "results": results}


def _main(argv: Sequence[str] | None = None) -> int:
    """The command: prints the table (and writes --json); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    ns.argv = argv
    if ns.vs_transformers:  # let torch share the GPU: JAX would otherwise take 75% of it
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out = run(ns)
    m = out["meta"]
    print(format_header(m))
    print(format_table(out["results"]))
    if ns.json is not None:  # the whole result: machines read the file, stdout is for people
        text = json.dumps(out, default=float)
        tmp = ns.json.with_name(ns.json.name + ".tmp")
        try:
            ns.json.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text + "\n")
            tmp.replace(ns.json)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            print(f"error: --json {ns.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command; an error a user can act on is one line `error: ...` and exit status 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
