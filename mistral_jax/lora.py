"""LoRA adapters applied to params: merged into the kernels, or kept beside them (unmerged).

Merged (`merge_lora`): W + scaling * B @ A written into the kernels. Unmerged
(`attach_lora`): `lora_a` [in..., r] and `lora_b` [r, out...] beside each kernel, added
by `Linear`. Reading adapter files is lora_file.py; docs/design/lora.md has the details.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.errors import UserInputError
from mistral_jax.quantize import dequantize, is_quantized, on_host, quantize_array, resolve_mode
from mistral_jax.tree import (
    ParamPath,
    flatten,
    is_linear_weight,
    owner,
    sibling,
    split_dims,
    unflatten,
)

LORA_LEAVES = ("lora_a", "lora_b")


# ---------------------------------------------------------------------------------------------
# Reading an adapter.


# ---------------------------------------------------------------------------------------------
# Using an adapter.


def is_lora_leaf(path: ParamPath) -> bool:
    """Whether a param path is an unmerged adapter leaf (`lora_a`, `w1_lora_b`, ...)."""
    return any(path[-1] == leaf or path[-1].endswith("_" + leaf) for leaf in LORA_LEAVES)


def detach_lora(params):
    """params without any unmerged LoRA leaves (the base model)."""
    return unflatten({p: v for p, v in flatten(params).items() if not is_lora_leaf(p)})


def attach_lora(params, adapter):
    """Unmerged mode: params with the adapter's lora_a/lora_b leaves (any previous
    adapter's removed). The base arrays are shared, not copied."""
    flat = flatten(detach_lora(params))
    for path, v in flatten(adapter).items():
        if owner(path, flat) is None:
            raise UserInputError(f"adapter leaf {'/'.join(path)} has no weight in these params")
        flat[path] = v
    return unflatten(flat)


def lora_delta(a: jax.Array, b: jax.Array, n_lead: int = 0) -> jax.Array:
    """The weight delta of an adapter: a [lead..., in..., r], b [lead..., r, out...] ->
    [lead..., in..., out...] in float32 (scaling is already in b)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    fn = lambda x, y: jnp.tensordot(x, y, axes=1)  # noqa: E731
    for _ in range(n_lead):
        fn = jax.vmap(fn)
    return fn(a, b)


def lora_einsum(eqn: str, n_in: int, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """The unmerged adapter's output for a Linear of einsum `eqn` with `n_in` input dims:
    (x @ a) @ b, x [..., in...], a [in..., r], b [r, out...] -> [..., out...] in x.dtype."""
    inputs, out = eqn.replace(" ", "").split("->")
    xs, ks = inputs.split(",")
    r = next(c for c in "rzyqpo" if c not in eqn)
    k_in, k_out = ks[:n_in], ks[n_in:]
    xb = "".join(c for c in xs if c not in k_in)
    h = jnp.einsum(f"{xs},{k_in}{r}->{xb}{r}", x, a.astype(x.dtype))
    return jnp.einsum(f"{xb}{r},{r}{k_out}->{out}", h, b.astype(x.dtype))


def merge_leaf(path: ParamPath, w, adapter_flat: dict[ParamPath, Any], scale=None):
    """One weight with its adapter's delta added: returns (w, scale).

    Quantized weights (`scale` given) are dequantized, merged and requantized per
    output channel in their storage dtype. numpy inputs are merged on the host CPU.
    """
    a_path, b_path = sibling(path, "lora_a"), sibling(path, "lora_b")
    if a_path not in adapter_flat:
        return w, scale
    a, b = adapter_flat[a_path], adapter_flat[b_path]
    lead, ins, _ = split_dims(path, np.ndim(w))
    if isinstance(w, np.ndarray):
        return on_host(functools.partial(_merge, n_lead=len(lead), ins=ins), w, np.asarray(a),
                       np.asarray(b), scale)
    return _merge(w, a, b, scale, n_lead=len(lead), ins=ins)


@functools.partial(jax.jit, static_argnames=("n_lead", "ins"))
def _merge(w, a, b, scale, *, n_lead: int, ins: tuple[int, ...]):
    delta = lora_delta(a, b, n_lead)
    if scale is None:
        return (w.astype(jnp.float32) + delta).astype(w.dtype), None
    mode = resolve_mode("int8" if jnp.dtype(w.dtype) == jnp.int8 else "fp8")
    return quantize_array(dequantize(w, scale, ins) + delta, mode, ins)


def merge_lora(params, adapter):
    """Merged mode: params whose kernels hold W + scaling * B @ A (no lora leaves)."""
    flat, ad = flatten(params), flatten(adapter)
    for path, w in list(flat.items()):
        if is_linear_weight(path, np.ndim(w)) and sibling(path, "lora_a") in ad:
            s_path = sibling(path, "scale")
            scale = flat.get(s_path) if is_quantized(w) else None
            flat[path], new_scale = merge_leaf(path, w, ad, scale)
            if scale is not None:
                flat[s_path] = new_scale
    return unflatten(flat)


