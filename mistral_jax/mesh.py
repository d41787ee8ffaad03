"""Meshes (data / tensor / expert), placing params and batches on them, and multi-host start.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_jax.args import ModelArgs
from mistral_jax.cache import init_cache
from mistral_jax.errors import UserInputError
from mistral_jax.model import abstract_params, init_params, logical_axes, param_logical_axes
from mistral_jax.partitioning import CACHE_AXES, MESH_AXES, RULES, logical_to_spec
from mistral_jax.tree import flatten, unflatten


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


@functools.lru_cache(maxsize=8)
def _declared(args: ModelArgs) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple]]:
    """path -> (shape, logical axes) of every declared weight (cached: ~seconds for 56 layers)."""
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
    quantization scales and unmerged LoRA factors get the axes `model.param_logical_axes`
    gives them. `params` may hold arrays or ShapeDtypeStructs."""
    declared = _declared(args)
    flat = flatten(params)
    if set(flat) <= set(declared):
        logical = {p: declared[p][1] for p in flat}
    else:
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


def place_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array; each process copies only its addressable shards."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_fn(args: ModelArgs, mesh: Mesh) -> Callable[[tuple[str, ...], np.ndarray], jax.Array]:
    """`place(path, host_array)` for `load.load_params`: each leaf straight onto its shards.

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
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    init = jax.jit(lambda k: init_params(args, k, dtype), out_shardings=param_shardings(args, mesh))
    return init(key)


def init_cache_sharded(args: ModelArgs, mesh: Mesh, batch_size: int, max_seq_len: int,
                       dtype: Any = jnp.bfloat16):
    """`cache.init_cache` created directly in its shards (k/v [B, K, S, Hd], pos [B, S])."""
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
