"""The Mistral/Mixtral transformer and its pure forward function.

    forward(params, tokens, positions, cache, *, args, kernels=None) -> (logits, cache)

`params` is a plain pytree (nested dicts of arrays), `args` a hashable `ModelArgs` and
`kernels` a hashable `Kernels` (both static under `jax.jit`), `cache` the pytree from
`init_cache` or None for a cache-less full causal pass. Layers are unrolled (one param
subtree per layer, `layers_0` ... `layers_{n-1}`; BENCHMARKS.md says why).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from mistral_jax.args import ModelArgs
from mistral_jax.cache import Cache, LayerCache, init_cache
from mistral_jax.errors import UserInputError
from mistral_jax.kernels import Kernels, default_kernels
from mistral_jax.layers import Attention, Dtype, FeedForward, Linear, RMSNorm
from mistral_jax.moe import MoeFeedForward
from mistral_jax.quantize import quantize_leaf, resolve_mode
from mistral_jax.tree import flatten, owner, split_dims, unflatten

__all__ = ["MistralModel", "forward", "init_cache", "init_params", "abstract_params",
           "logical_axes", "param_logical_axes", "causal_positions"]


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + feed_forward(norm(.))."""

    args: ModelArgs
    window: int | None
    dtype: Dtype = jnp.float32
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None,
                 fresh_prefill: bool = False) -> tuple[jax.Array, LayerCache | None]:
        a = self.args
        h, cache = Attention(a, self.window, self.dtype, self.kernels, name="attention")(
            RMSNorm(a.norm_eps, self.dtype, name="attention_norm")(x), positions, cache,
            fresh_prefill)
        x = x + h
        ffn = (MoeFeedForward(a, self.dtype, self.kernels, name="feed_forward") if a.moe
               else FeedForward(a, self.dtype, self.kernels, name="feed_forward"))
        x = x + ffn(RMSNorm(a.norm_eps, self.dtype, name="ffn_norm")(x))
        return x, cache


class MistralModel(nn.Module):
    args: ModelArgs
    dtype: Dtype = jnp.float32  # parameter dtype at init; compute follows the params' dtype
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None,
                 logits_index: jax.Array | None = None,
                 fresh_prefill: bool = False) -> tuple[jax.Array, Cache | None]:
        """tokens, positions [B, T] int32 (-1: padding) -> logits [B, T, V] float32.

        With logits_index [B] int32, only row b's token logits_index[b] goes through the
        output head: logits [B, 1, V] (a prefill needs one row of logits, not T).
        """
        a = self.args
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (a.vocab_size, a.dim), self.dtype)
        x = jnp.take(embedding, tokens, axis=0)
        new_cache = [] if cache is not None else None
        for i, window in enumerate(a.layer_windows):
            x, layer_cache = TransformerBlock(a, window, self.dtype, self.kernels,
                                              name=f"layers_{i}")(
                x, positions, None if cache is None else cache[i], fresh_prefill)
            if cache is not None:
                new_cache.append(layer_cache)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)
        x = RMSNorm(a.norm_eps, self.dtype, name="norm")(x)
        if a.tied_embeddings:  # the embedding [V, D] is the output head
            logits = jnp.einsum("btd,vd->btv", x, embedding.astype(x.dtype))
        else:
            logits = Linear((a.dim, a.vocab_size), ("embed", "vocab"), "btd,dv->btv",
                            dtype=self.dtype, qmatmul=self.kernels.qmatmul,
                            name="output")(x)
        return logits.astype(jnp.float32), new_cache


def forward(params, tokens: jax.Array, positions: jax.Array, cache: Cache | None, *,
            args: ModelArgs, kernels: Kernels | None = None,
            logits_index: jax.Array | None = None,
            fresh_prefill: bool = False) -> tuple[jax.Array, Cache | None]:
    """Pure forward pass. tokens, positions [B, T] int32 -> (logits [B, T, V] f32, cache).

    With a cache, attention covers the cached keys plus the new ones and the new
    keys are written (see `cache.py`); with `cache=None` it is a plain causal pass.
    `logits_index` [B] keeps only one position per row: logits [B, 1, V].
    `kernels` (static) picks implementations (kernels.py); None: `default_kernels()`.
    `fresh_prefill=True` (static) promises an empty cache and positions counting up from
    each row's first token with right padding only (a sampler's first prefill): attention
    then skips the empty cache slots and, on GPUs, runs the fused kernel unconditionally.

    Shapes and dtypes are checked (UserInputError), and host (NumPy) positions against the
    cache's size (`check_positions`); token values are not, as this runs under jit: an id
    outside [0, vocab_size) gives NaN logits (`Transformer.logits` and `generate` check
    ids first).
    """
    check_inputs(tokens, positions, cache, args)
    check_positions(positions, cache, args)
    kernels = default_kernels() if kernels is None else kernels
    return MistralModel(args, kernels=kernels).apply({"params": params}, tokens, positions,
                                                     cache, logits_index, fresh_prefill)


