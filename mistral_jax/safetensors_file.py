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
# of compressed-tensors weights, which must come with their scales (compressed_tensors.py).
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
