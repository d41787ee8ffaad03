"""Quantized weights: int8 and fp8 (e4m3) kernels with float32 scales per output channel.

A quantized linear layer keeps its `kernel` in the same shape, stored as int8 or
float8_e4m3fn, and gains a `scale` over the kernel's output dims; stacked MoE expert
weights gain a sibling `<name>_scale` (`w1` [E, D, F] int8 -> `w1_scale` [E, F]):

    {'wq': {'kernel': int8 [D, H, Hd], 'scale': f32 [H, Hd]}}
    y = (x @ kernel) * scale            # exact: a per-output-channel scale commutes with x @ .

`Linear` (layers.py) dispatches on the presence of `scale`, so `forward` stays the one
pure function and a quantized params tree is just a params tree. Which layers are
quantized: attention wq/wk/wv/wo and the feed-forward w1/w2/w3 (dense or experts), as
published fp8 checkpoints do; the embedding, norms, MoE gate and output stay in the
compute dtype (the gate decides routing; the output projection is ~2% of a 7B model).

Activations stay in the compute dtype (weight-only quantization), except for
compressed-tensors checkpoints whose config quantizes them: those Linear layers also
carry `input_scale` f32 []: > 0 is a static per-tensor scale from the checkpoint, 0
means a dynamic per-token scale (max |x| over the contracted dims / qmax). Stacked MoE
experts carry `<name>_input_scale` f32 [E] (`w1_input_scale`), 0 for dynamic: every
expert matmul quantizes its input rows per token (x for w1/w3, each SwiGLU row for w2;
moe.py), on every MoE path.

compressed-tensors checkpoints (`read_compressed_tensors`, `checkpoint_abstract`):

- supported: quant_method 'compressed-tensors', format float-quantized / int-quantized /
  naive-quantized; weights num_bits 8, type float (fp8 e4m3) or int (int8), symmetric,
  strategy channel or tensor, dynamic false; activations (input_activations) none
  (weight-only), dynamic per token (strategy token, dynamic true: FP8-dynamic, int8
  W8A8) for every quantized Linear and MoE expert, or static per tensor (strategy
  tensor, dynamic false) for attention and dense feed-forward layers, each of which must
  then store its `input_scale` (CheckpointError naming the missing tensors). Every
  config group must use the one scheme; a layer is quantized where the files hold its
  `weight_scale` (so `ignore` lists, e.g. lm_head or the MoE gate, need nothing more).
- refused with a ConfigError naming the field: other quant_methods (gptq, awq, ...) and
  formats (pack-quantized, marlin-24, ...), num_bits other than 8 (W4A16 ...),
  asymmetric, group / block strategies, dynamic weights, activations of another type
  than the weights, output_activations, kv_cache_scheme, groups with different schemes.
- refused with a CheckpointError: static activation quantization of MoE experts (their
  dynamic quantization is supported), a missing `input_scale` under a static scheme, an
  int8/fp8 weight without `weight_scale`, scales of no weight or of the wrong shape.

Loading: `Transformer.from_folder(..., quantize='int8' | 'fp8' | 'fp8-tensor')` quantizes
each weight as soon as it is read (the `finish` hook of `lora.load_hooks`), so the full-precision model
never exists at once; compressed-tensors checkpoints (llm-compressor, e.g.
FP8-dynamic) are read as they are stored (`read_compressed_tensors`,
`checkpoint_abstract`), never dequantized. `mistral-jax-convert --quantize MODE` writes the
same quantized tree to a converted folder, and writes compressed-tensors checkpoints as
stored (convert.py).

Speed: `qeinsum` is the one place the matmul happens. By default it is
einsum(x, kernel.astype(x.dtype)) * scale, left to XLA. `kernels.qmatmul_pallas` is a
fused dequantizing Pallas (Triton) kernel for decode-sized matmuls, selected with
MISTRAL_JAX_QMATMUL=pallas; it is checked for correctness in the Pallas interpreter and
lowered for CUDA in the tests on the CPU, but has not been run or timed on a GPU, so no
speed claim is made for either path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec

from mistral_jax.args import ModelArgs
from mistral_jax.checkpoint import flatten, unflatten
from mistral_jax.errors import CheckpointError, ConfigError, UserInputError

ParamPath = tuple[str, ...]
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


# ---------------------------------------------------------------------------------------------
# Which dims of a weight are contracted with the input, and where its extra leaves live.


def split_dims(path: ParamPath, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(lead, in, out) axes of the linear weight at `path` with `ndim` dims.

    Kernels are [in..., out...]: `wo` [H, Hd, D] contracts two dims, other kernels one.
    Stacked expert weights [E, in, out] have the expert axis as a `lead` dim.
    """
    if path[-1] == "kernel":
        n_in = 2 if path[-2] == "wo" else 1
        return (), tuple(range(n_in)), tuple(range(n_in, ndim))
    if ndim == 3 and path[-1] in ("w1", "w2", "w3"):
        return (0,), (1,), (2,)
    raise ValueError(f"{'/'.join(path)} is not a linear weight")


