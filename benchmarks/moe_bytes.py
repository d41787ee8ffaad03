"""Bytes a Mixtral MoE layer reads per decode step: sparse (gather) path versus all experts.

    python benchmarks/moe_bytes.py                  # Mixtral-8x7B layer, batch 1, bf16 and f32
    python benchmarks/moe_bytes.py --shape 8x22b --prefill-tokens 0
    python benchmarks/moe_bytes.py --decode-hidden 7168 --prefill-tokens 0   # + decode timing
    python benchmarks/moe_bytes.py --decode-hidden 14336 --quantize int8 --prefill-tokens 0
    python benchmarks/moe_bytes.py --decode-hidden 14336 --dtype bfloat16 --prefill-tokens 0  # GPU

Numbers come from XLA's own cost analysis ("bytes accessed") of the compiled layer on
this machine's backend, with abstract inputs (nothing is allocated); XLA counts a loop's
body once, so the tiled path (a loop over row blocks) is timed, not counted. Optionally
it also times a decode step (gather and tiled paths versus dense, with the bandwidth
each time implies for the selected experts' bytes) and a prefill (many tokens) of a
smaller layer (grouped path versus dense). On a GPU the decode timing adds the Pallas
kernel that reads the selected experts in place (`moe.moe_pallas`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mistral_jax

from mistral_jax.args import MoeArgs
from mistral_jax.bench.costs import expected_expert_fraction
from mistral_jax.moe_experts import ExpertWeight, moe_dense, moe_gather
from mistral_jax.moe_paths import grouped_block_size, moe_grouped, moe_pallas, moe_tiled
from mistral_jax.quantize import quantize_array, resolve_mode

SHAPES = {  # dim, hidden_dim, num_experts, num_experts_per_tok
    "8x7b": (4096, 14336, 8, 2),
    "8x22b": (6144, 16384, 8, 2),
}


def layer_inputs(n: int, d: int, f: int, e: int, k: int, dtype) -> tuple:
    """Abstract x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D]."""
    s = jax.ShapeDtypeStruct
    return (s((n, d), dtype), s((n, k), jnp.float32), s((n, k), jnp.int32),
            s((e, d, f), dtype), s((e, f, d), dtype), s((e, d, f), dtype))


def bytes_accessed(fn, inputs) -> float:
    """XLA's "bytes accessed" of `fn` compiled for the default backend."""
    cost = jax.jit(fn).lower(*inputs).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost["bytes accessed"])


def decode_bytes(d: int, f: int, e: int, k: int, dtype, batch: int = 1) -> dict[str, float]:
    inputs = layer_inputs(batch, d, f, e, k, dtype)
    weights = 3 * e * d * f * jnp.dtype(dtype).itemsize
    # Selected: the distinct experts `batch` tokens pick in expectation (uniform routing), the
    # same share as mistral_jax.bench's bandwidth floor (k/E at one token).
    return {"weights": weights, "selected": weights * expected_expert_fraction(MoeArgs(e, k), batch),
            "dense": bytes_accessed(moe_dense, inputs),
            "gather": bytes_accessed(moe_gather, inputs)}


