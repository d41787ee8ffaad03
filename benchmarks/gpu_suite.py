"""Every GPU measurement the open issues ask for, as one run that fits a short device lease.

    python3 benchmarks/gpu_suite.py --out $OUT                        # on the GPU host (520 s)
    python3 benchmarks/gpu_suite.py --list [--tiny]                   # the steps, in order
    python3 benchmarks/gpu_suite.py --tiny --out /tmp/suite --only mistral7b mixtral-layer

Steps run in priority order, each a subprocess with its own time limit, cut short so the
whole run ends within `--budget` seconds; a failing step is recorded and the next one runs.
Two files land in `--out` (a device run returns at most 8): `summary.json`, every step's
command, exit status, wall time, headline figures and whole bench JSON, rewritten after each
step so a cut-off run still leaves what it measured; and `logs.txt`, every step's output.
Each step's own files go to `--work` (a temporary folder by default). The summary is also
printed, a line a step.

`--tiny` swaps the presets and lengths for CPU-sized ones and the GPU kernels for their
interpreted versions: the CPU test of this script (tests/test_bench.py).

On the device host (../shared/GPU_NOTES.md, outside this repository), with `.whl` carried:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    export PYTHONPATH=/tmp/site:$PWD; python3 benchmarks/gpu_suite.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "mistral_jax.bench", "--repeats", "3"]
BUDGET = 520  # 9 minutes less 20 s for the interpreter's start and the summary

# (name, what it answers, argv after the interpreter, time limit in seconds). {out} is the
# output folder. First the rows of issue #18's target table, in priority order, within the
# default budget (9 minutes: their caps add up to 540 s, and the budget stops the run at
# BUDGET); then earlier issues' steps, which run where time is left or with --only.
MIXTRAL = ["--preset", "mixtral-8x7b", "--repeats", "2"]
STEPS: list[tuple[str, str, list[str], int]] = [
    ("gpu-tests", "#18 the Triton kernels (MoE decode, grouped matmul, int8/fp8 matmul with "
     "its new blocks) and cuDNN prefill, compiled, against the XLA paths",
     ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_kernels.py",
      "tests/test_bench.py"], 70),
    ("mixtral8x7b", "#18 rows 3, 5, 6: Mixtral bf16 default kernels (Pallas decode at B=1, "
     "Pallas grouped matmul at B=8 and in prefill): B=1 >= 140 tok/s? B=8 step <= 2x B=1? "
     "B=8 P=512 prefill >= 45% MFU?",
     MIXTRAL + ["--batch", "1", "8", "--prompt-len", "512", "--gen-len", "16",
                "--json", "{out}/mixtral8x7b.json"], 110),
    ("mistral7b-int8-pallas", "#18 row 2: 7B int8 decode B=1, the fused-dequant kernel with "
     "its new blocks: >= 1.7x bf16 (>= 380 tok/s)?",
     ["--repeats", "2", "--preset", "mistral-7b", "--quantize", "int8", "--qmatmul", "pallas", "--batch", "1",
      "--prompt-len", "128", "--gen-len", "32", "--json", "{out}/mistral7b_int8_pallas.json"],
     55),
    ("mixtral8x7b-int8", "#18 row 7: Mixtral int8 on one 80 GB GPU, B=1, both Pallas kernels: "
     ">= 150 tok/s?",
     MIXTRAL + ["--quantize", "int8", "--qmatmul", "pallas", "--moe-kernel", "pallas",
                "--batch", "1", "--prompt-len", "128", "--gen-len", "16",
                "--json", "{out}/mixtral8x7b_int8.json"], 75),
    ("mixtral-prefill2048", "#18 row 6: Mixtral B=1 P=2048 prefill through the grouped "
     "matmul: >= 35% MFU?",
     MIXTRAL + ["--batch", "1", "--prompt-len", "2048", "--gen-len", "2",
                "--json", "{out}/mixtral8x7b_p2048.json"], 65),
    ("mistral7b", "#18 row 1: 7B bf16 decode B=1 against the read-only probe's floor (>= 85%?)",
     ["--preset", "mistral-7b", "--batch", "1", "--prompt-len", "512", "--gen-len", "32",
      "--json", "{out}/mistral7b.json"], 55),
    ("mixtral8x7b-xla", "#18 row 4: Mixtral bf16 B=1 on the former defaults (XLA gather, scan "
     "prefill), for the ratios",
     MIXTRAL + ["--moe-kernel", "xla", "--moe-grouped", "scan", "--batch", "1",
                "--prompt-len", "128", "--gen-len", "16", "--json", "{out}/mixtral8x7b_xla.json"],
     60),
    ("mistral7b-fp8-pallas", "#18 row 2, fp8: 7B fp8 decode B=1 with the fused-dequant kernel",
     ["--preset", "mistral-7b", "--quantize", "fp8", "--qmatmul", "pallas", "--batch", "1",
      "--prompt-len", "128", "--gen-len", "32", "--json", "{out}/mistral7b_fp8_pallas.json"],
     50),
    # ---- earlier issues' steps (beyond the default budget)
    ("mixtral-layer", "#4 one Mixtral-8x7B layer, one token: dense vs gather vs tiled vs Pallas",
     ["benchmarks/moe_bytes.py", "--shape", "8x7b", "--decode-hidden", "14336", "--dtype",
      "bfloat16", "--prefill-tokens", "0", "--repeats", "20"], 120),
    ("kernel-sweep", "#4/#9 block sizes of the Pallas kernels against XLA, 7B/8x7B shapes",
     ["benchmarks/kernel_sweep.py", "--inner", "20", "--repeats", "5"], 240),
    ("mistral7b-int8-xla", "#9 int8 decode, dequantization left to XLA",
     ["--preset", "mistral-7b", "--quantize", "int8", "--qmatmul", "xla", "--batch", "1",
      "--prompt-len", "128", "--gen-len", "64", "--json", "{out}/mistral7b_int8_xla.json"], 180),
    ("mistral7b-batches", "#7 decode step time flat up to B=64?",
     ["--preset", "mistral-7b", "--batch", "8", "64", "--prompt-len", "512", "--gen-len", "64",
      "--json", "{out}/mistral7b_batches.json"], 300),
    ("prefill4096", "#7 MFU of a 4096-token prefill (cuDNN attention)",
     ["--preset", "mistral-7b", "--batch", "1", "--prompt-len", "4096", "--gen-len", "8",
      "--json", "{out}/mistral7b_p4096.json"], 180),
    ("vs-transformers", "#7 beside transformers' generate on the same weights",
     ["--preset", "mistral-7b", "--batch", "1", "8", "--prompt-len", "512", "--gen-len", "64",
      "--vs-transformers", "--json", "{out}/mistral7b_vs_hf.json"], 300),
    ("prefill4096-reference", "#7 the same prefill with XLA's attention, for the ratio",
     ["--preset", "mistral-7b", "--batch", "1", "--prompt-len", "4096", "--gen-len", "8",
      "--attention", "reference", "--json", "{out}/mistral7b_p4096_ref.json"], 180),
    ("mistral7b-second-start", "#7 compile time of a second start (persistent cache warm)",
     ["--preset", "mistral-7b", "--batch", "1", "--prompt-len", "512", "--gen-len", "64",
      "--json", "{out}/mistral7b_second.json"], 200),
    ("quant-quality-7b", "#9 int8/fp8 logits and greedy agreement on 7B-shaped weights",
     ["-m", "mistral_jax.quant", "--preset", "mistral-7b", "--prompt-len", "16",
      "--new-tokens", "8"], 180),
]

# --tiny: CPU-sized stand-ins for each flag's values, so the suite's own plumbing is tested
# in CI (a dict maps values, a string replaces every value).
TINY: dict[str, dict[str, str] | str] = {
    "--preset": {"mistral-7b": "tiny", "mixtral-8x7b": "tiny-moe"},
    "--batch": "1", "--prompt-len": "8", "--gen-len": "3", "--decode-hidden": "64",
    "--repeats": "2", "--new-tokens": "2", "--qmatmul": {"pallas": "pallas-interpret"},
    "--moe-kernel": {"pallas": "pallas-interpret"}, "--inner": "2",
    "--moe-grouped": {"pallas": "pallas-interpret"},
}
TINY_EXTRA = {"benchmarks/kernel_sweep.py": ["--tiny"]}


def _tiny(argv: list[str]) -> list[str]:
    out: list[str] = []
    flag = None
    argv = argv + TINY_EXTRA.get(argv[0], [])
    for a in argv:
        if a.startswith("--"):
            flag = a
            out.append(a)
            continue
        rule = TINY.get(flag)
        value = rule.get(a, a) if isinstance(rule, dict) else (rule or a)
        if not (flag == "--batch" and value in out[out.index(flag):]):  # batches collapse to 1
            out.append(value)
    return out


def step_argv(argv: list[str], out: Path, tiny: bool) -> list[str]:
    """The full command of a step: bench steps get the bench prefix; {out} filled in."""
    if tiny:
        argv = _tiny(argv)
    argv = [a.replace("{out}", str(out)) for a in argv]
    if argv[0].startswith("--"):
        prefix = BENCH + (["--copy-mib", "8", "--matmul-n", "64"] if tiny else [])
        return prefix + argv
    return [sys.executable, *argv]


def _json_or_none(line: str):
    """A JSON line, or None where a step killed at its limit left it cut short."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def key_figures(result: dict) -> list[dict]:
    """Per-row headline numbers of a bench JSON."""
    keys = ("batch", "prompt_len", "ttft_ms", "prefill_mfu_pct", "prefill_above_peak",
            "decode_ms_step", "decode_tok_s", "pct_of_bandwidth_floor", "decode_above_bandwidth",
            "vs_hf_generate", "hf_noisy", "peak_memory_bytes")
    rows = [{k: r.get(k) for k in keys if k in r} for r in result["results"]]
    meta = result["meta"]
    for row in rows:
        row.update(device=meta["device"], jax=meta["jax"],
                   copy_gbps=round(meta["copy_bandwidth_gbps"], 1))
    return rows


