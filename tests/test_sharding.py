"""Tensor / expert / data parallelism: sharding rules, meshes, and 8-device runs.

The rule and mesh tests run in this process (one CPU device; rules are checked against
mesh sizes given as dicts). The 8-device tests run `sharding_worker.py meshes` once, in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (JAX reads it at
start), and check every mesh's logits, greedy tokens and per-device bytes against the
single-device run of the same weights.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import (
    random_mistral_state,
    rel_err,
    run_on_cpu_devices,
    tiny_args,
    tiny_moe_args,
    write_mistral_folder,
)
from jax.sharding import Mesh, PartitionSpec
from sharding_worker import DECODE_HLO_MESHES, DENSE_MESHES, MOE_MESHES, tiny_models

from mistral_jax.args import MoeArgs
from mistral_jax.errors import ConfigError, UserInputError
from mistral_jax.mesh import (
    cache_shardings,
    initialize_distributed,
    make_mesh,
    param_specs,
    parse_mesh_spec,
    resolve_mesh,
    tree_specs,
)
from mistral_jax.transformer import Transformer

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"
P = PartitionSpec


# ----------------------------------------------------------------------------- mesh specs


def test_mesh_spec_sizes_with_absent_axes_of_size_one():
    assert parse_mesh_spec("data=1,tensor=4,expert=2") == {"data": 1, "tensor": 4, "expert": 2}
    assert parse_mesh_spec(" tensor = 8 ") == {"data": 1, "tensor": 8, "expert": 1}


@pytest.mark.parametrize("spec, message", [
    ("model=4", "unknown axis 'model'"),
    ("tensor=4,tensor=2", "given twice"),
    ("tensor:4", "cannot parse 'tensor:4'"),
    ("tensor=0", "size >= 1"),
    ("", "mesh spec must look like"),
])
def test_bad_mesh_spec_is_a_user_error_naming_the_problem(spec, message):
    with pytest.raises(UserInputError, match=message):
        parse_mesh_spec(spec)


def test_mesh_must_use_every_device():
    with pytest.raises(UserInputError, match=r"needs 2 devices but 1 are available"):
        make_mesh("tensor=2")


def test_default_mesh_puts_every_device_along_tensor():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "tensor", "expert")
    assert dict(mesh.shape) == {"data": 1, "tensor": jax.device_count(), "expert": 1}
    assert resolve_mesh("auto").shape == mesh.shape
    assert resolve_mesh(None) is None


def test_user_mesh_must_name_data_tensor_expert_axes():
    with pytest.raises(UserInputError, match="mesh axis 'model'"):
        resolve_mesh(Mesh(np.array(jax.devices()[:1]), ("model",)))
    own = Mesh(np.array(jax.devices()[:1]), ("tensor",))
    assert resolve_mesh(own) is own


# ----------------------------------------------------------------------------- rules


MESH = {"data": 2, "tensor": 4, "expert": 2}


def test_rules_split_heads_and_hidden_along_tensor_and_experts_along_expert():
    dense = param_specs(tiny_args(n_heads=8, n_kv_heads=4), MESH)
    attn, ffn = dense["layers_0"]["attention"], dense["layers_0"]["feed_forward"]
    assert attn["wq"]["kernel"] == P(None, "tensor", None)  # column-parallel in
    assert attn["wk"]["kernel"] == P(None, "tensor", None)
    assert attn["wo"]["kernel"] == P("tensor", None, None)  # row-parallel out
    assert ffn["w1"]["kernel"] == P(None, "tensor") and ffn["w3"]["kernel"] == P(None, "tensor")
    assert ffn["w2"]["kernel"] == P("tensor", None)
    assert dense["embedding"] == P("tensor", None)  # over the vocabulary
    assert dense["output"]["kernel"] == P(None, "tensor")
    assert dense["norm"]["weight"] == P(None)
    moe = param_specs(tiny_moe_args(moe=MoeArgs(4, 2)), MESH)["layers_0"]["feed_forward"]
    assert moe["w1"] == P("expert", None, "tensor") and moe["w2"] == P("expert", "tensor", None)
    assert moe["gate"]["kernel"] == P(None, None)


def test_fewer_kv_heads_than_tensor_devices_are_replicated_not_an_error():
    args = tiny_args(n_heads=16, n_kv_heads=8)
    mesh = {"tensor": 16}
    attn = param_specs(args, mesh)["layers_0"]["attention"]
    assert attn["wq"]["kernel"] == P(None, "tensor", None)
    assert attn["wk"]["kernel"] == P(None, None, None) == attn["wv"]["kernel"]
    devices = np.array(jax.devices()[:1])
    cache = cache_shardings(args, Mesh(devices.reshape(1, 1, 1), ("data", "tensor", "expert")), 4)
    assert cache[0]["k"].spec == P(None, None, None, None)  # size-1 axes split nothing
    from mistral_jax.partitioning import logical_to_spec

    assert logical_to_spec((4, 32, 8, 16), ("batch", "cache_len", "kv_heads", "head_dim"),
                           {"data": 2, "tensor": 16}, what="cache") == P("data", None, None, None)
    assert logical_to_spec((4, 32, 8, 16), ("batch", "cache_len", "kv_heads", "head_dim"),
                           {"data": 3, "tensor": 4}, what="cache") == P(None, None, "tensor", None)


@pytest.mark.parametrize("args, mesh, names", [
    (tiny_args(n_heads=4, n_kv_heads=2), {"tensor": 8}, ("n_heads=4", "'q_heads'", "'tensor'")),
    (tiny_args(n_heads=8, hidden_dim=100), {"tensor": 8}, ("hidden_dim=100", "'mlp'", "'tensor'")),
    (tiny_moe_args(moe=MoeArgs(4, 2)), {"expert": 8}, ("moe.num_experts=4", "'expert' of size 8")),
])
def test_indivisible_split_is_a_config_error_naming_axis_and_parameter(args, mesh, names):
    with pytest.raises(ConfigError) as e:
        param_specs(args, mesh)
    for name in names:
        assert name in str(e.value)
    assert "layers_0/" in str(e.value)


def test_quantization_scales_get_the_output_axes_of_their_kernel():
    from mistral_jax.model import abstract_params
    from mistral_jax.quantize import quantize_params

    args = tiny_args(n_heads=8, n_kv_heads=4)
    specs = tree_specs(quantize_params(abstract_params(args), "int8"), args, {"tensor": 4})
    attn = specs["layers_0"]["attention"]
    assert attn["wq"]["kernel"] == P(None, "tensor", None)
    assert attn["wq"]["scale"] == P("tensor", None)
    assert attn["wo"]["scale"] == P(None)


# ----------------------------------------------------------------------------- runtime


def test_initialize_distributed_needs_all_three_settings_or_none(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False  # single host: nothing to join
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(UserInputError, match="coordinator address .* process id"):
        initialize_distributed()
    with pytest.raises(UserInputError, match="process id 2 must be in"):
        initialize_distributed("10.0.0.1:1234", process_id=2)
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(UserInputError, match="JAX_PROCESS_ID='one'"):
        initialize_distributed("10.0.0.1:1234")


def test_random_weights_computed_into_their_shards_equal_unsharded_ones():
    args = tiny_args(n_layers=1, vocab_size=64, dim=32, hidden_dim=64)
    meshed = Transformer.random(args, seed=5, mesh="auto")
    plain = Transformer.random(args, seed=5)
    assert meshed.mesh is not None
    for a, b in zip(jax.tree.leaves(meshed.params), jax.tree.leaves(plain.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.mesh is meshed.mesh


def test_model_on_a_one_device_mesh_equals_the_unsharded_model(tmp_path):
    args = tiny_moe_args(n_layers=1, vocab_size=256)
    folder = write_mistral_folder(tmp_path / "m", args, random_mistral_state(args, 3))
    plain = Transformer.from_folder(folder, dtype="float32")
    meshed = Transformer.from_folder(folder, dtype="float32", mesh="auto")
    assert meshed.mesh is not None and plain.mesh is None
    tokens = np.arange(12).reshape(2, 6) % args.vocab_size
    np.testing.assert_array_equal(np.asarray(meshed.logits(tokens)),
                                  np.asarray(plain.logits(tokens)))


# ----------------------------------------------------------------------------- 8 devices


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """Results of `sharding_worker.py meshes` (one subprocess for every mesh and model).

    Run once per test session even under pytest-xdist: the workers share the session's
    temp folder, and the first to get the lock runs the subprocess for all of them.
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "sharding_eight_devices.json"
    with open(shared / "sharding_eight_devices.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_file():
            partial = out.with_suffix(".partial")
            run_on_cpu_devices(str(WORKER), "meshes", str(partial), timeout=900)
            partial.rename(out)
    return json.loads(out.read_text())


CASES = [("dense", m) for m in DENSE_MESHES] + [("moe", m) for m in MOE_MESHES]


@pytest.mark.slow
@pytest.mark.parametrize("model, spec", CASES)
def test_logits_and_greedy_tokens_on_a_mesh_equal_one_device(eight_devices, model, spec):
    ref, run = eight_devices[model]["reference"], eight_devices[model]["runs"][spec]
    assert rel_err(run["logits"], ref["logits"]) <= 1e-5
    assert run["tokens"] == ref["tokens"]
    assert all(len(t) == 5 for t in run["tokens"])


@pytest.mark.slow
@pytest.mark.parametrize("model, spec", CASES)
def test_each_device_holds_only_its_shard(eight_devices, model, spec):
    run = eight_devices[model]["runs"][spec]
    mesh = run["mesh"]
    specs = param_specs(dict(tiny_models())[model], mesh)
    split, per_device = 0, 0
    for name, leaf in run["leaves"].items():
        spec_of = specs
        for k in name.split("/"):
            spec_of = spec_of[k]
        parts = math.prod(mesh[a] for a in spec_of if a is not None)
        split += parts > 1
        # every shard on every device holds exactly total / parts bytes of this leaf
        assert leaf["shards"] == [leaf["total"] // parts], (name, spec_of, leaf)
        per_device += leaf["total"] // parts
    assert split >= 3  # at least the feed-forward (or stacked expert) weights
    assert run["n_devices"] == math.prod(mesh.values())
    assert run["device_bytes"] == [per_device] * run["n_devices"]


@pytest.mark.slow
def test_big_splits_cut_the_weights_per_device(eight_devices):
    moe = eight_devices["moe"]["runs"]["expert=8"]["leaves"]
    w1 = moe["layers_0/feed_forward/w1"]
    assert w1["shards"] == [w1["total"] // 8]
    dense = eight_devices["dense"]["runs"]["tensor=8"]["leaves"]
    wq, wk = dense["layers_0/attention/wq/kernel"], dense["layers_0/attention/wk/kernel"]
    assert wq["shards"] == [wq["total"] // 8]
    assert wk["shards"] == [wk["total"]]  # 2 KV heads on 8 devices: replicated


@pytest.mark.slow
def test_kv_cache_is_split_like_its_heads(eight_devices):
    runs = eight_devices["dense"]["runs"]
    assert runs["tensor=2"]["cache_k_spec"] == [None, "tensor", None, None]  # [B, K, S, Hd]
    assert runs["tensor=8"]["cache_k_spec"] == [None, None, None, None]  # 2 KV heads
    mixed = eight_devices["moe"]["runs"]["data=2,tensor=2,expert=2"]["cache_k_spec"]
    assert mixed == ["data", "tensor", None, None]


@pytest.mark.slow
def test_sample_cli_with_mesh_flag_prints_the_single_device_text(eight_devices):
    from sharding_worker import CLI_MESH

    one, meshed = eight_devices["cli"]["None"], eight_devices["cli"][CLI_MESH]
    assert one["status"] == 0 and meshed["status"] == 0, (one["stderr"], meshed["stderr"])
    assert meshed["stdout"].strip() and meshed["stdout"] == one["stdout"]


@pytest.mark.parametrize("flag, message", [
    ("tensor=2", "needs 2 devices but 1 are available"),
    ("model=2", "unknown axis 'model'"),
])
def test_sample_cli_rejects_a_bad_mesh_in_one_line(flag, message, capsys):
    from mistral_jax import sample

    assert sample.main(["--prompt", "x", "--max-tokens", "2", "--mesh", flag]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the demo-model notice
    assert last.startswith("error: --mesh: ") and message in last


@pytest.mark.slow
def test_converted_checkpoint_restores_straight_into_shards(eight_devices):
    from sharding_worker import CONVERTED_MESH

    runs = eight_devices["moe"]["runs"]
    restored, loaded = runs["converted"], runs[CONVERTED_MESH]
    assert restored["mesh"] == loaded["mesh"]
    assert restored["leaves"] == loaded["leaves"]  # same shard sizes on every device
    np.testing.assert_array_equal(restored["logits"], loaded["logits"])
    assert rel_err(restored["logits"], eight_devices["moe"]["reference"]["logits"]) <= 1e-5


def test_memory_plan_divides_the_split_weights_and_names_bad_meshes(tmp_path, capsys):
    from mistral_jax.config import args_to_params_json
    from mistral_jax.sharding import bytes_per_device_plan, main

    args = tiny_moe_args(n_heads=8, n_kv_heads=2, moe=MoeArgs(8, 2))
    one = bytes_per_device_plan(args, {"tensor": 1}, np.float32)
    assert one["params"] == one["params_total"] == args.n_params * 4
    plan = bytes_per_device_plan(args, {"tensor": 2, "expert": 4}, np.float32)
    L, D, V = args.n_layers, args.dim, args.vocab_size
    experts = 3 * L * 8 * D * args.hidden_dim * 4  # over expert=4 x tensor=2
    split_by_tensor = 2 * V * D * 4 + L * D * args.head_dim * (2 * 8 + 2 * 2) * 4
    replicated = L * D * 8 * 4 + (2 * L + 1) * D * 4  # gates and norms
    assert experts + split_by_tensor + replicated == one["params"]
    assert plan["params"] == experts // 8 + split_by_tensor // 2 + replicated
    assert plan["kv_per_token"] == one["kv_per_token"] // 2  # 2 KV heads over tensor=2
    (tmp_path / "params.json").write_text(json.dumps(args_to_params_json(args)))
    assert main([str(tmp_path), "--mesh", "tensor=2,expert=4", "--dtype", "float32"]) == 0
    assert f"{plan['params'] / 1024 ** 3:.2f} GiB per device" in capsys.readouterr().out
    assert main([str(tmp_path), "--mesh", "expert=16"]) == 2
    assert "moe.num_experts=8" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("model, spec", [c for c in CASES if c[1] in DECODE_HLO_MESHES])
def test_decode_step_moves_activations_never_weights(eight_devices, model, spec):
    """Every collective of a compiled decode step is at most [B, D] activations: the
    weights, experts included, are never gathered (the smallest split weight here is
    larger than that)."""
    args = dict(tiny_models())[model]
    found = eight_devices[model]["runs"][spec]["decode_collectives"]
    assert any(op == "all-reduce" for op, _ in found)  # the row-parallel sums are there
    batch_size = 4
    assert all(n <= batch_size * max(args.dim, 8) for _, n in found), found
    assert batch_size * args.dim < args.dim * args.hidden_dim // 8
