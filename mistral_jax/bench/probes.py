"""Hardware probes and peaks: read and copy bandwidth, matmul FLOP/s, datasheet figures, memory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s.
# Matched in order against the device kind: the NVL / PCIe parts before their SXM names.
STATED_PEAK_FLOPS = (("h200 nvl", 835e12), ("h200", 989.4e12), ("h100 pcie", 756e12),
                     ("h100 nvl", 835e12), ("h100", 989.4e12), ("a100", 312e12))


# HBM bandwidth from the vendors' datasheets, bytes/s, matched in order like the peaks above.
STATED_BANDWIDTH = (("h200", 4.8e12), ("h100 pcie", 2.0e12), ("h100 nvl", 3.9e12),
                    ("h100", 3.35e12), ("a100-sxm4-80gb", 2.039e12), ("a100 80gb pcie", 1.935e12),
                    ("a100", 1.555e12))


# The read-only probes: reductions that read the whole buffer and write almost nothing.
# XLA's emitters differ by shape, so the best of them is taken (on one H200 a `sum` read
# 3.61 TB/s where the copy probe's read + write came to 3.2-3.3, GPU_NOTES.md).
READ_PROBES = {
    "sum": lambda a: jnp.sum(a),
    "sum over rows": lambda a: jnp.sum(a, axis=0),
    "max over columns": lambda a: jnp.max(a, axis=1),
}
READ_COLUMNS = 8192


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls: other work on the machine only adds time, so
    the best run is the closest to what the device can do."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure_copy_bandwidth(n_bytes: int, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s, best of `repeats`: read + write of a float32
    buffer of `n_bytes`."""
    n = max(n_bytes // 4, 1)
    # In place (donated): no fresh output buffer whose first touch would be timed too.
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = [jax.block_until_ready(copy(jnp.ones((n,), jnp.float32)))]

    def step():
        x[0] = copy(x[0])
        return x[0]

    return 2 * n * 4 / _best_seconds(step, repeats)


def measure_read_bandwidth(n_bytes: int, repeats: int = 5) -> dict[str, float]:
    """Read-only bandwidth in bytes/s of each of READ_PROBES over one float32 buffer of
    about `n_bytes` ([rows, READ_COLUMNS]), best of `repeats` calls each. Give it at least
    the bytes a decode step reads, so that no cache holds the buffer."""
    rows = max(n_bytes // (4 * READ_COLUMNS), 1)
    # Filled on the device from a traced scalar: no host copy, no constant to fold.
    a = jax.block_until_ready(jax.jit(lambda v: jnp.full((rows, READ_COLUMNS), v))(1.0))
    out = {}
    for name, fn in READ_PROBES.items():
        f = jax.jit(fn)
        jax.block_until_ready(f(a))
        out[name] = rows * READ_COLUMNS * 4 / _best_seconds(lambda f=f, a=a: f(a), repeats)
    del a
    return out


def stated_bandwidth(device_kind: str) -> float | None:
    """The datasheet HBM bandwidth of a known GPU in bytes/s, else None."""
    kind = device_kind.lower()
    return next((bw for name, bw in STATED_BANDWIDTH if name in kind), None)


def device_free_bytes() -> int | None:
    """Bytes the default device's allocator can still hand out, where it says."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def measure_matmul_flops(dtype: Any, n: int, repeats: int = 10) -> float:
    """FLOP/s of one [n, n] @ [n, n] matmul in `dtype` on the default device, best of `repeats`."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    return 2 * n**3 / _best_seconds(lambda: matmul(a, b), repeats)


def stated_peak_flops(device_kind: str, dtype: Any) -> float | None:
    """The datasheet dense half-precision peak of a known GPU, else None."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return None
    kind = device_kind.lower()
    for name, flops in STATED_PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def choose_peak(measured_flops: float, matmul_n: int, dtype: Any, device_kind: str,
                peak_tflops: float | None) -> tuple[float, str]:
    """(FLOP/s MFU is taken against, where it comes from): --peak-tflops, else the
    datasheet peak of a known GPU, else the matmul measured in this run."""
    if peak_tflops:
        return peak_tflops * 1e12, "--peak-tflops"
    stated = stated_peak_flops(device_kind, dtype)
    if stated:
        return stated, f"datasheet dense bf16/fp16 for {device_kind}"
    return measured_flops, f"measured {matmul_n}^3 {jnp.dtype(dtype).name} matmul"


def memory_estimate(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # not every backend/version implements it
        return None


def device_peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak else None


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What this run measured about the device."""

    copy_bandwidth: float  # bytes/s, read + write
    matmul_flops: float  # FLOP/s measured in the run dtype
    peak_flops: float  # what MFU is taken against
    peak_source: str
    read_bandwidth: float | None = None  # bytes/s, the best read-only probe
    stated_bandwidth: float | None = None  # bytes/s, the datasheet's

    @property
    def floor_bandwidth(self) -> float:
        """What the read floor is taken against: the best the probes reached (the read-only
        one, or the copy's read + write where it read more): the higher, the lower the
        floor, so "% of floor" errs low rather than high."""
        return max(self.copy_bandwidth, self.read_bandwidth or 0.0)


def hardware_fractions(row: dict, hw: Hardware) -> dict:
    """MFU and % of the bandwidth floor of a result row against `hw`, each with a flag
    that is set where the row ran faster than the probe allows (above 100%): the probe then
    under-read the device (a busy CPU, a probe too small to reach the peak), and the figure
    is no efficiency. Uses the row's prefill_flops, ttft_ms, decode_bytes_per_step and
    decode_ms_step. The floor is the row's bytes over `hw.floor_bandwidth`; with a
    datasheet bandwidth, also the floor at that rate and the share of it."""
    mfu = 100 * row["prefill_flops"] / (row["ttft_ms"] / 1e3) / hw.peak_flops
    step_s = row["decode_ms_step"] / 1e3
    floor_s = row["decode_bytes_per_step"] / hw.floor_bandwidth
    pct = 100 * floor_s / step_s
    out = {"prefill_mfu_pct": mfu, "prefill_above_peak": mfu > 100,
           "bandwidth_floor_ms": floor_s * 1e3, "pct_of_bandwidth_floor": pct,
           "decode_above_bandwidth": pct > 100}
    if hw.stated_bandwidth:
        stated_s = row["decode_bytes_per_step"] / hw.stated_bandwidth
        out.update(datasheet_floor_ms=stated_s * 1e3,
                   pct_of_datasheet_floor=100 * stated_s / step_s)
    return out