def is_linear_weight(path: ParamPath, ndim: int) -> bool:
    """Whether the param at `path` is a Linear kernel or a stacked [E, in, out] expert weight."""
    return path[-1] == "kernel" or (ndim == 3 and path[-1] in ("w1", "w2", "w3"))


def sibling(path: ParamPath, leaf: str) -> ParamPath:
    """The path of the extra leaf `leaf` ('scale', 'input_scale', 'lora_a', ...) of a weight.

    Inside a Linear's dict for `.../kernel`; `<name>_<leaf>` beside stacked expert weights.
    """
    if path[-1] == "kernel":
        return path[:-1] + (leaf,)
    return path[:-1] + (f"{path[-1]}_{leaf}",)


def should_quantize(path: ParamPath, ndim: int) -> bool:
    """Whether the weight at `path` is quantized by `quantize_params` / `--quantize`."""
    if not is_linear_weight(path, ndim):
        return False
    module = path[-2] if path[-1] == "kernel" else path[-1]
    return module in QUANTIZED_MODULES and path[0].startswith("layers_")


# ---------------------------------------------------------------------------------------------
# Quantize, dequantize, matmul.


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


# 'xla' (default): einsum(x, kernel.astype(x.dtype)) * scale, left to XLA. 'pallas': the
# kernel `kernels.qmatmul_pallas` for few-row matmuls (decode) on GPU; 'pallas-interpret':
# the same kernel run by the Pallas interpreter (any backend; tests). Read at trace time.
QMATMUL_ENV = "MISTRAL_JAX_QMATMUL"
PALLAS_MAX_ROWS = 64  # above this many rows (prefill) the matmul is compute-bound: XLA


def qmatmul_implementation() -> str:
    """MISTRAL_JAX_QMATMUL, checked: 'xla' (default), 'pallas' or 'pallas-interpret'."""
    from mistral_jax.kernels import KERNEL_CHOICES, env_choice

    return env_choice(QMATMUL_ENV, KERNEL_CHOICES, "xla")


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
    from mistral_jax.kernels import qmatmul_pallas

    y = qmatmul_pallas(x.reshape(rows, k), kernel.reshape(k, -1), scale.reshape(-1),
                       interpret=interpret)
    return y.reshape(*x.shape[:x.ndim - n_in], *kernel.shape[n_in:])