def time_paths(n: int, d: int, f: int, e: int, k: int, paths: dict, repeats: int,
               dtype=jnp.float32, quantize: str | None = None) -> dict[str, float]:
    """Median seconds of each path (name -> fn) on N tokens with random routing; with
    `quantize` ('int8', 'fp8') the experts are quantized (weight-only, quant.py).

    Each path's calls run together, in `paths`' order: on the 2-core CPU the tiled path
    ran 2-3x slower for a while after the gather path's large copies (59-66 ms before,
    130-300 ms in turn with it, 2026-11-30), so the gather path goes last.
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, d)), dtype)
    logits = rng.standard_normal((n, e))
    experts = jnp.asarray(np.argsort(-logits, axis=1)[:, :k], jnp.int32)
    weights = jnp.full((n, k), 1.0 / k, jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e, d, f)) / d**0.5, dtype) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, f, d)) / f**0.5, dtype)
    if quantize:
        w1, w2, w3 = (ExpertWeight(*quantize_array(w, resolve_mode(quantize), (1,)))
                      for w in (w1, w2, w3))
    times: dict[str, list[float]] = {}
    for name, fn in paths.items():  # one path at a time, see the docstring
        jitted = jax.jit(fn)
        for _ in range(2):  # compile, then one more untimed call
            jitted(x, weights, experts, w1, w2, w3).block_until_ready()
        times[name] = []
        for _ in range(repeats):
            start = time.perf_counter()
            jitted(x, weights, experts, w1, w2, w3).block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="8x7b")
    p.add_argument("--batch", type=int, default=1, help="decode batch (tokens per step)")
    p.add_argument("--prefill-tokens", type=int, default=512,
                   help="time a prefill of this many tokens on a dim-1024 layer (0: skip)")
    p.add_argument("--decode-hidden", type=int, default=0,
                   help="also time one decode step (the --batch tokens) of a float32 layer of the "
                   "shape's dim with this hidden size: gather and tiled paths (and on a GPU "
                   "the Pallas kernel) against dense (0: skip)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the timed decode layer")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="time the decode layer with int8 / fp8 weight-only experts")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    d, f, e, k = SHAPES[a.shape]
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; Mixtral-{a.shape} MoE layer "
          f"dim={d} hidden={f} experts={e} top-{k}, decode batch {a.batch}")
    for dtype in (jnp.bfloat16, jnp.float32):
        r = decode_bytes(d, f, e, k, dtype, a.batch)
        print(f"  {jnp.dtype(dtype).name:8s} expert weights {r['weights'] / 1e9:6.2f} GB, "
              f"selected {r['selected'] / 1e9:5.2f} GB ({r['selected'] / r['weights']:.3f}) | "
              f"bytes accessed: dense {r['dense'] / 1e9:6.2f} GB, gather {r['gather'] / 1e9:6.2f} GB, "
              f"gather/dense {r['gather'] / r['dense']:.3f}, gather/selected "
              f"{r['gather'] / r['selected']:.2f}")
    r16 = decode_bytes(d, f, 2 * e, k, jnp.float32, a.batch)
    r8 = decode_bytes(d, f, e, k, jnp.float32, a.batch)
    print(f"  float32, {2 * e} experts instead of {e}: dense {r16['dense'] / r8['dense']:.3f}x, "
          f"gather {r16['gather'] / r8['gather']:.3f}x the bytes")
    if a.decode_hidden:
        dt = jnp.dtype(a.dtype)
        paths = {"dense": moe_dense, "tiled": moe_tiled, "gather": moe_gather}
        if jax.default_backend() == "gpu":
            paths["pallas"] = moe_pallas
        t = time_paths(a.batch, d, a.decode_hidden, e, k, paths, a.repeats, dt, a.quantize)
        itemsize = 1 if a.quantize else dt.itemsize  # int8 / fp8 kernels: one byte each
        gb = 3 * e * d * a.decode_hidden * itemsize / 1e9
        selected = gb * expected_expert_fraction(MoeArgs(e, k), a.batch)
        print(f"decode {a.batch} token(s), dim={d} hidden={a.decode_hidden} experts={e} top-{k}, "
              f"{dt.name}{' x ' + a.quantize + ' experts' if a.quantize else ''} ({gb:.2f} GB "
              f"of expert weights, {selected:.2f} GB selected), median of "
              f"{a.repeats}: " + ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in t.items()))
        for name, s in t.items():
            print(f"  {name:7s} {s / t['dense']:.3f} of dense; the selected experts' bytes at "
                  f"{selected / s:.0f} GB/s")
    if a.prefill_tokens:
        pd, pf = 1024, 3584
        t = time_paths(a.prefill_tokens, pd, pf, e, k,
                       {"dense": moe_dense, "grouped": moe_grouped}, a.repeats)
        block = grouped_block_size(a.prefill_tokens, k, e)
        print(f"prefill {a.prefill_tokens} tokens, dim={pd} hidden={pf} experts={e} top-{k}, float32, "
              f"median of {a.repeats}: dense {t['dense'] * 1e3:.1f} ms, grouped (block {block}) "
              f"{t['grouped'] * 1e3:.1f} ms, grouped/dense {t['grouped'] / t['dense']:.3f}")


if __name__ == "__main__":
    main()
