"""Reading LoRA adapters as mistral-finetune and peft write them.
"""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from mistral_jax.args import ModelArgs, config_field
from mistral_jax.checkpoint import tensor_target
from mistral_jax.config import lora_args, read_json
from mistral_jax.errors import CheckpointError, ConfigError
from mistral_jax.model import abstract_params
from mistral_jax.safetensors_file import iter_file_tensors, read_header
from mistral_jax.tree import ParamPath, flatten, is_linear_weight, sibling, split_dims, unflatten

DEFAULT_SCALING = 2.0


_KEY = re.compile(r"(?:base_model\.model\.)?(?P<base>.+)\.lora_(?P<ab>[AB])\.weight")


_FLOAT_DTYPES = ("F32", "F16", "BF16")


def _adapter_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("lora.safetensors", "adapter_model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no lora.safetensors or adapter_model.safetensors")
    raise CheckpointError(f"{path}: no such LoRA adapter file or folder")


def _adapter_config(file: Path, args: ModelArgs) -> tuple[float, int | None, str]:
    """(scaling, rank or None, where they came from) from peft's adapter_config.json
    (lora_alpha / r), a params.json lora block beside the adapter (rank and scaling, both
    required as in mistral-inference's LoraArgs), the base model's args.lora, or the
    default 2.0."""
    peft = file.parent / "adapter_config.json"
    if peft.is_file():
        cfg = read_json(peft)
        if cfg.get("target_parameters"):  # peft's adapters on fused expert tensors
            raise ConfigError(
                f"{peft}: target_parameters = {cfg['target_parameters']!r}: peft adapters on "
                "parameters (transformers' fused Mixtral experts) are not supported; adapters "
                "on modules (q_proj ... down_proj) are, and expert adapters in "
                "mistral-finetune's format (layers.N.feed_forward.experts.E.w1.lora_A.weight)")
        for key, ok in (("peft_type", lambda v: v in (None, "LORA")),
                        ("rank_pattern", lambda v: not v), ("alpha_pattern", lambda v: not v),
                        ("use_dora", lambda v: not v), ("fan_in_fan_out", lambda v: not v),
                        ("bias", lambda v: v in (None, "none"))):
            if not ok(cfg.get(key)):
                raise ConfigError(f"{peft}: {key} = {cfg.get(key)!r} is not supported")
        r = config_field(peft, cfg, "r", "int")
        alpha = config_field(peft, cfg, "lora_alpha", "float") if "lora_alpha" in cfg else float(r)
        return (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r), r, str(peft)
    params = file.parent / "params.json"
    if params.is_file():
        data = read_json(params)
        if data.get("lora") is not None:
            lora = lora_args(data["lora"], params)
            return lora.scaling, lora.rank, str(params)
    if args.lora is not None:
        return (float(args.lora.scaling), int(args.lora.rank),
                "the base model's params.json lora block")
    return DEFAULT_SCALING, None, "the default"


def _read_tensors(file: Path) -> dict[str, tuple[tuple[int, ...], str, np.ndarray | None]]:
    """name -> (shape, safetensors dtype, array for float tensors else None)."""
    header = read_header(file)
    floats = dict(iter_file_tensors(file, [n for n, (_, dt) in header.items()
                                           if dt in _FLOAT_DTYPES]))
    return {name: (shape, dt, floats.get(name)) for name, (shape, dt) in header.items()}