def qeinsum(eqn: str, x: jax.Array, kernel: jax.Array, scale: jax.Array,
            input_scale: jax.Array | None = None, *,
            axis_name: str | tuple[str, ...] = ()) -> jax.Array:
    """einsum(eqn, x, dequantized kernel) without materializing the dequantized kernel.

    kernel int8/fp8 [in..., out...] (or [lead..., in..., out...]), scale f32 over the kernel
    dims that reach the output. `input_scale` f32 [] (W8A8): x is quantized too, per token
    when it is 0 (`quantize_activations`; `axis_name` as there). Accumulates in float32
    and returns x.dtype. With
    MISTRAL_JAX_QMATMUL=pallas (GPU) few-row weight-only matmuls go through the fused
    `qmatmul_pallas` kernel instead of XLA (off by default: not yet measured on a GPU).
    """
    xs, ks, out = _parse(eqn)
    impl = qmatmul_implementation()
    if input_scale is None and impl != "xla":
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


# ---------------------------------------------------------------------------------------------
# Whole params trees.


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


def quantized_abstract_params(args: ModelArgs, mode: str | QuantMode, dtype=jnp.bfloat16):
    """ShapeDtypeStructs of `quantize_params(init_params(args, dtype), mode)`, nothing allocated."""
    from mistral_jax.model import abstract_params

    return quantize_params(abstract_params(args, dtype), mode)


def param_logical_axes(params, args: ModelArgs):
    """PartitionSpecs of logical axis names for a params tree with extra leaves.

    Covers quantized weights (`scale`: the kernel's lead and output axes; `input_scale`:
    the lead (expert) axis, none for a Linear's [] scale) and unmerged LoRA (`lora_a`:
    lead + input axes + rank; `lora_b`: lead + rank + output axes; the rank axis is never
    sharded). `params` may hold arrays or ShapeDtypeStructs.
    """
    from mistral_jax.model import logical_axes

    base = flatten(logical_axes(args), ())
    flat = flatten(params)
    out = {}
    for path in flat:
        if path in base:
            out[path] = base[path]
            continue
        found = None
        for suffix in ("input_scale", "scale", "lora_a", "lora_b"):
            for kernel in (path[:-1] + ("kernel",), path[:-1] + (path[-1][: -len(suffix) - 1],)):
                if kernel in base and sibling(kernel, suffix) == path:
                    found = kernel, suffix
        if found is None:
            raise ValueError(f"no logical axes known for param {'/'.join(path)}")
        kernel, suffix = found
        spec = tuple(base[kernel])
        lead, ins, outs = (tuple(spec[i] for i in dims)
                           for dims in split_dims(kernel, len(spec)))
        out[path] = PartitionSpec(*{
            "input_scale": lead,
            "scale": lead + outs,
            "lora_a": lead + ins + (None,),
            "lora_b": lead + (None,) + outs,
        }[suffix])
    return unflatten(out)


