"""Load test of `python -m mistral_jax.serve`: N concurrent streaming clients.

    python benchmarks/serve_load.py                                  # demo model, N = 1 4 16
    python benchmarks/serve_load.py --preset mistral-7b --dtype bfloat16 --clients 1 16 64
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 1 8

Starts a server (`--max-batch` = the largest N) unless --url names one. Each of N
clients sends --rounds streamed /v1/completions requests one after another: a prompt
of --prompt-len random token ids, exactly --gen-len output tokens (ignore_eos, greedy).
Levels run --repeats times, interleaved; per N, the pass with the median tokens/s is
reported. Per N: aggregate output tokens/s (all tokens / wall time from the first request sent to
the last answer), its ratio to N = 1, time to first token and inter-token latency
(gaps between streamed chunks, one token each but for a token whose text waits for the
next one) at p50 / p99. Prints a table; --json FILE writes it with the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


async def one_request(url: str, prompt: list[int], gen: int, key: str | None) -> dict:
    """One streamed completion over a bare asyncio connection: a light client, as the
    clients share the machine's CPUs with the server. Reads uvicorn's chunked body line
    by line (each server-sent event arrives as one chunk of whole lines)."""
    body = json.dumps({"prompt": prompt, "max_tokens": gen, "temperature": 0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    u = urlsplit(url)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: {u.netloc}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                  f"Connection: close\r\n{auth}\r\n").encode() + body)
    status = await reader.readline()
    if b" 200 " not in status:
        raise SystemExit(f"server answered {status!r}: {await reader.read(2000)!r}")
    while (await reader.readline()).strip():  # headers
        pass
    arrivals, tokens = [], 0
    while line := await reader.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["text"]:
            arrivals.append(time.perf_counter())
    writer.close()
    end = time.perf_counter()
    return {"ttft": arrivals[0] - start if arrivals else float("nan"),
            "gaps": np.diff(arrivals).tolist(), "tokens": tokens, "start": start, "end": end}


async def level(url: str, n: int, rounds: int, prompt_len: int, gen: int, key: str | None,
                seed: int) -> dict:
    rng = np.random.default_rng(seed + n)

    async def worker() -> list[dict]:
        out = []
        for _ in range(rounds):
            prompt = rng.integers(1000, 20000, prompt_len).tolist()
            out.append(await one_request(url, prompt, gen, key))
        return out

    results = [r for rs in await asyncio.gather(*(worker() for _ in range(n))) for r in rs]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    total = sum(r["tokens"] for r in results)
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    gaps = np.array([g for r in results for g in r["gaps"]]) * 1e3
    return {"clients": n, "requests": len(results), "output_tokens": total, "wall_s": wall,
            "tokens_per_s": total / wall,
            "ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p99": float(np.percentile(ttft, 99)),
            "itl_ms_p50": float(np.percentile(gaps, 50)) if gaps.size else float("nan"),
            "itl_ms_p99": float(np.percentile(gaps, 99)) if gaps.size else float("nan")}


def start_server(ns, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mistral_jax.serve", "--port", "0", "--max-batch",
           str(max_batch), "--max-seq-len", str(ns.max_seq_len)]
    for flag in ("ckpt", "preset", "dtype", "quantize"):
        if getattr(ns, flag) is not None:
            cmd += [f"--{flag}", str(getattr(ns, flag))]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)  # noqa: SIM115
    deadline = time.time() + 1800
    while time.time() < deadline:
        m = re.search(r"ready: serving \S+ on (http://\S+)", log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")


def versions() -> dict:
    import jax

    return {"python": platform.python_version(), "jax": jax.__version__,
            "device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
            "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--ckpt", default=None, help="model folder (default: the demo model)")
    p.add_argument("--preset", default=None, help="random weights of a preset (e.g. mistral-7b)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-batch", type=int, default=None,
                   help="the started server's slots (default: the largest --clients)")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not add N = 1 to --clients (ratios are then to the first N)")
    p.add_argument("--rounds", type=int, default=2, help="requests per client (default: 2)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3,
                   help="passes over the levels, interleaved; each level's median pass is "
                   "reported (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = p.parse_args(argv)
    if 1 not in ns.clients and not ns.no_baseline:
        ns.clients = [1, *ns.clients]
    proc = None
    url = ns.url
    if url is None:
        log = Path(tempfile.mkdtemp()) / "server.log"
        proc, url = start_server(ns, ns.max_batch or max(ns.clients), log)
    try:
        asyncio.run(level(url, 1, 1, ns.prompt_len, 4, ns.api_key, ns.seed))  # warm-up
        passes: dict[int, list[dict]] = {n: [] for n in sorted(ns.clients)}
        load = []
        for _ in range(ns.repeats):  # interleaved, so a busy spell of the machine hits all N
            for n in passes:
                passes[n].append(asyncio.run(level(url, n, ns.rounds, ns.prompt_len,
                                                   ns.gen_len, ns.api_key, ns.seed)))
                load.append(os.getloadavg()[0])
        rows = []
        for runs in passes.values():
            runs.sort(key=lambda r: r["tokens_per_s"])
            rows.append({**runs[len(runs) // 2],
                         "tokens_per_s_all": [round(r["tokens_per_s"], 1) for r in runs]})
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    base = rows[0]["tokens_per_s"]
    print(f"{'N':>4} {'reqs':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'x N=1':>6} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  (ms)")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
        print(f"{r['clients']:>4} {r['requests']:>5} {r['output_tokens']:>7} {r['wall_s']:>7.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['speedup']:>6.2f} {r['ttft_ms_p50']:>9.1f} "
              f"{r['ttft_ms_p99']:>9.1f} {r['itl_ms_p50']:>8.2f} {r['itl_ms_p99']:>8.2f}")
    if ns.json is not None:
        settings = {k: v for k, v in vars(ns).items() if k not in ("json", "api_key")}
        ns.json.write_text(json.dumps({"settings": settings, "versions": versions(),
                                       "load_avg_1min": load,
                                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
