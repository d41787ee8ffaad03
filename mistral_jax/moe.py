"""Sparse mixture of experts (Mixtral): a bias-free gate, top-k experts per token, their
SwiGLU outputs mixed by a float32 softmax over the selected gate logits.

    weights, experts = route(gate_logits, k)            # [N, k] f32, [N, k] int32
    out = moe(x, weights, experts, w1, w2, w3)          # x [N, D] -> [N, D]

The paths that compute it live in moe_experts.py (dense reference, gather),
moe_paths.py (tiled, grouped scan, Pallas decode) and moe_gmm.py (grouped matmuls); `moe` picks one statically from N, the
backend, the experts' dtype and `Kernels.moe`. docs/design/moe.md has the details.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.args import ModelArgs
from mistral_jax.errors import UserInputError
from mistral_jax.kernels import Kernels
from mistral_jax.layers import Dtype, Linear, scaled_normal
from mistral_jax.moe_experts import (
    AxisNames,
    ExpertWeight,
    Weight,
    kernel_of,
    moe_dense,
    moe_gather,
)
from mistral_jax.moe_gmm import moe_gmm, moe_ragged
from mistral_jax.moe_paths import TILED_CPU_DTYPES, moe_grouped, moe_pallas, moe_tiled
from mistral_jax.partitioning import expert_parallel

STRATEGIES = ("auto", "gather", "tiled", "grouped", "dense", "ragged", "pallas",
              "pallas-interpret", "gmm", "gmm-interpret")


def route(gate_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """gate_logits [N, E] -> (weights [N, k] float32, experts [N, k] int32).

    Top-k of the logits in float32, ties to the lower expert index; the weights are
    a softmax over the k selected logits (= softmax over all, top-k, renormalised).
    """
    top, idx = jax.lax.top_k(gate_logits.astype(jnp.float32), k)
    return jax.nn.softmax(top, axis=-1), idx.astype(jnp.int32)


def moe_strategy(n_tokens: int, k: int, n_experts: int) -> str:
    """The static path for N tokens: 'gather' while N*k <= E, else 'grouped'.

    The gather path reads N*k experts' weights; the grouped path reads at least the
    E-ish experts its blocks cover, so gathering wins while N*k <= E.
    """
    return "gather" if n_tokens * k <= n_experts else "grouped"


# Expert kernel dtypes the Pallas decode kernel is the default for on GPUs: measured 1.9x
# the gather path on Mixtral-8x7B bf16 (BENCHMARKS.md, the 2026-12-04 H200 table). int8/fp8
# experts through it are not measured yet (benchmarks/gpu_suite.py), so they gather.
PALLAS_GPU_DTYPES = ("bfloat16", "float16", "float32")


def default_decode_kernel(w1, w2, w3) -> str:
    """What `Kernels.moe` 'auto' decodes with, by backend and the expert kernels' dtypes:
    the CPU: 'tiled' where every dtype is in TILED_CPU_DTYPES; GPUs: 'pallas' where every
    dtype is in PALLAS_GPU_DTYPES; else 'xla' (the gather path)."""
    dtypes = {jnp.dtype(kernel_of(w).dtype).name for w in (w1, w2, w3)}
    backend = jax.default_backend()
    if backend == "cpu" and dtypes <= set(TILED_CPU_DTYPES):
        return "tiled"
    if backend == "gpu" and dtypes <= set(PALLAS_GPU_DTYPES):
        return "pallas"
    return "xla"


def default_grouped_kernel() -> str:
    """What `Kernels.grouped` 'auto' runs prefill / batched decode with: the Pallas grouped
    matmul on GPUs (one matmul per projection; the scan over blocks it replaces measured
    3-21% MFU on an H200, BENCHMARKS.md), the scan over row blocks elsewhere. Not
    `ragged_dot` on GPUs: jaxlib 0.10's CUDA lowering computes every expert for every row."""
    return "pallas" if jax.default_backend() == "gpu" else "scan"