def check_inputs(tokens, positions, cache: Cache | None, args: ModelArgs) -> None:
    """UserInputError unless tokens/positions are integer [B, T] of one shape and `cache`
    (if any) is `init_cache(args, B, ...)`-shaped: n_layers layers of float k/v
    [B, n_kv_heads, S, head_dim] and pos [B, S]. Static shapes only: free under jit."""
    for name, a in (("tokens", tokens), ("positions", positions)):
        if jnp.ndim(a) != 2 or not jnp.issubdtype(jnp.result_type(a), jnp.integer):
            raise UserInputError(
                f"{name} must be an integer [B, T] array, got {jnp.result_type(a)} of shape "
                f"{jnp.shape(a)} (mistral-inference's flat tokens + seqlens: "
                "Transformer.logits(tokens, seqlens=...))")
    if jnp.shape(tokens) != jnp.shape(positions):
        raise UserInputError(f"tokens {jnp.shape(tokens)} and positions {jnp.shape(positions)} "
                             "must have the same [B, T] shape")
    if cache is None:
        return
    b = jnp.shape(tokens)[0]
    if not isinstance(cache, (list, tuple)) or len(cache) != args.n_layers:
        got = len(cache) if isinstance(cache, (list, tuple)) else type(cache).__name__
        raise UserInputError(f"cache must hold n_layers={args.n_layers} layers "
                             f"(init_cache(args, batch_size, max_seq_len)), got {got}")
    for i, layer in enumerate(cache):
        for key in ("k", "v"):
            a = layer[key]
            shape = (b, args.n_kv_heads, a.shape[2] if a.ndim == 4 else None, args.head_dim)
            if a.ndim != 4 or tuple(a.shape) != shape or not jnp.issubdtype(a.dtype, jnp.floating):
                raise UserInputError(
                    f"cache[{i}]['{key}'] is {a.dtype} {tuple(a.shape)}; expected a float "
                    f"[B={b}, n_kv_heads={args.n_kv_heads}, S, head_dim={args.head_dim}] array, "
                    f"as init_cache(args, batch_size={b}, ...) makes")
        pos, slots = layer["pos"], layer["k"].shape[2]
        if tuple(pos.shape) != (b, slots) or not jnp.issubdtype(pos.dtype, jnp.integer):
            raise UserInputError(
                f"cache[{i}]['pos'] is {pos.dtype} {tuple(pos.shape)}; expected an integer "
                f"[B={b}, S={slots}] array (S as its k and v), as init_cache makes")


def check_positions(positions, cache: Cache | None, args: ModelArgs) -> None:
    """UserInputError if a position is past what the cache can hold exactly: a layer's
    rotating buffer wraps (slot = position mod S), which is exact only when S covers the
    layer's sliding window; without one (or with S below it) positions must stay below S,
    the `max_seq_len` of `init_cache`. Only host positions (NumPy arrays, lists) are
    checked: reading a device array's values would wait for the device on every call, and
    traced ones (under jit) have none."""
    if cache is None or isinstance(positions, jax.Array):
        return
    host = np.asarray(positions)
    top = int(host.max()) if host.size else -1
    for i, (window, layer) in enumerate(zip(args.layer_windows, cache)):
        slots = layer["k"].shape[2]
        if (window is None or slots < window) and top >= slots:
            raise UserInputError(
                f"position {top} is beyond the cache: layer {i} holds {slots} positions "
                f"(init_cache(..., max_seq_len={slots})) and "
                + ("has no sliding window" if window is None else f"a window of {window}")
                + f"; make the cache with max_seq_len > {top}")


def causal_positions(tokens: jax.Array) -> jax.Array:
    """Positions 0..T-1 for every row of tokens [B, T]."""
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _boxed_init(args: ModelArgs, dtype, key):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return MistralModel(args, dtype).init(key, tokens, tokens)["params"]


