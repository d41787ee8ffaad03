"""Safetensors files: headers, byte locations and plain reads of single tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from mistral_jax.errors import CheckpointError

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


@dataclasses.dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors file."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype


def np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    if name in ("bfloat16", "float8_e4m3fn"):  # numpy itself lacks these
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def tensor_locations(path: Path) -> tuple[dict[str, TensorLocation], str]:
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
        dtype = np_dtype(SAFETENSORS_DTYPES[dtype_name])
        if not 0 <= begin <= end or end > data_len:
            raise CheckpointError(f"{path}: tensor {name!r} has offsets [{begin}, {end}) past the "
                                  f"end of the data ({data_len} bytes): truncated or corrupt")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes, but shape "
                                  f"{list(shape)} of {dtype_name} needs "
                                  f"{math.prod(shape) * dtype.itemsize}")
        locs[name] = TensorLocation(base + begin, end - begin, shape, dtype)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the file")
    return locs, hashlib.sha256(head + raw).hexdigest()


def read_tensor(f, path: Path, name: str, loc: TensorLocation) -> np.ndarray:
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


def iter_file_tensors(path: Path, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each of `names` in the file, memory-mapped by safetensors; fp8
    (which numpy lacks) through a numpy memory map at its offsets (`tensor_locations`).
    CheckpointError naming the file if safetensors cannot read it."""
    fp8 = None
    try:
        with safe_open(path, framework="np") as f:
            for name in names:
                dt = f.get_slice(name).get_dtype()
                if not dt.startswith("F8"):
                    yield name, f.get_tensor(name)
                    continue
                if dt not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
                fp8 = fp8 or tensor_locations(path)[0]
                loc = fp8[name]
                yield name, np.memmap(path, loc.dtype, "r", offset=loc.offset,
                                      shape=(loc.nbytes // loc.dtype.itemsize,)).reshape(loc.shape)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: failed to read tensors ({e})") from None
