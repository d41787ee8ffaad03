"""Safetensors checkpoints -> Orbax checkpoints, and restoring them straight onto devices.

    convert(src, dst, dtype="bfloat16")              # Mistral or HF folder -> converted folder
    params = restore_params(dst, args, "bfloat16", shardings)   # each device reads its shard
    model = Transformer.from_folder(dst)             # recognises a converted folder

On-disk layout of a converted folder `dst/`:

    params.json                   the model's args (params.json schema, also for HF sources)
    tokenizer files               copied from the source (tekken*.json, tokenizer.model*, ...)
    params/                       an Orbax PyTree checkpoint (zarr v2, no OCDBT):
      _METADATA                   Orbax tree metadata, one entry per params leaf
      embedding/                  one uncompressed zarr array per leaf, named by the leaf's
      layers_0.attention.wq.kernel/   dotted path in the params pytree, in the project's layout
      layers_0.feed_forward.w1/   ([in..., out...] kernels, stacked experts [E, ...]) and dtype
      ...
    mistral_jax_checkpoint.json   the manifest, written last: format version, converter,
                                  dtype, source layout and files (size, header sha256),
                                  each leaf's shape and chunks

Chunks: model-parallel axes (vocab, q_heads, kv_heads, mlp) are split in up to 8 parts and
the expert axis in single experts, then the largest axis is halved until a chunk is at most
16 MiB. A device restoring an (up to 8-way) tensor-parallel shard thus reads only the chunks
of its shard, and each MoE expert is written as it arrives without building the stacked leaf.

`params/` is a plain Orbax checkpoint: `ocp.StandardCheckpointer().restore(dst / "params",
abstract_params_with_shardings)` works too (orbax-checkpoint 0.12.4 and 0.12.8 checked).
`restore_params` reads it with tensorstore directly, which needs neither Orbax's reader nor
a full host copy of any leaf.

Conversion streams: each source tensor is read with plain file reads (no memory map, so
its pages do not stay resident), transformed (`checkpoint.tensor_target`), cast and
written block by block while the next tensor is read. Peak memory stays near a few times
the largest tensor, whatever the model size. Everything is written into a hidden sibling
`.<dst>.partial-<pid>-<id>`, renamed to `dst` only when complete; a killed conversion
leaves only that hidden folder, which the next run removes.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mistral_jax.args import (
    ModelArgs,
    args_from_hf_config,
    args_from_params_json,
    args_to_params_json,
    load_args,
)
from mistral_jax.checkpoint import PlannedTensor, plan_checkpoint, safetensors_files
from mistral_jax.errors import CheckpointError, ConfigError, UserInputError

__all__ = ["ConvertStats", "MANIFEST", "convert", "is_converted", "load_converted",
           "read_manifest", "restore_params"]

MANIFEST = "mistral_jax_checkpoint.json"
ORBAX_DIR = "params"
FORMAT = "mistral_jax.orbax_params"
FORMAT_VERSION = 1
CHUNK_BYTES = 16 << 20
WRITE_WINDOW = 64 << 20  # bytes of blocks waiting for disk
_SPLIT_AXES = {"vocab": 8, "q_heads": 8, "kv_heads": 8, "mlp": 8, "expert": None}
_TOKENIZER_FILES = ("tekken*.json", "tokenizer.model*", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "generation_config.json")
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

ParamPath = tuple[str, ...]


# ----------------------------------------------------------------------------- source reading


@dataclasses.dataclass(frozen=True)
class _Loc:
    """Where one tensor's bytes lie in a safetensors file."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def tensor_locations(path: Path) -> tuple[dict[str, _Loc], str]:
    """name -> byte location of each tensor, and the header's sha256.

    Checks what the reader relies on: offsets inside the file, matching shape x dtype,
    no two tensors overlapping. Raises CheckpointError naming the file and tensor.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the "
                                      f"file ({size} bytes): truncated or corrupt")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base, data_len = 8 + n, size - 8 - n
    locs, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype_name not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name}; "
                                  f"expected one of {sorted(_ST_DTYPES)}")
        dtype = _np_dtype(_ST_DTYPES[dtype_name])
        if not 0 <= begin <= end or end > data_len:
            raise CheckpointError(f"{path}: tensor {name!r} has offsets [{begin}, {end}) past the "
                                  f"end of the data ({data_len} bytes): truncated or corrupt")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes, but shape "
                                  f"{list(shape)} of {dtype_name} needs "
                                  f"{math.prod(shape) * dtype.itemsize}")
        locs[name] = _Loc(base + begin, end - begin, shape, dtype)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the file")
    return locs, hashlib.sha256(head + raw).hexdigest()


def _read_tensor(f, path: Path, name: str, loc: _Loc) -> np.ndarray:
    """Read one tensor with plain reads into a fresh buffer (pages do not stay mapped)."""
    buf = np.empty(loc.nbytes, np.uint8)
    view, done = memoryview(buf), 0
    try:
        f.seek(loc.offset)
        while done < loc.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{path}: tensor {name!r} is cut short (file truncated "
                                      "while converting?)")
            done += got
    except OSError as e:
        raise CheckpointError(f"{path}: reading tensor {name!r} failed ({e.strerror or e})") from None
    return buf.view(loc.dtype).reshape(loc.shape)


def _iter_source(plan: list[PlannedTensor], locs: dict[Path, dict[str, _Loc]]
                 ) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    """Each planned tensor transformed to the params layout (not yet cast), in file order."""
    handles: dict[Path, Any] = {}
    try:
        for p in plan:
            if p.file not in handles:
                for f in handles.values():
                    f.close()
                handles = {p.file: open(p.file, "rb", buffering=0)}
            yield p, p.target.transform(_read_tensor(handles[p.file], p.file, p.name,
                                                     locs[p.file][p.name]))
    finally:
        for f in handles.values():
            f.close()


# ----------------------------------------------------------------------------- on-disk arrays


def _leaf_name(path: ParamPath) -> str:
    return ".".join(path)


def chunk_shape(shape: tuple[int, ...], axes: tuple[str | None, ...], itemsize: int,
                limit: int = CHUNK_BYTES) -> list[int]:
    """Zarr chunk shape of a leaf: model-parallel axes split, then halved until <= limit bytes."""
    chunks = list(shape)
    for i, name in enumerate(axes):
        if name in _SPLIT_AXES:
            ways = _SPLIT_AXES[name]
            chunks[i] = 1 if ways is None else -(-shape[i] // min(ways, shape[i]))
    while math.prod(chunks) * itemsize > limit:
        i = int(np.argmax(chunks))
        if chunks[i] == 1:
            break
        chunks[i] = -(-chunks[i] // 2)
    return chunks


def _ts_context():
    import tensorstore as ts

    # No read cache: every byte is used once, and cached chunks would only add resident memory.
    # file_io_sync: every chunk is fsynced before its write completes, so the final rename
    # never publishes chunks that a power cut could still lose.
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": True})


def _zarr_spec(folder: Path, path: ParamPath) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder / _leaf_name(path))}}


def _create_array(folder: Path, path: ParamPath, shape, chunks, dtype: np.dtype, context):
    import tensorstore as ts

    spec = _zarr_spec(folder, path)
    spec["metadata"] = {"shape": list(shape), "chunks": list(chunks), "dtype": _zarr_dtype(dtype),
                        "compressor": None, "fill_value": None, "dimension_separator": "."}
    return ts.open(spec, create=True, context=context).result()


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


def _open_array(folder: Path, path: ParamPath, context):
    import tensorstore as ts

    try:
        return ts.open(_zarr_spec(folder, path), open=True, context=context).result()
    except ValueError as e:
        raise CheckpointError(f"{folder / _leaf_name(path)}: cannot open the array of "
                              f"{'/'.join(path)} ({e})") from None


def _orbax_metadata(paths: list[ParamPath]) -> dict:
    """Orbax's `_METADATA` for a tree of jax.Arrays stored as zarr v2 without OCDBT."""
    tree = {str(p): {"key_metadata": [{"key": k, "key_type": 2} for k in p],  # 2: dict key
                     "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False}}
            for p in paths}
    return {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False}


def _blocks(n: int, rows: int) -> Iterator[slice]:
    for i in range(0, n, rows):
        yield slice(i, min(i + rows, n))


def _chunk_boxes(shape, chunks) -> Iterator[tuple[slice, ...]]:
    """The chunks of an array of `shape`, as index boxes, in C order."""
    yield from itertools.product(*(list(_blocks(n, c)) for n, c in zip(shape, chunks)))


class _Writer:
    """Issues block writes, keeping at most `window` bytes of written-from blocks in flight.

    The window lets the next tensor's read overlap the last writes, while the blocks
    waiting for disk never add more than `window` bytes to resident memory.
    """

    def __init__(self, where: Path, window: int = WRITE_WINDOW):
        self.where, self.window = where, window
        self.pending: collections.deque = collections.deque()
        self.bytes = 0
        self.pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))

    def write(self, store, value: np.ndarray, dtype: np.dtype, chunks: list[int]) -> None:
        """Cast and write `value` into `store`, one chunk at a time."""
        for box in _chunk_boxes(value.shape, chunks):
            need = math.prod(s.stop - s.start for s in box) * dtype.itemsize
            while self.pending and self.bytes + need > self.window:
                self._wait_one()
            block = _copy(value[box], dtype, self.pool)
            try:
                # `block` is ours alone: tensorstore may write from it without another copy.
                future = store[box].write(block, can_reference_source_data_indefinitely=True)
            except ValueError as e:
                raise CheckpointError(f"{self.where}: writing failed ({e})") from None
            self.pending.append((future, block.nbytes))
            self.bytes += block.nbytes

    def _wait_one(self) -> None:
        future, nbytes = self.pending.popleft()
        _wait([future], self.where)
        self.bytes -= nbytes

    def flush(self) -> None:
        while self.pending:
            self._wait_one()

    def close(self) -> None:
        self.pool.shutdown()
        for future, _ in self.pending:  # after a failure: let tensorstore finish or fail quietly
            try:
                future.result()
            except ValueError:
                pass


