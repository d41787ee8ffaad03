"""The benchmark's command-line flags: parsing, checks, and the kernels they choose.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from mistral_jax.cli.common import COMPILE_CACHE_ENV, default_cache_dir
from mistral_jax.errors import UserInputError
from mistral_jax.kernels import CHOICES, ENV, Kernels, default_kernels
from mistral_jax.presets import PRESETS
from mistral_jax.quantize import MODES


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m mistral_jax.bench`."""
    p = argparse.ArgumentParser(prog="python -m mistral_jax.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model shape with random weights (ignored with --ckpt)")
    p.add_argument("--ckpt", type=Path, help="a model folder (Mistral or HF layout) to load instead")
    p.add_argument("--layers", type=int, default=None,
                   help="the preset's shapes with this many layers (a big shape on a small "
                   "device: per-layer figures; not with --ckpt)")
    p.add_argument("--dtype", default="auto",
                   help="bfloat16 | float16 | float32; auto: float32 on a CPU, bfloat16 "
                   "elsewhere (transformer.auto_dtype)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, nargs="+", default=[64])
    p.add_argument("--gen-len", type=int, nargs="+", default=[32])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per figure (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", choices=list(MODES), default=None,
                   help="weight-only int8/fp8 attention and feed-forward weights (quantize.py)")
    p.add_argument("--attention", choices=CHOICES["attention"], default=None,
                   help=f"prefill attention kernel (Kernels.attention, kernels.py; default: "
                   f"{ENV['attention']}, else auto)")
    p.add_argument("--qmatmul", choices=CHOICES["qmatmul"], default=None,
                   help=f"quantized decode matmul: XLA or the Pallas kernel (Kernels.qmatmul; "
                   f"default: {ENV['qmatmul']}, else auto = xla)")
    p.add_argument("--moe-kernel", choices=CHOICES["moe"], default=None,
                   help=f"MoE decode path: XLA's gather, its row-block tiling or the Pallas "
                   f"kernel (Kernels.moe; default: {ENV['moe']}, else auto = tiled on the CPU "
                   "for float32/int8 experts, pallas on GPUs for float experts, xla otherwise)")
    p.add_argument("--moe-grouped", choices=CHOICES["grouped"], default=None,
                   help=f"MoE prefill / batched-decode path: scan over row blocks, ragged_dot or "
                   f"the Pallas grouped matmul (Kernels.grouped; default: {ENV['grouped']}, "
                   "else auto = pallas on GPUs, scan elsewhere)")
    p.add_argument("--vs-transformers", action="store_true",
                   help="also time transformers' PyTorch model on the same weights")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch CPU threads for --vs-transformers (default: torch's own)")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="buffer for the copy-bandwidth probe (default 1024 on GPU, 256 elsewhere)")
    p.add_argument("--read-mib", type=int, default=None,
                   help="buffer for the read-only bandwidth probe (default: the weights' bytes, "
                   "at least the copy probe's)")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="matmul size for the measured peak (default 8192 on GPU, 1024 elsewhere)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak to take MFU against (default: datasheet for known GPUs, else measured)")
    p.add_argument("--compile-cache", "--compile-cache-dir", dest="compile_cache", metavar="DIR",
                   type=Path, default=None,
                   help="JAX's persistent compilation cache, so that a second start skips most "
                   f"compilation (default {default_cache_dir()}; --compile-cache-dir: old name)")
    p.add_argument("--cache-min-compile-secs", type=float, default=None,
                   help="store only programs that took at least this long to compile (default: "
                   "$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, else JAX's 1 s)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help=f"neither read nor write the compilation cache (or set "
                   f"{COMPILE_CACHE_ENV}=off)")
    p.add_argument("--json", type=Path, help="also write the JSON result here")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate(ns: argparse.Namespace) -> None:
    for name in ("batch", "prompt_len"):
        if any(v < 1 for v in getattr(ns, name)):
            raise UserInputError(f"--{name.replace('_', '-')} values must be >= 1")
    if any(v < 2 for v in ns.gen_len):
        raise UserInputError("--gen-len values must be >= 2 (one prefill token + decode steps)")
    if ns.repeats < 1:
        raise UserInputError("--repeats must be >= 1")
    if ns.torch_threads is not None and ns.torch_threads < 1:
        raise UserInputError("--torch-threads must be >= 1")
    if ns.ckpt is not None and not ns.ckpt.is_dir():
        raise UserInputError(f"--ckpt {ns.ckpt}: not a directory")
    if ns.layers is not None and (ns.layers < 1 or ns.ckpt is not None):
        raise UserInputError("--layers must be >= 1, and applies to a --preset, not --ckpt")
    if ns.vs_transformers:  # one line now, not an ImportError traceback after the JAX run
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserInputError(
                f"--vs-transformers needs {' and '.join(missing)} (not installed here): "
                "pip install torch transformers (or the test extra), or drop --vs-transformers")
    if ns.quantize and ns.vs_transformers:
        raise UserInputError("--quantize cannot be combined with --vs-transformers "
                             "(transformers' model is built from unquantized weights)")
    if ns.json is not None:  # checked before the run, not after it
        if ns.json.is_dir():
            raise UserInputError(f"--json {ns.json}: is a directory; give a file name")
        blocking = next((p for p in ns.json.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise UserInputError(f"--json {ns.json}: {blocking} is a file, not a directory")


def chosen_kernels(ns: argparse.Namespace) -> Kernels:
    """The flags over the default (`kernels.default_kernels`: MISTRAL_JAX_*, else 'auto')."""
    default = default_kernels()
    return Kernels(attention=ns.attention or default.attention, moe=ns.moe_kernel or default.moe,
                   qmatmul=ns.qmatmul or default.qmatmul,
                   grouped=ns.moe_grouped or default.grouped)
