"""Converted folders (`mistral-jax-convert`): the manifest, and restoring the Orbax arrays onto devices.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mistral_jax.args import ModelArgs
from mistral_jax.compressed_tensors import read_compressed_tensors
from mistral_jax.dtypes import resolve_dtype
from mistral_jax.errors import CheckpointError, UserInputError
from mistral_jax.mesh import tree_specs
from mistral_jax.model import abstract_params
from mistral_jax.safetensors_file import np_dtype
from mistral_jax.tree import ParamPath, flatten, owner, sibling, split_dims, unflatten

MANIFEST = "mistral_jax_checkpoint.json"


ORBAX_DIR = "params"


FORMAT = "mistral_jax.orbax_params"


FORMAT_VERSION = 1


# dtypes a manifest may name for a leaf
_LEAF_DTYPES = ("float32", "float16", "bfloat16", "int8", "float8_e4m3fn")


_QUANTIZED = ("int8", "float8_e4m3fn")  # dtypes of quantized kernels


def leaf_name(path: ParamPath) -> str:
    return ".".join(path)


def ts_context():
    import tensorstore as ts

    # No read cache: every byte is used once, and cached chunks would only add resident memory.
    # file_io_sync: every chunk is fsynced before its write completes, so the final rename
    # never publishes chunks that a power cut could still lose.
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": True})


def zarr_spec(folder: Path, path: ParamPath) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder / leaf_name(path))}}


def open_array(folder: Path, path: ParamPath, context):
    import tensorstore as ts

    try:
        return ts.open(zarr_spec(folder, path), open=True, context=context).result()
    except ValueError as e:
        raise CheckpointError(f"{folder / leaf_name(path)}: cannot open the array of "
                              f"{'/'.join(path)} ({e})") from None


def _chunk_keys(shape, chunks) -> Iterator[str]:
    """The zarr v2 chunk file names ('.' separator) of an array of `shape`, in C order."""
    if not shape:
        yield "0"
        return
    grid = (range(-(-n // c)) for n, c in zip(shape, chunks))
    for idx in itertools.product(*grid):
        yield ".".join(map(str, idx))


def _check_chunk_files(ckpt: Path, manifest_path: Path, leaves: dict) -> None:
    """CheckpointError unless every chunk file of every leaf (shape and chunks as the manifest
    records them) is on disk: a missing one would read back as zeros (no fill value kept)."""
    for name, v in sorted(leaves.items()):
        shape, chunks = v.get("shape"), v.get("chunks")
        if not (isinstance(shape, list) and isinstance(chunks, list) and len(shape) == len(chunks)
                and all(isinstance(n, int) and n >= 0 for n in shape)
                and all(isinstance(c, int) and c > 0 for c in chunks)):
            raise CheckpointError(f"{manifest_path}: leaf {name} has no valid shape and chunks "
                                  f"({shape!r}, {chunks!r})")
        folder = ckpt / name
        try:
            present = set(os.listdir(folder))
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: missing: the array of leaf {name} is not there; "
                                  "the folder is incomplete (convert it again, or copy it "
                                  "again)") from None
        except OSError as e:
            raise CheckpointError(f"{folder}: cannot list the chunks of leaf {name} "
                                  f"({e.strerror or e})") from None
        missing = [k for k in _chunk_keys(shape, chunks) if k not in present]
        if missing:
            n = math.prod(-(-s // c) for s, c in zip(shape, chunks))
            shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
            raise CheckpointError(
                f"{folder}: {len(missing)} of the {n} chunk files of leaf {name} are missing "
                f"({shown}); the folder is incomplete (convert it again, or copy it again)")


def is_converted(folder: str | Path) -> bool:
    """Whether `folder` holds a converted checkpoint (complete or not: see `read_manifest`)."""
    folder = Path(folder)
    return (folder / MANIFEST).is_file() or (folder / ORBAX_DIR / "_METADATA").is_file()


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a converted folder; CheckpointError if missing, incomplete or unknown."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: incomplete converted checkpoint (no {MANIFEST}); "
                              "convert it again")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')} is not "
                              f"supported (expected {FORMAT_VERSION}); convert it again")
    return manifest


def stored_quantization(folder: str | Path) -> dict | None:
    """The quantization of a converted folder: None (plain weights, and every folder written
    before quantized conversions existed), {'mode': 'int8' | 'fp8' | 'fp8-tensor'} (quantized
    by the converter) or {'mode': 'compressed-tensors', ...} (a quantized source as stored)."""
    quantization = read_manifest(folder).get("quantization")
    if quantization is not None and not (isinstance(quantization, dict)
                                         and isinstance(quantization.get("mode"), str)):
        raise CheckpointError(f"{Path(folder) / MANIFEST}: unreadable quantization field "
                              f"{quantization!r}")
    return quantization


def folder_quantization(folder: str | Path) -> str | None:
    """How a model folder's weights are stored quantized: a converted folder's mode
    (`stored_quantization`), 'compressed-tensors' where a source folder's config says so
    (compressed_tensors.read_compressed_tensors), else None."""
    if is_converted(folder):
        stored = stored_quantization(folder)
        return None if stored is None else stored["mode"]
    return "compressed-tensors" if read_compressed_tensors(folder) is not None else None


def restored_abstract(folder: str | Path, args: ModelArgs, dtype: Any = None):
    """ShapeDtypeStructs of `restore_params(folder, args, dtype)`, read from the manifest
    alone (no arrays): quantized kernels and scales as stored, the rest in `dtype`."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    dt = np_dtype(manifest["dtype"]) if dtype is None else np.dtype(resolve_dtype(dtype))
    return unflatten(_restore_abstract(folder, manifest, args, dt)[0])