def moe(x: jax.Array, weights: jax.Array, experts: jax.Array, w1, w2, w3, *,
        strategy: str = "auto", kernel: str = "auto", qmatmul: str = "auto",
        grouped: str = "auto", hidden_axes: AxisNames = ()) -> jax.Array:
    """Mix the selected experts' SwiGLU outputs. x [N, D], weights/experts [N, k] -> [N, D].

    w1/w3 [E, D, F], w2 [E, F, D]: plain arrays or `ExpertWeight`s (quantized / LoRA).

    `strategy` is one of STRATEGIES; 'auto' picks by `moe_strategy` (static in N), and
    where that is 'gather', `kernel` (`Kernels.moe`) picks the decode path: `moe_gather`
    ('xla'), `moe_tiled` ('tiled') or `moe_pallas`; 'auto': `default_decode_kernel`.
    Where it is 'grouped', `grouped` (`Kernels.grouped`) picks the grouped path: 'scan'
    (`moe_grouped`), 'ragged' or the Pallas grouped matmul (`moe_gmm`); 'auto':
    `default_grouped_kernel`. `qmatmul` (`Kernels.qmatmul`) goes to the quantized expert
    matmuls of the gather and scan paths.

    `hidden_axes`: mesh axes that split F inside a shard_map (`partitioning.expert_parallel`
    with tensor > 1), so that the per-row activation scale of w2's input (`input_scale`)
    is the max over the whole row, as without the split; () elsewhere.
    """
    if strategy not in STRATEGIES:
        raise UserInputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        strategy = moe_strategy(x.shape[0], experts.shape[1], kernel_of(w1).shape[0])
        if strategy == "gather":
            if kernel == "auto":
                kernel = default_decode_kernel(w1, w2, w3)
            strategy = strategy if kernel == "xla" else kernel
        else:
            grouped = default_grouped_kernel() if grouped == "auto" else grouped
            strategy = {"scan": "grouped", "ragged": "ragged", "pallas": "gmm",
                        "pallas-interpret": "gmm-interpret"}[grouped]
    fn = {"gather": functools.partial(moe_gather, qmatmul=qmatmul), "tiled": moe_tiled,
          "grouped": functools.partial(moe_grouped, qmatmul=qmatmul), "dense": moe_dense,
          "ragged": moe_ragged, "pallas": moe_pallas,
          "pallas-interpret": functools.partial(moe_pallas, interpret=True),
          "gmm": moe_gmm, "gmm-interpret": functools.partial(moe_gmm, impl="pallas-interpret"),
          }[strategy]
    return fn(x, weights, experts, w1, w2, w3, hidden_axes=hidden_axes)


class MoeFeedForward(nn.Module):
    """Mixtral's sparse feed-forward: gate [D, E], experts w1/w3 [E, D, F], w2 [E, F, D]."""

    args: ModelArgs
    dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()
    strategy: str = "auto"  # see `moe`; tests pin 'dense' as the reference

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        a = self.args
        d, f, e = a.dim, a.hidden_dim, a.moe.num_experts
        gate = Linear((d, e), ("embed", None), "nd,de->ne", dtype=self.dtype, name="gate")
        w1 = self.param("w1", nn.with_logical_partitioning(scaled_normal(d), ("expert", "embed", "mlp")),
                        (e, d, f), self.dtype)
        w3 = self.param("w3", nn.with_logical_partitioning(scaled_normal(d), ("expert", "embed", "mlp")),
                        (e, d, f), self.dtype)
        w2 = self.param("w2", nn.with_logical_partitioning(scaled_normal(f), ("expert", "mlp", "embed")),
                        (e, f, d), self.dtype)
        b, t, _ = x.shape
        flat = x.reshape(b * t, d)
        weights, experts = route(gate(flat), a.moe.num_experts_per_tok)
        w1, w2, w3 = (self._expert_weight(n, w) for n, w in (("w1", w1), ("w2", w2),
                                                              ("w3", w3)))
        # Split over the mesh's expert axis when there is one (partitioning.py), else plain `moe`.
        fn = functools.partial(moe, strategy=self.strategy, kernel=self.kernels.moe,
                               qmatmul=self.kernels.qmatmul, grouped=self.kernels.grouped)
        out = expert_parallel(fn, flat, weights, experts, w1, w2, w3)
        return out.reshape(b, t, d)

    def _expert_weight(self, name: str, w: jax.Array) -> Weight:
        """The stacked weight `name` [E, in, out] as stored: a plain array, or an
        `ExpertWeight` with its `<name>_scale` [E, out] and `<name>_input_scale` [E]
        (int8/fp8, quant.py) and/or unmerged `<name>_lora_a` / `<name>_lora_b` (lora.py)
        leaves, for the paths to select from."""
        scale = self.get_variable("params", f"{name}_scale")
        input_scale = self.get_variable("params", f"{name}_input_scale")
        lora_a = self.get_variable("params", f"{name}_lora_a")
        lora_b = self.get_variable("params", f"{name}_lora_b")
        if input_scale is not None and scale is None:
            where = "/".join((*self.scope.path, f"{name}_input_scale"))
            raise UserInputError(f"params {where}: activation scales need a quantized "
                                 f"{name} (with {name}_scale)")
        if scale is None and lora_a is None:
            return w
        return ExpertWeight(w, scale, lora_a, lora_b, input_scale)
