"""Loading a model folder: safetensors (Mistral / HF layouts), compressed-tensors and
converted Orbax folders, with LoRA and quantization applied as each weight arrives.

    args, params = load(folder, dtype=jnp.bfloat16, mesh=None)   # what from_folder calls
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mistral_jax.args import ModelArgs
from mistral_jax.checkpoint import iter_tensors, plan_checkpoint
from mistral_jax.compressed_tensors import checkpoint_abstract, read_compressed_tensors
from mistral_jax.config import args_from_params_json, load_args
from mistral_jax.errors import UserInputError
from mistral_jax.lora import attach_lora, merge_leaf, merge_lora
from mistral_jax.lora_file import load_lora
from mistral_jax.mesh import param_shardings, place_fn, place_params
from mistral_jax.orbax_restore import (
    folder_quantization,
    is_converted,
    restore_params,
    stored_quantization,
)
from mistral_jax.quantize import quantize_leaf, resolve_mode
from mistral_jax.safetensors_file import safetensors_files
from mistral_jax.tree import ParamPath, flatten, is_linear_weight, set_leaf, unflatten


def load_params(folder: str | Path, args: ModelArgs, layout: str, dtype, *,
                place: Callable[[ParamPath, np.ndarray], object] | None = None,
                progress: bool = False,
                finish: Callable[[ParamPath, np.ndarray], dict[ParamPath, np.ndarray]] | None = None):
    """Load a safetensors checkpoint folder into a params pytree of `dtype`.

    `place(path, host_array)` puts each finished leaf on its device(s) (default
    `jax.device_put`); it is called once per leaf as soon as the leaf is complete,
    so at most one leaf (a stacked expert weight for MoE) is held on the host.
    `finish(path, host_array) -> {path: host_array}` may first turn a finished leaf
    into other leaves (LoRA merge, quantization: `load.load_hooks`). Weights stored
    int8/fp8 with a `weight_scale` (compressed-tensors) stay so (`quant.py`).
    """
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


def load_hooks(folder: Path, args: ModelArgs, dtype, *, lora_path=None, lora_merge=None,
               lora_scaling=None, quantize=None, prequantized: str | None = None):
    """What `Transformer.from_folder` does around `load.load_params` for LoRA and
    quantization: returns (finish, post) where `finish(path, host_array)` merges the
    adapter into each weight and then quantizes it as it is read, and `post(params)`
    attaches an unmerged adapter (or merges into an already quantized checkpoint).

    `lora_merge=None` merges unless the folder's params.json has a lora block, which,
    as in mistral-inference, asks for the adapter to stay unmerged. `prequantized` names
    how the weights are already stored quantized; None: `orbax_restore.folder_quantization`.
    """
    if prequantized is None:
        prequantized = folder_quantization(folder)
    if quantize is not None:
        resolve_mode(quantize)
        if prequantized:
            raise UserInputError(f"{folder}: the checkpoint is already quantized "
                                 f"({prequantized}); load it without quantize=")
    adapter = None if lora_path is None else load_lora(lora_path, args, dtype=dtype,
                                                       scaling=lora_scaling)
    merge = adapter is not None and (args.lora is None if lora_merge is None else lora_merge)
    ad = {} if prequantized or not merge else flatten(adapter)  # merged as each weight loads

    def finish(path, w):
        if ad and is_linear_weight(path, w.ndim):
            w, _ = merge_leaf(path, w, ad)
        return quantize_leaf(path, w, quantize) if quantize is not None else {path: w}

    def post(params):
        if adapter is None:
            return params
        if not merge:
            return attach_lora(params, adapter)
        return merge_lora(params, adapter) if prequantized else params

    return (finish if ad or quantize is not None else None), post


def finish_params(params, finish):
    """Apply a `load_hooks` finish to every leaf of an already loaded params tree."""
    if finish is None:
        return params
    out = {}
    for path, w in flatten(params).items():
        out.update(finish(path, w))
    return unflatten(out)


def load(folder: str | Path, *, dtype: Any, mesh: Mesh | None = None, progress: bool = False,
         lora_path: str | Path | None = None, lora_merge: bool | None = None,
         lora_scaling: float | None = None, quantize: str | None = None,
         **arg_overrides: Any) -> tuple[ModelArgs, Any]:
    """(args, params) of a model folder, as `Transformer.from_folder` documents its arguments.

    A converted folder (`mistral-jax-convert`) is restored from Orbax, each device reading
    its shards; safetensors folders are read tensor by tensor, each finished leaf placed on
    its devices (`mesh`: a resolved Mesh or None). Everything that can be checked before
    reading a weight (configs, `quantize=` on quantized weights, the adapter) is.
    """
    folder = Path(folder)
    hooks = dict(lora_path=lora_path, lora_merge=lora_merge, lora_scaling=lora_scaling,
                 quantize=quantize)
    if is_converted(folder):
        args = args_from_params_json(folder / "params.json", **arg_overrides)
        stored = stored_quantization(folder)
        finish, post = load_hooks(folder, args, dtype, prequantized=stored and stored["mode"],
                                  **hooks)
        shardings = None if mesh is None else param_shardings(args, mesh)
        params = restore_params(folder, args, dtype, shardings, progress=progress)
        params = post(finish_params(params, finish))
    else:
        args, layout = load_args(folder, **arg_overrides)
        finish, post = load_hooks(folder, args, dtype, **hooks)
        place = None if mesh is None else place_fn(args, mesh)
        params = post(load_params(folder, args, layout, dtype, place=place, progress=progress,
                                  finish=finish))
    if mesh is not None:  # leaves the load hooks added or changed
        params = place_params(params, args, mesh)
    return args, params
