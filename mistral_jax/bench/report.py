"""The benchmark's table: columns, marks and notes.
"""

from __future__ import annotations

from collections.abc import Sequence

from mistral_jax.bench.vs_transformers import HF_NOISY_SPREAD

COLUMNS = (  # (header, key, format)
    ("B", "batch", "{:d}"), ("P", "prompt_len", "{:d}"), ("G", "gen_len", "{:d}"),
    ("TTFT ms", "ttft_ms", "{:.2f}"), ("prefill tok/s", "prefill_tok_s", "{:.0f}"),
    ("TFLOP/s", "prefill_tflops", "{:.3f}"), ("MFU %", "prefill_mfu_pct", "{:.1f}"),
    ("decode ms/step", "decode_ms_step", "{:.3f}"), ("decode tok/s", "decode_tok_s", "{:.1f}"),
    ("GB read/step", "decode_gb_step", "{:.3f}"), ("% BW floor", "pct_of_bandwidth_floor", "{:.1f}"),
    ("% datasheet floor", "pct_of_datasheet_floor", "{:.1f}"),
    ("ms/step, one dispatch each", "step_dispatch_ms", "{:.3f}"),
    ("generate tok/s", "generate_tok_s", "{:.1f}"),
    ("compile s (prefill+decode)", "compile_s", "{:.2f}"),
    ("peak mem GB", "peak_memory_gb", "{:.3f}"),
    ("HF generate tok/s", "hf_generate_tok_s", "{:.1f}"), ("vs HF", "vs_hf_generate", "{:.2f}x"),
)


# A cell of the first key is marked where the row's flag (second key) is set; the notes
# below the table say why.
MARKS = {"prefill_mfu_pct": ("prefill_above_peak", "*"),
         "pct_of_bandwidth_floor": ("decode_above_bandwidth", "*"),
         "vs_hf_generate": ("hf_noisy", "~")}


NOTES = {
    "*": "Marked *: above 100%, so the run went faster than the peak (MFU) or the best "
         "bandwidth probe (% BW floor: read-only or copy) it is taken against: that probe "
         "under-read this device (a busy CPU, or --matmul-n / --read-mib too small to reach "
         "the peak). Not an efficiency.",
    "~": f"Marked ~: transformers' timed rounds differed more than {HF_NOISY_SPREAD:g}x "
         "(hf_*_range in the JSON): on a busy CPU torch's multi-threaded calls stall while "
         "other jobs hold the cores (one thread avoids it).",
}


MEMORY_ESTIMATE = "XLA memory_analysis of the larger program"


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of the result rows, then a note for each kind of marked cell."""
    cols = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in rows)
            or c[1] in ("compile_s", "peak_memory_gb", "decode_gb_step")]
    estimated = [r.get("memory_source") == MEMORY_ESTIMATE for r in rows
                 if r.get("peak_memory_bytes") is not None]
    all_estimated = bool(estimated) and all(estimated)
    headers = [h + (" (XLA est.)" if k == "peak_memory_gb" and all_estimated else "")
               for h, k, _ in cols]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    used = set()
    for r in rows:
        r = dict(r, compile_s=r["compile_prefill_s"] + r["compile_decode_s"],
                 decode_gb_step=r["decode_bytes_per_step"] / 1e9,
                 peak_memory_gb=None if r.get("peak_memory_bytes") is None
                 else r["peak_memory_bytes"] / 1e9)
        cells = []
        for _, k, fmt in cols:
            cell = "-" if r.get(k) is None else fmt.format(r[k])
            flag, mark = MARKS.get(k, (None, ""))
            if flag and r.get(flag):
                cell += mark
                used.add(mark)
            if (k == "peak_memory_gb" and not all_estimated and r.get(k) is not None
                    and r.get("memory_source") == MEMORY_ESTIMATE):
                cell += " est."
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    if all_estimated:
        lines.append("Peak memory: XLA's estimate for the largest compiled program "
                     "(arguments + outputs + temporaries); this device reports no allocator peak.")
    lines += [NOTES[mark] for mark in NOTES if mark in used]
    return "\n".join(lines)


def format_header(m: dict) -> str:
    """The lines above the table, from a run's meta: model and device, the bandwidth the
    read floor is taken against (the best probe; the datasheet's beside it), the copy and
    matmul probes, transformers' setup."""
    stated = m["stated_bandwidth_gbps"]
    by_probe = ", ".join(f"{k} {v:.1f}" for k, v in m["read_bandwidth_gbps_by_probe"].items())
    lines = [
        f"# {m['model']} {m['dtype']} ({m['n_params'] / 1e9:.3f}B params, "
        f"{m['weight_bytes'] / 1e9:.3f} GB) on {m['device']} x{m['n_devices']}, jax {m['jax']}",
        f"# read floor against {m['floor_bandwidth_gbps']:.1f} GB/s (the best probe): read-only "
        f"{m['read_bandwidth_gbps']:.1f} GB/s over {m['read_bytes'] / 1e9:.2f} GB ({by_probe}), "
        f"copy {m['copy_bandwidth_gbps']:.1f} GB/s; datasheet "
        + (f"{stated:.0f} GB/s" if stated else "unknown for this device"),
        f"# copy bandwidth {m['copy_bandwidth_gbps']:.1f} GB/s, MFU against "
        f"{m['peak_tflops']:.3f} TFLOP/s ({m['peak_source']}); probes before/after the run: "
        + ", ".join(f"{x:.1f}" for x in m["copy_bandwidth_gbps_probes"]) + " GB/s, "
        + ", ".join(f"{x:.3f}" for x in m["matmul_tflops_probes"]) + " TFLOP/s; "
        + ("" if m["load_avg_1m"] is None else f"load average {m['load_avg_1m']:.2f}"),
    ]
    if "hf_logits_rel_err" in m:
        threads = " or ".join(map(str, m["torch_threads"]))
        lines.append(f"# transformers {m['transformers']} on {m['hf_device']} ({threads} torch "
                     "threads" + (", the faster per row" if len(m["torch_threads"]) > 1 else "")
                     + f"): logits rel err {m['hf_logits_rel_err']:.2e}")
    return "\n".join(lines)
