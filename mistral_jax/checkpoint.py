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

import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from mistral_jax.args import ModelArgs
from mistral_jax.errors import CheckpointError
from mistral_jax.hf_config import IMAGES_NOTE, VISION, language_model_name

ParamPath = tuple[str, ...]
# Names some exporters add that carry nothing the model needs.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# The safetensors dtypes a weight may have (-> numpy dtype name): floats, and the int8 / fp8
# of compressed-tensors weights, which must come with their scales (quant.py).
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I8": "int8", "F8_E4M3": "float8_e4m3fn"}


def check_dtype(path: Path, name: str, dtype: str) -> None:
    """CheckpointError unless `dtype` (a safetensors dtype such as 'BF16') may hold a weight:
    the one check of the loader (`plan_checkpoint`) and the converter (`tensor_locations`)."""
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; expected one of "
                              f"{sorted(SAFETENSORS_DTYPES)}")


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
    if name.endswith((".weight_scale", ".input_scale")):  # compressed-tensors (quant.py)
        from mistral_jax.quant import scale_target

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


def safetensors_files(folder: Path, layout: str) -> list[Path]:
    """The weight files of a model folder, in a stable order."""
    if layout == "hf":
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names "
                                      "in the folder")
            files = sorted({folder / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index}: lists shard {f.name}, which is missing")
            return files
    files = sorted(folder.glob(_LAYOUTS[layout][2]))
    if not files:
        raise CheckpointError(_no_weights(folder, layout))
    return files


_LAYOUTS = {  # layout -> (name, config file, weight files)
    "mistral": ("Mistral", "params.json", "consolidated*.safetensors"),
    "hf": ("HF", "config.json", "model*.safetensors"),
}


def _names(paths: list[Path], most: int = 3) -> str:
    return ", ".join(p.name for p in paths[:most]) + (" ..." if len(paths) > most else "")


def _no_weights(folder: Path, layout: str) -> str:
    """Why a folder has no weight files for `layout`: what else is there, and what to do."""
    name, config, pattern = _LAYOUTS[layout]
    msg = f"{folder}: no weight files ({pattern}) for the {name} layout"
    other = "hf" if layout == "mistral" else "mistral"
    other_name, other_config, other_pattern = _LAYOUTS[other]
    found = sorted(folder.glob(other_pattern))
    if found and (folder / other_config).is_file():
        msg += (f"; the folder also has {other_config} and {_names(found)} ({other_name} "
                f"layout): to read those, pass --format {other} to mistral-jax-convert")
        if layout == "mistral":  # what load_args picks when both are there
            msg += (", or move params.json out of the folder for Transformer.from_folder "
                    "(which reads params.json when both configs are there)")
    elif found:
        msg += f"; {_names(found)} ({other_name} layout) would need {other_config}"
    torch = sorted(p for ext in ("*.pth", "*.pt", "*.bin") for p in folder.glob(ext))
    if torch:
        msg += (f"; {_names(torch)}: PyTorch pickle checkpoints are not read, only "
                f"safetensors files ({pattern})")
    return msg


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a safetensors header, validated by safetensors itself."""
    try:
        with safe_open(path, framework="np") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


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
    from mistral_jax.quant import STORAGE_DTYPES, is_quantized, scale_shapes

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
            if target.path[-1].endswith("scale"):  # compressed-tensors scales (quant.py)
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
        # compressed-tensors scale leaves (quant.py): `scale` is the tensor `.weight_scale`,
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
    from mistral_jax.quant import STORAGE_DTYPES

    by_file: dict[Path, list[PlannedTensor]] = {}
    for p in plan:
        by_file.setdefault(p.file, []).append(p)
    for path, items in by_file.items():
        try:
            with safe_open(path, framework="np") as f:
                for p in items:
                    w = _get_tensor(f, path, p.name)
                    # int8/fp8 weights keep their dtype, their scales are float32 (quant.py)
                    dt = (w.dtype if w.dtype in STORAGE_DTYPES.values() else
                          np.float32 if p.target.path[-1].endswith("scale") else dtype)
                    w = p.target.transform(w)  # (ascontiguousarray makes 0-d arrays 1-d)
                    yield p, np.ascontiguousarray(w).reshape(w.shape).astype(dt, copy=False)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: failed to read tensors ({e})") from None


def _broadcast(transform: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]):
    return lambda w: np.broadcast_to(transform(w), shape)


def _get_tensor(f, path: Path, name: str) -> np.ndarray:
    """A tensor from an open safetensors file; fp8, which numpy lacks, via a memory map."""
    from mistral_jax.quant import STORAGE_DTYPES

    sl = f.get_slice(name)
    dt = sl.get_dtype()
    if not dt.startswith("F8"):
        return f.get_tensor(name)
    if dt not in STORAGE_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        start, end = json.loads(fh.read(n))[name]["data_offsets"]
    shape = tuple(sl.get_shape())
    return np.memmap(path, STORAGE_DTYPES[dt], "r", offset=8 + n + start,
                     shape=(end - start,)).reshape(shape)


def flatten(tree, prefix: ParamPath = ()) -> dict[ParamPath, Any]:
    """Nested dicts (params, abstract params, logical axes) -> {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: dict[ParamPath, Any]) -> dict:
    """{path tuple: leaf} -> nested dicts (the inverse of `flatten`)."""
    tree: dict = {}
    for path, v in flat.items():
        set_leaf(tree, path, v)
    return tree


def set_leaf(tree: dict, path: ParamPath, value) -> None:
    """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def load_params(folder: str | Path, args: ModelArgs, layout: str, dtype, *,
                place: Callable[[ParamPath, np.ndarray], object] | None = None,
                progress: bool = False,
                finish: Callable[[ParamPath, np.ndarray], dict[ParamPath, np.ndarray]] | None = None):
    """Load a safetensors checkpoint folder into a params pytree of `dtype`.

    `place(path, host_array)` puts each finished leaf on its device(s) (default
    `jax.device_put`); it is called once per leaf as soon as the leaf is complete,
    so at most one leaf (a stacked expert weight for MoE) is held on the host.
    `finish(path, host_array) -> {path: host_array}` may first turn a finished leaf
    into other leaves (LoRA merge, quantization: `lora.load_hooks`). Weights stored
    int8/fp8 with a `weight_scale` (compressed-tensors) stay so (`quant.py`).
    """
    import jax

    from mistral_jax.quant import checkpoint_abstract, read_compressed_tensors

    folder = Path(folder)
    np_dtype = np.dtype(dtype)
    files = safetensors_files(folder, layout)
    abstract, implied = checkpoint_abstract(files, layout, args, np_dtype,
                                            read_compressed_tensors(folder))
    plan = plan_checkpoint(files, layout, args, abstract)
    expected = flatten(abstract)
    place = place or (lambda path, arr: jax.device_put(arr))
    pending: dict[ParamPath, tuple[np.ndarray, set[int]]] = {}
    params: dict = {}
    items = iter_tensors(plan, np_dtype)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(plan), desc=f"loading {folder.name}", unit="tensor")

    def emit(path: ParamPath, w: np.ndarray) -> None:
        for leaf_path, leaf in (finish(path, w) if finish else {path: w}).items():
            set_leaf(params, leaf_path, place(leaf_path, leaf))

    for p, w in items:
        path = p.target.path
        if p.target.expert is None:
            emit(path, w)
            continue
        buf, done = pending.setdefault(path, (np.empty(expected[path].shape, expected[path].dtype),
                                              set()))
        buf[p.target.expert] = w
        done.add(p.target.expert)
        if len(done) == buf.shape[0]:
            emit(path, buf)
            del pending[path]
    for path, w in implied.items():  # e.g. dynamic activation scales, not stored in files
        emit(path, w)
    return params
