"""Writing converted folders: chunked zarr arrays, Orbax metadata, the manifest.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mistral_jax.args import ModelArgs
from mistral_jax.checkpoint import PlannedTensor
from mistral_jax.errors import CheckpointError
from mistral_jax.model import param_logical_axes
from mistral_jax.orbax_restore import (
    FORMAT,
    FORMAT_VERSION,
    ORBAX_DIR,
    leaf_name,
    open_array,
    ts_context,
    zarr_spec,
)
from mistral_jax.quantize import on_host, quantize_array, quantize_leaf, should_quantize
from mistral_jax.safetensors_file import TensorLocation, read_tensor
from mistral_jax.tree import ParamPath, flatten, sibling, split_dims

CHUNK_BYTES = 16 << 20


WRITE_WINDOW = 64 << 20  # bytes of blocks waiting for disk


_SPLIT_AXES = {"vocab": 8, "q_heads": 8, "kv_heads": 8, "mlp": 8, "expert": None}


def _no_check() -> None:
    pass


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


def _create_array(folder: Path, path: ParamPath, shape, chunks, dtype: np.dtype, context):
    import tensorstore as ts

    spec = zarr_spec(folder, path)
    spec["metadata"] = {"shape": list(shape), "chunks": list(chunks), "dtype": _zarr_dtype(dtype),
                        "compressor": None, "fill_value": None, "dimension_separator": "."}
    # Every chunk gets its file, all-zero ones too (restore_params refuses missing chunk files).
    spec["store_data_equal_to_fill_value"] = True
    return ts.open(spec, create=True, context=context).result()


def _zarr_dtype(dtype: np.dtype) -> str:
    # ml_dtypes' types (bfloat16, float8_e4m3fn) by name, as tensorstore and Orbax write them
    return dtype.name if dtype.kind == "V" else dtype.str


def orbax_metadata(paths: list[ParamPath]) -> dict:
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

    def __init__(self, where: Path, window: int = WRITE_WINDOW,
                 check: Callable[[], None] = _no_check):
        self.where, self.window, self.check = where, window, check
        self.pending: collections.deque = collections.deque()
        self.bytes = 0
        self.pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))

    def write(self, store, value: np.ndarray, dtype: np.dtype, chunks: list[int]) -> None:
        """Cast and write `value` into `store`, one chunk at a time."""
        for box in _chunk_boxes(value.shape, chunks):
            self.check()
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
    if value.ndim == 0:  # activation scales
        return np.array(value, dtype)
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


def leaf_table(abstract, args: ModelArgs) -> dict[str, dict]:
    """leaf name -> {'path', 'shape', 'chunks', 'dtype'} for every leaf of `abstract` (params,
    possibly with quantization scales), chunked along the leaves' logical axes."""
    axes = flatten(param_logical_axes(abstract, args))
    out = {}
    for path, leaf in flatten(abstract).items():
        dtype = np.dtype(leaf.dtype)
        names = tuple(axes[path]) + (None,) * (len(leaf.shape) - len(axes[path]))
        out[leaf_name(path)] = {"path": list(path), "shape": list(leaf.shape),
                                 "chunks": chunk_shape(leaf.shape, names, dtype.itemsize),
                                 "dtype": dtype}
    return dict(sorted(out.items()))


def leaf_bytes(leaf: dict) -> int:
    return math.prod(leaf["shape"]) * leaf["dtype"].itemsize


def leaf_paths(leaves: dict[str, dict]) -> Iterator[ParamPath]:
    for v in leaves.values():
        yield tuple(v["path"])


@dataclasses.dataclass
class Source:
    """What a conversion writes, piece by piece: `pieces()` yields (leaf path, expert index or
    None, host array, planned tensor or None) for every source tensor in file order, each
    transformed, cast, and quantized under `mode`, then the `implied` leaves no file holds."""

    plan: list[PlannedTensor]
    locs: dict[Path, dict[str, TensorLocation]]
    leaves: dict[str, dict]
    dtype: np.dtype  # the compute dtype: of every leaf that is not quantized or a scale
    mode: Any = None  # quant.QuantMode, or None
    implied: dict = dataclasses.field(default_factory=dict)
    amax: dict = dataclasses.field(default_factory=dict)  # 'fp8-tensor' stacked experts: max |w|
    check: Callable[[], None] = _no_check  # `Interrupts.check`, before each tensor and chunk

    def _quantized(self, p: PlannedTensor) -> bool:
        return self.mode is not None and should_quantize(
            p.target.path, len(self.leaves[leaf_name(p.target.path)]["shape"]))

    def find_amax(self, progress: bool) -> None:
        """Per-tensor modes: max |w| of each stacked expert weight, over all of its experts,
        so that each expert is then quantized on its own exactly as the stacked weight is."""
        if self.mode is None or not self.mode.per_tensor:
            return
        todo = [p for p in self.plan if p.target.expert is not None and self._quantized(p)]
        items = _iter_source(todo, self.locs, self.check)
        if progress and todo:
            from tqdm import tqdm

            items = tqdm(items, total=len(todo), desc="max |w| of the experts", unit="tensor")
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for p, value in items:
                top = np.float32(np.max(np.abs(_copy(value, self.dtype, pool))))  # exact
                path = p.target.path
                self.amax[path] = max(self.amax.get(path, top), top)
                del value

    def pieces(self, pool) -> Iterator[tuple[ParamPath, int | None, np.ndarray, Any]]:
        import functools

        for p, value in _iter_source(self.plan, self.locs, self.check):
            path, expert = p.target.path, p.target.expert
            if not self._quantized(p):  # cast by the writer, block by block
                yield path, expert, value, p
            elif expert is None:  # cast as `load.load_params` does, then quantized
                for leaf_path, leaf in quantize_leaf(path, _copy(value, self.dtype, pool),
                                                     self.mode).items():
                    yield leaf_path, None, leaf, p
            else:  # one expert of a stacked [E, in, out] weight, as a [1, in, out] one
                in_dims = split_dims(path, 3)[1]
                w = _copy(value, self.dtype, pool)[None]
                if self.mode.per_tensor:
                    q, scale = on_host(lambda x, a, d=in_dims: quantize_array(x, self.mode, d, a),
                                       w, self.amax[path])
                else:
                    q, scale = on_host(functools.partial(quantize_array, mode=self.mode,
                                                         in_dims=in_dims), w)
                del w
                yield path, expert, q[0], p
                yield sibling(path, "scale"), expert, scale[0], p
            del value
        for path, value in self.implied.items():
            yield path, None, np.asarray(value), None


