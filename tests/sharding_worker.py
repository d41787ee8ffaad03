"""Subprocess side of test_sharding.py / test_multihost.py (JAX must see its devices at start).

    python tests/sharding_worker.py meshes OUT.json
        8 host CPU devices (the parent sets XLA_FLAGS): dense and MoE tiny models loaded
        onto every mesh in MESHES; writes logits, greedy tokens and per-device bytes.
    python tests/sharding_worker.py multihost OUT.json FOLDER --coordinator H:P
            --num-processes N --process-id I
        one process of a multi-process run (4 CPU devices each); process 0 writes the
        logits and greedy tokens of FOLDER's model under MULTIHOST_MESHES.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

DENSE_MESHES = ("tensor=2", "tensor=4", "tensor=8")
MOE_MESHES = ("expert=2", "expert=4", "expert=8", "tensor=4,expert=2", "data=2,tensor=2,expert=2")
DECODE_HLO_MESHES = ("tensor=8", "expert=8", "data=2,tensor=2,expert=2")
CONVERTED_MESH = "tensor=4,expert=2"  # same shardings as that MOE_MESHES run: no new compile
CLI_MESH = "data=2,tensor=4"  # the built-in demo model has 4 heads
MULTIHOST_MESHES = ("tensor=4,expert=2",)  # as the README runs 8x22B on 2 hosts: tensor=8,expert=2
MAX_TOKENS = 5


def tiny_models():
    """(name, args) of the two models: 8 query heads, 2 KV heads (replicated from tensor=4)."""
    from helpers import tiny_args, tiny_moe_args

    from mistral_jax.args import MoeArgs

    common = dict(n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=512)
    return (("dense", tiny_args(**common)),
            ("moe", tiny_moe_args(moe=MoeArgs(num_experts=8, num_experts_per_tok=2), **common)))


def batch(vocab_size: int) -> tuple[np.ndarray, list[list[int]]]:
    """tokens [2, 8] for logits, and 2 prompts of different lengths for generation."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, vocab_size, (2, 8)).astype(np.int32)
    prompts = [rng.integers(0, vocab_size, n).tolist() for n in (3, 6)]
    return tokens, prompts


def run(model, tokens, prompts) -> dict:
    from mistral_jax.generate import generate

    logits = np.asarray(model.logits(tokens))
    generated, _ = generate(prompts, model, max_tokens=MAX_TOKENS)
    return {"logits": logits.tolist(), "tokens": generated}


def leaf_report(model) -> dict:
    """Per leaf: total bytes, the bytes of each addressable shard, and the per-device total."""
    import jax


    leaves = {}
    for path, x in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        name = "/".join(k.key for k in path)
        leaves[name] = {"total": int(x.nbytes),
                        "shards": sorted({int(s.data.nbytes) for s in x.addressable_shards})}
    per_device = bytes_per_device(model.params)
    return {"leaves": leaves, "device_bytes": sorted(per_device.values()),
            "n_devices": len(per_device)}


def bytes_per_device(tree) -> dict:
    """How many bytes of `tree`'s arrays each (addressable) device holds."""
    import jax

    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def decode_collectives(model, batch_size: int = 4) -> list[list]:
    """[op, element count] of each collective in the compiled decode step (one token per row)."""
    import re

    from mistral_jax.mesh import shard_batch
    from mistral_jax.partitioning import use_mesh
    from mistral_jax.transformer import jit_forward

    cache = model.init_cache(batch_size, 16)
    tokens, positions = shard_batch(model.mesh, np.ones((batch_size, 1), np.int32),
                                    np.full((batch_size, 1), 3, np.int32))
    with use_mesh(model.mesh):
        text = jit_forward.lower(model.params, tokens, positions, cache,
                                 args=model.args).compile().as_text()
    ops = "all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute"
    return [[m[2], int(np.prod([int(d) for d in m[1].split(",") if d]))]
            for m in re.finditer(rf"= \w+\[([\d,]*)\]\S* ({ops})(?:-start)?\(", text)]