def run(ns: argparse.Namespace) -> list[dict]:
    out = ns.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(ns.work or tempfile.mkdtemp(prefix="gpu_suite_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = out / "logs.txt"
    logs.write_text("")
    deadline = time.monotonic() + ns.budget
    env = os.environ.copy()  # scripts import this checkout's mistral_jax, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    summary = []
    for name, what, argv, limit in STEPS:
        if ns.only and name not in ns.only:
            continue
        left = deadline - time.monotonic()
        entry = {"step": name, "what": what}
        if left < 20:
            entry.update(rc=None, skipped="budget spent")
        else:
            cmd = step_argv(argv, work, ns.tiny)
            entry["command"] = " ".join(cmd[1:] if cmd[0] == sys.executable else cmd)
            start = time.monotonic()
            log = work / f"{name}.log"
            with open(log, "w") as f:
                try:
                    proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                          timeout=min(limit, left), env=env)
                    entry["rc"] = proc.returncode
                except subprocess.TimeoutExpired:
                    entry["rc"] = "timeout"
            entry["wall_s"] = round(time.monotonic() - start, 1)
            text = log.read_text(errors="replace")
            with open(logs, "a") as f:
                f.write(f"===== {name}: {entry['command']}\n{text}\n")
            tail = text.splitlines()
            entry["tail"] = [line[:300] for line in tail if not line.startswith("{")][-8:]
            entry["json_lines"] = [parsed for line in tail  # quant.py, kernel_sweep.py
                                   if line.startswith(('{"model"', '{"device"'))
                                   and (parsed := _json_or_none(line)) is not None]
            json_arg = next((a for a in cmd if a.endswith(".json")), None)
            if json_arg and Path(json_arg).exists():
                entry["bench"] = json.loads(Path(json_arg).read_text())
                entry["results"] = key_figures(entry["bench"])
        summary.append(entry)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(json.dumps({k: v for k, v in entry.items() if k not in ("tail", "bench")},
                         default=str),
              flush=True)
        if entry.get("rc") not in (0, None):
            print("\n".join("    " + line for line in entry["tail"]), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_suite_out")))
    p.add_argument("--work", type=Path, default=None,
                   help="where the steps write their own files (default: a temporary folder)")
    p.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole run")
    p.add_argument("--only", nargs="+", choices=[s[0] for s in STEPS], default=None)
    p.add_argument("--tiny", action="store_true", help="CPU-sized presets (tests)")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    ns = p.parse_args(argv)
    if ns.list:
        for name, what, argv_, limit in STEPS:
            cmd = " ".join(step_argv(argv_, Path("WORK"), ns.tiny)[1:])
            print(f"{name:24s} {limit:4d}s  {what}\n    {cmd}")
        return 0
    summary = run(ns)
    return 0 if all(e.get("rc") in (0, None) for e in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
