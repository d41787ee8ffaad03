"""`python -m mistral_jax.serve`: an OpenAI-compatible server with continuous batching.

    python -m mistral_jax.serve                      # the built-in demo model, port 8000
    python -m mistral_jax.serve --ckpt DIR --max-batch 16 --max-seq-len 8192 --api-key KEY

Endpoints: GET /health, /metrics, /v1/models; POST /v1/chat/completions,
/v1/completions, /v1/fim/completions. SIGTERM (or Ctrl-C) stops taking requests, lets
the running ones go on for --shutdown-grace seconds, ends the rest with finish_reason
'abort' and exits 0 (130 after Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import uvicorn

from mistral_jax import interrupts
from mistral_jax.cache import cache_sizes
from mistral_jax.cli import common as cli
from mistral_jax.dtypes import resolve_dtype
from mistral_jax.errors import UserInputError
from mistral_jax.model import random_params
from mistral_jax.presets import PRESETS
from mistral_jax.serve.api import create_app
from mistral_jax.serve.engine import Engine
from mistral_jax.serve.metrics import Metrics
from mistral_jax.tokenizer import load_tokenizer

DEFAULT_MAX_SEQ_LEN = 4096  # when neither the model's config nor --max-seq-len states one
MEMORY_HEADROOM = 0.9  # the cache may take this share of the free memory


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m mistral_jax.serve",
                           description="An OpenAI-compatible server with continuous batching.")
    cli.add_model_flags(p)
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="serve random weights of a preset shape (benchmarks, e.g. mistral-7b; "
                   "see python -m mistral_jax.bench --help) with the demo model's tokenizer, "
                   "instead of --ckpt")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=cli.int_at_least(0), default=8000,
                   help="port (default: %(default)s; 0: any free one, printed when ready)")
    p.add_argument("--max-batch", type=cli.int_at_least(1), default=8,
                   help="slots: requests decoded together (default: %(default)s)")
    p.add_argument("--max-seq-len", type=cli.int_at_least(2), default=None,
                   help="context per request, prompt + answer (default: the model's "
                   f"max_seq_len, else {DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--max-waiting", type=cli.int_at_least(1), default=256,
                   help="requests queued for a slot before new ones get 503 (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=cli.int_at_least(16), default=256,
                   help="largest prompt chunk prefilled between two decode steps "
                   "(default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("MISTRAL_JAX_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: "
                   "$MISTRAL_JAX_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the folder's or preset's name)")
    p.add_argument("--shutdown-grace", type=float, default=5.0, metavar="S",
                   help="on SIGTERM, seconds the running requests may go on (default: %(default)s)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not compile every batch and chunk size before serving")
    return p


def cache_bytes(args, max_batch: int, max_seq_len: int, dtype) -> int:
    """Bytes of the KV cache: k and v, [max_batch, n_kv_heads, S, head_dim] per layer,
    S = max_seq_len or the layer's sliding window if smaller, plus int32 positions."""
    item = jnp.dtype(dtype).itemsize
    return sum(max_batch * size * (2 * args.n_kv_heads * args.head_dim * item + 4)
               for size in cache_sizes(args, max_seq_len))


def free_memory() -> tuple[int | None, str]:
    """Bytes free for the cache on the first device (its allocator's limit minus what is in
    use), or the host's MemAvailable on a CPU; None where neither is known."""
    dev = jax.devices()[0]
    stats = None
    with contextlib.suppress(Exception):
        stats = dev.memory_stats()
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{dev.device_kind} memory"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available host memory"
    return None, ""


