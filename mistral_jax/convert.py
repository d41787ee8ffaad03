"""`mistral-jax-convert SRC DST`: safetensors folders -> converted (Orbax) folders.

    convert(src, dst, dtype="bfloat16")              # Mistral or HF folder -> converted folder
    convert(src, dst, quantize="int8")               # ... written quantized (int8 / fp8)

Everything is written into a hidden sibling and renamed into place when complete; a
signal leaves nothing behind. The arrays are written by orbax_write.py and read back by
orbax_restore.py; docs/design/converted-folders.md describes the folder format.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from mistral_jax.args import ModelArgs
from mistral_jax.checkpoint import plan_checkpoint
from mistral_jax.compressed_tensors import checkpoint_abstract, read_compressed_tensors
from mistral_jax.config import (
    args_from_hf_config,
    args_from_params_json,
    args_to_params_json,
    check_folder,
    load_args,
)
from mistral_jax.dtypes import resolve_dtype
from mistral_jax.errors import CheckpointError, ConfigError, MistralJaxError, UserInputError
from mistral_jax.interrupts import WORDS, Interrupts, exit_status, keyboard_interrupts
from mistral_jax.model import abstract_params
from mistral_jax.orbax_restore import (
    MANIFEST,
    ORBAX_DIR,
    folder_quantization,
    is_converted,
    read_manifest,
    restore_params,
    restored_abstract,
    stored_quantization,
)
from mistral_jax.orbax_write import (
    Source,
    build_manifest,
    convert_into,
    leaf_bytes,
    leaf_paths,
    leaf_table,
    orbax_metadata,
    verify_written,
)
from mistral_jax.quantize import MODES, quantize_params, resolve_mode
from mistral_jax.safetensors_file import safetensors_files, tensor_locations
from mistral_jax.tree import flatten, unflatten

__all__ = ["ConvertStats", "MANIFEST", "convert", "folder_quantization", "is_converted",
           "read_manifest", "restore_params", "restored_abstract", "stored_quantization"]

# Copied beside the converted params: every name tokenizer.find_tokenizer_file looks for in a
# folder (versioned SentencePiece files under any stem, e.g. mistral_instruct_..._.model.v3),
# and the Hugging Face tokenizer / generation files.
_TOKENIZER_FILES = ("tekken*.json", "tokenizer.model", "*.model.v*", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")



# ----------------------------------------------------------------------------- source reading


# ----------------------------------------------------------------------------- on-disk arrays


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

    SIGINT, SIGTERM and SIGHUP (from the main thread; see interrupts.Interrupts): their
    handlers run at once while the source is checked, and once the partial output exists
    are only recorded, and acted on at the next tensor or chunk: the partial output is
    removed (a signal during that removal is recorded too, never cutting it short), then
    the signal's previous handler runs (KeyboardInterrupt for SIGINT; under the default
    action the signal is raised again, ending the process). One that arrives once `dst`
    is in place is too late: the conversion is complete.
    """
    with Interrupts() as interrupts:
        return _convert(Path(src), Path(dst), dtype, layout, quantize, force, verify, progress,
                        interrupts)


def _convert(src: Path, dst: Path, dtype: Any, layout: str, quantize: str | None, force: bool,
             verify: bool, progress: bool, interrupts: Interrupts) -> ConvertStats:
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
    else:  # int8 / fp8 kernels with their scales, as `load.load_params` holds them
        abstract, implied = checkpoint_abstract(files, layout, args, np_dtype, scheme)
    check()
    plan = plan_checkpoint(files, layout, args, abstract)  # every header checked before any data
    file_info = {f: tensor_locations(f) for f in files}
    locs = {f: info[0] for f, info in file_info.items()}
    if mode is not None:
        abstract = quantize_params(abstract, mode)
    if implied:  # dynamic activation scales: in the params, in no file
        import jax

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
    leaves = leaf_table(abstract, args)
    total = sum(leaf_bytes(v) for v in leaves.values())
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
        source = Source(plan, locs, leaves, np_dtype, mode, implied, check=check)
        source.find_amax(progress)
        convert_into(tmp, src, source, total, progress)
        if verify:
            verify_written(tmp, source, progress)
        try:
            (tmp / "params.json").write_text(json.dumps(args_to_params_json(args), indent=2) + "\n")
            for f in sorted({f for pattern in _TOKENIZER_FILES for f in src.glob(pattern)}):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            _write_json(tmp / ORBAX_DIR / "_METADATA", orbax_metadata(list(leaf_paths(leaves))))
            manifest = build_manifest(src_abs, layout, file_info, np_dtype, quantization, leaves,
                                 len(plan), total)
            _write_json(tmp / MANIFEST, manifest)
            _fsync_path(tmp)
        except OSError as e:
            raise CheckpointError(f"{dst}: writing the checkpoint failed ({e.strerror or e})") from None
        check()  # the last point to stop at: after the rename the checkpoint is complete
        _replace(tmp, dst_abs, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # signals only recorded meanwhile (Interrupts)
        raise
    return ConvertStats(dst, len(plan), total, time.perf_counter() - start, verify,
                        None if quantization is None else quantization["mode"])


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mistral-jax-convert",
        description="Convert a Mistral (params.json + consolidated*.safetensors) or Hugging Face "
                    "(config.json + model*.safetensors) folder into an Orbax checkpoint folder, "
                    "optionally quantized (--quantize).")
    p.add_argument("src", help="source model folder")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype: bfloat16 (default), "
                   "float16 or float32")
    p.add_argument("--format", default="auto", choices=("auto", "mistral", "hf"),
                   help="source layout (auto: params.json -> mistral, else config.json -> "
                        "hf; params.json wins when both are there)")
    p.add_argument("--quantize", default=None, choices=list(MODES),
                   help="write the attention / feed-forward weights quantized: int8 or fp8 "
                        "(e4m3) with a float32 scale per output channel, or fp8-tensor (one "
                        "scale per weight); the other weights stay in --dtype. Not for "
                        "compressed-tensors sources, which are written quantized as stored")
    p.add_argument("--force", action="store_true",
                   help="replace DST if it is a converted checkpoint (it has "
                        "mistral_jax_checkpoint.json) or an empty folder; anything else at DST "
                        "is never deleted (remove it yourself)")
    p.add_argument("--verify", action="store_true",
                   help="read every tensor back and compare it with the source (cast, and "
                        "quantized again with --quantize) before finishing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (130 / 143 / 129 after SIGINT / SIGTERM /
    SIGHUP, once the partial output is removed)."""
    opts = _parser().parse_args(argv)
    with keyboard_interrupts():  # in-process: SIGTERM / SIGHUP unwind like Ctrl-C
        try:
            stats = convert(opts.src, opts.dst, dtype=opts.dtype, layout=opts.format,
                            quantize=opts.quantize, force=opts.force, verify=opts.verify,
                            progress=not opts.quiet)
        except (MistralJaxError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            status = exit_status(e)
            word = WORDS.get(status - 128, "interrupted")
            print(f"\n{word}; the destination was left as it was", file=sys.stderr)
            return status
    print(stats.summary())
    return 0


if __name__ == "__main__":  # `python -m mistral_jax.convert` = mistral-jax-convert
    sys.exit(main())