def init_params(args: ModelArgs, key: jax.Array | int = 0, dtype: Dtype = jnp.float32):
    """Random params (a plain pytree) for `args`, e.g. for tests and benchmarks."""
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    return nn.meta.unbox(jax.jit(functools.partial(_boxed_init, args, dtype))(key))


def random_params(args: ModelArgs, seed: int = 0, dtype: Dtype = jnp.bfloat16,
                  quantize: str | None = None):
    """Random params drawn leaf by leaf, in chunks of rows (benchmarks of large presets).

    The same distributions as `init_params` (kernels normal with std 1/sqrt(fan_in), the
    embedding std 1, norms ones) but other draws. `init_params` draws every weight in one
    program, whose random-bit temporaries took 18 GB of host memory for a 6.9 GB one-layer
    Mixtral; here at most one weight and one chunk's temporaries exist beside the finished
    leaves. With `quantize` ('int8', 'fp8', ...), each weight is quantized as soon as it is
    drawn, so a quantized Mixtral 8x7B never needs its ~93 GB of bfloat16.
    """
    mode = resolve_mode(quantize) if quantize else None
    key = jax.random.PRNGKey(seed)
    out = {}
    for i, (path, leaf) in enumerate(flatten(abstract_params(args, dtype)).items()):
        if path[-1] == "weight":  # RMSNorm
            w = jnp.ones(leaf.shape, leaf.dtype)
        else:
            fan_in = 1 if path == ("embedding",) else math.prod(
                leaf.shape[d] for d in split_dims(path, len(leaf.shape))[1])
            w = _random_normal(jax.random.fold_in(key, i), 1.0 / math.sqrt(fan_in),
                               leaf.shape, leaf.dtype)
        out.update(quantize_leaf(path, w, mode) if mode else {path: w})
    return unflatten(out)


RANDOM_CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 per drawn chunk


def _chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows (of the leaf flattened to [rows, last dim]) drawn per chunk: the largest divisor
    of the row count whose chunk holds at most RANDOM_CHUNK_ELEMENTS (at least one row)."""
    rows, last = math.prod(shape[:-1]), shape[-1]
    cap = max(1, RANDOM_CHUNK_ELEMENTS // last)
    return next(r for r in range(min(rows, cap), 0, -1) if rows % r == 0)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _random_normal(key, std, shape: tuple[int, ...], dtype):
    """Normal(0, std) of `shape` in `dtype`, drawn `_chunk_rows(shape)` rows at a time."""
    n_rows, last, rows = math.prod(shape[:-1]), shape[-1], _chunk_rows(shape)

    def draw(k):
        return (jax.random.normal(k, (rows, last), jnp.float32) * std).astype(dtype)

    chunks = jax.lax.map(draw, jax.random.split(key, n_rows // rows))
    return chunks.reshape(shape)


def abstract_params(args: ModelArgs, dtype: Dtype = jnp.float32):
    """ShapeDtypeStructs of the params, computed without allocating anything."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(_boxed_init, args, dtype),
                                        jax.random.PRNGKey(0)))


def logical_axes(args: ModelArgs):
    """A pytree like params whose leaves are PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, args, jnp.float32),
                           jax.random.PRNGKey(0))
    return nn.get_partition_spec(boxed)


def param_logical_axes(params, args: ModelArgs):
    """PartitionSpecs of logical axis names for a params tree with extra leaves.

    Covers quantized weights (`scale`: the kernel's lead and output axes; `input_scale`:
    the lead (expert) axis, none for a Linear's [] scale) and unmerged LoRA (`lora_a`:
    lead + input axes + rank; `lora_b`: lead + rank + output axes; the rank axis is never
    sharded). `params` may hold arrays or ShapeDtypeStructs.
    """
    base = flatten(logical_axes(args), ())
    flat = flatten(params)
    out = {}
    for path in flat:
        if path in base:
            out[path] = base[path]
            continue
        found = owner(path, base)
        if found is None:
            raise ValueError(f"no logical axes known for param {'/'.join(path)}")
        kernel, suffix = found
        spec = tuple(base[kernel])
        lead, ins, outs = (tuple(spec[i] for i in dims)
                           for dims in split_dims(kernel, len(spec)))
        out[path] = PartitionSpec(*{
            "input_scale": lead,
            "scale": lead + outs,
            "lora_a": lead + ins + (None,),
            "lora_b": lead + (None,) + outs,
        }[suffix])
    return unflatten(out)
