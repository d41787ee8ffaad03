"""Per-token time of `generate_stream` (what chat pays): one jitted step dispatched per
token, each token read back to the host.

    python benchmarks/stream_latency.py                     # the demo model, 128 tokens
    python benchmarks/stream_latency.py --ckpt DIR --dtype bfloat16 --max-tokens 256

Prints the median over `--repeats` runs (after one warm-up run) of wall time / tokens,
greedy, from a fixed prompt; the stream never stops early (no eos_id).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mistral_jax

from mistral_jax.generate import generate_stream
from mistral_jax.transformer import Transformer

DEMO = Path(__file__).resolve().parents[1] / "mistral_jax" / "demo_model"


def ms_per_token(model: Transformer, prompt: list[int], max_tokens: int) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in generate_stream(prompt, model, max_tokens=max_tokens))
    return (time.perf_counter() - start) / n * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=DEMO, help="model folder (default: the demo model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    ns = p.parse_args(argv)
    model = Transformer.from_folder(ns.ckpt, dtype=ns.dtype)
    prompt = [1 + i % (model.args.vocab_size - 1) for i in range(ns.prompt_len)]
    ms_per_token(model, prompt, ns.max_tokens)  # compiles
    runs = [ms_per_token(model, prompt, ns.max_tokens) for _ in range(ns.repeats)]
    print(f"{ns.ckpt.name}: {statistics.median(runs):.3f} ms/token (median of {ns.repeats}, "
          f"min {min(runs):.3f}), {ns.max_tokens} tokens, {ns.dtype}, "
          f"{jax.devices()[0].platform}, JAX {jax.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