def convert_into(tmp: Path, src: Path, source: Source, total: int, progress: bool) -> None:
    ckpt = tmp / ORBAX_DIR
    context = ts_context()
    leaves = source.leaves
    stores = {}
    try:
        ckpt.mkdir()
        for v in leaves.values():
            source.check()
            stores[tuple(v["path"])] = _create_array(ckpt, tuple(v["path"]), v["shape"],
                                                     v["chunks"], v["dtype"], context)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tmp}: cannot create the checkpoint arrays ({e})") from None
    bar = _bar(progress, total, f"converting {src.name}")
    writer = _Writer(ckpt, check=source.check)
    n = len(source.plan)
    try:
        # no enumerate(): its reused result tuple would keep the last tensor alive
        done, last = 0, None
        for path, expert, value, p in source.pieces(writer.pool):
            leaf = leaves[leaf_name(path)]
            store = stores[path] if expert is None else stores[path][expert]
            writer.write(store, value, leaf["dtype"], leaf["chunks"][0 if expert is None else 1:])
            del value
            if p is not None and p is not last:
                done, last = done + 1, p
            if bar is not None:
                bar.update(math.prod(store.shape) * leaf["dtype"].itemsize)
                bar.set_postfix_str(f"{done}/{n} tensors", refresh=False)
        writer.flush()
    finally:
        writer.close()
        if bar is not None:
            bar.close()


def verify_written(tmp: Path, source: Source, progress: bool) -> None:
    """Read every array back from `tmp` and compare it bit for bit with what the source
    gives again (read, cast and quantized anew)."""
    ckpt = tmp / ORBAX_DIR
    context = ts_context()
    leaves = source.leaves
    stores = {tuple(v["path"]): open_array(ckpt, tuple(v["path"]), context) for v in leaves.values()}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(source.plan), desc="verifying", unit="tensor")
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        last = None
        for path, expert, value, p in source.pieces(pool):
            leaf = leaves[leaf_name(path)]
            dtype, uint = leaf["dtype"], np.dtype(f"u{leaf['dtype'].itemsize}")
            store = stores[path] if expert is None else stores[path][expert]
            chunks = leaf["chunks"][0 if expert is None else 1:]
            what = "an implied leaf" if p is None else f"source tensor {p.name!r} in {p.file}"
            for box in _chunk_boxes(value.shape, chunks):
                source.check()
                want = np.array(value[box], dtype=dtype, order="C")
                try:
                    got = store[box].read().result()
                except ValueError as e:
                    raise CheckpointError(f"{ckpt / leaf_name(path)}: reading back failed ({e})") from None
                if got.shape != want.shape or not np.array_equal(got.view(uint), want.view(uint)):
                    raise CheckpointError(f"{ckpt / leaf_name(path)}: verification failed: "
                                          f"differs from {what}")
            del value
            if bar is not None and p is not None and p is not last:
                bar.update(1)
            last = p
    if bar is not None:
        bar.close()


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


def build_manifest(src: Path, layout: str, file_info, dtype: np.dtype, quantization: dict | None,
              leaves, n_tensors: int, total: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("mistral_jax")
    except PackageNotFoundError:
        pkg = "unknown"
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "converter": f"mistral_jax {pkg}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype.name, "quantization": quantization, "orbax_dir": ORBAX_DIR,
        "bytes": total,
        "source": {"path": str(src), "layout": layout, "tensors": n_tensors,
                   "files": [{"name": f.name, "bytes": f.stat().st_size, "header_sha256": h}
                             for f, (_, h) in file_info.items()]},
        "leaves": {k: {"shape": v["shape"], "chunks": v["chunks"], "dtype": v["dtype"].name}
                   for k, v in leaves.items()},
    }


def _iter_source(plan: list[PlannedTensor], locs: dict[Path, dict[str, TensorLocation]],
                 check: Callable[[], None] = _no_check
                 ) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    """Each planned tensor transformed to the params layout (not yet cast), in file order;
    `check()` (`Interrupts.check`) before each read."""
    handles: dict[Path, Any] = {}
    try:
        for p in plan:
            check()
            if p.file not in handles:
                for f in handles.values():
                    f.close()
                handles = {p.file: open(p.file, "rb", buffering=0)}
            yield p, p.target.transform(read_tensor(handles[p.file], p.file, p.name,
                                                     locs[p.file][p.name]))
    finally:
        for f in handles.values():
            f.close()
