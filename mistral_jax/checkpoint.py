"""Reading model weights from the folders users have: Mistral's and Hugging Face's.

Mistral layout: `params.json` + `consolidated*.safetensors` with names such as
`layers.0.attention.wq.weight`. HF layout: `config.json` + `model*.safetensors`
(+ `model.safetensors.index.json`) with names such as
`model.layers.0.self_attn.q_proj.weight`, whose q/k rows are permuted for
"rotate half" rotary embeddings; we undo that permutation.

Loading runs in two passes: the headers of every file are checked first (names,
shapes, nothing missing or unknown), and only then are tensors read, one at a
time from the memory map, transformed and cast. A bad checkpoint therefore fails
before any weight is read, with one `CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mistral_jax.args import ModelArgs
from mistral_jax.errors import CheckpointError
from mistral_jax.hf_config import IMAGES_NOTE, VISION, language_model_name
from mistral_jax.quantize import STORAGE_DTYPES, is_quantized
from mistral_jax.safetensors_file import (
    _LAYOUTS,
    _names,
    check_dtype,
    iter_file_tensors,
    read_header,
)
from mistral_jax.tree import ParamPath, flatten, is_linear_weight, sibling, split_dims

# Names some exporters add that carry nothing the model needs.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class TensorTarget:
    """Where a checkpoint tensor goes in the params pytree, and how it gets there."""

    path: ParamPath
    transform: Callable[[np.ndarray], np.ndarray]
    expert: int | None = None  # index along the stacked expert axis, for MoE weights


def _t(w: np.ndarray) -> np.ndarray:
    return w.T


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _heads_in(n_heads: int, head_dim: int, hf_permuted: bool):
    """[n_heads * head_dim, D] (torch out, in) -> kernel [D, n_heads, head_dim]."""

    def transform(w: np.ndarray) -> np.ndarray:
        d = w.shape[1]
        if hf_permuted:  # HF stores each head as [real halves | imaginary halves]
            w = w.reshape(n_heads, 2, head_dim // 2, d).transpose(0, 2, 1, 3)
        return w.reshape(n_heads, head_dim, d).transpose(2, 0, 1)

    return transform


def _heads_out(n_heads: int, head_dim: int):
    """wo [D, n_heads * head_dim] -> kernel [n_heads, head_dim, D]."""
    return lambda w: w.T.reshape(n_heads, head_dim, w.shape[0])


_MISTRAL = {
    "attention.wq": "wq", "attention.wk": "wk", "attention.wv": "wv", "attention.wo": "wo",
    "feed_forward.w1": "w1", "feed_forward.w2": "w2", "feed_forward.w3": "w3",
    "attention_norm": "attention_norm", "ffn_norm": "ffn_norm", "feed_forward.gate": "gate",
}
_HF = {
    "self_attn.q_proj": "wq", "self_attn.k_proj": "wk", "self_attn.v_proj": "wv",
    "self_attn.o_proj": "wo", "mlp.gate_proj": "w1", "mlp.down_proj": "w2", "mlp.up_proj": "w3",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "block_sparse_moe.gate": "gate",
}
_MISTRAL_EXPERT = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight")
_HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_MISTRAL_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def tensor_target(name: str, layout: str, args: ModelArgs) -> TensorTarget | None:
    """Map a checkpoint tensor name to its place in params; None if it is not a model weight."""
    name = language_model_name(name)
    if name.endswith((".weight_scale", ".input_scale")):  # compressed-tensors (compressed_tensors.py)
        return scale_target(name, layout, args)
    hf = layout == "hf"
    a = args
    top = ({"model.embed_tokens.weight": "embedding", "model.norm.weight": "norm",
            "lm_head.weight": "output"} if hf else
           {"tok_embeddings.weight": "embedding", "norm.weight": "norm",
            "output.weight": "output"})
    if name in top:
        key = top[name]
        if key == "output" and args.tied_embeddings:  # the embedding is the output head
            return None
        if key == "embedding":
            return TensorTarget(("embedding",), _identity)
        if key == "norm":
            return TensorTarget(("norm", "weight"), _identity)
        return TensorTarget(("output", "kernel"), _t)
    m = (_HF_EXPERT if hf else _MISTRAL_EXPERT).fullmatch(name)
    if m:
        layer, expert, w = int(m[1]), int(m[2]), m[3]
        if a.moe is None or layer >= a.n_layers or expert >= a.moe.num_experts:
            return None
        return TensorTarget((f"layers_{layer}", "feed_forward", w), _t, expert)
    m = (_HF_LAYER if hf else _MISTRAL_LAYER).fullmatch(name)
    if not m or int(m[1]) >= a.n_layers:
        return None
    layer, module = f"layers_{m[1]}", (_HF if hf else _MISTRAL).get(m[2])
    if module is None:
        return None
    if module in ("attention_norm", "ffn_norm"):
        return TensorTarget((layer, module, "weight"), _identity)
    if module == "gate":
        return None if a.moe is None else TensorTarget((layer, "feed_forward", "gate", "kernel"), _t)
    if module in ("wq", "wk", "wv"):
        heads = a.n_heads if module == "wq" else a.n_kv_heads
        transform = _heads_in(heads, a.head_dim, hf_permuted=hf and module != "wv")
        return TensorTarget((layer, "attention", module, "kernel"), transform)
    if module == "wo":
        return TensorTarget((layer, "attention", "wo", "kernel"), _heads_out(a.n_heads, a.head_dim))
    if a.moe is not None:  # dense w1/w2/w3 names do not belong in a MoE model
        return None
    return TensorTarget((layer, "feed_forward", module, "kernel"), _t)










@dataclass(frozen=True)
class PlannedTensor:
    file: Path
    name: str
    target: TensorTarget


def plan_checkpoint(files: list[Path], layout: str, args: ModelArgs, abstract) -> list[PlannedTensor]:
    """Check every header against the expected params; return what to read, in file order.

    `abstract` is the params pytree of ShapeDtypeStructs (`model.abstract_params`).
    Raises CheckpointError for an unknown tensor, a wrong shape, a duplicate or a missing one.
    """
    expected = flatten(abstract)
    plan, seen, vision = [], {}, 0
    for path in files:
        for name, (shape, dt) in read_header(path).items():
            if IGNORED.fullmatch(name):
                continue
            if VISION.fullmatch(name):
                vision += 1
                continue
            target = tensor_target(name, layout, args)
            if target is None or target.path not in expected:
                raise CheckpointError(
                    f"{path}: unexpected tensor {name!r} for a {layout}-layout model with "
                    f"n_layers={args.n_layers}, moe={args.moe}")
            check_dtype(path, name, dt)
            leaf = expected[target.path]
            param_shape = leaf.shape[1:] if target.expert is not None else leaf.shape
            if dt in STORAGE_DTYPES and not is_quantized(leaf):
                raise CheckpointError(f"{path}: tensor {name!r} is stored as {dt} but the "
                                      "checkpoint has no weight_scale for it")
            if target.path[-1].endswith("scale"):  # compressed-tensors scales (compressed_tensors.py)
                if tuple(shape) not in scale_shapes(target.path[-1], param_shape):
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {list(shape)}, expected one scale "
                        f"per output channel ({int(np.prod(param_shape))}) or one per tensor")
                if param_shape and int(np.prod(shape)) == 1:  # per tensor: broadcast
                    target = TensorTarget(target.path, _broadcast(target.transform, param_shape),
                                          target.expert)
                want = tuple(shape)
            else:
                want = _torch_shape(target, param_shape)
            if tuple(shape) != want:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {list(shape)}, expected {list(want)} "
                    f"for these args")
            key = (target.path, target.expert)
            if key in seen:
                raise CheckpointError(f"{path}: tensor {name!r} also appears in {seen[key]}")
            seen[key] = path
            plan.append(PlannedTensor(path, name, target))
    missing = []
    for p, leaf in expected.items():
        n = leaf.shape[0] if _is_stacked_expert(p, args) else None
        for e in ([None] if n is None else range(n)):
            if (p, e) not in seen:
                param = "/".join(p) + ("" if e is None else f"[expert {e}]")
                name = checkpoint_name(p, e, layout)
                missing.append(param if name == param else f"{name} ({param})")
    if missing:
        names = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        folder = files[0].parent
        index = folder / "model.safetensors.index.json"
        unlisted = (sorted(set(folder.glob(_LAYOUTS["hf"][2])) - set(files))
                    if layout == "hf" and index.is_file() else [])
        hint = (f"; {index.name} does not list {_names(unlisted)}, which the folder has (an "
                "index from another download?)" if unlisted else "")
        raise CheckpointError(
            f"{folder}: {len(missing)} weights missing from the checkpoint: {names}{hint}")
    if vision:
        print(IMAGES_NOTE.format(folder=files[0].parent, n=vision), file=sys.stderr)
    return plan


def checkpoint_name(path: ParamPath, expert: int | None, layout: str) -> str:
    """The checkpoint tensor name of a param leaf (the inverse of `tensor_target`), for messages."""
    hf = layout == "hf"
    top = {("embedding",): "model.embed_tokens.weight" if hf else "tok_embeddings.weight",
           ("norm", "weight"): "model.norm.weight" if hf else "norm.weight",
           ("output", "kernel"): "lm_head.weight" if hf else "output.weight"}
    if path in top:
        return top[path]
    m = re.fullmatch(r"layers_(\d+)", path[0])
    if m:
        prefix = f"model.layers.{m[1]}." if hf else f"layers.{m[1]}."
        # compressed-tensors scale leaves (compressed_tensors.py): `scale` is the tensor `.weight_scale`,
        # `input_scale` is `.input_scale`
        suffix = {"scale": "weight_scale", "input_scale": "input_scale"}
        if expert is not None:
            experts = "block_sparse_moe.experts" if hf else "feed_forward.experts"
            w, _, leaf = path[-1].partition("_")  # w1, or w1_scale / w1_input_scale
            return f"{prefix}{experts}.{expert}.{w}.{suffix.get(leaf, 'weight')}"
        names = {module: name for name, module in (_HF if hf else _MISTRAL).items()}
        if len(path) >= 3 and path[-1] in ("kernel", "weight") and path[-2] in names:
            return f"{prefix}{names[path[-2]]}.weight"
        if len(path) >= 3 and path[-1] in suffix and path[-2] in names:
            return f"{prefix}{names[path[-2]]}.{suffix[path[-1]]}"
    return "/".join(path) + ("" if expert is None else f"[expert {expert}]")


def _is_stacked_expert(path: ParamPath, args: ModelArgs) -> bool:
    return (args.moe is not None and path[-2:-1] == ("feed_forward",)
            and path[-1] in ("w1", "w2", "w3", "w1_scale", "w2_scale", "w3_scale"))


def _torch_shape(target: TensorTarget, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint (PyTorch [out, in]) shape of a param (or one expert's slice) of `shape`."""
    module = target.path[-2] if target.path[-1] == "kernel" else target.path[-1]
    if target.path == ("embedding",) or target.path[-1] == "weight":
        return tuple(shape)
    if module in ("wq", "wk", "wv"):  # kernel [D, H, Hd] <- [H * Hd, D]
        return (shape[1] * shape[2], shape[0])
    if module == "wo":  # kernel [H, Hd, D] <- [D, H * Hd]
        return (shape[2], shape[0] * shape[1])
    return tuple(reversed(shape))  # plain [in, out] <- [out, in]


def iter_tensors(plan: list[PlannedTensor], dtype) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    """Read, transform and cast each planned tensor, one at a time, from the memory map."""
    by_file: dict[Path, list[PlannedTensor]] = {}
    for p in plan:
        by_file.setdefault(p.file, []).append(p)
    for path, items in by_file.items():
        arrays = iter_file_tensors(path, [p.name for p in items])
        for p, (_, w) in zip(items, arrays):
            # int8/fp8 weights keep their dtype, their scales are float32 (quantize.py)
            dt = (w.dtype if w.dtype in STORAGE_DTYPES.values() else
                  np.float32 if p.target.path[-1].endswith("scale") else dtype)
            w = p.target.transform(w)  # (ascontiguousarray makes 0-d arrays 1-d)
            yield p, np.ascontiguousarray(w).reshape(w.shape).astype(dt, copy=False)


def _broadcast(transform: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]):
    return lambda w: np.broadcast_to(transform(w), shape)


def scale_target(name: str, layout: str, args: ModelArgs):
    """`checkpoint.tensor_target` for `<weight>.weight_scale` / `<weight>.input_scale` names."""
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
