"""Quantized conversions (mistral_jax/convert.py): `--quantize int8|fp8|fp8-tensor` writes the
tree `Transformer.from_folder(src, quantize=mode)` builds, bit for bit; compressed-tensors
sources are written as stored; both restore quantized, onto a mesh too; errors are clear;
folders written before quantization existed still load."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from helpers import (
    random_mistral_state,
    run_on_cpu_devices,
    tiny_args,
    tiny_moe_args,
    write_hf_folder,
    write_mistral_folder,
)
from test_lora import random_adapter, write_adapter
from test_quant import write_compressed_tensors

from convert.safetensors_to_orbax import main
from mistral_jax.convert import convert
from mistral_jax.errors import UserInputError
from mistral_jax.orbax_restore import MANIFEST, read_manifest, restore_params, stored_quantization
from mistral_jax.transformer import Transformer
from mistral_jax.tree import flatten

ROOT = Path(__file__).resolve().parent.parent
TOKENS = np.array([[1, 7, 42, 300, 5, 11, 2], [3, 9, 200, 17, 64, 8, 1]])
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
STORAGE = {"int8": np.dtype(np.int8), "fp8": E4M3, "fp8-tensor": E4M3}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny random checkpoints: dense in the Mistral layout, MoE in the HF layout (2 shards)."""
    root = tmp_path_factory.mktemp("sources")
    dense, moe = tiny_args(vocab_size=512), tiny_moe_args()
    return {"dense": write_mistral_folder(root / "dense", dense, random_mistral_state(dense, 3)),
            "moe": write_hf_folder(root / "moe", moe, random_mistral_state(moe, 3), shards=2)}


def assert_same_tree(got, want):
    """Same paths, dtypes, shapes and bits."""
    fg, fw = flatten(got), flatten(want)
    assert fg.keys() == fw.keys(), sorted(set(fg) ^ set(fw))
    for p in fg:
        a, b = np.asarray(fg[p]), np.asarray(fw[p])
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (p, a.dtype, b.dtype)
        assert np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}")), p


def _chunk_bytes(dst: Path) -> int:
    return sum(f.stat().st_size for f in (dst / "params").rglob("*") if f.name[0].isdigit())


@pytest.mark.parametrize("kind,mode", [("dense", "int8"), ("dense", "fp8"), ("moe", "int8"),
                                       ("moe", "fp8"), ("moe", "fp8-tensor")])
def test_quantized_conversion_equals_quantizing_at_load(sources, tmp_path, kind, mode):
    src, dst = sources[kind], tmp_path / "q"
    assert main([str(src), str(dst), "--quantize", mode, "--verify", "--quiet"]) == 0
    direct = Transformer.from_folder(src, quantize=mode)  # bfloat16, quantized as it loads
    converted = Transformer.from_folder(dst)
    assert_same_tree(converted.params, direct.params)
    assert np.array_equal(np.asarray(converted.logits(TOKENS)), np.asarray(direct.logits(TOKENS)))

    flat = flatten(converted.params)
    kernels = [p for p in flat if p[-1] in ("kernel", "w1", "w2", "w3") and p[0] != "output"
               and "gate" not in p]
    assert kernels and all(flat[p].dtype == STORAGE[mode] for p in kernels)
    scales = [p for p in flat if p[-1].endswith("scale")]
    assert len(scales) == len(kernels) and all(flat[p].dtype == np.float32 for p in scales)
    assert flat[("embedding",)].dtype == flat[("output", "kernel")].dtype == ml_dtypes.bfloat16

    manifest = read_manifest(dst)
    assert manifest["quantization"] == {"mode": mode} == stored_quantization(dst)
    assert manifest["dtype"] == "bfloat16"
    for p, x in flat.items():
        assert manifest["leaves"][".".join(p)]["dtype"] == np.dtype(x.dtype).name
    # The disk check and totals count each leaf in its own dtype.
    plain = convert(src, tmp_path / "plain", dtype="bfloat16")
    assert manifest["bytes"] == _chunk_bytes(dst) < plain.bytes_written


def test_restoring_in_another_dtype_casts_only_the_unquantized_leaves(sources, tmp_path):
    src, dst = sources["moe"], tmp_path / "q"
    stats = convert(src, dst, dtype="bfloat16", quantize="int8")
    assert "(int8)" in stats.summary()
    stored = Transformer.from_folder(dst).params
    up = restore_params(dst, Transformer.from_folder(src).args, "float32")
    flat_up, flat_stored = flatten(up), flatten(stored)
    for p, x in flat_stored.items():
        keep = x.dtype == np.int8 or p[-1].endswith("scale")  # int8 kernels, float32 scales
        want = np.asarray(x) if keep else np.asarray(x).astype(np.float32)
        got = np.asarray(flat_up[p])
        assert got.dtype == want.dtype and np.array_equal(got, want), p