def load_lora(path: str | Path, args: ModelArgs, *, dtype: Any = jnp.float32,
              scaling: float | None = None) -> dict:
    """Read and check a LoRA adapter for a model of `args`; returns the adapter pytree.

    The adapter is a params-shaped pytree of `lora_a` [in..., r] / `lora_b` [r, out...]
    leaves in `dtype`, lora_b holding scaling * B (see module docstring). Raises
    CheckpointError naming the key for a key that is not a LoRA tensor or matches no
    linear layer, a missing A/B partner, ranks or shapes that do not fit, and tensors of
    different or non-float dtypes; ConfigError for a rank that disagrees with the config.
    """
    file = _adapter_file(Path(path))
    scale, cfg_rank, cfg_source = _adapter_config(file, args)
    if scaling is not None:
        scale = float(scaling)
    tensors = _read_tensors(file)
    if not tensors:
        raise CheckpointError(f"{file}: the adapter holds no tensors")
    expected = flatten(abstract_params(args))
    # The dtype most keys have is the adapter's; a key with another is the one named.
    dtypes = collections.Counter(dt for _, dt, _ in tensors.values())
    common = dtypes.most_common(1)[0][0]
    pairs: dict[tuple[ParamPath, int | None], dict[str, str]] = {}
    targets = {}
    for name, (_, dt, _) in tensors.items():
        m = _KEY.fullmatch(name)
        if m is None:
            raise CheckpointError(f"{file}: key {name!r} is not a LoRA tensor "
                                  "(expected <module>.lora_A.weight / <module>.lora_B.weight)")
        if dt not in _FLOAT_DTYPES:
            raise CheckpointError(f"{file}: key {name!r} has dtype {dt}; LoRA weights must be "
                                  "float32, float16 or bfloat16")
        if dt != common:
            example = next(k for k, (_, d, _) in tensors.items() if d == common)
            raise CheckpointError(f"{file}: key {name!r} has dtype {dt} but {example!r} (and "
                                  f"{dtypes[common] - 1} other keys) have {common}; all LoRA "
                                  "weights must share one dtype")
        base = m["base"]
        layout = "hf" if base.startswith(("model.", "lm_head")) else "mistral"
        target = tensor_target(base + ".weight", layout, args)
        if (target is None or target.path not in expected
                or not is_linear_weight(target.path, len(expected[target.path].shape))):
            raise CheckpointError(
                f"{file}: key {name!r} matches no linear layer of this model "
                f"(n_layers={args.n_layers}, moe={args.moe})")
        key = (target.path, target.expert)
        slot = pairs.setdefault(key, {})
        if m["ab"] in slot:
            raise CheckpointError(f"{file}: key {name!r} and {slot[m['ab']]!r} both adapt "
                                  f"{'/'.join(target.path)}")
        slot[m["ab"]] = name
        targets[key] = target

    # Each pair on its own first: lora_A [r, in] and lora_B [out, r] of its layer.
    ranks: dict[tuple[ParamPath, int | None], int] = {}
    for key, slot in pairs.items():
        path, _ = key
        for ab, other in (("A", "B"), ("B", "A")):
            if ab not in slot:
                raise CheckpointError(f"{file}: key {slot[other]!r} has no matching "
                                      f"lora_{ab} tensor")
        a_name, b_name = slot["A"], slot["B"]
        shape = expected[path].shape
        _, ins, outs = split_dims(path, len(shape))
        n_in = math.prod(shape[i] for i in ins)
        n_out = math.prod(shape[i] for i in outs)
        a_shape, b_shape = list(tensors[a_name][0]), list(tensors[b_name][0])
        if len(a_shape) != 2 or a_shape[1] != n_in:
            raise CheckpointError(f"{file}: key {a_name!r} has shape {a_shape}, expected "
                                  f"[rank, {n_in}] (rank, in_features)")
        if len(b_shape) != 2 or b_shape[0] != n_out:
            raise CheckpointError(f"{file}: key {b_name!r} has shape {b_shape}, expected "
                                  f"[{n_out}, rank] (out_features, rank)")
        if a_shape[0] != b_shape[1]:
            raise CheckpointError(
                f"{file}: keys {a_name!r} {a_shape} and {b_name!r} {b_shape} disagree on the "
                f"rank ({a_shape[0]} vs {b_shape[1]}): lora_A is [rank, in_features], lora_B "
                "[out_features, rank]")
        ranks[key] = a_shape[0]
    # Then one rank for every pair: the one most pairs have; the others are named.
    counts = collections.Counter(ranks.values())
    rank = counts.most_common(1)[0][0]
    odd = [pairs[k]["A"] for k, r in ranks.items() if r != rank]
    if odd:
        example = next(pairs[k]["A"] for k, r in ranks.items() if r == rank)
        listed = ", ".join(f"{n!r} has rank {tensors[n][0][0]}" for n in odd[:4])
        raise CheckpointError(
            f"{file}: key {listed}{' ...' if len(odd) > 4 else ''} but {example!r} (and "
            f"{counts[rank] - 1} other pairs) have rank {rank}; all LoRA pairs must share one "
            "rank")
    if cfg_rank is not None and rank != cfg_rank:
        first = next(iter(pairs.values()))["A"]
        raise ConfigError(f"{file}: key {first!r} has rank {rank} but {cfg_source} says "
                          f"rank {cfg_rank}")
    flat: dict[ParamPath, np.ndarray] = {}
    for key, slot in pairs.items():
        path, expert = key
        a_name, b_name = slot["A"], slot["B"]
        shape = expected[path].shape
        lead, ins, _ = split_dims(path, len(shape))
        A = tensors[a_name][2].astype(np.float32)
        B = tensors[b_name][2].astype(np.float32) * np.float32(scale)
        transform = targets[key].transform
        if len(ins) == 1:  # one input dim: A^T is [in, r]; B moves like a weight with r inputs
            a, b = A.T, transform(B)
        else:  # one output dim (wo): A moves like a weight with r outputs; B^T is [r, out]
            a, b = transform(A), B.T
        a_path, b_path = sibling(path, "lora_a"), sibling(path, "lora_b")
        if expert is None:
            flat[a_path], flat[b_path] = a, b
        else:  # stacked experts: experts the adapter leaves out get zeros
            e = shape[lead[0]]
            flat.setdefault(a_path, np.zeros((e, *a.shape), np.float32))[expert] = a
            flat.setdefault(b_path, np.zeros((e, *b.shape), np.float32))[expert] = b
    return unflatten({p: jnp.asarray(v, dtype) for p, v in flat.items()})
