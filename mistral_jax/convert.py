"""Safetensors checkpoints -> Orbax checkpoints, and restoring them straight onto devices.

    convert(src, dst, dtype="bfloat16")              # Mistral or HF folder -> converted folder
    convert(src, dst, quantize="int8")               # ... written quantized (int8 / fp8)
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
                                  dtype, quantization, source layout and files (size,
                                  header sha256), each leaf's shape, chunks and dtype

Quantized checkpoints: `convert(..., quantize='int8' | 'fp8' | 'fp8-tensor')` quantizes each
attention / feed-forward weight (`quant.should_quantize`) as it streams and writes its
int8 / float8_e4m3fn kernel plus its float32 `scale` leaf (`w1_scale` beside stacked
experts): the tree `Transformer.from_folder(src, dtype=dtype, quantize=mode)` builds, bit
for bit (each weight is cast to `dtype` first, then quantized). A compressed-tensors source
(llm-compressor int8 / fp8, `quant.read_compressed_tensors`) is written as stored: its
kernels, scales and activation scales (`input_scale`, 0.0 for dynamic ones) as loading it
gives them, never dequantized; `quantize=` with such a source is a UserInputError.
The manifest's `quantization` says which (`{"mode": "int8"}`, `{"mode":
"compressed-tensors", ...}`, or null) and each leaf its dtype; folders written before
either field existed read as unquantized in the manifest's `dtype`. Restoring keeps the
stored dtype of quantized kernels and of scales (`dtype=` casts only the other leaves), and
`Transformer.from_folder(dst, quantize=...)` on a quantized folder is a UserInputError.

Chunks: model-parallel axes (vocab, q_heads, kv_heads, mlp) are split in up to 8 parts and
the expert axis in single experts, then the largest axis is halved until a chunk is at most
16 MiB. A device restoring an (up to 8-way) tensor-parallel shard thus reads only the chunks
of its shard, and each MoE expert is written as it arrives without building the stacked leaf.

Every chunk has its file (all-zero ones too), and restoring first checks that each chunk file
the manifest implies is there: a missing one (a partial copy) would otherwise read as zeros.

`params/` is a plain Orbax checkpoint: `ocp.StandardCheckpointer().restore(dst / "params",
abstract_params_with_shardings)` works too (orbax-checkpoint 0.12.4 and 0.12.8 checked).
`restore_params` reads it with tensorstore directly, which needs neither Orbax's reader nor
a full host copy of any leaf.

Conversion streams: each source tensor is read with plain file reads (no memory map, so
its pages do not stay resident), transformed (`checkpoint.tensor_target`), cast (and
quantized) and written block by block while the next tensor is read. Peak memory stays
near a few times the largest tensor, whatever the model size. Stacked MoE experts are
quantized one expert at a time (their scales are per expert and channel); for
'fp8-tensor' a first pass over the expert tensors finds each stacked weight's max |w|.
Everything is written into a hidden sibling `.<dst>.partial-<pid>-<id>`, renamed to `dst`
only when complete; a killed conversion leaves only that hidden folder, which the next
run removes.
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
import signal
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mistral_jax.args import (
    ModelArgs,
    args_from_hf_config,
    args_from_params_json,
    args_to_params_json,
    check_folder,
    load_args,
)
from mistral_jax.checkpoint import (
    SAFETENSORS_DTYPES,
    PlannedTensor,
    check_dtype,
    plan_checkpoint,
    safetensors_files,
)
from mistral_jax.errors import CheckpointError, ConfigError, UserInputError

__all__ = ["ConvertStats", "MANIFEST", "convert", "folder_quantization", "is_converted",
           "read_manifest", "restore_params", "restored_abstract", "stored_quantization"]

MANIFEST = "mistral_jax_checkpoint.json"
ORBAX_DIR = "params"
FORMAT = "mistral_jax.orbax_params"
FORMAT_VERSION = 1
CHUNK_BYTES = 16 << 20
WRITE_WINDOW = 64 << 20  # bytes of blocks waiting for disk
_SPLIT_AXES = {"vocab": 8, "q_heads": 8, "kv_heads": 8, "mlp": 8, "expert": None}
# Copied beside the converted params: every name tokenizer.find_tokenizer_file looks for in a
# folder (versioned SentencePiece files under any stem, e.g. mistral_instruct_..._.model.v3),
# and the Hugging Face tokenizer / generation files.
_TOKENIZER_FILES = ("tekken*.json", "tokenizer.model", "*.model.v*", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# dtypes a manifest may name for a leaf
_LEAF_DTYPES = ("float32", "float16", "bfloat16", "int8", "float8_e4m3fn")
_QUANTIZED = ("int8", "float8_e4m3fn")  # dtypes of quantized kernels

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

    if name in ("bfloat16", "float8_e4m3fn"):  # numpy itself lacks these
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


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
        check_dtype(path, name, dtype_name)
        dtype = _np_dtype(SAFETENSORS_DTYPES[dtype_name])
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


def _no_check() -> None:
    pass


def _iter_source(plan: list[PlannedTensor], locs: dict[Path, dict[str, _Loc]],
                 check: Callable[[], None] = _no_check
                 ) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    """Each planned tensor transformed to the params layout (not yet cast), in file order;
    `check()` (`_Interrupts.check`) before each read."""
    handles: dict[Path, Any] = {}
    try:
        for p in plan:
            check()
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
    # Every chunk gets its file, all-zero ones too (restore_params refuses missing chunk files).
    spec["store_data_equal_to_fill_value"] = True
    return ts.open(spec, create=True, context=context).result()


def _zarr_dtype(dtype: np.dtype) -> str:
    # ml_dtypes' types (bfloat16, float8_e4m3fn) by name, as tensorstore and Orbax write them
    return dtype.name if dtype.kind == "V" else dtype.str


def _open_array(folder: Path, path: ParamPath, context):
    import tensorstore as ts

    try:
        return ts.open(_zarr_spec(folder, path), open=True, context=context).result()
    except ValueError as e:
        raise CheckpointError(f"{folder / _leaf_name(path)}: cannot open the array of "
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


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass(frozen=True)
class ConvertStats:
    """What a conversion did: tensors read, bytes written, wall time, quantization mode."""

    dst: Path
    tensors: int
    bytes_written: int
    seconds: float
    verified: bool
    quantization: str | None = None  # 'int8' / 'fp8' / 'fp8-tensor' / 'compressed-tensors'

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        quant = f" ({self.quantization})" if self.quantization else ""
        return (f"converted {self.tensors} tensors{quant}: {self.bytes_written / 1e9:.3f} GB "
                f"written in {self.seconds:.1f} s ({self.mb_per_s:.0f} MB/s)"
                f"{', verified' if self.verified else ''} -> {self.dst}")


def _source_args(src: Path, layout: str) -> tuple[ModelArgs, str]:
    if layout == "auto":
        return load_args(src)  # (checks the folder)
    check_folder(src)
    if layout not in ("mistral", "hf"):
        raise UserInputError(f"format must be auto, mistral or hf, got {layout!r}")
    cfg = src / ("params.json" if layout == "mistral" else "config.json")
    if not cfg.is_file():
        raise ConfigError(f"{src}: no {cfg.name}, needed for --format {layout}")
    reader = args_from_params_json if layout == "mistral" else args_from_hf_config
    return reader(cfg), layout


def _in_the_way(dst: Path) -> str | None:
    """'PATH is a file' for the first of dst's parents that exists and is not a directory."""
    for parent in reversed(dst.parents):
        if parent.exists() and not parent.is_dir():
            return f"{parent} is a file, not a folder"
    return None


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
            quantize: str | None = None, force: bool = False, verify: bool = False,
            progress: bool = False) -> ConvertStats:
    """Convert a Mistral or HF safetensors folder into a converted folder at `dst`.

    Streams one tensor at a time; `dst` appears (by a rename) only once complete, and
    with `verify` only once every array read back equals what was meant to be written
    (the source cast to `dtype`, and quantized again the same way with `quantize`).
    `quantize`: None, 'int8', 'fp8' or 'fp8-tensor' writes the attention / feed-forward
    weights quantized (int8 / fp8 kernel + float32 scale), exactly as
    `Transformer.from_folder(src, dtype=dtype, quantize=quantize)` would hold them. A
    compressed-tensors source is written as stored (quantized) and refuses `quantize`.
    An existing `dst` is a UserInputError, unless `force` and it is a converted checkpoint
    (it has the manifest) or an empty folder, which the finished output then replaces.
    Raises ConfigError / CheckpointError / UserInputError naming the file at fault.

    SIGINT and SIGTERM (from the main thread): their handlers run at once while the
    source is checked, and once the partial output exists are only recorded, and acted on
    at the next tensor or chunk: the partial output is removed (a signal during that
    removal is recorded too, never cutting it short), then the signal's previous handler
    runs (KeyboardInterrupt for SIGINT; under the default action the signal is raised
    again, ending the process). One that arrives once `dst` is in place is too late: the
    conversion is complete.
    """
    with _Interrupts() as interrupts:
        return _convert(Path(src), Path(dst), dtype, layout, quantize, force, verify, progress,
                        interrupts)