def check_memory(args, max_batch: int, max_seq_len: int, dtype) -> None:
    need = cache_bytes(args, max_batch, max_seq_len, dtype)
    free, what = free_memory()
    if free is None or need <= MEMORY_HEADROOM * free:
        return
    budget = MEMORY_HEADROOM * free
    batch_fit = int(budget // cache_bytes(args, 1, max_seq_len, dtype))
    len_fit = max_seq_len
    while len_fit > 16 and cache_bytes(args, max_batch, len_fit, dtype) > budget:
        len_fit //= 2
    shorter = (f" or --max-seq-len (e.g. {len_fit})"
               if cache_bytes(args, max_batch, len_fit, dtype) <= budget else "")
    raise UserInputError(
        f"the KV cache for --max-batch {max_batch} x --max-seq-len {max_seq_len} needs "
        f"{need / 2**30:.2f} GiB but {what} has {free / 2**30:.2f} GiB free: lower "
        f"--max-batch (at most {batch_fit} fits){shorter}")


def resolve_context(ns: argparse.Namespace, args) -> int:
    if ns.max_seq_len is None:
        return args.max_seq_len or DEFAULT_MAX_SEQ_LEN
    if args.max_seq_len is not None and ns.max_seq_len > args.max_seq_len:
        raise UserInputError(f"--max-seq-len {ns.max_seq_len} is beyond the model's context "
                             f"of {args.max_seq_len} tokens")
    return ns.max_seq_len


def load(ns: argparse.Namespace):
    """(params, args, tokenizer, dtype, served name) for the flags."""
    if ns.preset is None:
        folder, args, tok = cli.prepare(ns)
        model = cli.load_model(ns, folder)
        name = ns.served_model_name or Path(folder).resolve().name
        return model.params, args, tok, model.dtype, name
    if ns.ckpt is not None or ns.preset not in PRESETS:
        raise UserInputError(f"--preset must be one of {', '.join(sorted(PRESETS))}, without "
                             f"--ckpt; got {ns.preset!r}")
    args = PRESETS[ns.preset]
    tok = load_tokenizer(ns.tokenizer or cli.demo_model_folder())
    if tok.n_words > args.vocab_size:
        raise UserInputError(f"--preset {ns.preset} has vocab_size={args.vocab_size}, fewer "
                             f"than the tokenizer's {tok.n_words}: pass --tokenizer")
    dtype = resolve_dtype(ns.dtype)
    if not ns.no_compile_cache:
        cli.enable_compilation_cache(ns.compile_cache)
    params = random_params(args, 0, dtype, ns.quantize)
    return params, args, tok, dtype, ns.served_model_name or ns.preset


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserInputError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                             "(--host/--port)") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _main(argv: Sequence[str] | None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.shutdown_grace < 0 or not math.isfinite(ns.shutdown_grace):
        raise UserInputError(f"--shutdown-grace must be >= 0, got {ns.shutdown_grace}")
    sock = bind(ns.host, ns.port)  # before loading: a taken port fails at once
    params, args, tok, dtype, name = load(ns)
    max_len = resolve_context(ns, args)
    check_memory(args, ns.max_batch, max_len, dtype)
    metrics = Metrics()
    engine = Engine(params, args, tok, max_batch=ns.max_batch, max_seq_len=max_len,
                    dtype=dtype, max_chunk=ns.prefill_chunk, max_waiting=ns.max_waiting,
                    vocab_limit=cli.decodable_ids(tok, args), metrics=metrics, log=cli.log)
    if not ns.no_warmup:
        start = time.perf_counter()
        engine.warmup()
        cli.log(f"compiled {len(engine.buckets)} decode and {len(engine.chunks)} prefill "
                f"programs in {time.perf_counter() - start:.1f} s")
    engine.start()
    app = create_app(engine, tok, model_name=name, max_model_len=max_len, api_key=ns.api_key,
                     metrics=metrics)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=ns.shutdown_grace + 10)
    server = _Server(config, engine, app, ns.shutdown_grace)
    host, port = sock.getsockname()[:2]
    server.ready_line = (f"ready: serving {name} on http://{host}:{port} (max batch "
                         f"{ns.max_batch}, context {max_len} tokens)")
    try:
        # While serving, SIGTERM / SIGINT drain the engine (`_Server.on_signal`) instead of
        # ending the process at once, as interrupts.py does for every command.
        with interrupts.deferred((signal.SIGTERM, signal.SIGINT)):
            asyncio.run(server.serve(sockets=[sock]))
    finally:
        engine.stop()
    return 130 if server.signal == signal.SIGINT else 0


class _Server(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT drain the engine and exit normally (plain
    uvicorn re-raises the signal after shutting down: exit status -15)."""

    def __init__(self, config, engine, app, grace: float) -> None:
        super().__init__(config)
        self.engine, self.app, self.grace = engine, app, grace
        self.signal: int | None = None
        self.ready_line = ""

    @contextlib.contextmanager
    def capture_signals(self):
        # Kept until the process exits: a signal while the engine stops is not fatal.
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.on_signal)
        yield

    def on_signal(self, sig, frame) -> None:
        if self.signal is not None:  # a second signal: stop now
            self.force_exit = True
            return
        self.signal = sig
        cli.log(f"{signal.Signals(sig).name}: not taking requests; running ones end within "
                f"{self.grace:g} s")
        self.app.state.draining = True
        self.app.state.deadline = time.monotonic() + self.grace + 1.0
        self.engine.drain(self.grace)
        self.should_exit = True  # uvicorn closes the socket, then waits for the responses

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            cli.log(self.ready_line)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m mistral_jax.serve` / `mistral-jax-serve`."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