def _restore_abstract(folder: Path, manifest: dict, args: ModelArgs, dtype: np.dtype):
    """{path: ShapeDtypeStruct} of what `restore_params` returns, and {scale path: owner path}.

    The declared params of `args` (`abstract_params`) in `dtype`, except that quantized
    kernels keep their stored dtype, plus the scale leaves the folder holds; raises
    CheckpointError when the folder's arrays do not fit `args`.
    """
    import jax

    ckpt = folder / manifest.get("orbax_dir", ORBAX_DIR)
    base = flatten(abstract_params(args, dtype))
    stored = {}
    for name, v in manifest.get("leaves", {}).items():
        leaf_dtype = v.get("dtype", manifest["dtype"]) if isinstance(v, dict) else None
        if leaf_dtype not in _LEAF_DTYPES:
            raise CheckpointError(f"{folder / MANIFEST}: leaf {name} has dtype {leaf_dtype!r}; "
                                  f"expected one of {list(_LEAF_DTYPES)}")
        stored[tuple(name.split("."))] = np_dtype(leaf_dtype)
    owners = {p: o[0] for p in stored if p not in base and (o := owner(p, base)) is not None}
    out = {}
    for path, leaf in base.items():  # quantized kernels keep their dtype, the rest get `dtype`
        keep = path in stored and stored[path].name in _QUANTIZED
        out[path] = jax.ShapeDtypeStruct(leaf.shape, stored[path]) if keep else leaf
    for path, weight in owners.items():  # scales keep theirs (float32)
        lead, _, outs = split_dims(weight, len(base[weight].shape))
        if path[-1].endswith("input_scale"):  # [] for a Linear, [E] for stacked experts
            shape = tuple(base[weight].shape[i] for i in lead)
        else:  # the kernel's lead and output dims (quant.quantize_array)
            shape = tuple(base[weight].shape[i] for i in lead + outs)
        out[path] = jax.ShapeDtypeStruct(shape, stored[path])
    want, have = set(out), set(stored)
    if want != have:
        names = lambda paths: sorted(leaf_name(p) for p in paths)  # noqa: E731
        diff = names(want - have)[:4] + names(have - want)[:4]
        raise CheckpointError(
            f"{ckpt}: its arrays do not match the args in {folder / 'params.json'} "
            f"({len(want - have)} missing, {len(have - want)} unexpected: {', '.join(diff)})")
    for path, leaf in out.items():
        if leaf.dtype.name in _QUANTIZED and sibling(path, "scale") not in out:
            raise CheckpointError(f"{ckpt / leaf_name(path)}: a {leaf.dtype.name} weight "
                                  "without its scale")
    return out, owners


