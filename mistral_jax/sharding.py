"""Tensor, expert and data parallelism with `jax.sharding` meshes, on one host or several.

JAX's SPMD partitioner does the work: every parameter, the KV cache and the batch are
placed with a `NamedSharding` over a mesh with axes `data`, `tensor` and `expert`,
and the jitted `forward` / sampler run unchanged on those arrays (XLA inserts the
collectives). Nothing here hand-writes a process group.

    mesh = make_mesh("data=1,tensor=4,expert=2")       # or make_mesh(): all devices on tensor
    model = Transformer.from_folder(path, mesh=mesh)   # each array loaded onto its shards

Which axis goes where is data, not code: `RULES` maps the logical axis names that
`layers.py` declares on every weight (`model.logical_axes(args)`) to mesh axes:

    attention heads (q_heads, kv_heads) and the FFN hidden dim (mlp)   -> tensor
        (wq/wk/wv and w1/w3 are column-parallel, wo and w2 row-parallel)
    stacked experts (expert)                                            -> expert
    vocabulary of the embedding and output head (vocab)                 -> tensor
    batch of tokens, positions and KV cache (batch)                     -> data
    model dim (embed), head_dim, cache slots                            -> replicated

A size that does not divide its mesh axis raises `ConfigError` naming the parameter,
the logical axis and the mesh axis, except for the axes in `REPLICATE_IF_INDIVISIBLE`:
those are kept whole on every device of that mesh axis instead. That is how a model
with fewer KV heads than tensor devices (8 KV heads on 16 devices) runs: wk, wv and
the KV cache are replicated along `tensor` while the query heads stay split. Each
device then holds every KV head (more cache memory per device than a partial
replication over tensor / n_kv_heads devices would need, which one tensor axis cannot
express), but attention stays local; splitting head_dim instead would add an
all-reduce inside every attention score. A batch that does not divide `data` is
likewise replicated, and so is a vocabulary that does not divide `tensor`.

Device order: the mesh is filled with `tensor` varying fastest, then `expert`, then
`data`, over devices sorted by (process, id). A tensor group therefore stays on one
host whenever `tensor` <= the devices per host, so the per-layer all-reduces of
tensor parallelism ride NVLink and only the expert/data traffic crosses hosts.

Inside jit, two things need the mesh while tracing, so `Transformer` and `generate`
trace under `jax.set_mesh(mesh)` (`use_mesh`, found from the params by `mesh_of`):
`cache.init_cache` pins the cache to batch-on-data / heads-on-tensor (`constrain`),
and `moe.MoeFeedForward` runs its experts through `expert_parallel`, a `shard_map` in
which each device uses only its own experts and F-slice (the partitioner alone would
all-gather the stacked experts for the per-expert gathers of the sparse MoE paths).
Everything else is left to XLA's propagation from the weights' shardings: a decode
step then only all-reduces activations (embedding lookup, attention wo, w2 / experts).
Without a mesh all of this is a no-op and a single-device trace is unchanged.

Multi-host: call `initialize_distributed` (flags or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables) before anything touches a
device, and run the same command on every host; `place_array` builds each global
array with `jax.make_array_from_callback`, so every process only copies its own
shards to its devices, and `gather` hands every process the whole of a result.

`python -m mistral_jax.sharding FOLDER --mesh SPEC` prints the weights and KV cache
per device of a mesh from the folder's params.json alone (`bytes_per_device_plan`).
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_jax.args import ModelArgs
from mistral_jax.checkpoint import flatten, unflatten
from mistral_jax.errors import ConfigError, UserInputError

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
BATCH_AXES = ("batch", None)  # tokens, positions [B, T]


# ----------------------------------------------------------------------------- meshes


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=1,tensor=4,expert=2' -> {'data': 1, 'tensor': 4, 'expert': 2}; absent axes are 1."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"mesh spec must look like 'data=1,tensor=4,expert=2', got {spec!r}")
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if not m:
            raise UserInputError(
                f"mesh spec {spec!r}: cannot parse {part.strip()!r}; expected axis=size, "
                "e.g. 'data=1,tensor=4,expert=2'")
        name, size = m[1], int(m[2])
        if name not in MESH_AXES:
            raise UserInputError(
                f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        if name in seen:
            raise UserInputError(f"mesh spec {spec!r}: axis {name!r} is given twice")
        if size < 1:
            raise UserInputError(f"mesh spec {spec!r}: axis {name!r} must have size >= 1")
        seen.add(name)
        sizes[name] = size
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ('data', 'tensor', 'expert') over `devices` (default: all, every process).

    `spec` is a string ('tensor=4,expert=2'), a dict of axis sizes (absent axes are 1),
    or None: every device along `tensor`. The sizes must multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if spec is None:
        sizes = {"data": 1, "tensor": len(devices), "expert": 1}
    elif isinstance(spec, str):
        sizes = parse_mesh_spec(spec)
    else:
        unknown = set(spec) - set(MESH_AXES)
        if unknown:
            raise UserInputError(
                f"mesh axes {sorted(unknown)} are unknown; axes are {', '.join(MESH_AXES)}")
        sizes = {a: int(spec.get(a, 1)) for a in MESH_AXES}
        bad = [a for a, n in sizes.items() if n < 1]
        if bad:
            raise UserInputError(f"mesh axis {bad[0]!r} must have size >= 1, got {sizes[bad[0]]}")
    n = math.prod(sizes.values())
    if n != len(devices):
        desc = ",".join(f"{a}={sizes[a]}" for a in MESH_AXES)
        raise UserInputError(
            f"mesh {desc} needs {n} devices but {len(devices)} are available "
            f"({devices[0].platform if devices else 'none'}); the sizes must multiply to "
            f"the device count")
    devices.sort(key=lambda d: (d.process_index, d.id))
    # tensor fastest, then expert, then data (see the module docstring), named in MESH_AXES order.
    grid = np.array(devices, dtype=object).reshape(
        sizes["data"], sizes["expert"], sizes["tensor"]).transpose(0, 2, 1)
    return _auto_mesh(grid, MESH_AXES)


def _auto_mesh(devices: np.ndarray, names: tuple[str, ...]) -> Mesh:
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:  # older JAX: every mesh axis is automatic
        return Mesh(devices, names)
    return Mesh(devices, names, axis_types=(axis_type.Auto,) * len(names))


def resolve_mesh(mesh: Mesh | str | Mapping[str, int] | None) -> Mesh | None:
    """Accept a Mesh, a spec string or dict, 'auto' (all devices on tensor), or None (no mesh).

    A user-built Mesh must name only axes among data/tensor/expert (absent ones count as
    size 1); it is used as is, except that explicit axis types become automatic ones,
    since the model relies on XLA's sharding propagation.
    """
    if mesh is None:
        return None
    if isinstance(mesh, str):
        return make_mesh(None if mesh.strip() == "auto" else mesh)
    if isinstance(mesh, Mapping):
        return make_mesh(mesh)
    if not isinstance(mesh, Mesh):
        raise UserInputError(
            f"mesh must be a jax.sharding.Mesh, a spec such as 'tensor=4,expert=2', or None; "
            f"got {type(mesh).__name__}")
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise UserInputError(
            f"mesh axis {unknown[0]!r} is not one of {', '.join(MESH_AXES)}; name the mesh "
            "axes data, tensor and expert")
    types = getattr(mesh, "axis_types", None)
    auto = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
    if types is not None and auto is not None and any(t != auto for t in types):
        return _auto_mesh(mesh.devices, tuple(mesh.axis_names))
    return mesh


def mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """{'data': n, 'tensor': n, 'expert': n} of a (possibly abstract) Mesh or a dict of sizes."""
    shape = dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)
    return {a: int(shape.get(a, 1)) for a in MESH_AXES}


# ----------------------------------------------------------------------------- rules -> specs


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


@functools.lru_cache(maxsize=8)
def _declared(args: ModelArgs) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple]]:
    """path -> (shape, logical axes) of every declared weight (cached: ~seconds for 56 layers)."""
    from mistral_jax.model import abstract_params, logical_axes

    shapes, axes = flatten(abstract_params(args)), flatten(logical_axes(args))
    return {p: (tuple(shapes[p].shape), tuple(axes[p])) for p in shapes}


def _spec(shape, logical, mesh, what: str, rules) -> PartitionSpec:
    logical = tuple(logical) + (None,) * (len(shape) - len(logical))
    return logical_to_spec(shape, logical, mesh, what=what, rules=rules)


def param_specs(args: ModelArgs, mesh: Mesh | Mapping[str, int],
                rules: Sequence[tuple[str, str | None]] = RULES):
    """A pytree like params of PartitionSpecs over mesh axes, from `model.logical_axes(args)`.

    Raises ConfigError naming the parameter and axis for an indivisible required split.
    """
    return unflatten({p: _spec(shape, axes, mesh, "/".join(p), rules)
                    for p, (shape, axes) in _declared(args).items()})


def param_shardings(args: ModelArgs, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = RULES):
    """A pytree like params of NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(args, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def tree_specs(params, args: ModelArgs, mesh: Mesh | Mapping[str, int],
               rules: Sequence[tuple[str, str | None]] = RULES):
    """PartitionSpecs for a params tree that may hold more than the declared weights:
    quantization scales and unmerged LoRA factors get the axes `quant.param_logical_axes`
    gives them. `params` may hold arrays or ShapeDtypeStructs."""
    declared = _declared(args)
    flat = flatten(params)
    if set(flat) <= set(declared):
        logical = {p: declared[p][1] for p in flat}
    else:
        from mistral_jax.quant import param_logical_axes

        logical = {p: tuple(a) for p, a in flatten(param_logical_axes(params, args)).items()}
    return unflatten({p: _spec(tuple(x.shape), logical[p], mesh, "/".join(p), rules)
                    for p, x in flat.items()})


def cache_shardings(args: ModelArgs, mesh: Mesh, batch_size: int) -> list[dict[str, NamedSharding]]:
    """Shardings of `cache.init_cache(args, batch_size, ...)`: heads on tensor, batch on data."""
    out = []
    for layer in range(args.n_layers):
        dims = {"k": (batch_size, args.n_kv_heads, 0, args.head_dim),
                "v": (batch_size, args.n_kv_heads, 0, args.head_dim),
                "pos": (batch_size, 0)}
        out.append({name: NamedSharding(mesh, logical_to_spec(
            dims[name], CACHE_AXES[name], mesh, what=f"cache[{layer}]/{name}"))
            for name in ("k", "v", "pos")})
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------- placement


def place_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array; each process copies only its addressable shards."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_fn(args: ModelArgs, mesh: Mesh) -> Callable[[tuple[str, ...], np.ndarray], jax.Array]:
    """`place(path, host_array)` for `checkpoint.load_params`: each leaf straight onto its shards.

    Declared weights get `param_shardings`; extra leaves that load hooks add (quantization
    scales, LoRA factors: small) are replicated here and given their own sharding by
    `place_params` afterwards.
    """
    shardings = flatten(param_shardings(args, mesh))

    def place(path: tuple[str, ...], host: np.ndarray) -> jax.Array:
        sharding = shardings.get(tuple(path))
        if sharding is None or tuple(np.shape(host)) != _declared(args)[tuple(path)][0]:
            sharding = replicated(mesh)
        return place_array(host, sharding)

    return place


def place_params(params, args: ModelArgs, mesh: Mesh):
    """Every leaf of a params tree on its sharding over `mesh` (leaves already there stay)."""
    flat = flatten(params)
    specs = flatten(tree_specs(params, args, mesh))
    out = {}
    for path, x in flat.items():
        sharding = NamedSharding(mesh, specs[path])
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            out[path] = x
        elif isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
            out[path] = jax.device_put(x, sharding)
        else:  # host data, or one process's local array in a multi-process run
            out[path] = place_array(np.asarray(jax.device_get(x)), sharding)
    return unflatten(out)


def init_params_sharded(args: ModelArgs, mesh: Mesh, key: jax.Array | int = 0,
                        dtype: Any = jnp.float32):
    """`model.init_params` computed directly into its shards (no device holds a whole weight)."""
    from mistral_jax.model import init_params

    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    init = jax.jit(lambda k: init_params(args, k, dtype), out_shardings=param_shardings(args, mesh))
    return init(key)


def init_cache_sharded(args: ModelArgs, mesh: Mesh, batch_size: int, max_seq_len: int,
                       dtype: Any = jnp.bfloat16):
    """`cache.init_cache` created directly in its shards (k/v [B, K, S, Hd], pos [B, S])."""
    from mistral_jax.cache import init_cache

    make = jax.jit(lambda: init_cache(args, batch_size, max_seq_len, dtype),
                   out_shardings=cache_shardings(args, mesh, batch_size))
    return make()


def shard_batch(mesh: Mesh, *arrays) -> tuple[jax.Array, ...]:
    """Host arrays [B, ...] placed as global arrays with rows along data."""
    return tuple(place_array(np.asarray(a), NamedSharding(
        mesh, logical_to_spec(np.shape(a), ("batch",) + (None,) * (np.ndim(a) - 1), mesh,
                              what="batch"))) for a in arrays)


def gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process, sharded) global array as one numpy array on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def mesh_of(tree) -> Mesh | None:
    """The data/tensor/expert Mesh the arrays of `tree` are sharded over, else None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            mesh = sharding.mesh
            return mesh if set(mesh.axis_names) <= set(MESH_AXES) else None
    return None


def bytes_per_device(tree) -> dict[jax.Device, int]:
    """How many bytes of `tree`'s arrays each (addressable) device holds."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


