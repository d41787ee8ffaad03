"""Block sizes of the Pallas kernels (mistral_jax/kernels.py) against XLA, timed on this device.

    python benchmarks/kernel_sweep.py              # GPU: Mistral-7B / Mixtral-8x7B shapes
    python benchmarks/kernel_sweep.py --tiny       # CPU: tiny shapes, interpreted kernels (tests)

Each figure is the median over `--repeats` of `--inner` calls run inside one jitted
`fori_loop` (no dispatch per call; the weights are arguments, never constants), divided
by `--inner`, with the bandwidth that implies for the weight bytes one call must read.
The kernels' block sizes are otherwise untuned guesses; this picks them on hardware.
Prints a line per configuration, then every result as one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mistral_jax

from mistral_jax.args import MoeArgs
from mistral_jax.bench.costs import expected_expert_fraction
from mistral_jax.gpu_kernels import moe_decode_pallas, qmatmul_pallas
from mistral_jax.moe import route
from mistral_jax.moe_experts import mix_slots, moe_dense, moe_gather
from mistral_jax.quantize import MODES, param_bytes, quantize_array


def time_call(fn, x, weights: tuple, inner: int, repeats: int) -> float:
    """Seconds per `fn(x, *weights)`, from `inner` chained calls inside one program."""
    def loop(x, *w):
        def body(_, xc):
            y = fn(xc, *w)
            return xc + (jnp.sum(y.astype(jnp.float32)) * 0).astype(xc.dtype)  # a dependency
        return jax.lax.fori_loop(0, inner, body, x)

    jitted = jax.jit(loop)
    jitted(x, *weights).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jitted(x, *weights).block_until_ready()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def sweep_qmatmul(shapes, blocks, rows: int, mode: str, inner: int, repeats: int,
                  interpret: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for k, n in shapes:
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
        q, scale = quantize_array(w, MODES[mode], (0,))
        cases = {"xla bf16": (lambda a, w: a @ w, (w,)),
                 f"xla {mode}": (lambda a, q, s: ((a @ q.astype(a.dtype)).astype(jnp.float32)
                                                  * s).astype(a.dtype), (q, scale))}
        cases["pallas default"] = (functools.partial(qmatmul_pallas, interpret=interpret),
                                   (q, scale))  # qmatmul_blocks' choice
        for bn, bk in blocks:
            if n % bn == 0 and k % bk == 0:
                cases[f"pallas n{bn} k{bk}"] = (functools.partial(
                    qmatmul_pallas, block_n=bn, block_k=bk, interpret=interpret), (q, scale))
        for name, (fn, weights) in cases.items():
            s = time_call(fn, x, weights, inner, repeats)
            out.append({"kernel": "qmatmul", "shape": [rows, k, n], "mode": mode, "case": name,
                        "us": s * 1e6, "gbps": param_bytes(weights) / s / 1e9})
            print(f"qmatmul {rows}x{k}x{n} {mode:4s} {name:22s} {s * 1e6:9.1f} us "
                  f"{out[-1]['gbps']:8.1f} GB/s", flush=True)
    return out


def sweep_moe(d: int, f: int, e: int, k: int, tokens: int, up_blocks, down_blocks,
              inner: int, repeats: int, interpret: bool) -> list[dict]:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.bfloat16)
    weights, experts = route(jnp.asarray(rng.standard_normal((tokens, e)), jnp.float32), k)
    w1, w3 = (jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), jnp.bfloat16)
              for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), jnp.bfloat16)
    # The distinct experts `tokens` pick in expectation: mistral_jax.bench's share.
    selected = param_bytes((w1, w2, w3)) * expected_expert_fraction(MoeArgs(e, k), tokens)

    def routed(fn):
        return lambda a, w1, w2, w3: fn(a, weights, experts, w1, w2, w3)

    def kernel(**blocks):  # the decode kernel returns each slot's output: mixed here
        return lambda a, w1, w2, w3: mix_slots(moe_decode_pallas(
            a, experts, w1, w2, w3, interpret=interpret, **blocks), weights)

    cases = {"xla dense": routed(moe_dense), "xla gather": routed(moe_gather)}
    for bf, bd in up_blocks:
        if f % bf == 0 and d % bd == 0:
            cases[f"pallas up f{bf} d{bd}"] = kernel(block_f=bf, block_d=bd)
    for bo, bi in down_blocks:
        if d % bo == 0 and f % bi == 0:
            cases[f"pallas down out{bo} in{bi}"] = kernel(block_out=bo, block_in=bi)
    out = []
    for name, fn in cases.items():
        s = time_call(fn, x, (w1, w2, w3), inner, repeats)
        out.append({"kernel": "moe", "shape": [tokens, d, f, e, k], "case": name, "us": s * 1e6,
                    "gbps_selected": selected / s / 1e9})
        print(f"moe {tokens} tok d{d} f{f} e{e} top{k} {name:26s} {s * 1e6:9.1f} us "
              f"{out[-1]['gbps_selected']:8.1f} GB/s of selected experts", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, interpreted kernels")
    p.add_argument("--modes", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8"])
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    interpret = a.tiny or jax.default_backend() != "gpu"
    if a.tiny:
        q_shapes, q_blocks = [(64, 256), (256, 64)], [(32, 64), (64, 32)]
        moe_shape = (64, 128, 4, 2)
        up, down = [(32, 32), (64, 16)], [(32, 32)]
    else:
        q_shapes = [(4096, 14336), (14336, 4096), (4096, 4096)]
        q_blocks = [(bn, bk) for bn in (32, 64, 128, 256) for bk in (64, 128, 256)]
        moe_shape = (4096, 14336, 8, 2)
        up = [(32, 64), (64, 64), (128, 32), (128, 64), (256, 32)]
        down = [(64, 64), (128, 64), (256, 32), (128, 128)]
    print(f"backend {jax.default_backend()}, device {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}, interpret {interpret}", flush=True)
    results = []
    for mode in a.modes:
        results += sweep_qmatmul(q_shapes, q_blocks, 1, mode, a.inner, a.repeats, interpret)
    results += sweep_moe(*moe_shape, 1, up, down, a.inner, a.repeats, interpret)
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