def restore_params(folder: str | Path, args: ModelArgs, dtype: Any = None, shardings=None, *,
                   progress: bool = False, max_workers: int = 4):
    """Restore the params of a converted folder, each array directly with its sharding.

    `shardings`: None (the default device), one `jax.sharding.Sharding` for every leaf, a
    `jax.sharding.Mesh` (each leaf sharded by the rules of sharding.py, scales included),
    or a pytree like params of them (e.g. `sharding.param_shardings(args, mesh)`; for a
    quantized folder the scale leaves it lacks follow their kernel's mesh). Each device's
    shard is read from disk on its own (identical shards once), so no host ever holds a
    full copy of a sharded leaf. `dtype` None keeps the stored dtype; otherwise every leaf
    is cast to it except quantized (int8 / fp8) kernels and their float32 scales.
    Returns the params pytree of jax.Arrays: the shapes of `abstract_params(args)`, plus the
    scale leaves of a quantized folder (the tree `Transformer.from_folder(src,
    quantize=...)` builds).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    stored = np_dtype(manifest["dtype"])
    dt = stored if dtype is None else np.dtype(resolve_dtype(dtype))
    flat, owners = _restore_abstract(folder, manifest, args, dt)
    paths = sorted(flat)
    flat_shardings = _flat_shardings(shardings, flat, owners, args)
    ckpt = folder / manifest.get("orbax_dir", ORBAX_DIR)
    _check_chunk_files(ckpt, folder / MANIFEST, manifest["leaves"])  # before reading any
    context = ts_context()

    def restore(path: ParamPath):
        leaf = flat[path]
        store = open_array(ckpt, path, context)
        if tuple(store.shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"{ckpt / leaf_name(path)}: shape {list(store.shape)}, but the args in "
                f"{folder / 'params.json'} expect {list(leaf.shape)} for {'/'.join(path)}")
        return _restore_array(store, leaf.shape, flat_shardings[path], np.dtype(leaf.dtype),
                              ckpt / leaf_name(path))

    with ThreadPoolExecutor(max_workers) as pool:
        arrays = pool.map(restore, paths)
        if progress:
            from tqdm import tqdm

            arrays = tqdm(arrays, total=len(paths), desc=f"restoring {folder.name}", unit="array")
        arrays = list(arrays)
    return unflatten(dict(zip(paths, arrays)))


def _flat_shardings(shardings, flat: dict, owners: dict, args: ModelArgs) -> dict:
    """{path: Sharding} for every leaf of `flat` (see `restore_params`)."""
    import jax
    from jax.sharding import Mesh, NamedSharding

    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return dict.fromkeys(flat, shardings)
    specs = None

    def spec(mesh: Mesh, path: ParamPath):
        nonlocal specs
        if specs is None:
            specs = flatten(tree_specs(unflatten(flat), args, mesh))
        return NamedSharding(mesh, specs[path])

    if isinstance(shardings, Mesh):
        return {p: spec(shardings, p) for p in flat}
    given = flatten(shardings) if isinstance(shardings, Mapping) else {}
    if not isinstance(shardings, Mapping) or not all(
            isinstance(s, jax.sharding.Sharding) for s in given.values()):
        raise UserInputError("shardings must be a Sharding, a Mesh or a pytree like params "
                             f"of Shardings, got {type(shardings).__name__}")
    missing = [p for p in flat if p not in given and p not in owners]
    unexpected = [p for p in given if p not in flat]
    if missing or unexpected:
        raise UserInputError(
            "shardings must be a Sharding, a Mesh or a pytree like params (missing: "
            f"{', '.join(leaf_name(p) for p in missing[:4]) or '-'}; unexpected: "
            f"{', '.join(leaf_name(p) for p in unexpected[:4]) or '-'})")
    out = {}
    for p in flat:
        if p in given:
            out[p] = given[p]
        else:  # a scale the pytree does not name: on its weight's mesh, or where the weight is
            weight = given[owners[p]]
            out[p] = spec(weight.mesh, p) if isinstance(weight, NamedSharding) else weight
    return out


def _restore_array(store, shape, sharding, dtype: np.dtype, where: Path):
    import jax

    index_map = sharding.addressable_devices_indices_map(tuple(shape))
    reads = {}
    for idx in index_map.values():
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key not in reads:
            reads[key] = store[idx].read()
    shards = {}
    try:
        for device, idx in index_map.items():
            key = tuple((s.start, s.stop, s.step) for s in idx)
            shards[device] = jax.device_put(reads[key].result().astype(dtype, copy=False), device)
    except ValueError as e:
        raise CheckpointError(f"{where}: reading failed ({e})") from None
    return jax.make_array_from_single_device_arrays(
        tuple(shape), sharding, [shards[d] for d in index_map])