# ----------------------------------------------------------------------------- multi-host


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserInputError(f"environment variable {name}={value!r} is not an integer") from None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           *, timeout_s: int = 300) -> bool:
    """Join a multi-host run (`jax.distributed.initialize`); call before anything uses a device.

    Each argument falls back to the environment: JAX_COORDINATOR_ADDRESS ('host:port' of
    process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID. With none of them set this is a no-op
    (single host) and returns False; with some but not all it raises UserInputError.
    Returns True once this process has joined.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    given = {"coordinator address (--coordinator / JAX_COORDINATOR_ADDRESS)": coordinator_address,
             "number of processes (--num-processes / JAX_NUM_PROCESSES)": num_processes,
             "process id (--process-id / JAX_PROCESS_ID)": process_id}
    if all(v is None for v in given.values()):
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise UserInputError(f"multi-host run: missing the {' and the '.join(missing)}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserInputError(
            f"multi-host run: process id {process_id} must be in [0, num_processes="
            f"{num_processes})")
    if ":" not in coordinator_address:
        raise UserInputError(
            f"multi-host run: coordinator address {coordinator_address!r} must be host:port")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)
    return True


# ----------------------------------------------------------------------------- inside jit
# `Transformer` runs its jitted calls under `jax.set_mesh(mesh)` (see `use_mesh`); while
# tracing, the functions below read that mesh. Without one they change nothing, so a
# single-device run traces exactly as before.


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


# ----------------------------------------------------------------------------- planning


def bytes_per_device_plan(args: ModelArgs, mesh: Mesh | Mapping[str, int],
                          dtype: Any = jnp.bfloat16, params: Any = None) -> dict[str, int]:
    """What each device holds under the rules, computed from shapes (nothing allocated).

    `params`: the tree of ShapeDtypeStructs to plan (e.g. quantized kernels and their
    scales, `planned_params`); by default the declared weights in `dtype`.
    Returns {'params': bytes of weights per device, 'params_total': bytes of all weights,
    'kv_per_token': KV cache bytes per cached token of one sequence, per device}.
    """
    itemsize = jnp.dtype(dtype).itemsize
    sizes = mesh_sizes(mesh)
    if params is None:
        from mistral_jax.model import abstract_params

        params = abstract_params(args, dtype)
    specs = flatten(tree_specs(params, args, mesh))
    per_device = total = 0
    for p, leaf in flatten(params).items():
        n = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        total += n
        per_device += n // math.prod(sizes[a] for a in specs[p] if a is not None)
    kv_spec = logical_to_spec((1, args.n_kv_heads, 1, args.head_dim), CACHE_AXES["k"], mesh,
                              what="cache")
    kv_heads = args.n_kv_heads // (sizes["tensor"] if "tensor" in kv_spec else 1)
    kv = 2 * args.n_layers * kv_heads * args.head_dim * itemsize
    return {"params": per_device, "params_total": total, "kv_per_token": kv}


def planned_params(folder: str | Path, args: ModelArgs, dtype: Any = jnp.bfloat16,
                   quantize: str | None = None):
    """ShapeDtypeStructs of the params `Transformer.from_folder(folder, dtype=dtype,
    quantize=quantize)` holds, from the folder's configs alone (no weights read): a
    converted folder's leaves as its manifest lists them; a compressed-tensors config's
    8-bit kernels (int8, or fp8 per channel / per tensor) with their scales; else the
    declared weights, quantized by `quantize`."""
    from mistral_jax.convert import folder_quantization, is_converted, restored_abstract
    from mistral_jax.model import abstract_params
    from mistral_jax.quant import (
        quantize_params,
        quantized_abstract_params,
        read_compressed_tensors,
    )

    folder = Path(folder)
    stored = folder_quantization(folder)
    if quantize is not None and stored is not None:
        raise UserInputError(f"{folder} holds {stored} weights already; drop "
                             f"--quantize {quantize}")
    if is_converted(folder):
        tree = restored_abstract(folder, args, dtype)
        return tree if quantize is None else quantize_params(tree, quantize)
    if stored is not None:  # compressed-tensors: the mode whose leaves it loads as
        scheme = read_compressed_tensors(folder)
        quantize = ("int8" if scheme.weight_dtype == np.dtype(np.int8) else
                    "fp8-tensor" if scheme.weight_strategy == "tensor" else "fp8")
    if quantize is None:
        return abstract_params(args, dtype)
    return quantized_abstract_params(args, quantize, dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mistral_jax.sharding FOLDER --mesh SPEC`: per-device memory of a mesh.

    Reads only the folder's configs (params.json / config.json, a converted folder's
    manifest; no weights, no devices needed), so a mesh can be checked before downloading
    or loading a model. Quantized folders (converted, compressed-tensors) count their
    8-bit weights; `--quantize` plans a load that quantizes.
    """
    import argparse

    from mistral_jax.args import load_args
    from mistral_jax.errors import MistralJaxError

    p = argparse.ArgumentParser(prog="python -m mistral_jax.sharding",
                                description=main.__doc__.splitlines()[0])
    p.add_argument("folder", help="model folder with params.json or config.json")
    p.add_argument("--mesh", required=True, help="e.g. 'tensor=8' or 'tensor=8,expert=2'")
    p.add_argument("--dtype", default="bfloat16", help="weights and KV cache dtype")
    p.add_argument("--quantize", choices=["int8", "fp8", "fp8-tensor"],
                   help="plan a load that quantizes (as from_folder(quantize=...))")
    ns = p.parse_args(argv)
    try:
        from mistral_jax.transformer import resolve_dtype

        args, _ = load_args(ns.folder)
        sizes = parse_mesh_spec(ns.mesh)
        dtype = resolve_dtype(ns.dtype)
        params = planned_params(ns.folder, args, dtype, ns.quantize)
        plan = bytes_per_device_plan(args, sizes, dtype, params)
    except MistralJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gib = 1024 ** 3
    kernels = sorted({jnp.dtype(x.dtype).name for x in jax.tree.leaves(params)
                      if jnp.dtype(x.dtype).itemsize == 1})
    shown = {a: n for a, n in sizes.items() if n > 1} or sizes  # the axes the spec set
    n_devices = math.prod(sizes.values())
    print(f"mesh {','.join(f'{a}={n}' for a, n in shown.items())} "
          f"({n_devices} device{'' if n_devices == 1 else 's'}), {ns.dtype}"
          + (f", {'/'.join(kernels)} kernels" if kernels else ""))
    print(f"weights: {plan['params_total'] / gib:.2f} GiB in all, "
          f"{plan['params'] / gib:.2f} GiB per device")
    print(f"KV cache: {plan['kv_per_token'] / 1024:.1f} KiB per device per cached token "
          f"of one sequence")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