@pytest.mark.parametrize("kind,weights,strategy,activations",
                         [("dense", "float", "channel", "static"),
                          ("dense", "int", "tensor", None),
                          ("moe", "float", "channel", "dynamic")])
def test_compressed_tensors_source_is_written_as_stored(tmp_path, kind, weights, strategy,
                                                       activations):
    args = tiny_args(vocab_size=512) if kind == "dense" else tiny_moe_args()
    ct, _ = write_compressed_tensors(tmp_path / "ct", args, random_mistral_state(args, seed=5),
                                     weights=weights, strategy=strategy, activations=activations)
    dst = tmp_path / "converted"
    assert main([str(ct), str(dst), "--dtype", "float32", "--verify", "--quiet"]) == 0
    direct = Transformer.from_folder(ct, dtype="float32")
    converted = Transformer.from_folder(dst, dtype="float32")
    assert_same_tree(converted.params, direct.params)  # never dequantized
    assert np.array_equal(np.asarray(converted.logits(TOKENS)), np.asarray(direct.logits(TOKENS)))
    flat = flatten(converted.params)
    want = E4M3 if weights == "float" else np.dtype(np.int8)
    assert flat[("layers_0", "attention", "wq", "kernel")].dtype == want
    n_input_scales = sum(p[-1].endswith("input_scale") for p in flat)  # experts: w1_input_scale
    assert n_input_scales == (0 if activations is None else 7 * args.n_layers)
    if kind == "moe":  # dynamic per token, one [E] leaf per stacked weight
        assert flat[("layers_0", "feed_forward", "w2_input_scale")].shape == (
            args.moe.num_experts,)
    quantization = stored_quantization(dst)
    assert quantization["mode"] == "compressed-tensors"
    assert quantization["weight_dtype"] == want.name
    assert quantization["activations"] == activations
    # Restored in bfloat16: only the unquantized leaves change dtype.
    bf16 = flatten(Transformer.from_folder(dst).params)
    assert bf16[("layers_0", "attention", "wq", "kernel")].dtype == want
    assert bf16[("layers_0", "attention", "wq", "scale")].dtype == np.float32
    assert bf16[("embedding",)].dtype == ml_dtypes.bfloat16


def test_lora_on_a_converted_quantized_folder_loads_as_on_its_source(tmp_path):
    """Merged into the quantized kernels (requantized), or attached unmerged, as for the
    compressed-tensors source itself."""
    args = tiny_args(vocab_size=512)
    ct, _ = write_compressed_tensors(tmp_path / "ct", args, random_mistral_state(args, seed=5))
    adapter = write_adapter(tmp_path / "a" / "lora.safetensors", random_adapter(args, seed=1))
    dst = tmp_path / "converted"
    convert(ct, dst, dtype="float32")
    for merge in (True, False):
        got = Transformer.from_folder(dst, dtype="float32", lora_path=adapter, lora_merge=merge)
        want = Transformer.from_folder(ct, dtype="float32", lora_path=adapter, lora_merge=merge)
        assert_same_tree(got.params, want.params)


def test_quantize_errors_are_clear(sources, tmp_path, capsys):
    args = tiny_args(vocab_size=512)
    ct, _ = write_compressed_tensors(tmp_path / "ct", args, random_mistral_state(args, seed=5))
    with pytest.raises(UserInputError, match="already quantized .*compressed-tensors"):
        convert(ct, tmp_path / "out", quantize="int8")
    assert main([str(ct), str(tmp_path / "out"), "--quantize", "fp8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "without --quantize" in err and err.count("\n") == 1
    with pytest.raises(UserInputError, match="quantize must be one of"):
        convert(sources["dense"], tmp_path / "out", quantize="int4")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main([str(sources["dense"]), str(tmp_path / "out"), "--quantize", "int4"])
    # A quantized converted folder refuses quantize= (any mode, the stored one included).
    dst = tmp_path / "q"
    convert(sources["dense"], dst, quantize="fp8")
    for mode in ("fp8", "int8"):
        with pytest.raises(UserInputError, match=r"already quantized \(fp8\).*without quantize="):
            Transformer.from_folder(dst, quantize=mode)
    convert(ct, tmp_path / "ct_converted")
    with pytest.raises(UserInputError, match="already quantized"):
        Transformer.from_folder(tmp_path / "ct_converted", quantize="int8")


def test_folders_converted_before_quantization_existed_still_load(sources, tmp_path):
    """A manifest without the `quantization` field and per-leaf dtypes: unquantized, in its
    `dtype`; quantize= still quantizes such a folder as it loads."""
    src, dst = sources["moe"], tmp_path / "old"
    convert(src, dst, dtype="bfloat16")
    manifest = json.loads((dst / MANIFEST).read_text())
    del manifest["quantization"]
    for leaf in manifest["leaves"].values():
        del leaf["dtype"]
    (dst / MANIFEST).write_text(json.dumps(manifest))
    assert stored_quantization(dst) is None
    assert_same_tree(Transformer.from_folder(dst).params, Transformer.from_folder(src).params)
    assert_same_tree(Transformer.from_folder(dst, quantize="int8").params,
                     Transformer.from_folder(src, quantize="int8").params)


MESH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from mistral_jax.transformer import Transformer
    from mistral_jax import sharding
    from mistral_jax.tree import flatten
    from mistral_jax.orbax_restore import restore_params

    src, dst = sys.argv[1], sys.argv[2]
    spec = "data=2,tensor=2,expert=2"
    converted = Transformer.from_folder(dst, dtype="float32", mesh=spec)
    direct = Transformer.from_folder(src, dtype="float32", quantize="int8", mesh=spec)
    fc, fd = flatten(converted.params), flatten(direct.params)
    assert fc.keys() == fd.keys()
    for p in fc:
        a, b = fc[p], fd[p]
        assert a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, a.ndim), (
            p, a.sharding, b.sharding)
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)), p
    scale = fc[("layers_0", "feed_forward", "w1_scale")]
    assert tuple(scale.sharding.spec) == ("expert", "tensor"), scale.sharding.spec
    tokens = np.array([[1, 7, 42, 300, 5, 11, 2]] * 2)
    assert np.array_equal(np.asarray(converted.logits(tokens)), np.asarray(direct.logits(tokens)))
    # Shardings of the declared weights only: each scale follows its kernel's mesh.
    mesh, args = converted.mesh, converted.args
    for shardings in (sharding.param_shardings(args, mesh), mesh):
        restored = flatten(restore_params(dst, args, "float32", shardings))
        for p, a in restored.items():
            assert a.sharding.is_equivalent_to(fc[p].sharding, a.ndim), (p, a.sharding)
    print("OK")
