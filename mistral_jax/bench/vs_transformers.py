"""The same weights in transformers (PyTorch): build, time and compare.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.args import ModelArgs
from mistral_jax.errors import UserInputError
from mistral_jax.model import causal_positions, forward


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
    cfg.update(hf_family_fields(args))
    return cfg


def hf_family_fields(args: ModelArgs) -> dict:
    """The config.json fields of the newer families (hf_config.py reads them back): Ministral's
    layer_types, Ministral3's yarn rope_parameters and query scale, tied embeddings."""
    out: dict = {"tie_word_embeddings": args.tied_embeddings}
    if isinstance(args.sliding_window, tuple):
        windows = {w for w in args.layer_windows if w is not None}
        if len(windows) > 1:
            raise UserInputError(f"config.json has one sliding_window; args have {sorted(windows)}")
        out.update(architectures=["MinistralForCausalLM"], model_type="ministral",
                   sliding_window=windows.pop() if windows else None,
                   layer_types=["full_attention" if w is None else "sliding_attention"
                                for w in args.layer_windows])
    if args.yarn is not None or args.llama_4_scaling is not None:
        if args.llama_4_scaling is not None and (
                args.yarn is None or args.yarn.original_max_position_embeddings
                != args.llama_4_scaling.original_max_position_embeddings):
            raise UserInputError("config.json's query scale reads yarn's "
                                 "original_max_position_embeddings; args differ")
        rope = {"rope_type": "default", "rope_theta": args.rope_theta}
        if args.yarn is not None:
            y = args.yarn
            rope.update(rope_type="yarn", factor=y.factor, beta_fast=y.beta_fast,
                        beta_slow=y.beta_slow, attention_factor=y.attention_factor,
                        original_max_position_embeddings=y.original_max_position_embeddings,
                        truncate=y.truncate)
        if args.llama_4_scaling is not None:
            rope["llama_4_scaling_beta"] = args.llama_4_scaling.beta
            out.update(architectures=["Ministral3ForCausalLM"], model_type="ministral3")
        out["rope_parameters"] = rope
    return out


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
          "lm_head.weight": (tt(params["embedding"]) if a.tied_embeddings
                             else tt(params["output"]["kernel"]).T)}
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
    config_cls = transformers.AutoConfig.for_model(cfg["model_type"]).__class__
    model_cls = getattr(transformers, cfg["architectures"][0])
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
