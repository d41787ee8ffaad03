"""`python -m mistral_jax.sharding FOLDER --mesh SPEC`: the memory a mesh needs, planned.

Reads only the folder's configs (no weights, no devices). The mesh itself, the rules and
placement live in `mistral_jax.mesh` and `mistral_jax.partitioning`; their public names
are re-exported here, where earlier versions defined them (docs/design/sharding.md).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mistral_jax.args import ModelArgs
from mistral_jax.cli.common import run as run_command
from mistral_jax.compressed_tensors import read_compressed_tensors
from mistral_jax.config import load_args
from mistral_jax.dtypes import resolve_dtype
from mistral_jax.errors import UserInputError
from mistral_jax.mesh import (
    initialize_distributed,
    make_mesh,
    param_shardings,
    param_specs,
    parse_mesh_spec,
    place_params,
    shard_batch,
    tree_specs,
)
from mistral_jax.model import abstract_params
from mistral_jax.orbax_restore import folder_quantization, is_converted, restored_abstract
from mistral_jax.partitioning import CACHE_AXES, MESH_AXES, RULES, logical_to_spec, mesh_sizes
from mistral_jax.quantize import MODES, quantize_params
from mistral_jax.tree import flatten

# The public sharding API, defined in mesh.py and partitioning.py, importable from here too.
__all__ = ["CACHE_AXES", "MESH_AXES", "RULES", "bytes_per_device_plan", "initialize_distributed",
           "logical_to_spec", "main", "make_mesh", "mesh_sizes", "param_shardings", "param_specs",
           "parse_mesh_spec", "place_params", "planned_params", "shard_batch", "tree_specs"]


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
    return quantize_params(abstract_params(args, dtype), quantize)


def _main(argv: Sequence[str] | None = None) -> int:
    """`python -m mistral_jax.sharding FOLDER --mesh SPEC`: per-device memory of a mesh.

    Reads only the folder's configs (params.json / config.json, a converted folder's
    manifest; no weights, no devices needed), so a mesh can be checked before downloading
    or loading a model. Quantized folders (converted, compressed-tensors) count their
    8-bit weights; `--quantize` plans a load that quantizes.
    """
    p = argparse.ArgumentParser(prog="python -m mistral_jax.sharding",
                                description=_main.__doc__.splitlines()[0])
    p.add_argument("folder", help="model folder with params.json or config.json")
    p.add_argument("--mesh", required=True, help="e.g. 'tensor=8' or 'tensor=8,expert=2'")
    p.add_argument("--dtype", default="bfloat16", help="weights and KV cache dtype")
    p.add_argument("--quantize", choices=list(MODES),
                   help="plan a load that quantizes (as from_folder(quantize=...))")
    ns = p.parse_args(argv)
    args, _ = load_args(ns.folder)
    sizes = parse_mesh_spec(ns.mesh)
    dtype = resolve_dtype(ns.dtype)
    params = planned_params(ns.folder, args, dtype, ns.quantize)
    plan = bytes_per_device_plan(args, sizes, dtype, params)
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


def main(argv: Sequence[str] | None = None) -> int:
    """The command; an error a user can act on is one line `error: ...` and exit status 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