def param_bytes(tree) -> int:
    """Total bytes of the leaves (arrays or ShapeDtypeStructs) of a params tree."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# compressed-tensors checkpoints (llm-compressor): int8 / fp8 weights with `weight_scale`.


@dataclasses.dataclass(frozen=True)
class CompressedTensorsScheme:
    """The parts of a compressed-tensors `quantization_config` this package runs."""

    weight_dtype: np.dtype  # int8 or float8_e4m3fn
    weight_strategy: str  # 'channel' or 'tensor'
    activations: str | None  # None: weight-only; 'dynamic': per token; 'static': per tensor
    source: Path


def read_compressed_tensors(folder: str | Path) -> CompressedTensorsScheme | None:
    """The quantization scheme of a model folder, or None for an unquantized checkpoint.

    Reads `quantization_config` from config.json (HF layout) or `quantization` from
    params.json. Supported: 8-bit symmetric int or float weights, per channel or per
    tensor, with activations unquantized, dynamic per token, or static per tensor.
    Anything else is a ConfigError naming the field.
    """
    folder = Path(folder)
    cfg, source = None, None
    for name, key in (("params.json", "quantization"), ("config.json", "quantization_config")):
        f = folder / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{f}: not valid JSON ({e})") from None
            if isinstance(data, dict) and data.get(key):
                cfg, source = data[key], f
                break
    if cfg is None:
        return None

    def bad(field: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"{source}: quantization field {field} = {value!r} is not supported "
                           f"(supported: {want})")

    method = cfg.get("quant_method")
    if method != "compressed-tensors":
        raise bad("quant_method", method, "'compressed-tensors'")
    fmt = cfg.get("format")
    if fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
        raise bad("format", fmt, "float-quantized, int-quantized, naive-quantized")
    if cfg.get("kv_cache_scheme"):
        raise bad("kv_cache_scheme", cfg["kv_cache_scheme"], "null")
    groups = cfg.get("config_groups") or {}
    if not groups:
        raise bad("config_groups", groups, "one or more groups")
    schemes = set()
    for gname, group in groups.items():
        w = group.get("weights") or {}
        prefix = f"config_groups.{gname}.weights"
        if w.get("num_bits") != 8:
            raise bad(prefix + ".num_bits", w.get("num_bits"), "8")
        if w.get("type") not in ("float", "int"):
            raise bad(prefix + ".type", w.get("type"), "float, int")
        if not w.get("symmetric", True):
            raise bad(prefix + ".symmetric", w.get("symmetric"), "true")
        if w.get("strategy") not in ("channel", "tensor"):
            raise bad(prefix + ".strategy", w.get("strategy"), "channel, tensor")
        if w.get("dynamic"):
            raise bad(prefix + ".dynamic", w.get("dynamic"), "false")
        act = group.get("input_activations")
        mode = None
        if act:
            prefix = f"config_groups.{gname}.input_activations"
            if act.get("num_bits") != 8:
                raise bad(prefix + ".num_bits", act.get("num_bits"), "8")
            if act.get("type") != w["type"]:
                raise bad(prefix + ".type", act.get("type"), f"{w['type']!r} like the weights")
            if not act.get("symmetric", True):
                raise bad(prefix + ".symmetric", act.get("symmetric"), "true")
            want = "token" if act.get("dynamic") is True else "tensor"
            if act.get("dynamic") not in (True, False) or act.get("strategy") != want:
                raise bad(prefix + ".strategy", act.get("strategy"),
                          "'token' with dynamic: true, or 'tensor' with dynamic: false")
            mode = "dynamic" if act["dynamic"] else "static"
        if group.get("output_activations"):
            raise bad(f"config_groups.{gname}.output_activations", group["output_activations"],
                      "null")
        dtype = STORAGE_DTYPES["F8_E4M3" if w["type"] == "float" else "I8"]
        schemes.add((dtype, w["strategy"], mode))
    if len(schemes) > 1:
        raise bad("config_groups", sorted(groups), "groups that all use one scheme")
    dtype, strategy, mode = schemes.pop()
    return CompressedTensorsScheme(dtype, strategy, mode, source)


def scale_target(name: str, layout: str, args: ModelArgs):
    """`checkpoint.tensor_target` for `<weight>.weight_scale` / `<weight>.input_scale` names."""
    from mistral_jax.checkpoint import TensorTarget, tensor_target

    base, leaf = name.rsplit(".", 1)
    target = tensor_target(base + ".weight", layout, args)
    if target is None or not is_linear_weight(target.path, 3 if target.expert is not None else 0):
        return None
    if leaf == "input_scale":
        return TensorTarget(sibling(target.path, "input_scale"),
                            lambda s: np.asarray(s, np.float32).reshape(()), target.expert)
    n_in = len(split_dims(target.path, 3)[1]) if target.path[-1] == "kernel" else 1

    def transform(s: np.ndarray) -> np.ndarray:
        s = np.asarray(s, np.float32)
        if s.size == 1:  # per tensor: `plan_checkpoint` broadcasts it over the channels
            return s.reshape(())
        if n_in > 1:  # a single output dim (wo): rows are the channels as they are
            return s.reshape(-1)
        # Output channels are the rows of [out, in]: move them like a one-column weight
        # (this applies HF's q/k row permutation too).
        return target.transform(s.reshape(-1, 1))[0]

    return TensorTarget(sibling(target.path, "scale"), transform, target.expert)


def scale_shapes(leaf: str, shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """Checkpoint shapes accepted for a scale of params shape `shape` (one expert's slice)."""
    if leaf.endswith("input_scale"):
        return {(), (1,)}
    n = int(np.prod(shape))
    return {(n, 1), (n,), (1,), ()}


def checkpoint_abstract(files: list[Path], layout: str, args: ModelArgs, dtype,
                        scheme: CompressedTensorsScheme | None):
    """The params a checkpoint holds: `abstract_params`, with each weight that has a
    `weight_scale` quantized (its stored dtype) plus its scale leaves.

    Returns (abstract, extra) where `extra` maps paths to leaves the config implies but the
    files do not store: dynamic activation scales, 0.0, for every quantized Linear (f32 [])
    and stacked expert weight (f32 [E], `w1_input_scale`). With static activation
    quantization every quantized Linear must store its `input_scale` (CheckpointError
    naming the missing tensors), and quantized MoE experts are refused.
    """
    from mistral_jax.checkpoint import checkpoint_name, read_header, tensor_target
    from mistral_jax.model import abstract_params

    abstract = abstract_params(args, dtype)
    if scheme is None:
        return abstract, {}
    flat = flatten(abstract)
    headers = {}
    for f in files:
        for name, (shape, dt) in read_header(f).items():
            headers[name] = (f, shape, dt)
    extra = {}
    static_missing = {}  # input_scale path -> its checkpoint name, for static activations
    for name, (f, _, _) in headers.items():
        if not name.endswith((".weight_scale", ".input_scale")):
            continue
        base = name.rsplit(".", 1)[0] + ".weight"
        target = tensor_target(base, layout, args)
        if target is None or target.path not in flat or base not in headers:
            raise CheckpointError(f"{f}: tensor {name!r} scales no weight of this model "
                                  f"(no {base!r} in the checkpoint)")
        path, leaf = target.path, flat[target.path]
        if name.endswith(".input_scale"):
            if scheme.activations != "static":
                raise CheckpointError(f"{f}: tensor {name!r} but {scheme.source} does not "
                                      "declare static activation quantization")
            if target.expert is not None:
                raise CheckpointError(f"{f}: tensor {name!r}: static activation scales of MoE "
                                      "experts are not supported (dynamic ones are)")
            if base + "_scale" not in headers:
                raise CheckpointError(f"{f}: tensor {name!r} but its weight {base!r} is not "
                                      "quantized (no weight_scale)")
            flat[sibling(path, "input_scale")] = jax.ShapeDtypeStruct((), jnp.float32)
            continue
        wdt = headers[base][2]
        if wdt not in STORAGE_DTYPES or STORAGE_DTYPES[wdt] != scheme.weight_dtype:
            raise CheckpointError(
                f"{headers[base][0]}: tensor {base!r} has dtype {wdt}, expected "
                f"{scheme.weight_dtype} as {scheme.source} says (it has a weight_scale)")
        lead, _, outs = split_dims(path, len(leaf.shape))
        flat[path] = jax.ShapeDtypeStruct(leaf.shape, scheme.weight_dtype)
        flat[sibling(path, "scale")] = jax.ShapeDtypeStruct(
            tuple(leaf.shape[i] for i in lead + outs), jnp.float32)
        if scheme.activations == "dynamic":  # per token: experts [E] too, one per expert
            extra[sibling(path, "input_scale")] = np.zeros(
                tuple(leaf.shape[i] for i in lead), np.float32)
        elif scheme.activations == "static":
            if target.expert is not None:
                raise CheckpointError(
                    f"{f}: tensor {name!r}: {scheme.source} declares static activation "
                    "quantization (input_activations dynamic: false), which MoE experts do "
                    "not support (dynamic per-token quantization they do)")
            if base[: -len("weight")] + "input_scale" not in headers:
                in_path = sibling(path, "input_scale")
                static_missing[in_path] = checkpoint_name(in_path, None, layout)
    if static_missing:
        order = {sibling(p, "input_scale"): i for i, p in enumerate(flat)}  # model order
        names = ", ".join(static_missing[p] for p in sorted(static_missing, key=order.get)[:8])
        more = " ..." if len(static_missing) > 8 else ""
        raise CheckpointError(
            f"{files[0].parent}: {len(static_missing)} input_scale "
            f"tensor{'s' * (len(static_missing) > 1)} missing from the checkpoint: "
            f"{names}{more}; {scheme.source} declares static activation "
            "quantization (input_activations dynamic: false), so every quantized layer "
            "needs its input_scale")
    return unflatten(flat), extra


def drop_activation_quantization(params):
    """params without `input_scale` leaves: activations of every layer stay unquantized."""
    return unflatten({p: v for p, v in flatten(params).items() if p[-1] != "input_scale"})


# ---------------------------------------------------------------------------------------------
# Quality: how far quantized logits are from a reference.


def quality(forward_ref: Callable, forward_q: Callable, prompts: np.ndarray,
            new_tokens: int = 16) -> dict[str, float]:
    """Compare two models on fixed prompts [B, T]: relative logit error and greedy agreement.

    `forward_*(tokens [B, L], positions [B, L]) -> logits [B, L, V]` (positions -1: padding).
    Returns rel_err (max |dq - dref| / max |dref| over the prompts' logits), rms_rel_err
    (root-mean-square of the difference over that of the reference), top1_agreement
    (teacher-forced next-token argmax agreement over every prompt position), and
    greedy_agreement (fraction of `new_tokens` greedy continuation tokens equal, position by
    position, each model continuing its own text).
    """
    b, t = prompts.shape
    length = t + new_tokens
    tokens = np.zeros((b, length), np.int32)
    tokens[:, :t] = prompts
    pos = np.where(np.arange(length) < t, np.arange(length), -1).astype(np.int32)
    pos = np.broadcast_to(pos, (b, length))
    ref = np.asarray(forward_ref(tokens, pos), np.float64)[:, :t]
    got = np.asarray(forward_q(tokens, pos), np.float64)[:, :t]
    result = {
        "rel_err": float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))),
        "rms_rel_err": float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2))),
        "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
    }
    outs = []
    for fwd in (forward_ref, forward_q):
        seq, p = tokens.copy(), pos.copy()
        for i in range(t, length):
            logits = np.asarray(fwd(seq, p))
            seq[:, i] = logits[:, i - 1].argmax(-1)
            p[:, i] = i
        outs.append(seq[:, t:])
    result["greedy_agreement"] = float(np.mean(outs[0] == outs[1]))
    return result


