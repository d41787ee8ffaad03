"""Quantized weights: int8 and fp8 (e4m3) kernels with float32 scales per output channel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mistral_jax.errors import UserInputError
from mistral_jax.gpu_kernels import qmatmul_pallas
from mistral_jax.tree import ParamPath, flatten, is_linear_weight, sibling, split_dims, unflatten

FP8 = jnp.dtype(jnp.float8_e4m3fn)


INT8 = jnp.dtype(jnp.int8)


QUANTIZED_DTYPES = (INT8, FP8)


# safetensors dtype names of quantized storage -> numpy dtypes (numpy itself lacks fp8).
STORAGE_DTYPES = {"I8": np.dtype(np.int8), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}


# Modules quantized by default (module name, i.e. the param path's last non-leaf key).
QUANTIZED_MODULES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclasses.dataclass(frozen=True)
class QuantMode:
    """How to quantize weights: storage dtype and scale granularity."""

    name: str
    dtype: Any
    per_tensor: bool = False  # one scale per tensor (stored broadcast over output channels)


MODES = {
    "int8": QuantMode("int8", INT8),
    "fp8": QuantMode("fp8", FP8),
    "fp8-tensor": QuantMode("fp8-tensor", FP8, per_tensor=True),
}


def resolve_mode(mode: str | QuantMode) -> QuantMode:
    """'int8' | 'fp8' | 'fp8-tensor' (or a QuantMode) -> QuantMode; else UserInputError."""
    if isinstance(mode, QuantMode):
        return mode
    if mode not in MODES:
        raise UserInputError(f"quantize must be one of {sorted(MODES)}, got {mode!r}")
    return MODES[mode]


def qmax(dtype) -> float:
    """Largest magnitude the storage dtype holds: 127 for int8, 448 for float8_e4m3fn."""
    dtype = jnp.dtype(dtype)
    if dtype == INT8:
        return 127.0
    return float(jnp.finfo(dtype).max)


def is_quantized(x) -> bool:
    """Whether an array (or ShapeDtypeStruct) is stored int8 or float8_e4m3fn."""
    return jnp.dtype(x.dtype) in QUANTIZED_DTYPES


def should_quantize(path: ParamPath, ndim: int) -> bool:
    """Whether the weight at `path` is quantized by `quantize_params` / `--quantize`."""
    if not is_linear_weight(path, ndim):
        return False
    module = path[-2] if path[-1] == "kernel" else path[-1]
    return module in QUANTIZED_MODULES and path[0].startswith("layers_")


@functools.partial(jax.jit, static_argnames=("mode", "in_dims"))
def quantize_array(w: jax.Array, mode: QuantMode, in_dims: tuple[int, ...], tensor_amax=None):
    """w [lead..., in..., out...] -> (q of mode.dtype, same shape; scale f32 [lead..., out...]).

    Symmetric, one scale per output channel (amax over the `in_dims` / qmax), or one per
    tensor. int8 rounds to nearest (ties to even); fp8 rounds in the cast.
    `tensor_amax` (per-tensor modes): max |w| of the whole tensor when `w` is a slice of
    it (one expert of a stacked weight, as the converter streams them); the result is
    then that slice of quantizing the whole tensor.
    """
    w = w.astype(jnp.float32)
    top = qmax(mode.dtype)
    amax = jnp.max(jnp.abs(w), axis=in_dims)
    if mode.per_tensor:
        whole = jnp.max(amax) if tensor_amax is None else jnp.asarray(tensor_amax, jnp.float32)
        amax = jnp.broadcast_to(whole, amax.shape)
    scale = jnp.where(amax > 0, amax / top, 1.0)
    q = jnp.clip(w / jnp.expand_dims(scale, in_dims), -top, top)
    if jnp.dtype(mode.dtype) == INT8:
        q = jnp.round(q)
    return q.astype(mode.dtype), scale


def dequantize(q: jax.Array, scale: jax.Array, in_dims: tuple[int, ...], dtype=jnp.float32):
    """The inverse of `quantize_array`: q * scale, in `dtype`."""
    return (q.astype(jnp.float32) * jnp.expand_dims(scale.astype(jnp.float32), in_dims)).astype(dtype)


def on_host(fn: Callable, *arrays):
    """Run a jitted `fn` on the host CPU for numpy inputs; numpy outputs (used while loading)."""
    cpu = jax.devices("cpu")[0]
    out = fn(*(jax.device_put(a, cpu) for a in arrays))
    return jax.tree.map(np.asarray, out)


def _align(v: jax.Array, letters: str, out: str) -> jax.Array:
    """v with axes named by `letters` -> broadcastable against an array with axes `out`."""
    order = [c for c in out if c in letters]
    v = jnp.transpose(v, [letters.index(c) for c in order])
    return v.reshape([v.shape[order.index(c)] if c in letters else 1 for c in out])


def _parse(eqn: str) -> tuple[str, str, str]:
    inputs, out = eqn.replace(" ", "").split("->")
    x, k = inputs.split(",")
    return x, k, out


def quantize_activations(x: jax.Array, contracted: tuple[int, ...], dtype, input_scale: jax.Array,
                         axis_name: str | tuple[str, ...] = ()):
    """x -> (x quantized to `dtype` and back to x.dtype, scale broadcastable against x).

    `input_scale` (broadcastable against the scale) > 0: that static per-tensor scale; 0:
    per-token, max |x| over the `contracted` axes / qmax. `axis_name`: mesh axes the
    contracted axes are split over inside a shard_map; the max is then taken over them too
    (`jax.lax.pmax`), so each token's scale is that of its whole row.
    """
    top = qmax(dtype)
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=contracted, keepdims=True)
    if axis_name:
        amax = jax.lax.pmax(amax, axis_name)
    dynamic = amax / top
    dynamic = jnp.where(dynamic > 0, dynamic, 1.0)
    s = jnp.where(input_scale > 0, input_scale.astype(jnp.float32), dynamic)
    xq = jnp.clip(x.astype(jnp.float32) / s, -top, top)
    if jnp.dtype(dtype) == INT8:
        xq = jnp.round(xq)
    return xq.astype(dtype).astype(x.dtype), s


PALLAS_MAX_ROWS = 64  # above this many rows (prefill) the matmul is compute-bound: XLA


def _pallas_qeinsum(eqn: str, x: jax.Array, kernel: jax.Array, scale: jax.Array,
                    interpret: bool) -> jax.Array | None:
    """qeinsum as a 2-D `qmatmul_pallas` when `eqn` is `batch+in, in+out -> batch+out`
    (every Linear) and the rows are few; None otherwise."""
    xs, ks, out = _parse(eqn)
    n_in = len([c for c in ks if c not in out])
    if xs[len(xs) - n_in:] != ks[:n_in] or out != xs[:len(xs) - n_in] + ks[n_in:]:
        return None
    k = math.prod(kernel.shape[:n_in])
    rows = math.prod(x.shape[:x.ndim - n_in])
    if rows > PALLAS_MAX_ROWS:
        return None
    y = qmatmul_pallas(x.reshape(rows, k), kernel.reshape(k, -1), scale.reshape(-1),
                       interpret=interpret)
    return y.reshape(*x.shape[:x.ndim - n_in], *kernel.shape[n_in:])


def qeinsum(eqn: str, x: jax.Array, kernel: jax.Array, scale: jax.Array,
            input_scale: jax.Array | None = None, *,
            axis_name: str | tuple[str, ...] = (), impl: str = "auto") -> jax.Array:
    """einsum(eqn, x, dequantized kernel) without materializing the dequantized kernel.

    kernel int8/fp8 [in..., out...] (or [lead..., in..., out...]), scale f32 over the kernel
    dims that reach the output. `input_scale` f32 [] (W8A8): x is quantized too, per token
    when it is 0 (`quantize_activations`; `axis_name` as there). Accumulates in float32
    and returns x.dtype. `impl` (`Kernels.qmatmul`): 'pallas' sends few-row weight-only
    matmuls through the fused `qmatmul_pallas` kernel ('pallas-interpret': in the
    interpreter); 'auto' and 'xla' leave them to XLA.
    """
    xs, ks, out = _parse(eqn)
    if input_scale is None and impl not in ("auto", "xla"):
        y = _pallas_qeinsum(eqn, x, kernel, scale, interpret=impl == "pallas-interpret")
        if y is not None:
            return y
    if input_scale is None:
        y = jnp.einsum(eqn, x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    else:  # activations quantized too (compressed-tensors W8A8)
        contracted = tuple(i for i, c in enumerate(xs) if c in ks and c not in out)
        xq, s = quantize_activations(x, contracted, kernel.dtype, input_scale, axis_name)
        y = jnp.einsum(eqn, xq, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
        s_letters = "".join(c for i, c in enumerate(xs) if i not in contracted)
        y = y * _align(jnp.squeeze(s, contracted), s_letters, out)
    scale_letters = "".join(c for c in ks if c in out)
    return (y * _align(scale.astype(jnp.float32), scale_letters, out)).astype(x.dtype)


def quantize_leaf(path: ParamPath, w, mode: str | QuantMode) -> dict[ParamPath, Any]:
    """One weight -> {path: quantized kernel, scale path: scale}, or {path: w} if not quantized.

    numpy inputs are quantized on the host CPU and come back as numpy (load time);
    jax arrays stay on their device.
    """
    mode = resolve_mode(mode)
    if not should_quantize(path, np.ndim(w)) or is_quantized(w):
        return {path: w}
    _, in_dims, _ = split_dims(path, np.ndim(w))
    if isinstance(w, np.ndarray):
        q, scale = on_host(functools.partial(quantize_array, mode=mode, in_dims=in_dims), w)
    else:
        q, scale = quantize_array(w, mode, in_dims)
    return {path: q, sibling(path, "scale"): scale}


def quantize_params(params, mode: str | QuantMode):
    """Quantize every attention / feed-forward weight of a params pytree (see module docstring).

    Works on arrays or ShapeDtypeStructs alike (under `jax.eval_shape`). Already
    quantized weights are left as they are.
    """
    out = {}
    for path, w in flatten(params).items():
        if isinstance(w, jax.ShapeDtypeStruct):
            out.update(jax.eval_shape(lambda a, p=path: quantize_leaf(p, a, mode), w))
        else:
            out.update(quantize_leaf(path, w, mode))
    return unflatten(out)


def param_bytes(tree) -> int:
    """Total bytes of the leaves (arrays or ShapeDtypeStructs) of a params tree."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