def _copy(value: np.ndarray, dtype: np.dtype, pool) -> np.ndarray:
    """`value` (often a transposed view) as a C-ordered array of `dtype`, made by threads.

    Copying a few rows at a time keeps a transposed read in cache (numpy's one-shot copy
    of a transposed view is about 2x slower); numpy releases the GIL while copying.
    """
    out = np.empty(value.shape, dtype)
    row_bytes = max(1, math.prod(value.shape[1:]) * dtype.itemsize)
    step = 64 if not value.flags.c_contiguous else max(1, (4 << 20) // row_bytes)

    def part(sl: slice) -> None:
        out[sl] = value[sl]

    for _ in pool.map(part, _blocks(value.shape[0], step)):
        pass
    return out


def _wait(futures: list, where: Path) -> None:
    try:
        for f in futures:
            f.result()
    except ValueError as e:  # tensorstore reports I/O failures (ENOSPC, EACCES ...) as ValueError
        raise CheckpointError(f"{where}: writing the checkpoint failed ({e})") from None


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass(frozen=True)
class ConvertStats:
    """What a conversion did: tensors read, bytes written, wall time."""

    dst: Path
    tensors: int
    bytes_written: int
    seconds: float
    verified: bool

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (f"converted {self.tensors} tensors: {self.bytes_written / 1e9:.3f} GB written in "
                f"{self.seconds:.1f} s ({self.mb_per_s:.0f} MB/s)"
                f"{', verified' if self.verified else ''} -> {self.dst}")


def _source_args(src: Path, layout: str) -> tuple[ModelArgs, str]:
    if layout == "auto":
        return load_args(src)
    if layout not in ("mistral", "hf"):
        raise UserInputError(f"format must be auto, mistral or hf, got {layout!r}")
    cfg = src / ("params.json" if layout == "mistral" else "config.json")
    if not cfg.is_file():
        raise ConfigError(f"{src}: no {cfg.name}, needed for --format {layout}")
    reader = args_from_params_json if layout == "mistral" else args_from_hf_config
    return reader(cfg), layout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(dst: Path) -> None:
    """Remove hidden leftovers of conversions into `dst` whose process is gone (e.g. SIGKILL)."""
    for p in dst.parent.glob(f".{dst.name}.*-*-*"):
        kind, _, rest = p.name[len(dst.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("partial", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _hidden_sibling(dst: Path, kind: str) -> Path:
    return dst.parent / f".{dst.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def convert(src: str | Path, dst: str | Path, *, dtype: Any = "bfloat16", layout: str = "auto",
            force: bool = False, verify: bool = False, progress: bool = False) -> ConvertStats:
    """Convert a Mistral or HF safetensors folder into a converted folder at `dst`.

    Streams one tensor at a time; `dst` appears (by a rename) only once complete, and
    with `verify` only once every tensor read back equals the source cast to `dtype`.
    Raises ConfigError / CheckpointError / UserInputError naming the file at fault.
    """
    from mistral_jax.model import abstract_params, logical_axes
    from mistral_jax.transformer import resolve_dtype

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    np_dtype = np.dtype(resolve_dtype(dtype))
    if is_converted(src):
        raise UserInputError(f"{src}: already a converted checkpoint ({MANIFEST})")
    args, layout = _source_args(src, layout)
    from mistral_jax.quant import read_compressed_tensors

    if read_compressed_tensors(src) is not None:
        raise UserInputError(f"{src}: quantized (compressed-tensors) checkpoints are not "
                             "converted; load the folder directly with Transformer.from_folder")
    files = safetensors_files(src, layout)
    abstract = abstract_params(args, np_dtype)
    plan = plan_checkpoint(files, layout, args, abstract)  # every header checked before any data
    file_info = {f: tensor_locations(f) for f in files}
    locs = {f: info[0] for f, info in file_info.items()}

    dst_abs, src_abs = dst.absolute(), src.resolve()
    if dst_abs.resolve() == src_abs or src_abs.is_relative_to(dst_abs.resolve()):
        raise UserInputError(f"{dst}: would overwrite the source folder {src}")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise UserInputError(f"{dst}: already exists (pass --force to replace it)")
    leaves = _leaves(abstract, logical_axes(args), np_dtype)
    total = sum(math.prod(v["shape"]) for v in leaves.values()) * np_dtype.itemsize
    try:
        dst_abs.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(dst_abs)
        free = shutil.disk_usage(dst_abs.parent).free
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write here ({e.strerror or e})") from None
    if free < total:
        raise CheckpointError(f"{dst}: needs {total / 1e9:.2f} GB, only {free / 1e9:.2f} GB free "
                              f"on that disk")
    tmp = _hidden_sibling(dst_abs, "partial")
    try:
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write here ({e.strerror or e})") from None
    try:
        _convert_into(tmp, src, plan, locs, leaves, np_dtype, total, progress)
        if verify:
            _verify(tmp, plan, locs, leaves, np_dtype, progress)
        try:
            (tmp / "params.json").write_text(json.dumps(args_to_params_json(args), indent=2) + "\n")
            for pattern in _TOKENIZER_FILES:
                for f in sorted(src.glob(pattern)):
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
            _write_json(tmp / ORBAX_DIR / "_METADATA", _orbax_metadata(list(_leaf_paths(leaves))))
            manifest = _manifest(src_abs, layout, file_info, np_dtype, leaves, len(plan), total)
            _write_json(tmp / MANIFEST, manifest)
            _fsync_path(tmp)
        except OSError as e:
            raise CheckpointError(f"{dst}: writing the checkpoint failed ({e.strerror or e})") from None
        _replace(tmp, dst_abs, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertStats(dst, len(plan), total, time.perf_counter() - start, verify)


def _leaves(abstract, axes, dtype: np.dtype) -> dict[str, dict]:
    """leaf name -> {'path', 'shape', 'chunks'} for every params leaf, from the declarations."""
    import jax

    out = {}
    flat_axes = dict(jax.tree_util.tree_leaves_with_path(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    for key, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        path = tuple(k.key for k in key)
        names = tuple(flat_axes[key]) + (None,) * (len(leaf.shape) - len(flat_axes[key]))
        out[_leaf_name(path)] = {"path": list(path), "shape": list(leaf.shape),
                                 "chunks": chunk_shape(leaf.shape, names, dtype.itemsize)}
    return out


def _leaf_paths(leaves: dict[str, dict]) -> Iterator[ParamPath]:
    for v in leaves.values():
        yield tuple(v["path"])


def _convert_into(tmp: Path, src: Path, plan, locs, leaves, dtype: np.dtype, total: int,
                  progress: bool) -> None:
    ckpt = tmp / ORBAX_DIR
    context = _ts_context()
    try:
        ckpt.mkdir()
        stores = {tuple(v["path"]): _create_array(ckpt, tuple(v["path"]), v["shape"], v["chunks"],
                                                  dtype, context) for v in leaves.values()}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tmp}: cannot create the checkpoint arrays ({e})") from None
    bar = _bar(progress, total, f"converting {src.name}")
    writer = _Writer(ckpt)
    try:
        done = 0  # no enumerate(): its reused result tuple would keep the last tensor alive
        for p, value in _iter_source(plan, locs):
            path, leaf = p.target.path, leaves[_leaf_name(p.target.path)]
            store = stores[path] if p.target.expert is None else stores[path][p.target.expert]
            writer.write(store, value, dtype, leaf["chunks"][0 if p.target.expert is None else 1:])
            del value
            done += 1
            if bar is not None:
                bar.update(math.prod(store.shape) * dtype.itemsize)
                bar.set_postfix_str(f"{done}/{len(plan)} tensors", refresh=False)
        writer.flush()
    finally:
        writer.close()
        if bar is not None:
            bar.close()


def _verify(tmp: Path, plan, locs, leaves, dtype: np.dtype, progress: bool) -> None:
    """Read every tensor back from `tmp` and compare it bit for bit with the cast source."""
    ckpt = tmp / ORBAX_DIR
    context = _ts_context()
    stores = {tuple(v["path"]): _open_array(ckpt, tuple(v["path"]), context) for v in leaves.values()}
    items = _iter_source(plan, locs)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(plan), desc="verifying", unit="tensor")
    uint = np.dtype(f"u{dtype.itemsize}")
    for p, value in items:
        path = p.target.path
        store = stores[path] if p.target.expert is None else stores[path][p.target.expert]
        chunks = leaves[_leaf_name(path)]["chunks"][0 if p.target.expert is None else 1:]
        for box in _chunk_boxes(value.shape, chunks):
            want = np.array(value[box], dtype=dtype, order="C")
            try:
                got = store[box].read().result()
            except ValueError as e:
                raise CheckpointError(f"{ckpt / _leaf_name(path)}: reading back failed ({e})") from None
            if got.shape != want.shape or not np.array_equal(got.view(uint), want.view(uint)):
                raise CheckpointError(f"{ckpt / _leaf_name(path)}: verification failed: differs "
                                      f"from source tensor {p.name!r} in {p.file}")


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


def _manifest(src: Path, layout: str, file_info, dtype: np.dtype, leaves, n_tensors: int,
              total: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("mistral_jax")
    except PackageNotFoundError:
        pkg = "unknown"
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "converter": f"mistral_jax {pkg}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype.name, "orbax_dir": ORBAX_DIR, "bytes": total,
        "source": {"path": str(src), "layout": layout, "tensors": n_tensors,
                   "files": [{"name": f.name, "bytes": f.stat().st_size, "header_sha256": h}
                             for f, (_, h) in file_info.items()]},
        "leaves": {k: {"shape": v["shape"], "chunks": v["chunks"]} for k, v in leaves.items()},
    }


def _replace(tmp: Path, dst: Path, force: bool) -> None:
    """Atomically move the finished `tmp` to `dst` (replacing it under `force`)."""
    old = None
    try:
        if dst.exists() or dst.is_symlink():
            if not force:  # appeared while converting
                raise UserInputError(f"{dst}: already exists (pass --force to replace it)")
            old = _hidden_sibling(dst, "old")
            os.rename(dst, old)
        os.rename(tmp, dst)
        _fsync_path(dst.parent)
    except OSError as e:
        raise CheckpointError(f"{dst}: could not move the finished checkpoint into place "
                              f"({e.strerror or e})") from None
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- restoring


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


def restore_params(folder: str | Path, args: ModelArgs, dtype: Any = None, shardings=None, *,
                   progress: bool = False, max_workers: int = 4):
    """Restore the params of a converted folder, each array directly with its sharding.

    `shardings`: None (the default device), one `jax.sharding.Sharding` for every leaf, or
    a pytree like params of them (e.g. `NamedSharding`s from the sharding rules). Each
    device's shard is read from disk on its own (identical shards once), so no host ever
    holds a full copy of a sharded leaf. `dtype` None keeps the stored dtype.
    Returns the params pytree of jax.Arrays with the shapes of `abstract_params(args)`.
    """
    import jax

    from mistral_jax.model import abstract_params
    from mistral_jax.transformer import resolve_dtype

    folder = Path(folder)
    manifest = read_manifest(folder)
    stored = _np_dtype(manifest["dtype"])
    dt = stored if dtype is None else np.dtype(resolve_dtype(dtype))
    abstract = abstract_params(args, dt)
    keyed, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        flat_shardings = [shardings] * len(keyed)
    else:
        try:
            flat_shardings = treedef.flatten_up_to(shardings)
        except (ValueError, TypeError) as e:
            raise UserInputError(f"shardings must be a Sharding or a pytree like params ({e})") from None
    ckpt = folder / manifest.get("orbax_dir", ORBAX_DIR)
    want = {_leaf_name(tuple(k.key for k in key)) for key, _ in keyed}
    have = set(manifest.get("leaves", {}))
    if want != have:
        diff = sorted(want - have)[:4] + sorted(have - want)[:4]
        raise CheckpointError(
            f"{ckpt}: its arrays do not match the args in {folder / 'params.json'} "
            f"({len(want - have)} missing, {len(have - want)} unexpected: {', '.join(diff)})")
    context = _ts_context()

    def restore(i: int):
        key, leaf = keyed[i]
        path = tuple(k.key for k in key)
        store = _open_array(ckpt, path, context)
        if tuple(store.shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"{ckpt / _leaf_name(path)}: shape {list(store.shape)}, but the args in "
                f"{folder / 'params.json'} expect {list(leaf.shape)} for {'/'.join(path)}")
        return _restore_array(store, leaf.shape, flat_shardings[i], dt, ckpt / _leaf_name(path))

    items = range(len(keyed))
    with ThreadPoolExecutor(max_workers) as pool:
        arrays = pool.map(restore, items)
        if progress:
            from tqdm import tqdm

            arrays = tqdm(arrays, total=len(keyed), desc=f"restoring {folder.name}", unit="array")
        arrays = list(arrays)
    return jax.tree_util.tree_unflatten(treedef, arrays)


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


def load_converted(folder: str | Path, dtype: Any = None, *, shardings=None,
                   progress: bool = False, **arg_overrides: Any):
    """(args, params) of a converted folder: its params.json (with overrides) and weights."""
    folder = Path(folder)
    read_manifest(folder)
    args = args_from_params_json(folder / "params.json", **arg_overrides)
    return args, restore_params(folder, args, dtype, shardings, progress=progress)