PROMPTS = (
    "Return the number of items in a container.",
    "def read_config(path):\n    \"\"\"Read a JSON configuration file and return a dict.",
    "The quick brown fox jumps over the lazy dog, and the dog does not seem to mind.",
    "Raise ValueError if the argument is negative; otherwise return its square root.",
    "class Cache:\n    \"\"\"A least-recently-used cache with a fixed number of slots.",
    "Open the file in binary mode, read it in chunks of 4096 bytes and compute its hash.",
    "Return a new list with the elements of the iterable sorted in ascending order.",
    "import os\nimport sys\n\ndef main(argv):\n    \"\"\"Parse the command line arguments and",
)


def text_prompts(tok, n: int, length: int) -> np.ndarray:
    """[n, length] token ids of the fixed texts PROMPTS (BOS first): prompt i is text i,
    continued by the texts after it (one per line, wrapping around) until it has `length`
    tokens, then cut to `length`. UserInputError for more prompts than texts."""
    if not 1 <= n <= len(PROMPTS):
        raise UserInputError(f"--prompts must be in [1, {len(PROMPTS)}] (the fixed texts) with "
                             f"--ckpt, got {n}")
    if length < 2:
        raise UserInputError(f"--prompt-len must be at least 2 (BOS and one token), got {length}")
    rows = []
    for i in range(n):
        text, j = PROMPTS[i], i
        ids = tok.encode(text)
        while len(ids) < length:
            j += 1
            text += "\n" + PROMPTS[j % len(PROMPTS)]
            ids = tok.encode(text)
        rows.append(ids[:length])
    return np.array(rows, np.int32)