class _Interrupted(BaseException):
    """A signal whose default action is to end the process: unwinds, then it is raised again."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _in_gc_callback(frame) -> bool:
    """Whether `frame` runs inside a garbage-collection callback (jax has one)."""
    import gc

    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


class _Interrupts:
    """Records SIGINT / SIGTERM instead of letting their handlers raise wherever Python is
    (a KeyboardInterrupt raised in a garbage-collection callback is printed and dropped, and
    one raised while the partial output is removed would leave it behind). `check()` acts on
    a recorded signal at a point of the conversion's choosing. Until `defer()` (while there
    is nothing to clean up) the handler also runs at once, unless Python is inside a
    garbage-collection callback (the next `check()` acts on it then). Outside the main
    thread, or for a signal that was ignored, it changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.saved: dict[int, Any] = {}
        self.pending: int | None = None
        self.immediate = True

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous not in (signal.SIG_IGN, None):
                    self.saved[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self.pending is None:
            self.pending = signum
        if not self.immediate:
            return
        if _in_gc_callback(frame):  # what it raised would be printed and dropped:
            return  # the next check() acts on it
        self._act(signum)
        self.pending = None

    def defer(self) -> None:
        """From now on only record signals (after acting on one already recorded)."""
        self.immediate = False
        self.check()

    def check(self) -> None:
        """Act on a recorded signal: call its previous handler (which raises, as Python's
        SIGINT handler and the CLI's SIGTERM handler do), or for the default action raise
        _Interrupted. A handler that returns lets the conversion go on."""
        signum, self.pending = self.pending, None
        if signum is not None:
            self._act(signum)

    def _act(self, signum: int) -> None:
        handler = self.saved[signum]
        if handler == signal.SIG_DFL:
            raise _Interrupted(signum)
        handler(signum, None)

    def __exit__(self, kind, exc, tb) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        if isinstance(exc, _Interrupted):
            signal.raise_signal(exc.signum)  # the default action: the process ends here
            raise SystemExit(128 + exc.signum)
        if isinstance(exc, Exception):
            self.check()  # a signal recorded while an error unwound: the signal wins


def _convert(src: Path, dst: Path, dtype: Any, layout: str, quantize: str | None, force: bool,
             verify: bool, progress: bool, interrupts: _Interrupts) -> ConvertStats:
    from mistral_jax.model import abstract_params
    from mistral_jax.quant import (
        checkpoint_abstract,
        quantize_params,
        read_compressed_tensors,
        resolve_mode,
    )
    from mistral_jax.transformer import resolve_dtype

    start = time.perf_counter()
    np_dtype = np.dtype(resolve_dtype(dtype))
    mode = None if quantize is None else resolve_mode(quantize)
    if is_converted(src):
        raise UserInputError(f"{src}: already a converted checkpoint ({MANIFEST})")
    args, layout = _source_args(src, layout)
    scheme = read_compressed_tensors(src)
    if scheme is not None and mode is not None:
        raise UserInputError(f"{src}: the checkpoint is already quantized (compressed-tensors, "
                             f"{scheme.weight_dtype.name} weights); convert it without "
                             "--quantize: it is written as stored")
    files = safetensors_files(src, layout)
    check = interrupts.check  # (a signal dropped in a GC callback while tracing the model)
    if scheme is None:
        abstract, implied = abstract_params(args, np_dtype), {}
    else:  # int8 / fp8 kernels with their scales, as `checkpoint.load_params` holds them
        abstract, implied = checkpoint_abstract(files, layout, args, np_dtype, scheme)
    check()
    plan = plan_checkpoint(files, layout, args, abstract)  # every header checked before any data
    file_info = {f: tensor_locations(f) for f in files}
    locs = {f: info[0] for f, info in file_info.items()}
    if mode is not None:
        abstract = quantize_params(abstract, mode)
    if implied:  # dynamic activation scales: in the params, in no file
        import jax

        from mistral_jax.checkpoint import flatten, unflatten

        abstract = unflatten({**flatten(abstract), **{
            p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in implied.items()}})
    quantization = (None if scheme is None and mode is None else {"mode": mode.name}
                    if mode is not None else
                    {"mode": "compressed-tensors", "weight_dtype": scheme.weight_dtype.name,
                     "weight_strategy": scheme.weight_strategy,
                     "activations": scheme.activations})

    dst_abs, src_abs = dst.absolute(), src.resolve()
    if dst_abs.resolve() == src_abs or src_abs.is_relative_to(dst_abs.resolve()):
        raise UserInputError(f"{dst}: would overwrite the source folder {src}")
    _check_replaceable(dst, force)
    check()
    leaves = _leaves(abstract, args)
    total = sum(_leaf_bytes(v) for v in leaves.values())
    try:
        dst_abs.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(dst_abs)
        free = shutil.disk_usage(dst_abs.parent).free
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write here ({_in_the_way(dst_abs) or e.strerror or e})"
                              ) from None
    if free < total:
        raise CheckpointError(f"{dst}: needs {total / 1e9:.2f} GB, only {free / 1e9:.2f} GB free "
                              f"on that disk")
    interrupts.defer()  # from here on there is partial output to remove first
    tmp = _hidden_sibling(dst_abs, "partial")
    try:
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write here ({e.strerror or e})") from None
    try:
        check()
        source = _Source(plan, locs, leaves, np_dtype, mode, implied, check=check)
        source.find_amax(progress)
        _convert_into(tmp, src, source, total, progress)
        if verify:
            _verify(tmp, source, progress)
        try:
            (tmp / "params.json").write_text(json.dumps(args_to_params_json(args), indent=2) + "\n")
            for f in sorted({f for pattern in _TOKENIZER_FILES for f in src.glob(pattern)}):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            _write_json(tmp / ORBAX_DIR / "_METADATA", _orbax_metadata(list(_leaf_paths(leaves))))
            manifest = _manifest(src_abs, layout, file_info, np_dtype, quantization, leaves,
                                 len(plan), total)
            _write_json(tmp / MANIFEST, manifest)
            _fsync_path(tmp)
        except OSError as e:
            raise CheckpointError(f"{dst}: writing the checkpoint failed ({e.strerror or e})") from None
        check()  # the last point to stop at: after the rename the checkpoint is complete
        _replace(tmp, dst_abs, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # signals only recorded meanwhile (_Interrupts)
        raise
    return ConvertStats(dst, len(plan), total, time.perf_counter() - start, verify,
                        None if quantization is None else quantization["mode"])


def _leaves(abstract, args: ModelArgs) -> dict[str, dict]:
    """leaf name -> {'path', 'shape', 'chunks', 'dtype'} for every leaf of `abstract` (params,
    possibly with quantization scales), chunked along the leaves' logical axes."""
    from mistral_jax.checkpoint import flatten
    from mistral_jax.quant import param_logical_axes

    axes = flatten(param_logical_axes(abstract, args))
    out = {}
    for path, leaf in flatten(abstract).items():
        dtype = np.dtype(leaf.dtype)
        names = tuple(axes[path]) + (None,) * (len(leaf.shape) - len(axes[path]))
        out[_leaf_name(path)] = {"path": list(path), "shape": list(leaf.shape),
                                 "chunks": chunk_shape(leaf.shape, names, dtype.itemsize),
                                 "dtype": dtype}
    return dict(sorted(out.items()))


def _leaf_bytes(leaf: dict) -> int:
    return math.prod(leaf["shape"]) * leaf["dtype"].itemsize


def _leaf_paths(leaves: dict[str, dict]) -> Iterator[ParamPath]:
    for v in leaves.values():
        yield tuple(v["path"])


@dataclasses.dataclass
class _Source:
    """What a conversion writes, piece by piece: `pieces()` yields (leaf path, expert index or
    None, host array, planned tensor or None) for every source tensor in file order, each
    transformed, cast, and quantized under `mode`, then the `implied` leaves no file holds."""

    plan: list[PlannedTensor]
    locs: dict[Path, dict[str, _Loc]]
    leaves: dict[str, dict]
    dtype: np.dtype  # the compute dtype: of every leaf that is not quantized or a scale
    mode: Any = None  # quant.QuantMode, or None
    implied: dict = dataclasses.field(default_factory=dict)
    amax: dict = dataclasses.field(default_factory=dict)  # 'fp8-tensor' stacked experts: max |w|
    check: Callable[[], None] = _no_check  # `_Interrupts.check`, before each tensor and chunk

    def _quantized(self, p: PlannedTensor) -> bool:
        from mistral_jax.quant import should_quantize

        return self.mode is not None and should_quantize(
            p.target.path, len(self.leaves[_leaf_name(p.target.path)]["shape"]))

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

        from mistral_jax.quant import on_host, quantize_array, quantize_leaf, sibling, split_dims

        for p, value in _iter_source(self.plan, self.locs, self.check):
            path, expert = p.target.path, p.target.expert
            if not self._quantized(p):  # cast by the writer, block by block
                yield path, expert, value, p
            elif expert is None:  # cast as `checkpoint.load_params` does, then quantized
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


def _convert_into(tmp: Path, src: Path, source: _Source, total: int, progress: bool) -> None:
    ckpt = tmp / ORBAX_DIR
    context = _ts_context()
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
            leaf = leaves[_leaf_name(path)]
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


def _verify(tmp: Path, source: _Source, progress: bool) -> None:
    """Read every array back from `tmp` and compare it bit for bit with what the source
    gives again (read, cast and quantized anew)."""
    ckpt = tmp / ORBAX_DIR
    context = _ts_context()
    leaves = source.leaves
    stores = {tuple(v["path"]): _open_array(ckpt, tuple(v["path"]), context) for v in leaves.values()}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(source.plan), desc="verifying", unit="tensor")
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        last = None
        for path, expert, value, p in source.pieces(pool):
            leaf = leaves[_leaf_name(path)]
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
                    raise CheckpointError(f"{ckpt / _leaf_name(path)}: reading back failed ({e})") from None
                if got.shape != want.shape or not np.array_equal(got.view(uint), want.view(uint)):
                    raise CheckpointError(f"{ckpt / _leaf_name(path)}: verification failed: "
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


def _manifest(src: Path, layout: str, file_info, dtype: np.dtype, quantization: dict | None,
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


def _check_replaceable(dst: Path, force: bool) -> None:
    """UserInputError unless `dst` is absent, or `force` and it is a converted checkpoint (it
    has the manifest) or an empty folder: --force never deletes anything else."""
    if not (dst.exists() or dst.is_symlink()):
        return
    if not force:
        raise UserInputError(f"{dst}: already exists (pass --force to replace it, if it is a "
                             "converted checkpoint or an empty folder)")
    if (dst / MANIFEST).is_file():
        return
    try:
        if dst.is_dir() and not any(dst.iterdir()):
            return
    except OSError as e:
        raise UserInputError(f"{dst}: cannot look inside ({e.strerror or e}); --force replaces "
                             "only a converted checkpoint or an empty folder") from None
    what = "a folder that is not a converted checkpoint" if dst.is_dir() else "not a folder"
    raise UserInputError(f"{dst}: {what} (no {MANIFEST}); --force replaces only a converted "
                         "checkpoint or an empty folder: remove it yourself if it should go")


def _replace(tmp: Path, dst: Path, force: bool) -> None:
    """Atomically move the finished `tmp` to `dst` (replacing it under `force`)."""
    old = None
    try:
        if dst.exists() or dst.is_symlink():
            _check_replaceable(dst, force)  # again: it may have appeared while converting
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
    (quant.read_compressed_tensors), else None."""
    from mistral_jax.quant import read_compressed_tensors

    if is_converted(folder):
        stored = stored_quantization(folder)
        return None if stored is None else stored["mode"]
    return "compressed-tensors" if read_compressed_tensors(folder) is not None else None


def _scale_owner(path: ParamPath, base: dict) -> ParamPath | None:
    """The weight whose scale leaf `path` is (`quant.sibling`), if it is one of `base`."""
    from mistral_jax.quant import sibling

    for suffix in ("input_scale", "scale"):
        if path[-1] != suffix and not path[-1].endswith("_" + suffix):
            continue
        for owner in (path[:-1] + ("kernel",), path[:-1] + (path[-1][: -len(suffix) - 1],)):
            if owner in base and sibling(owner, suffix) == path:
                return owner
    return None


def restored_abstract(folder: str | Path, args: ModelArgs, dtype: Any = None):
    """ShapeDtypeStructs of `restore_params(folder, args, dtype)`, read from the manifest
    alone (no arrays): quantized kernels and scales as stored, the rest in `dtype`."""
    from mistral_jax.checkpoint import unflatten
    from mistral_jax.transformer import resolve_dtype

    folder = Path(folder)
    manifest = read_manifest(folder)
    dt = _np_dtype(manifest["dtype"]) if dtype is None else np.dtype(resolve_dtype(dtype))
    return unflatten(_restore_abstract(folder, manifest, args, dt)[0])


def _restore_abstract(folder: Path, manifest: dict, args: ModelArgs, dtype: np.dtype):
    """{path: ShapeDtypeStruct} of what `restore_params` returns, and {scale path: owner path}.

    The declared params of `args` (`abstract_params`) in `dtype`, except that quantized
    kernels keep their stored dtype, plus the scale leaves the folder holds; raises
    CheckpointError when the folder's arrays do not fit `args`.
    """
    import jax

    from mistral_jax.checkpoint import flatten
    from mistral_jax.model import abstract_params
    from mistral_jax.quant import sibling, split_dims

    ckpt = folder / manifest.get("orbax_dir", ORBAX_DIR)
    base = flatten(abstract_params(args, dtype))
    stored = {}
    for name, v in manifest.get("leaves", {}).items():
        leaf_dtype = v.get("dtype", manifest["dtype"]) if isinstance(v, dict) else None
        if leaf_dtype not in _LEAF_DTYPES:
            raise CheckpointError(f"{folder / MANIFEST}: leaf {name} has dtype {leaf_dtype!r}; "
                                  f"expected one of {list(_LEAF_DTYPES)}")
        stored[tuple(name.split("."))] = _np_dtype(leaf_dtype)
    owners = {p: o for p in stored if p not in base and (o := _scale_owner(p, base)) is not None}
    out = {}
    for path, leaf in base.items():  # quantized kernels keep their dtype, the rest get `dtype`
        keep = path in stored and stored[path].name in _QUANTIZED
        out[path] = jax.ShapeDtypeStruct(leaf.shape, stored[path]) if keep else leaf
    for path, owner in owners.items():  # scales keep theirs (float32)
        lead, _, outs = split_dims(owner, len(base[owner].shape))
        if path[-1].endswith("input_scale"):  # [] for a Linear, [E] for stacked experts
            shape = tuple(base[owner].shape[i] for i in lead)
        else:  # the kernel's lead and output dims (quant.quantize_array)
            shape = tuple(base[owner].shape[i] for i in lead + outs)
        out[path] = jax.ShapeDtypeStruct(shape, stored[path])
    want, have = set(out), set(stored)
    if want != have:
        names = lambda paths: sorted(_leaf_name(p) for p in paths)  # noqa: E731
        diff = names(want - have)[:4] + names(have - want)[:4]
        raise CheckpointError(
            f"{ckpt}: its arrays do not match the args in {folder / 'params.json'} "
            f"({len(want - have)} missing, {len(have - want)} unexpected: {', '.join(diff)})")
    for path, leaf in out.items():
        if leaf.dtype.name in _QUANTIZED and sibling(path, "scale") not in out:
            raise CheckpointError(f"{ckpt / _leaf_name(path)}: a {leaf.dtype.name} weight "
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
    from mistral_jax.checkpoint import unflatten
    from mistral_jax.transformer import resolve_dtype

    folder = Path(folder)
    manifest = read_manifest(folder)
    stored = _np_dtype(manifest["dtype"])
    dt = stored if dtype is None else np.dtype(resolve_dtype(dtype))
    flat, owners = _restore_abstract(folder, manifest, args, dt)
    paths = sorted(flat)
    flat_shardings = _flat_shardings(shardings, flat, owners, args)
    ckpt = folder / manifest.get("orbax_dir", ORBAX_DIR)
    _check_chunk_files(ckpt, folder / MANIFEST, manifest["leaves"])  # before reading any
    context = _ts_context()

    def restore(path: ParamPath):
        leaf = flat[path]
        store = _open_array(ckpt, path, context)
        if tuple(store.shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"{ckpt / _leaf_name(path)}: shape {list(store.shape)}, but the args in "
                f"{folder / 'params.json'} expect {list(leaf.shape)} for {'/'.join(path)}")
        return _restore_array(store, leaf.shape, flat_shardings[path], np.dtype(leaf.dtype),
                              ckpt / _leaf_name(path))

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

    from mistral_jax.checkpoint import flatten, unflatten

    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return dict.fromkeys(flat, shardings)
    specs = None

    def spec(mesh: Mesh, path: ParamPath):
        nonlocal specs
        if specs is None:
            from mistral_jax.sharding import tree_specs

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
            f"{', '.join(_leaf_name(p) for p in missing[:4]) or '-'}; unexpected: "
            f"{', '.join(_leaf_name(p) for p in unexpected[:4]) or '-'})")
    out = {}
    for p in flat:
        if p in given:
            out[p] = given[p]
        else:  # a scale the pytree does not name: on its weight's mesh, or where the weight is
            owner = given[owners[p]]
            out[p] = spec(owner.mesh, p) if isinstance(owner, NamedSharding) else owner
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


if __name__ == "__main__":  # `python -m mistral_jax.convert` = mistral-jax-convert
    from convert.safetensors_to_orbax import main

    raise SystemExit(main())
