"""Sharding rules as data, and the trace-time helpers that read the ambient mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from mistral_jax.errors import ConfigError

MESH_AXES = ("data", "tensor", "expert")


# Logical axis (as declared in layers.py / moe.py / model.py) -> mesh axis (None: replicated).
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "tensor"),
    ("embed", None),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("cache_len", None),
)


# Logical axes kept whole (replicated along their mesh axis) when their size does not
# divide it; every other split must be exact.
REPLICATE_IF_INDIVISIBLE = frozenset({"batch", "kv_heads", "vocab"})


# The ModelArgs field behind each logical axis, to name it in errors.
_ARG_OF_AXIS = {"vocab": "vocab_size", "embed": "dim", "q_heads": "n_heads",
                "kv_heads": "n_kv_heads", "head_dim": "head_dim", "mlp": "hidden_dim",
                "expert": "moe.num_experts", "batch": "batch size"}


CACHE_AXES = {"k": ("batch", "kv_heads", "cache_len", "head_dim"),
              "v": ("batch", "kv_heads", "cache_len", "head_dim"),
              "pos": ("batch", "cache_len")}


def mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """{'data': n, 'tensor': n, 'expert': n} of a (possibly abstract) Mesh or a dict of sizes."""
    shape = dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)
    return {a: int(shape.get(a, 1)) for a in MESH_AXES}


def logical_to_spec(shape: Sequence[int], logical: Sequence[str | None], mesh, *, what: str,
                    rules: Sequence[tuple[str, str | None]] = RULES) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dims have `logical` axis names.

    A dim whose mesh axis has size 1 (or is absent) is left unsplit; an indivisible
    dim is replicated if its logical axis is in REPLICATE_IF_INDIVISIBLE and raises
    ConfigError naming `what`, the axis and the sizes otherwise.
    """
    table = dict(rules)
    sizes = mesh_sizes(mesh)
    present = set(mesh) if isinstance(mesh, Mapping) else set(mesh.axis_names)
    out: list[str | None] = []
    used: set[str] = set()
    for size, name in zip(shape, logical):
        axis = table.get(name) if name is not None else None
        if axis is None or axis not in present or sizes[axis] == 1 or axis in used:
            out.append(None)
            continue
        n = sizes[axis]
        if size % n:
            if name in REPLICATE_IF_INDIVISIBLE:
                out.append(None)
                continue
            raise ConfigError(
                f"cannot shard {what}: {_ARG_OF_AXIS.get(name, name)}={size} (logical axis "
                f"{name!r}) is not divisible by mesh axis {axis!r} of size {n}; choose a "
                f"{axis} size that divides {size}")
        out.append(axis)
        used.add(axis)
    return PartitionSpec(*out)


def use_mesh(mesh: Mesh | None):
    """`jax.set_mesh(mesh)` as a context manager; a no-op for None."""
    import contextlib

    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def ambient_mesh():
    """The mesh set by `use_mesh` / `jax.set_mesh` while tracing, or None."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or mesh.empty or not set(mesh.axis_names) & set(MESH_AXES):
        return None
    return mesh


def constrain(x: jax.Array, logical: Sequence[str | None], what: str = "activation") -> jax.Array:
    """Pin x's sharding by logical axis names under the ambient mesh (no-op without one)."""
    mesh = ambient_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(x.shape, logical, mesh, what=what))


def constrain_cache_layer(layer):
    """A layer's cache {'k', 'v' [B, K, S, Hd], 'pos' [B, S]}: batch on data, heads on tensor."""
    return type(layer)(**{name: constrain(value, CACHE_AXES[name], f"cache/{name}")
                          for name, value in layer.items()})


def _expert_specs(w, spec: PartitionSpec):
    """The shard_map spec of a stacked expert weight: `spec` for a plain [E, in, out]
    array; for a moe.ExpertWeight (kernel, scale [E, out], lora_a [E, in, r],
    lora_b [E, r, out], input_scale [E]) the kernel's spec and, per present field, its
    axes of it."""
    if not isinstance(w, tuple):
        return spec
    e, i, o = (tuple(spec) + (None,) * 3)[:3]
    specs = (spec, PartitionSpec(e, o), PartitionSpec(e, i, None), PartitionSpec(e, None, o),
             PartitionSpec(e))
    return type(w)(*(None if a is None else s for a, s in zip(w, specs, strict=True)))


def expert_parallel(moe_fn: Callable[..., jax.Array], x: jax.Array, weights: jax.Array,
                    experts: jax.Array, w1: jax.Array, w2: jax.Array, w3: jax.Array) -> jax.Array:
    """`moe_fn(x, weights, experts, w1, w2, w3)` with the experts split along the mesh's `expert` axis.

    x [N, D], weights/experts [N, k], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D] (plain arrays,
    or moe.ExpertWeight tuples whose scale / LoRA / input_scale leaves are split like their
    kernel; `moe_fn` then takes `hidden_axes` when w2 quantizes its input). Under an
    ambient mesh with expert > 1, each device runs `moe_fn` on its own block of the
    weights: E/n local experts (assignments to other experts get weight 0, as if
    unrouted), its F/tensor slice of the hidden dim (SwiGLU is elementwise in F, so the
    w2 products of the slices sum to the whole), and its data shard of the tokens. The
    partial outputs are summed over expert and tensor: one all-reduce of [N/data, D] per
    layer, and the expert weights never leave their devices (the SPMD partitioner alone
    would all-gather them for the per-expert gathers of `moe_gather` / `moe_grouped`).
    Without such a mesh this is just `moe_fn(...)`.
    """
    mesh = ambient_mesh()
    sizes = {"data": 1, "tensor": 1, "expert": 1} if mesh is None else mesh_sizes(mesh)
    if sizes["expert"] == 1:
        return moe_fn(x, weights, experts, w1, w2, w3)
    k1, k2 = (w[0] if isinstance(w, tuple) else w for w in (w1, w2))  # moe.ExpertWeight
    n_experts = k1.shape[0]
    w_in = logical_to_spec(k1.shape, ("expert", "embed", "mlp"), mesh, what="experts w1/w3")
    w_out = logical_to_spec(k2.shape, ("expert", "mlp", "embed"), mesh, what="experts w2")
    local = n_experts // sizes["expert"]  # logical_to_spec checked that it divides
    rows = logical_to_spec(x.shape, ("batch", None), mesh, what="MoE tokens")
    reduce_axes = tuple(a for a in ("expert", "tensor") if a in w_in)
    # w2 quantizing its input rows per token (moe.ExpertWeight.input_scale) needs the max
    # over each row's whole F, which the devices along F hold in parts: moe's hidden_axes.
    f_axes = (tuple(w_in) + (None,) * 3)[2]
    f_axes = () if f_axes is None else (f_axes,) if isinstance(f_axes, str) else tuple(f_axes)
    kw = {"hidden_axes": f_axes} if f_axes and getattr(w2, "input_scale", None) is not None else {}

    def shard(x, weights, experts, w1, w2, w3):
        ids = experts - jax.lax.axis_index("expert") * local
        mine = (ids >= 0) & (ids < local)
        out = moe_fn(x, jnp.where(mine, weights, 0), jnp.where(mine, ids, 0), w1, w2, w3, **kw)
        return jax.lax.psum(out, reduce_axes)

    return jax.shard_map(shard, mesh=mesh, in_specs=(rows, rows, rows, _expert_specs(w1, w_in),
                                                     _expert_specs(w2, w_out),
                                                     _expert_specs(w3, w_in)),
                         out_specs=rows, check_vma=False)(x, weights, experts, w1, w2, w3)