""")


def test_quantized_folder_restores_onto_a_mesh_with_the_shardings_of_quantize_at_load(
        sources, tmp_path):
    """8 CPU devices as data=2 x tensor=2 x expert=2, MoE int8: each leaf (scales included)
    arrives with the sharding loading the source with quantize='int8' gives it."""
    src, dst = sources["moe"], tmp_path / "q"
    convert(src, dst, dtype="float32", quantize="int8")
    out = run_on_cpu_devices("-c", MESH_SCRIPT, str(src), str(dst), cwd=ROOT, timeout=300)
    assert out.startswith("OK")


def test_quantized_folder_restores_with_orbax_standard_checkpointer(sources, tmp_path):
    orbax = pytest.importorskip("orbax.checkpoint")
    dst = tmp_path / "q"
    convert(sources["moe"], dst, quantize="fp8")
    model = Transformer.from_folder(dst)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          model.params)
    restored = orbax.StandardCheckpointer().restore((dst / "params").absolute(), target)
    assert_same_tree(restored, model.params)


W8A8_MESH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from mistral_jax.transformer import Transformer
    from mistral_jax.tree import flatten

    src, dst = sys.argv[1], sys.argv[2]
    spec = "data=2,tensor=2,expert=2"
    one = Transformer.from_folder(src, dtype="float32")
    direct = Transformer.from_folder(src, dtype="float32", mesh=spec)
    converted = Transformer.from_folder(dst, dtype="float32", mesh=spec)
    fc, fd = flatten(converted.params), flatten(direct.params)
    assert fc.keys() == fd.keys() == flatten(one.params).keys()
    for p in fc:
        a, b = fc[p], fd[p]
        assert a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, a.ndim), (
            p, a.sharding, b.sharding)
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}")), p
    s = fc[("layers_0", "feed_forward", "w1_input_scale")]
    assert s.shape == (4,) and tuple(s.sharding.spec) == ("expert",), s.sharding.spec
    tokens = np.array([[1, 7, 42, 300, 5, 11, 2]] * 2)
    want = np.asarray(one.logits(tokens), np.float64)
    for model in (direct, converted):
        got = np.asarray(model.logits(tokens), np.float64)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-5, err
    print("OK")
""")


def test_w8a8_mixtral_folder_on_a_mesh_equals_one_device(tmp_path):
    """An FP8-dynamic compressed-tensors Mixtral, as stored and converted, on 8 CPU devices
    (data=2 x tensor=2 x expert=2): the experts' [E] input_scale leaves are split with their
    experts and the logits equal one device's (each token's scale of w2's input is the
    max over the F halves the tensor pair holds)."""
    args = tiny_moe_args()
    ct, _ = write_compressed_tensors(tmp_path / "ct", args, random_mistral_state(args, seed=5),
                                     activations="dynamic")
    dst = tmp_path / "converted"
    convert(ct, dst, dtype="float32")
    out = run_on_cpu_devices("-c", W8A8_MESH_SCRIPT, str(ct), str(dst), cwd=ROOT, timeout=300)
    assert out.startswith("OK")
