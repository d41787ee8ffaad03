"""Measure the converter on a synthetic checkpoint: throughput and the child's peak RSS.

    python -m convert.benchmark --gb 2.0 [--dtype bfloat16] [--quantize int8] [--dir /tmp/x] [--keep]

Writes a Mistral-layout folder of about `--gb` GB of float32 weights (many tensors, written
tile by tile so the parent stays small), converts it in a child process with the CLI, and
prints the child's peak resident memory (`os.wait4` rusage), time and MB/s.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mistral_jax.args import ModelArgs
from mistral_jax.config import args_to_params_json


def synthetic_args(gb: float) -> ModelArgs:
    """A dense model of about `gb` GB in float32: dim 2048, ~186 MB per layer."""
    kw = dict(dim=2048, head_dim=128, hidden_dim=5632, n_heads=16, n_kv_heads=8,
              norm_eps=1e-5, vocab_size=32000)
    base = ModelArgs(n_layers=1, **kw)
    per_layer = (ModelArgs(n_layers=2, **kw).n_params - base.n_params) * 4
    fixed = base.n_params * 4 - per_layer
    return ModelArgs(n_layers=max(1, math.ceil((gb * 1e9 - fixed) / per_layer)), **kw)


def write_synthetic(folder: Path, args: ModelArgs, seed: int = 0) -> tuple[int, int, int]:
    """Write params.json + consolidated.safetensors (float32) without holding any tensor.

    Returns (file bytes, number of tensors, largest tensor bytes).
    """
    d, hd, f = args.dim, args.head_dim, args.hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,),
              "output.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (args.n_heads * hd, d),
                       p + "attention.wk.weight": (args.n_kv_heads * hd, d),
                       p + "attention.wv.weight": (args.n_kv_heads * hd, d),
                       p + "attention.wo.weight": (d, args.n_heads * hd),
                       p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                       p + "feed_forward.w1.weight": (f, d), p + "feed_forward.w2.weight": (d, f),
                       p + "feed_forward.w3.weight": (f, d)})
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(args_to_params_json(args)))
    tile = (np.random.default_rng(seed).standard_normal(1 << 22, dtype=np.float32) * 0.02).tobytes()
    with open(folder / "consolidated.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            left = math.prod(shape) * 4
            shift = hash(name) % 1024 * 4  # different contents per tensor
            while left:
                piece = tile[shift:shift + left] if shift + left <= len(tile) else tile[shift:]
                out.write(piece)
                left -= len(piece)
                shift = 0
    largest = max(math.prod(s) for s in shapes.values()) * 4
    return 8 + len(raw) + offset, len(shapes), largest


_CHILD = """
import sys
from convert.safetensors_to_orbax import main
try:
    status = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as f:  # this process's own peak: VmHWM (kB)
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    print(f"VmHWM {peak}", file=sys.stderr)
sys.exit(status)
"""


def convert_in_child(src: Path, dst: Path, *extra: str) -> tuple[int, float, float, str]:
    """Run the CLI in a child; returns (exit status, its peak RSS in MB, seconds, output).

    The peak is the child's own VmHWM (Linux): `ru_maxrss` of a child also counts the
    parent's memory at fork time, which after `exec` says nothing about the child.
    """
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst), "--quiet", *extra],
                          capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    seconds = time.perf_counter() - start
    peak = re.search(r"^VmHWM (\d+)$", done.stderr, re.M)
    output = (done.stdout + re.sub(r"^VmHWM \d+\n?", "", done.stderr, flags=re.M)).strip()
    return done.returncode, int(peak[1]) / 1024 if peak else float("nan"), seconds, output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None, choices=("int8", "fp8", "fp8-tensor"),
                   help="convert with --quantize (the tiny baseline run is not quantized)")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    opts = p.parse_args(argv)
    work = Path(opts.dir or tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        args = synthetic_args(opts.gb)
        size, n, largest = write_synthetic(work / "src", args)
        print(f"source: {size / 1e9:.2f} GB float32, {n} tensors, largest {largest / 1e6:.0f} MB")
        quant = ["--quantize", opts.quantize] if opts.quantize else []
        status, rss, seconds, out = convert_in_child(work / "src", work / "dst", "--dtype",
                                                     opts.dtype, *quant)
        print(out.strip())
        if status:
            return status
        written = sum(f.stat().st_size for f in (work / "dst").rglob("*") if f.is_file())
        print(f"child peak RSS {rss:.0f} MB; {written / 1e9:.2f} GB on disk; {seconds:.1f} s "
              f"including start-up ({written / 1e6 / seconds:.0f} MB/s); dtype {opts.dtype}"
              f"{', quantized ' + opts.quantize if opts.quantize else ''}")
        tiny = ModelArgs(dim=64, n_layers=1, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                         norm_eps=1e-5, vocab_size=256)
        write_synthetic(work / "tiny", tiny)
        status, base, _, out = convert_in_child(work / "tiny", work / "tiny_dst")
        print(f"same CLI on a tiny model: peak RSS {base:.0f} MB (imports, JAX); the "
              f"conversion itself added {rss - base:.0f} MB (largest tensor {largest / 1e6:.0f} MB)")
        import jax

        from mistral_jax.orbax_restore import restore_params

        start = time.perf_counter()
        params = restore_params(work / "dst", args, None)
        jax.block_until_ready(params)
        restore_s = time.perf_counter() - start
        print(f"restore_params onto {jax.devices()[0]}: {restore_s:.1f} s "
              f"({written / 1e6 / restore_s:.0f} MB/s)")
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