def meshes(out: Path) -> None:
    import jax
    from helpers import random_mistral_state, write_mistral_folder

    from mistral_jax.mesh import make_mesh, parse_mesh_spec
    from mistral_jax.transformer import Transformer

    assert jax.device_count() == 8, jax.devices()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in tiny_models():
            folder = write_mistral_folder(Path(tmp) / name, args, random_mistral_state(args, 0))
            tokens, prompts = batch(args.vocab_size)
            start = time.process_time()
            reference = run(Transformer.from_folder(folder, dtype="float32"), tokens, prompts)
            runs = {}
            for spec in DENSE_MESHES if name == "dense" else MOE_MESHES:
                n = int(np.prod(list(parse_mesh_spec(spec).values())))
                mesh = spec if n == 8 else make_mesh(spec, jax.devices()[:n])
                model = Transformer.from_folder(folder, dtype="float32", mesh=mesh)
                cache = model.init_cache(4, 16)
                runs[spec] = {**run(model, tokens, prompts), **leaf_report(model),
                              "cache_k_spec": [a for a in cache[0]["k"].sharding.spec],
                              "mesh": dict(model.mesh.shape)}
                if spec in DECODE_HLO_MESHES:
                    runs[spec]["decode_collectives"] = decode_collectives(model)
            if name == "moe":  # a converted (Orbax) folder, restored shard by shard
                from mistral_jax.convert import convert

                convert(folder, Path(tmp) / "converted", dtype="float32")
                model = Transformer.from_folder(Path(tmp) / "converted", dtype="float32",
                                                mesh=CONVERTED_MESH)
                runs["converted"] = {"logits": np.asarray(model.logits(tokens)).tolist(),
                                     **leaf_report(model), "mesh": dict(model.mesh.shape)}
            results[name] = {"reference": reference, "runs": runs,
                             "cpu_s": time.process_time() - start}
    results["cli"] = {str(spec): sample_cli(spec) for spec in (None, CLI_MESH)}
    out.write_text(json.dumps(results))


def sample_cli(mesh: str | None, *extra: str) -> dict:
    """`python -m mistral_jax.sample` on the built-in demo model, greedy, with `--mesh`."""
    import contextlib
    import io

    from mistral_jax import sample

    argv = ["--prompt", "def add(a, b):", "--max-tokens", "8", "--temperature", "0",
            "--dtype", "float32", *extra] + ([] if mesh is None else ["--mesh", mesh])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = sample.main(argv)
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()[-2000:]}


def multihost(out: Path, folder: Path, coordinator: str, num_processes: int,
              process_id: int) -> None:
    # First the CLI, as the README runs it on each host: its flags join the processes.
    cli = sample_cli(MULTIHOST_MESHES[0], "--coordinator", coordinator, "--num-processes",
                     str(num_processes), "--process-id", str(process_id))
    import jax

    from mistral_jax.config import load_args
    from mistral_jax.transformer import Transformer

    args, _ = load_args(folder)
    tokens, prompts = batch(args.vocab_size)
    results = {"process_count": jax.process_count(), "device_count": jax.device_count(),
               "local_device_count": jax.local_device_count(), "runs": {}, "cli": cli}
    for spec in MULTIHOST_MESHES:
        model = Transformer.from_folder(folder, dtype="float32", mesh=spec)
        results["runs"][spec] = run(model, tokens, prompts)
    if process_id == 0:
        out.write_text(json.dumps(results))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("meshes", "multihost"))
    p.add_argument("out", type=Path)
    p.add_argument("folder", type=Path, nargs="?")
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    a = p.parse_args()
    if a.mode == "meshes":
        meshes(a.out)
    else:
        multihost(a.out, a.folder, a.coordinator, a.num_processes, a.process_id)


if __name__ == "__main__":
    main()