def main(argv=None) -> int:
    """`python -m mistral_jax.quant`: quality of int8 / fp8 against bfloat16, one JSON line each."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mistral_jax.quant", description=main.__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path,
                     help="a model folder (prompts: the fixed texts, tokenized, each continued "
                          "by the next texts to --prompt-len tokens)")
    src.add_argument("--preset", default="tiny",
                     help="random weights of a mistral_jax.bench preset (prompts: random tokens)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--prompts", type=int, default=8,
                   help=f"how many prompts (at most {len(PROMPTS)} with --ckpt)")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens per prompt, BOS included")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)

    import sys

    from mistral_jax.errors import MistralJaxError
    from mistral_jax.transformer import Transformer, jit_forward

    try:
        if ns.prompts < 1 or ns.prompt_len < 2 or ns.new_tokens < 1:
            raise UserInputError(f"--prompts and --new-tokens must be >= 1 and --prompt-len "
                                 f">= 2, got {ns.prompts}, {ns.new_tokens} and {ns.prompt_len}")
        if ns.ckpt is not None:
            from mistral_jax.convert import folder_quantization
            from mistral_jax.tokenizer import load_tokenizer

            stored = folder_quantization(ns.ckpt) if ns.ckpt.is_dir() else None
            if stored is not None:  # checked before anything loads
                raise UserInputError(
                    f"--ckpt {ns.ckpt} holds quantized weights ({stored}): this report "
                    "compares quantization against the bfloat16 weights; give the "
                    "unquantized folder it was converted from")
            tok = load_tokenizer(ns.ckpt)
            prompts = text_prompts(tok, ns.prompts, ns.prompt_len)
            model = Transformer.from_folder(ns.ckpt, dtype="bfloat16")
            args, params, name = model.args, model.params, str(ns.ckpt)
        else:
            from mistral_jax.bench import PRESETS
            from mistral_jax.model import random_params

            if ns.preset not in PRESETS:
                raise UserInputError(f"--preset must be one of {sorted(PRESETS)}, "
                                     f"got {ns.preset!r}")
            args, name = PRESETS[ns.preset], ns.preset
            params = random_params(args, ns.seed, jnp.bfloat16)  # leaf by leaf, as the bench
            prompts = np.random.default_rng(ns.seed).integers(
                0, args.vocab_size, (ns.prompts, ns.prompt_len)).astype(np.int32)
        if args.max_seq_len is not None and ns.prompt_len + ns.new_tokens > args.max_seq_len:
            raise UserInputError(f"--prompt-len {ns.prompt_len} + --new-tokens {ns.new_tokens} "
                                 f"exceeds the model's max_seq_len={args.max_seq_len}")
    except MistralJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def fwd(tree):
        return lambda t, pos: jit_forward(tree, jnp.asarray(t), jnp.asarray(pos), None,
                                          args=args)[0]

    for mode in ns.modes:
        qparams = quantize_params(params, mode)
        report = quality(fwd(params), fwd(qparams), prompts, ns.new_tokens)
        print(json.dumps({"model": name, "mode": mode, "reference": "bfloat16",
                          "device": jax.devices()[0].device_kind,
                          "prompts": list(prompts.shape), "new_tokens": ns.new_tokens,
                          "weight_bytes": param_bytes(qparams),
                          "bf16_weight_bytes": param_bytes(params), **report}), flush=True)
        del qparams
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
