"""Benchmark: prefill, decode and end-to-end generation speed against hardware limits.

    python -m mistral_jax.bench --preset mistral-7b --batch 1 8 64 --prompt-len 512 --gen-len 128
    python -m mistral_jax.bench --preset tiny --batch 1 4 --prompt-len 32 --gen-len 8 --vs-transformers

A preset (or `--ckpt FOLDER`) gives the model; random weights are drawn on the device,
leaf by leaf (`model.random_params`), so 7B-size presets never touch the host. For each
batch size B, prompt length P and generation length G it reports:

- compile: seconds to lower + compile the prefill program, the decode loop and the
  single decode step (JAX's persistent compilation cache, on by default, makes a second
  start skip most of it); generate's own compile time is reported too;
- prefill: `forward` over P tokens into a fresh cache plus the greedy first token, fetched
  to the host (time to first token), as tokens/s, TFLOP/s and MFU against a stated peak
  (bf16/fp16 on known GPUs, or --peak-tflops) or, elsewhere, a matmul measured in this run.
  FLOPs count the output head once per row (`forward(..., logits_index=...)` skips the
  other positions);
- decode: G - 1 one-token steps (cache donated, greedy sampling fused in) inside one
  jitted `fori_loop`, as generate's loop runs them, in ms/step and tokens/s; the same
  step dispatched once per token from Python (what a streaming loop pays) in ms/step;
  and the bandwidth floor: bytes read per step (weights, except the embedding table of
  which only B rows are read; for MoE only the experts B tokens are expected to pick;
  the whole KV cache buffer) divided by a device-copy bandwidth measured in the same run.
  Both probes (matmul, copy) take the fastest of 10 calls, before and again after the
  workload, and the higher of the two; a figure still above 100% is flagged (`*` in the
  table, `prefill_above_peak` / `decode_above_bandwidth` in the JSON), as the probe then
  under-read the device;
- generate: wall time of `generate.generate_from_params` (prefill + `lax.while_loop`
  decode, host work included) for the same prompts, in generated tokens/s;
- peak memory: the device allocator's peak so far where it reports one (GPU), else
  XLA's estimate for the largest compiled program (arguments + outputs + temporaries;
  "XLA est." in the table, `memory_source` in the JSON);
- with `--vs-transformers`: transformers' MistralForCausalLM / MixtralForCausalLM built
  from the same weights and dtype on the same device, its prefill and greedy `generate`
  on the same prompts (medians of --repeats after two untimed calls of each; `~` marks
  rounds that differed more than 2x; on a CPU without --torch-threads, timed with torch's
  own thread count and with one thread, each figure's faster kept), the ratios, and the
  logits' relative error.

It prints a table for people on stdout; `--json FILE` writes the whole result as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.args import ModelArgs, MoeArgs
from mistral_jax.cache import cache_sizes, init_cache
from mistral_jax.cli import COMPILE_CACHE_ENV, default_cache_dir, enable_compilation_cache
from mistral_jax.errors import MistralJaxError, UserInputError
from mistral_jax.kernels import KERNEL_CHOICES
from mistral_jax.layers import ATTENTION_CHOICES, ATTENTION_ENV
from mistral_jax.model import causal_positions, forward, random_params
from mistral_jax.moe import MOE_KERNEL_CHOICES, MOE_KERNEL_ENV, default_decode_kernel
from mistral_jax.quant import QMATMUL_ENV

_SHAPES_7B = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32,
                  n_kv_heads=8, norm_eps=1e-5, rope_theta=1e6)

PRESETS: dict[str, ModelArgs] = {
    # CPU-sized shapes for CI and quick checks.
    "tiny": ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                      norm_eps=1e-5, vocab_size=512),
    "tiny-moe": ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4,
                          n_kv_heads=2, norm_eps=1e-5, vocab_size=512, moe=MoeArgs(4, 2)),
    "small": ModelArgs(dim=512, n_layers=8, head_dim=64, hidden_dim=1536, n_heads=8,
                       n_kv_heads=2, norm_eps=1e-5, vocab_size=32768),  # 58M params
    "small-moe": ModelArgs(dim=512, n_layers=8, head_dim=64, hidden_dim=1536, n_heads=8,
                           n_kv_heads=2, norm_eps=1e-5, vocab_size=32768,
                           moe=MoeArgs(8, 2)),  # 190M params, 151M in experts
    # Published shapes (params.json of the released checkpoints).
    "mistral-7b": ModelArgs(**_SHAPES_7B, vocab_size=32768),  # Mistral-7B-v0.3
    "mixtral-8x7b": ModelArgs(**_SHAPES_7B, vocab_size=32000, moe=MoeArgs(8, 2)),
    "codestral-22b": ModelArgs(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384,
                               n_heads=48, n_kv_heads=8, norm_eps=1e-5, vocab_size=32768,
                               rope_theta=1e6),
}

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s.
# Matched in order against the device kind: the NVL / PCIe parts before their SXM names.
STATED_PEAK_FLOPS = (("h200 nvl", 835e12), ("h200", 989.4e12), ("h100 pcie", 756e12),
                     ("h100 nvl", 835e12), ("h100", 989.4e12), ("a100", 312e12))


# ----------------------------------------------------------------------------- setup


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls: other work on the machine only adds time, so
    the best run is the closest to what the device can do."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure_copy_bandwidth(n_bytes: int, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s, best of `repeats`: read + write of a float32
    buffer of `n_bytes`."""
    n = max(n_bytes // 4, 1)
    # In place (donated): no fresh output buffer whose first touch would be timed too.
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = [jax.block_until_ready(copy(jnp.ones((n,), jnp.float32)))]

    def step():
        x[0] = copy(x[0])
        return x[0]

    return 2 * n * 4 / _best_seconds(step, repeats)


def measure_matmul_flops(dtype: Any, n: int, repeats: int = 10) -> float:
    """FLOP/s of one [n, n] @ [n, n] matmul in `dtype` on the default device, best of `repeats`."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    return 2 * n**3 / _best_seconds(lambda: matmul(a, b), repeats)


def stated_peak_flops(device_kind: str, dtype: Any) -> float | None:
    """The datasheet dense half-precision peak of a known GPU, else None."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return None
    kind = device_kind.lower()
    for name, flops in STATED_PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def choose_peak(measured_flops: float, matmul_n: int, dtype: Any, device_kind: str,
                peak_tflops: float | None) -> tuple[float, str]:
    """(FLOP/s MFU is taken against, where it comes from): --peak-tflops, else the
    datasheet peak of a known GPU, else the matmul measured in this run."""
    if peak_tflops:
        return peak_tflops * 1e12, "--peak-tflops"
    stated = stated_peak_flops(device_kind, dtype)
    if stated:
        return stated, f"datasheet dense bf16/fp16 for {device_kind}"
    return measured_flops, f"measured {matmul_n}^3 {jnp.dtype(dtype).name} matmul"


# ----------------------------------------------------------------------------- model arithmetic


def _leaves_with_names(params) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [("/".join(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]


def _nbytes(leaf) -> int:
    return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize


def expected_expert_fraction(moe: MoeArgs | None, batch: int) -> float:
    """Expected share of a layer's experts that `batch` tokens pick, routing uniformly."""
    if moe is None:
        return 1.0
    return 1.0 - (1.0 - moe.num_experts_per_tok / moe.num_experts) ** batch


def decode_bytes(args: ModelArgs, params, batch: int, cache_len: int, cache_dtype: Any) -> dict:
    """Bytes a one-token decode step of `batch` rows must read, at the least.

    weights: every param except the embedding table (only `batch` rows of it), with
    stacked MoE expert weights scaled by `expected_expert_fraction`; kv: the whole
    cache buffer (k, v and positions) of every layer, as attention reads it.
    """
    weights = 0.0
    frac = expected_expert_fraction(args.moe, batch)
    for name, leaf in _leaves_with_names(params):
        if name == "embedding":
            weights += batch * leaf.shape[-1] * jnp.dtype(leaf.dtype).itemsize
        elif args.moe is not None and "feed_forward/w" in name and len(leaf.shape) == 3:
            weights += frac * _nbytes(leaf)
        else:
            weights += _nbytes(leaf)
    kv = 0
    item = jnp.dtype(cache_dtype).itemsize
    for size in cache_sizes(args, cache_len):
        kv += 2 * batch * size * args.n_kv_heads * args.head_dim * item + batch * size * 4
    return {"weights": weights, "kv": float(kv), "total": weights + kv}


def prefill_flops(args: ModelArgs, batch: int, prompt_len: int) -> float:
    """Useful FLOPs of a causal prefill: 2 per active weight per token, plus attention.

    Attention counts q.k and p.v over the (query, key) pairs the causal/windowed mask
    keeps; the embedding lookup is no matmul; MoE counts the top-k experts per token.
    """
    a = args
    active = a.moe.num_experts_per_tok if a.moe else 1
    per_layer = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads)
    per_layer += 3 * a.dim * a.hidden_dim * active + (a.dim * a.moe.num_experts if a.moe else 0)
    # The output head runs on each row's last token only (forward's logits_index).
    matmul = 2 * (a.n_layers * per_layer * prompt_len + a.dim * a.vocab_size) * batch
    attention = 0
    for window in a.layer_windows:
        w = prompt_len if window is None else min(window, prompt_len)
        # query q sees min(q + 1, w) keys
        pairs = w * (w + 1) // 2 + (prompt_len - w) * w
        attention += 4 * a.n_heads * a.head_dim * pairs * batch
    return float(matmul + attention)


# ----------------------------------------------------------------------------- programs


def prefill_step(params, tokens: jax.Array, *, args: ModelArgs, cache_len: int,
                 cache_dtype: Any):
    """tokens [B, P] -> (greedy next token [B] int32, filled cache) from a fresh cache."""
    cache = init_cache(args, tokens.shape[0], cache_len, cache_dtype)
    last = jnp.full((tokens.shape[0],), tokens.shape[1] - 1, jnp.int32)
    logits, cache = forward(params, tokens, causal_positions(tokens), cache, args=args,
                            logits_index=last,  # only the last token goes through the head
                            fresh_prefill=True)  # empty cache, positions 0..P-1
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def decode_step(params, token: jax.Array, position: jax.Array, cache, *, args: ModelArgs):
    """token, position [B] -> (greedy next token [B], position + 1, cache): one step on device."""
    logits, cache = forward(params, token[:, None], position[:, None], cache, args=args)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), position + 1, cache


def decode_loop(params, token: jax.Array, position: jax.Array, cache, *, args: ModelArgs,
                n_steps: int):
    """`decode_step` n_steps times inside one program (as generate's loop): no dispatch per step."""

    def body(_, carry):
        return decode_step(params, *carry, args=args)

    return jax.lax.fori_loop(0, n_steps, body, (token, position, cache))


def _memory_estimate(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # not every backend/version implements it
        return None


def _device_peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak else None


# ----------------------------------------------------------------------------- transformers


def hf_config_dict(args: ModelArgs, dtype_name: str) -> dict:
    """transformers' config.json for `args` (Mistral or Mixtral)."""
    cfg = {
        "architectures": ["MixtralForCausalLM" if args.moe else "MistralForCausalLM"],
        "model_type": "mixtral" if args.moe else "mistral",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps, "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta, "sliding_window": args.sliding_window,
        "max_position_embeddings": args.max_seq_len or 32768, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": dtype_name, "bos_token_id": 1, "eos_token_id": 2,
    }
    if args.moe:
        cfg["num_local_experts"] = args.moe.num_experts
        cfg["num_experts_per_tok"] = args.moe.num_experts_per_tok
        cfg["router_jitter_noise"] = 0.0
    return cfg


def hf_state_dict(params, args: ModelArgs, names: set[str]) -> dict:
    """Our params as a transformers state dict (torch tensors on the params' device).

    The inverse of checkpoint.py's HF mapping: kernels [in..., out...] -> weights
    [out, in]; q/k rows permuted from Mistral's interleaved rotary layout to HF's
    rotate-half one. `names` are the keys the target model expects: Mixtral experts go
    to the fused `experts.gate_up_proj` / `experts.down_proj` of transformers 5 or to
    per-expert `block_sparse_moe.experts.{e}.w{1,2,3}` of older versions.
    """
    import torch

    def tt(x) -> torch.Tensor:  # zero-copy view of the JAX buffer
        return torch.from_dlpack(x)

    def rotate_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
        out, d = w.shape
        return w.reshape(n_heads, out // n_heads // 2, 2, d).transpose(1, 2).reshape(out, d)

    a = args
    sd = {"model.embed_tokens.weight": tt(params["embedding"]),
          "model.norm.weight": tt(params["norm"]["weight"]),
          "lm_head.weight": tt(params["output"]["kernel"]).T}
    for i in range(a.n_layers):
        layer, p = params[f"layers_{i}"], f"model.layers.{i}."
        att = layer["attention"]
        sd[p + "self_attn.q_proj.weight"] = rotate_half_rows(
            tt(att["wq"]["kernel"]).reshape(a.dim, -1).T, a.n_heads)
        sd[p + "self_attn.k_proj.weight"] = rotate_half_rows(
            tt(att["wk"]["kernel"]).reshape(a.dim, -1).T, a.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = tt(att["wv"]["kernel"]).reshape(a.dim, -1).T
        sd[p + "self_attn.o_proj.weight"] = tt(att["wo"]["kernel"]).reshape(-1, a.dim).T
        sd[p + "input_layernorm.weight"] = tt(layer["attention_norm"]["weight"])
        sd[p + "post_attention_layernorm.weight"] = tt(layer["ffn_norm"]["weight"])
        ff = layer["feed_forward"]
        if a.moe is None:
            sd[p + "mlp.gate_proj.weight"] = tt(ff["w1"]["kernel"]).T
            sd[p + "mlp.up_proj.weight"] = tt(ff["w3"]["kernel"]).T
            sd[p + "mlp.down_proj.weight"] = tt(ff["w2"]["kernel"]).T
            continue
        w1, w2, w3 = tt(ff["w1"]), tt(ff["w2"]), tt(ff["w3"])  # [E, D, F], [E, F, D]
        if p + "mlp.experts.gate_up_proj" in names:
            sd[p + "mlp.gate.weight"] = tt(ff["gate"]["kernel"]).T
            sd[p + "mlp.experts.gate_up_proj"] = torch.cat(
                [w1.transpose(1, 2), w3.transpose(1, 2)], dim=1)
            sd[p + "mlp.experts.down_proj"] = w2.transpose(1, 2)
        else:
            sd[p + "block_sparse_moe.gate.weight"] = tt(ff["gate"]["kernel"]).T
            for e in range(a.moe.num_experts):
                q = p + f"block_sparse_moe.experts.{e}."
                sd[q + "w1.weight"], sd[q + "w3.weight"] = w1[e].T, w3[e].T
                sd[q + "w2.weight"] = w2[e].T
    return sd


def build_transformers_model(params, args: ModelArgs, device: str):
    """transformers' model (eval mode, default sdpa attention) holding copies of `params`."""
    import torch
    import transformers

    try:  # skips the random init of weights that are overwritten anyway
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    dtype = params["embedding"].dtype
    torch_dtype = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16,
                   jnp.dtype(jnp.float16): torch.float16}[jnp.dtype(dtype)]
    cfg = hf_config_dict(args, str(torch_dtype).removeprefix("torch."))
    config_cls = transformers.MixtralConfig if args.moe else transformers.MistralConfig
    model_cls = transformers.MixtralForCausalLM if args.moe else transformers.MistralForCausalLM
    config = config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device), no_init_weights():
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    names = set(model.state_dict())
    state = {k: v.to(device).contiguous().clone() for k, v in
             hf_state_dict(params, args, names).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


HF_WARMUP = 2  # untimed calls of transformers' prefill and generate before the timed rounds
# Timed rounds whose slowest is this many times the fastest mark transformers' figures noisy.
HF_NOISY_SPREAD = 2.0


def bench_transformers(model, tokens: np.ndarray, gen_len: int, repeats: int) -> dict:
    """transformers' prefill (time to first token) and greedy `generate` on tokens [B, P]:
    medians of `repeats` timed rounds after HF_WARMUP untimed ones, with the fastest and
    slowest round, and `hf_noisy` where they differ by more than HF_NOISY_SPREAD times.

    On a busy CPU that noise is mostly torch's multi-threaded calls stalling while other
    jobs hold the cores (BENCHMARKS.md); one thread avoids it, at the cost of torch's
    parallelism (see `bench_transformers_threads`).
    """
    import torch

    device = next(model.parameters()).device
    ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def prefill():
        out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1).cpu()

    def generate():
        return model.generate(ids, attention_mask=mask, max_new_tokens=gen_len,
                              min_new_tokens=gen_len, do_sample=False)

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    with torch.inference_mode():
        for _ in range(HF_WARMUP):  # the first calls also allocate and pick kernels
            prefill(), generate()
        ttfts = [timed(prefill)[0] for _ in range(repeats)]
        runs = [timed(generate) for _ in range(repeats)]
    gens = [t for t, _ in runs]
    ttft, seconds = statistics.median(ttfts), statistics.median(gens)
    new_tokens = runs[-1][1][:, tokens.shape[1]:].cpu().numpy()
    spread = max(max(ttfts) / min(ttfts), max(gens) / min(gens))
    return {"hf_ttft_ms": ttft * 1e3, "hf_ttft_ms_range": [min(ttfts) * 1e3, max(ttfts) * 1e3],
            "hf_generate_s": seconds, "hf_generate_s_range": [min(gens), max(gens)],
            "hf_generate_tok_s": tokens.shape[0] * gen_len / seconds,
            "hf_noisy": spread > HF_NOISY_SPREAD, "hf_tokens": new_tokens}


def bench_transformers_threads(model, tokens: np.ndarray, gen_len: int, repeats: int,
                               threads: Sequence[int | None]) -> dict:
    """`bench_transformers` under each torch thread count in `threads` (None: leave it as
    set). Each figure comes from the setting that made it faster: `generate`'s figures
    from one (`hf_torch_threads`), time to first token from one (`hf_ttft_torch_threads`);
    `hf_by_threads` holds each setting's medians. On a CPU shared with other jobs torch's
    multi-threaded calls can stall (BENCHMARKS.md), one thread never did; on a quiet one its
    threads make it faster: trying both gives transformers its better figure either way."""
    import torch

    results = []
    for n in threads:
        if n is not None:
            torch.set_num_threads(n)
        results.append(dict(bench_transformers(model, tokens, gen_len, repeats),
                            hf_torch_threads=torch.get_num_threads()))
    best = max(results, key=lambda r: r["hf_generate_tok_s"])
    first = min(results, key=lambda r: r["hf_ttft_ms"])
    tried = {str(r["hf_torch_threads"]): {k: r[k] for k in ("hf_ttft_ms", "hf_generate_tok_s",
                                                            "hf_noisy")} for r in results}
    return dict(best, hf_ttft_ms=first["hf_ttft_ms"], hf_ttft_ms_range=first["hf_ttft_ms_range"],
                hf_ttft_torch_threads=first["hf_torch_threads"], hf_by_threads=tried)


def hf_logits_rel_err(model, params, args: ModelArgs, tokens: np.ndarray) -> float:
    """max |ours - transformers| / max |transformers| of the logits of tokens [1, T]."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        ref = model(torch.as_tensor(tokens, dtype=torch.long, device=device)).logits
    ref = ref.float().cpu().numpy()
    fwd = jax.jit(functools.partial(forward, args=args))
    batch = jnp.asarray(tokens, jnp.int32)
    ours = np.asarray(fwd(params, batch, causal_positions(batch), None)[0])
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------- one configuration


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What this run measured about the device."""

    copy_bandwidth: float  # bytes/s, read + write
    matmul_flops: float  # FLOP/s measured in the run dtype
    peak_flops: float  # what MFU is taken against
    peak_source: str


def hardware_fractions(row: dict, hw: Hardware) -> dict:
    """MFU and % of the bandwidth floor of a result row against `hw`, each with a flag
    that is set where the row ran faster than the probe allows (above 100%): the probe then
    under-read the device (a busy CPU, a probe too small to reach the peak), and the figure
    is no efficiency. Uses the row's prefill_flops, ttft_ms, decode_bytes_per_step and
    decode_ms_step."""
    mfu = 100 * row["prefill_flops"] / (row["ttft_ms"] / 1e3) / hw.peak_flops
    floor_s = row["decode_bytes_per_step"] / hw.copy_bandwidth
    pct = 100 * floor_s / (row["decode_ms_step"] / 1e3)
    return {"prefill_mfu_pct": mfu, "prefill_above_peak": mfu > 100,
            "bandwidth_floor_ms": floor_s * 1e3, "pct_of_bandwidth_floor": pct,
            "decode_above_bandwidth": pct > 100}


def bench_config(params, args: ModelArgs, *, batch: int, prompt_len: int, gen_len: int,
                 repeats: int, seed: int, hf_model=None,
                 torch_threads: Sequence[int | None] = (None,)) -> dict:
    """All figures for one (batch, prompt_len, gen_len); see the module docstring. MFU
    and % of the bandwidth floor come later (`hardware_fractions`), once the probes
    have run again after the workload."""
    from mistral_jax.generate import generate_from_params

    dtype = params["embedding"].dtype
    cache_len = prompt_len + gen_len
    rng = np.random.default_rng(seed)
    tokens_np = rng.integers(0, args.vocab_size, (batch, prompt_len), dtype=np.int32)
    tokens = jnp.asarray(tokens_np)
    row: dict[str, Any] = {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}

    start = time.perf_counter()
    prefill = jax.jit(functools.partial(prefill_step, args=args, cache_len=cache_len,
                                        cache_dtype=dtype)).lower(params, tokens).compile()
    row["compile_prefill_s"] = time.perf_counter() - start
    vec = jax.ShapeDtypeStruct((batch,), jnp.int32)
    abstract_cache = jax.eval_shape(lambda: init_cache(args, batch, cache_len, dtype))
    n_steps = gen_len - 1
    start = time.perf_counter()
    loop = jax.jit(functools.partial(decode_loop, args=args, n_steps=n_steps),
                   donate_argnums=(3,)).lower(params, vec, vec, abstract_cache).compile()
    row["compile_decode_s"] = time.perf_counter() - start
    start = time.perf_counter()
    step = jax.jit(functools.partial(decode_step, args=args), donate_argnums=(3,)).lower(
        params, vec, vec, abstract_cache).compile()
    row["compile_step_s"] = time.perf_counter() - start

    start_position = jnp.full((batch,), prompt_len, jnp.int32)
    ttfts, loops, steps = [], [], []
    for r in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        token, cache = prefill(params, tokens)
        np.asarray(token)  # the first token reaches the host
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        token, _, cache = jax.block_until_ready(loop(params, token, start_position, cache))
        loop_s = (time.perf_counter() - start) / n_steps
        del cache
        token, cache = jax.block_until_ready(prefill(params, tokens))
        position = start_position
        start = time.perf_counter()
        for _ in range(n_steps):  # dispatched asynchronously: no host round trip per token
            token, position, cache = step(params, token, position, cache)
        jax.block_until_ready(token)
        step_s = (time.perf_counter() - start) / n_steps
        del cache
        if r:
            ttfts.append(ttft)
            loops.append(loop_s)
            steps.append(step_s)

    ttft, loop_s = statistics.median(ttfts), statistics.median(loops)
    flops = prefill_flops(args, batch, prompt_len)
    moved = decode_bytes(args, params, batch, cache_len, dtype)
    row.update(
        ttft_ms=ttft * 1e3,
        prefill_tok_s=batch * prompt_len / ttft,
        prefill_flops=flops,
        prefill_tflops=flops / ttft / 1e12,
        decode_ms_step=loop_s * 1e3,
        decode_tok_s=batch / loop_s,
        step_dispatch_ms=statistics.median(steps) * 1e3,
        decode_bytes_per_step=moved["total"],
        decode_kv_bytes_per_step=moved["kv"],
    )

    prompts = tokens_np.tolist()
    gen = functools.partial(generate_from_params, params, args, prompts, max_tokens=gen_len,
                            dtype=dtype)
    start = time.perf_counter()
    ours_tokens, _ = gen()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        gen()
        runs.append(time.perf_counter() - start)
    gen_s = statistics.median(runs)
    row.update(generate_s=gen_s, generate_tok_s=batch * gen_len / gen_s,
               compile_generate_s=max(first - gen_s, 0.0))

    peak = _device_peak_memory()
    if peak is not None:
        row.update(peak_memory_bytes=peak, memory_source="device peak_bytes_in_use")
    else:
        estimates = [m for m in map(_memory_estimate, (prefill, loop, step)) if m]
        row.update(peak_memory_bytes=max(estimates) if estimates else None,
                   memory_source=MEMORY_ESTIMATE)

    if hf_model is not None:
        hf = bench_transformers_threads(hf_model, tokens_np, gen_len, repeats, torch_threads)
        hf_tokens = hf.pop("hf_tokens")
        row.update(hf)
        row["vs_hf_generate"] = row["generate_tok_s"] / row["hf_generate_tok_s"]
        row["vs_hf_ttft"] = row["hf_ttft_ms"] / row["ttft_ms"]
        row["hf_greedy_rows_equal"] = float(np.mean(
            [list(h) == o for h, o in zip(hf_tokens.tolist(), ours_tokens)]))
    return row


# ----------------------------------------------------------------------------- CLI


COLUMNS = (  # (header, key, format)
    ("B", "batch", "{:d}"), ("P", "prompt_len", "{:d}"), ("G", "gen_len", "{:d}"),
    ("TTFT ms", "ttft_ms", "{:.2f}"), ("prefill tok/s", "prefill_tok_s", "{:.0f}"),
    ("TFLOP/s", "prefill_tflops", "{:.3f}"), ("MFU %", "prefill_mfu_pct", "{:.1f}"),
    ("decode ms/step", "decode_ms_step", "{:.3f}"), ("decode tok/s", "decode_tok_s", "{:.1f}"),
    ("% BW floor", "pct_of_bandwidth_floor", "{:.1f}"),
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
    "*": "Marked *: above 100%, so the run went faster than the peak (MFU) or copy bandwidth "
         "(% BW floor) it is taken against: that probe under-read this device (a busy CPU, or "
         "--matmul-n / --copy-mib too small to reach the peak). Not an efficiency.",
    "~": f"Marked ~: transformers' timed rounds differed more than {HF_NOISY_SPREAD:g}x "
         "(hf_*_range in the JSON): on a busy CPU torch's multi-threaded calls stall while "
         "other jobs hold the cores (one thread avoids it).",
}
MEMORY_ESTIMATE = "XLA memory_analysis of the larger program"


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of the result rows, then a note for each kind of marked cell."""
    cols = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in rows)
            or c[1] in ("compile_s", "peak_memory_gb")]
    estimated = [r.get("memory_source") == MEMORY_ESTIMATE for r in rows
                 if r.get("peak_memory_bytes") is not None]
    all_estimated = bool(estimated) and all(estimated)
    headers = [h + (" (XLA est.)" if k == "peak_memory_gb" and all_estimated else "")
               for h, k, _ in cols]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    used = set()
    for r in rows:
        r = dict(r, compile_s=r["compile_prefill_s"] + r["compile_decode_s"],
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
    p.add_argument("--quantize", choices=["int8", "fp8", "fp8-tensor"], default=None,
                   help="weight-only int8/fp8 attention and feed-forward weights (quant.py)")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                   help=f"prefill attention kernel (sets {ATTENTION_ENV}, see layers.py)")
    p.add_argument("--qmatmul", choices=KERNEL_CHOICES, default=None,
                   help=f"quantized decode matmul: XLA or the Pallas kernel (sets {QMATMUL_ENV}, "
                   "see kernels.py; default: the environment's, else xla)")
    p.add_argument("--moe-kernel", choices=MOE_KERNEL_CHOICES, default=None,
                   help=f"MoE decode path: XLA's gather, its row-block tiling or the Pallas "
                   f"kernel (sets {MOE_KERNEL_ENV}, see moe.py; default: the environment's, "
                   "else tiled on the CPU for float32/int8 experts, xla otherwise)")
    p.add_argument("--vs-transformers", action="store_true",
                   help="also time transformers' PyTorch model on the same weights")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch CPU threads for --vs-transformers (default: torch's own)")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="buffer for the copy-bandwidth probe (default 1024 on GPU, 256 elsewhere)")
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


def _validate(ns: argparse.Namespace) -> None:
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


def _load_model(ns: argparse.Namespace, dtype) -> tuple[ModelArgs, Any, str]:
    if ns.ckpt is not None:
        from mistral_jax.transformer import Transformer

        model = Transformer.from_folder(ns.ckpt, dtype=dtype, quantize=ns.quantize)
        return model.args, model.params, str(ns.ckpt)
    args, name = PRESETS[ns.preset], ns.preset
    if ns.layers is not None:
        plural = "s" if ns.layers > 1 else ""
        args = dataclasses.replace(args, n_layers=ns.layers)
        name = f"{name} ({ns.layers} layer{plural})"
    params = random_params(args, ns.seed, dtype, ns.quantize)
    return args, params, f"{name} {ns.quantize}" if ns.quantize else name


def moe_kernel_used(args: ModelArgs, params: Any) -> str | None:
    """The MoE decode path a decode step takes (None for a dense model): the value of
    MISTRAL_JAX_MOE_KERNEL, else moe.default_decode_kernel's choice for the first layer's
    experts, named 'xla (default)' or 'tiled (default)'."""
    if args.moe is None:
        return None
    if MOE_KERNEL_ENV in os.environ:
        return os.environ[MOE_KERNEL_ENV]
    ff = params["layers_0"]["feed_forward"]
    return f"{default_decode_kernel(ff['w1'], ff['w2'], ff['w3'])} (default)"


def enable_cache(ns: argparse.Namespace) -> Path | None:
    """Turn on JAX's persistent compilation cache as the flags say; returns its folder.
    Without --cache-min-compile-secs, JAX's own threshold stands (its
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, else 1 s)."""
    if ns.no_compile_cache:
        return None
    return enable_compilation_cache(ns.compile_cache, ns.cache_min_compile_secs)


def run(ns: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed CLI arguments; returns {'meta', 'results'}."""
    from mistral_jax.transformer import resolve_dtype

    _validate(ns)
    cache_dir = enable_cache(ns)
    on_gpu = jax.default_backend() == "gpu"
    dtype = resolve_dtype(ns.dtype)
    copy_bytes = (ns.copy_mib or (1024 if on_gpu else 256)) << 20
    matmul_n = ns.matmul_n or (8192 if on_gpu else 1024)
    # Probed before and again after the workload; the higher of the two counts, since a
    # busy machine can only make a probe read low. The first probes run before the weights
    # load, so that their buffers (1 GiB on a GPU) never sit beside the weights and raise
    # the allocator's peak that each row reports.
    copy_probes = [measure_copy_bandwidth(copy_bytes)]
    matmul_probes = [measure_matmul_flops(dtype, matmul_n)]
    args, params, model_name = _load_model(ns, dtype)
    if args.max_seq_len is not None and max(ns.prompt_len) + max(ns.gen_len) > args.max_seq_len:
        raise UserInputError(f"prompt + generation length exceeds max_seq_len={args.max_seq_len}")
    device = jax.devices()[0]

    hf_model = None
    torch_threads: list[int | None] = [None]  # None: as set (--torch-threads) or torch's own
    meta: dict[str, Any] = {}
    if ns.vs_transformers:
        import torch
        import transformers

        hf_device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        if ns.torch_threads:
            torch.set_num_threads(ns.torch_threads)
        elif hf_device == "cpu":  # torch's own count (all cores, as XLA's) and one thread
            torch_threads = sorted({1, torch.get_num_threads()})
        hf_model = build_transformers_model(params, args, hf_device)
        n = min(min(ns.prompt_len), 64)
        probe = np.random.default_rng(ns.seed).integers(0, args.vocab_size, (1, n))
        meta.update(torch=torch.__version__, transformers=transformers.__version__,
                    hf_device=hf_device,
                    torch_threads=[n or torch.get_num_threads() for n in torch_threads],
                    hf_logits_rel_err=hf_logits_rel_err(hf_model, params, args, probe))

    results = []
    for batch in sorted(ns.batch):
        for prompt_len in ns.prompt_len:
            for gen_len in ns.gen_len:
                results.append(bench_config(
                    params, args, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
                    repeats=ns.repeats, seed=ns.seed, hf_model=hf_model,
                    torch_threads=torch_threads))

    copy_probes.append(measure_copy_bandwidth(copy_bytes))
    matmul_probes.append(measure_matmul_flops(dtype, matmul_n))
    copy_bw, matmul = max(copy_probes), max(matmul_probes)
    hw = Hardware(copy_bw, matmul, *choose_peak(matmul, matmul_n, dtype, device.device_kind,
                                                ns.peak_tflops))
    for row in results:
        row.update(hardware_fractions(row, hw))

    weight_bytes = sum(_nbytes(x) for x in jax.tree_util.tree_leaves(params))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m mistral_jax.bench " + " ".join(ns.argv),
        "model": model_name, "args": dataclasses.asdict(args),
        "dtype": jnp.dtype(dtype).name,
        "n_params": sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)),
        "weight_bytes": weight_bytes,
        "device": device.device_kind, "platform": device.platform,
        "n_devices": jax.device_count(), "host": platform.node(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "attention": os.environ.get(ATTENTION_ENV, "auto"),
        "qmatmul": os.environ.get(QMATMUL_ENV, "xla"),
        "moe_kernel": moe_kernel_used(args, params),
        "copy_bandwidth_gbps": copy_bw / 1e9, "copy_bytes": copy_bytes,
        "copy_bandwidth_gbps_probes": [x / 1e9 for x in copy_probes],
        "matmul_tflops_measured": matmul / 1e12, "matmul_n": matmul_n,
        "matmul_tflops_probes": [x / 1e12 for x in matmul_probes],
        "peak_tflops": hw.peak_flops / 1e12, "peak_source": hw.peak_source,
        "rows_above_peak": sum(bool(r["prefill_above_peak"]) for r in results),
        "rows_above_bandwidth": sum(bool(r["decode_above_bandwidth"]) for r in results),
        "compile_cache_dir": str(cache_dir) if cache_dir else None,
        "compile_cache_min_compile_secs":
            jax.config.jax_persistent_cache_min_compile_time_secs if cache_dir else None,
        **meta,
    }
    return {"meta": meta, "results": results}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: prints the table (and writes --json); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    ns.argv = argv
    if ns.vs_transformers:  # let torch share the GPU: JAX would otherwise take 75% of it
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    chosen = {ATTENTION_ENV: ns.attention, QMATMUL_ENV: ns.qmatmul, MOE_KERNEL_ENV: ns.moe_kernel}
    previous = {name: os.environ.get(name) for name in chosen}
    os.environ.update({name: value for name, value in chosen.items() if value is not None})
    try:
        out = run(ns)
    except MistralJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    m = out["meta"]
    print(f"# {m['model']} {m['dtype']} ({m['n_params'] / 1e9:.3f}B params, "
          f"{m['weight_bytes'] / 1e9:.3f} GB) on {m['device']} x{m['n_devices']}, jax {m['jax']}")
    print(f"# copy bandwidth {m['copy_bandwidth_gbps']:.1f} GB/s, MFU against "
          f"{m['peak_tflops']:.3f} TFLOP/s ({m['peak_source']}); probes before/after the run: "
          + ", ".join(f"{x:.1f}" for x in m["copy_bandwidth_gbps_probes"]) + " GB/s, "
          + ", ".join(f"{x:.3f}" for x in m["matmul_tflops_probes"]) + " TFLOP/s; "
          + ("" if m["load_avg_1m"] is None else f"load average {m['load_avg_1m']:.2f}"))
    if "hf_logits_rel_err" in m:
        threads = " or ".join(map(str, m["torch_threads"]))
        print(f"# transformers {m['transformers']} on {m['hf_device']} ({threads} torch threads"
              + (", the faster per row" if len(m["torch_threads"]) > 1 else "")
              + f"): logits rel err {m['hf_logits_rel_err']:.2e}")
    print(format_table(out["results"]))
    if ns.json is not None:  # the whole result: machines read the file, stdout is for people
        text = json.dumps(out, default=float)
        tmp = ns.json.with_name(ns.json.name + ".tmp")
        try:
            ns.json.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text + "\n")
            tmp.replace(ns.json)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            print(f"error: --json {ns.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
