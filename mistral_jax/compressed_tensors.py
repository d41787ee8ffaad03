"""compressed-tensors checkpoints (llm-compressor): int8 / fp8 weights with `weight_scale`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.args import ModelArgs
from mistral_jax.checkpoint import checkpoint_name, tensor_target
from mistral_jax.errors import CheckpointError, ConfigError
from mistral_jax.model import abstract_params
from mistral_jax.quantize import STORAGE_DTYPES
from mistral_jax.safetensors_file import read_header
from mistral_jax.tree import flatten, sibling, split_dims, unflatten


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
