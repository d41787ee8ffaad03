"""The cost model: bytes a decode step reads and FLOPs a prefill does.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax.args import ModelArgs, MoeArgs
from mistral_jax.cache import cache_sizes
from mistral_jax.model import abstract_params
from mistral_jax.quantize import param_bytes, quantize_params


def _leaves_with_names(params) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [("/".join(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]


def nbytes(leaf) -> int:
    return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize


def weight_bytes(args: ModelArgs, dtype: Any, quantize: str | None = None) -> int:
    """Bytes of the params of `args` in `dtype` (quantized by `quantize`), from shapes only."""
    params = abstract_params(args, dtype)
    if quantize:
        params = jax.eval_shape(lambda p: quantize_params(p, quantize), params)
    return param_bytes(params)


def expected_expert_fraction(moe: MoeArgs | None, batch: int) -> float:
    """Expected share of a layer's experts that `batch` tokens pick, routing uniformly."""
    if moe is None:
        return 1.0
    return 1.0 - (1.0 - moe.num_experts_per_tok / moe.num_experts) ** batch


def moe_expert_reads(moe: MoeArgs, batch: int) -> dict[str, float]:
    """Share of a layer's stacked expert weights one decode step of `batch` tokens reads on
    each MoE path, routing uniformly: 'per assignment' (the decode kernels, moe.py's 'xla'
    gather, 'tiled', 'pallas': each of the batch*k (token, slot) pairs reads its expert,
    repeats included), 'grouped' (the grouped paths: each chosen expert once,
    `expected_expert_fraction`), 'dense' (every expert)."""
    return {"per assignment": batch * moe.num_experts_per_tok / moe.num_experts,
            "grouped": expected_expert_fraction(moe, batch), "dense": 1.0}


def decode_bytes(args: ModelArgs, params, batch: int, cache_len: int, cache_dtype: Any) -> dict:
    """Bytes a one-token decode step of `batch` rows must read, at the least.

    weights: every param except the embedding table (only `batch` rows of it), with
    stacked MoE expert weights scaled by `expected_expert_fraction`; kv: the whole
    cache buffer (k, v and positions) of every layer, as attention reads it. For a MoE
    model, `by_path`: the total on each path of `moe_expert_reads`, and `path`: the one a
    decode step of `batch` rows takes (moe.moe_strategy: per assignment while batch*k <= E).
    """
    weights = 0.0
    experts = 0.0  # bytes of every stacked expert weight
    frac = expected_expert_fraction(args.moe, batch)
    for name, leaf in _leaves_with_names(params):
        if name == "embedding":
            weights += batch * leaf.shape[-1] * jnp.dtype(leaf.dtype).itemsize
        elif args.moe is not None and "feed_forward/w" in name and leaf.ndim >= 2 \
                and leaf.shape[0] == args.moe.num_experts:
            experts += nbytes(leaf)
        else:
            weights += nbytes(leaf)
    kv = 0
    item = jnp.dtype(cache_dtype).itemsize
    for size in cache_sizes(args, cache_len):
        kv += 2 * batch * size * args.n_kv_heads * args.head_dim * item + batch * size * 4
    out = {"weights": weights + frac * experts, "kv": float(kv),
           "total": weights + frac * experts + kv}
    if args.moe is not None:
        m = args.moe
        out["by_path"] = {path: weights + share * experts + kv
                          for path, share in moe_expert_reads(m, batch).items()}
        out["path"] = ("per assignment" if batch * m.num_experts_per_tok <= m.num_experts
                       else "grouped")
    return out


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
