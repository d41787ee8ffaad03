"""LoRA adapters: merged and unmerged agree, zeros change nothing, parity with
transformers + peft (PyTorch, float32), one base serving several adapters, and bad
adapters rejected with the offending key named."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from helpers import (
    random_mistral_state,
    rel_err,
    tiny_args,
    tiny_moe_args,
    torch_logits,
    torch_reference,
    write_hf_folder,
    write_mistral_folder,
)
from safetensors.numpy import save_file

from mistral_jax.args import LoraArgs
from mistral_jax.checkpoint import tensor_target
from mistral_jax.config import args_from_params_json
from mistral_jax.errors import CheckpointError, ConfigError
from mistral_jax.lora import attach_lora, detach_lora, merge_lora
from mistral_jax.lora_file import load_lora
from mistral_jax.quantize import quantize_params
from mistral_jax.transformer import Transformer
from mistral_jax.tree import flatten, sibling

RANK = 4
DENSE_MODULES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def module_shapes(args, module: str) -> tuple[int, int]:
    """(out_features, in_features) of a Mistral-layout module name such as 'attention.wq'."""
    d, hd, f = args.dim, args.head_dim, args.hidden_dim
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    return {"wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q), "w1": (f, d),
            "w3": (f, d), "w2": (d, f),
            "gate": (args.moe.num_experts if args.moe else 0, d)}[module.split(".")[-1]]


def random_adapter(args, seed: int = 0, rank: int = RANK, zeros: bool = False) -> dict:
    """Mistral-format adapter tensors for every linear layer (experts and gate for MoE)."""
    rng = np.random.default_rng(seed)
    modules = list(DENSE_MODULES[:4])
    if args.moe is None:
        modules += list(DENSE_MODULES[4:])
    else:
        modules += ["feed_forward.gate"] + [f"feed_forward.experts.{e}.{w}"
                                            for e in range(args.moe.num_experts)
                                            for w in ("w1", "w2", "w3")]
    out = {}
    for i in range(args.n_layers):
        for m in modules:
            n_out, n_in = module_shapes(args, m)
            a = rng.standard_normal((rank, n_in)) / np.sqrt(n_in)
            b = np.zeros((n_out, rank)) if zeros else 0.2 * rng.standard_normal((n_out, rank))
            out[f"layers.{i}.{m}.lora_A.weight"] = a.astype(np.float32)
            out[f"layers.{i}.{m}.lora_B.weight"] = b.astype(np.float32)
    return out


def write_adapter(path, tensors: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return str(path)


@pytest.fixture(scope="module", params=["dense", "moe"])
def base(request, tmp_path_factory):
    args = tiny_args(vocab_size=512) if request.param == "dense" else tiny_moe_args()
    root = tmp_path_factory.mktemp(request.param)
    folder = write_mistral_folder(root / "model", args, random_mistral_state(args, seed=3))
    adapter = write_adapter(root / "a1" / "lora.safetensors", random_adapter(args, seed=1))
    return args, folder, adapter, root


TOKENS = np.random.default_rng(5).integers(0, 512, (2, 20))


def test_merged_and_unmerged_adapters_give_the_same_logits(base):
    args, folder, adapter, _ = base
    merged = Transformer.from_folder(folder, dtype="float32", lora_path=adapter, lora_merge=True)
    unmerged = Transformer.from_folder(folder, dtype="float32", lora_path=adapter,
                                       lora_merge=False)
    plain = Transformer.from_folder(folder, dtype="float32")
    leaves = flatten(unmerged.params)
    assert any(p[-1].endswith("lora_a") for p in leaves)
    assert not any(p[-1].endswith("lora_a") for p in flatten(merged.params))
    got, want = unmerged.logits(TOKENS), merged.logits(TOKENS)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(plain.logits(TOKENS), want) > 1e-2  # the adapter does change the model


def test_an_adapter_of_zeros_changes_nothing(base, tmp_path):
    args, folder, _, _ = base
    zeros = write_adapter(tmp_path / "lora.safetensors", random_adapter(args, zeros=True))
    plain = np.asarray(Transformer.from_folder(folder, dtype="float32").logits(TOKENS))
    merged = Transformer.from_folder(folder, dtype="float32", lora_path=zeros, lora_merge=True)
    np.testing.assert_array_equal(np.asarray(merged.logits(TOKENS)), plain)
    unmerged = Transformer.from_folder(folder, dtype="float32", lora_path=zeros, lora_merge=False)
    assert rel_err(unmerged.logits(TOKENS), plain) <= 1e-6


def test_merge_equals_the_checkpoint_transform_of_scaling_b_at_a(base):
    """The kernel-layout delta is exactly W' - W of the [out, in] checkpoint weight."""
    args, folder, adapter, _ = base
    tensors = random_adapter(args, seed=1)
    lora = load_lora(adapter, args)
    params = Transformer.from_folder(folder, dtype="float32").params
    merged = flatten(merge_lora(params, lora))
    flat = flatten(params)
    for name in tensors:
        if not name.endswith("lora_A.weight"):
            continue
        stem = name[: -len(".lora_A.weight")]
        target = tensor_target(stem + ".weight", "mistral", args)
        delta = target.transform(2.0 * tensors[stem + ".lora_B.weight"] @ tensors[name])
        got = merged[target.path] - flat[target.path]
        if target.expert is not None:
            got = got[target.expert]
        np.testing.assert_allclose(np.asarray(got), delta, rtol=1e-4, atol=1e-6)


def test_one_base_serves_several_adapters(base, tmp_path):
    args, folder, adapter, _ = base
    other = write_adapter(tmp_path / "lora.safetensors", random_adapter(args, seed=9))
    model = Transformer.from_folder(folder, dtype="float32")
    first = attach_lora(model.params, load_lora(adapter, args))
    second = attach_lora(first, load_lora(other, args))  # replaces the first adapter
    kernel = ("layers_0", "attention", "wq", "kernel")
    assert flatten(second)[kernel] is flatten(model.params)[kernel]  # shared, not copied
    assert flatten(detach_lora(second)).keys() == flatten(model.params).keys()
    for params, path in ((first, adapter), (second, other)):
        want = Transformer.from_folder(folder, dtype="float32", lora_path=path).logits(TOKENS)
        assert rel_err(Transformer(args, params).logits(TOKENS), want) <= 1e-5


def test_params_json_lora_block_keeps_the_adapter_unmerged_with_its_scaling(base, tmp_path):
    args, folder, adapter, _ = base
    cfg = json.loads((folder / "params.json").read_text())
    cfg["lora"] = {"rank": RANK, "scaling": 0.5}
    lora_folder = tmp_path / "with_lora"
    lora_folder.mkdir()
    (lora_folder / "params.json").write_text(json.dumps(cfg))
    (lora_folder / "consolidated.safetensors").symlink_to(folder / "consolidated.safetensors")
    model = Transformer.from_folder(lora_folder, dtype="float32", lora_path=adapter)
    assert model.args.lora == LoraArgs(RANK, 0.5)
    assert sibling(("layers_0", "attention", "wq", "kernel"), "lora_a") in flatten(model.params)
    want = Transformer.from_folder(folder, dtype="float32", lora_path=adapter, lora_scaling=0.5)
    assert rel_err(model.logits(TOKENS), want.logits(TOKENS)) <= 1e-5


def test_merged_adapter_then_quantized_at_load_equals_quantizing_the_merged_model(base):
    args, folder, adapter, _ = base
    loaded = Transformer.from_folder(folder, dtype="float32", lora_path=adapter, quantize="int8")
    merged = Transformer.from_folder(folder, dtype="float32", lora_path=adapter)
    want = quantize_params(merged.params, "int8")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                                     loaded.params, want))


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of transformers' q/k row permutation (rotate-half -> interleaved)."""
    d1, d2 = w.shape
    return w.reshape(n_heads, 2, d1 // n_heads // 2, d2).transpose(0, 2, 1, 3).reshape(d1, d2)


def test_logits_match_transformers_with_a_peft_lora_float32(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    args = tiny_args(vocab_size=512, n_heads=4, n_kv_heads=2)
    state = random_mistral_state(args, seed=11)
    hf = write_hf_folder(tmp_path / "hf", args, state)
    mistral = write_mistral_folder(tmp_path / "mistral", args, state)
    torch.manual_seed(0)
    config = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"])
    peft_model = get_peft_model(torch_reference(hf), config).eval()
    want = torch_logits(peft_model, TOKENS)
    peft_model.save_pretrained(tmp_path / "peft")

    # 1. peft's own adapter folder (HF names, rotate-half q/k rows), on the HF-layout base.
    for merge in (True, False):
        model = Transformer.from_folder(hf, dtype="float32", lora_path=tmp_path / "peft",
                                        lora_merge=merge)
        assert rel_err(model.logits(TOKENS), want) <= 1e-5

    # 2. The same adapter in mistral-finetune's format, on the Mistral-layout base.
    names = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv",
             "o_proj": "attention.wo", "gate_proj": "feed_forward.w1",
             "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2"}
    tensors = {}
    for name, p in peft_model.named_parameters():
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.default\.weight", name)
        if m:
            w = p.detach().numpy()
            if m[3] == "B" and m[2] in ("q_proj", "k_proj"):
                w = _unpermute(w, args.n_heads if m[2] == "q_proj" else args.n_kv_heads)
            tensors[f"layers.{m[1]}.{names[m[2]]}.lora_{m[3]}.weight"] = np.ascontiguousarray(w)
    assert len(tensors) == 2 * 7 * args.n_layers
    adapter = write_adapter(tmp_path / "mistral_lora" / "lora.safetensors", tensors)
    for merge in (True, False):  # scaling lora_alpha / r = 2.0: mistral-inference's default
        model = Transformer.from_folder(mistral, dtype="float32", lora_path=adapter,
                                        lora_merge=merge)
        assert rel_err(model.logits(TOKENS), want) <= 1e-5


def _corrupt(tensors: dict, case: str) -> tuple[dict, str]:
    """A bad copy of an adapter and the key its error must name."""
    t = dict(tensors)
    if case == "wrong_rank_shape":
        key = "layers.1.attention.wv.lora_B.weight"
        t[key] = np.zeros((t[key].shape[0], RANK + 2), np.float32)
    elif case == "wrong_in_features":
        key = "layers.0.feed_forward.w2.lora_A.weight"
        t[key] = np.zeros((RANK, 7), np.float32)
    elif case == "layer_out_of_range":
        key = "layers.9.attention.wq.lora_A.weight"
        t[key] = t["layers.0.attention.wq.lora_A.weight"]
    elif case == "unknown_module":
        key = "layers.0.attention.wx.lora_A.weight"
        t[key] = t["layers.0.attention.wq.lora_A.weight"]
    elif case == "not_a_linear_layer":
        key = "layers.0.attention_norm.lora_A.weight"
        t[key] = np.zeros((RANK, 64), np.float32)
    elif case == "not_a_lora_key":
        key = "layers.0.attention.wq.weight"
        t[key] = np.zeros((64, 64), np.float32)
    elif case == "dtype_mismatch":
        key = "layers.1.feed_forward.w3.lora_A.weight"
        t[key] = t[key].astype(np.float16)
    elif case == "missing_partner":
        key = "layers.1.attention.wo.lora_A.weight"
        del t["layers.1.attention.wo.lora_B.weight"]
    else:
        raise ValueError(case)
    return t, key


@pytest.mark.parametrize("case", ["wrong_rank_shape", "wrong_in_features", "layer_out_of_range",
                                  "unknown_module", "not_a_linear_layer", "not_a_lora_key",
                                  "dtype_mismatch", "missing_partner"])
def test_bad_adapters_are_rejected_naming_the_key(case, tmp_path):
    args = tiny_args(vocab_size=512)
    tensors, key = _corrupt(random_adapter(args), case)
    path = write_adapter(tmp_path / "lora.safetensors", tensors)
    with pytest.raises(CheckpointError, match=re.escape(repr(key))):
        load_lora(path, args)


def test_adapter_rank_must_match_the_params_json_lora_rank(tmp_path):
    args = tiny_args(vocab_size=512, lora=LoraArgs(rank=RANK + 4, scaling=2.0))
    path = write_adapter(tmp_path / "lora.safetensors", random_adapter(args))
    with pytest.raises(ConfigError, match=r"lora_A\.weight'.*rank 4 but the base model's "
                                          r"params\.json lora block says rank 8"):
        load_lora(path, args)


def _with_rank(tensors: dict, module: str, rank: int, which: str = "AB") -> dict:
    """A copy of an adapter whose `module` pair (e.g. 'layers.0.attention.wk') has `rank`
    in lora_A and/or lora_B (`which`)."""
    t = dict(tensors)
    rng = np.random.default_rng(9)
    for ab in which:
        key = f"{module}.lora_{ab}.weight"
        n0, n1 = t[key].shape
        shape = (rank, n1) if ab == "A" else (n0, rank)
        t[key] = rng.standard_normal(shape).astype(np.float32)
    return t


def test_mixed_ranks_name_the_pair_whose_rank_differs(tmp_path):
    """One pair of rank 6 among rank-4 pairs: the error names that pair (the rank most
    pairs share is the adapter's), not the first pair in key order."""
    args = tiny_args(vocab_size=512)
    for module in ("layers.0.attention.wk", "layers.0.attention.wo"):  # wo sorts first
        tensors = _with_rank(random_adapter(args), module, RANK + 2)
        path = write_adapter(tmp_path / module / "lora.safetensors", tensors)
        with pytest.raises(CheckpointError) as error:
            load_lora(path, args)
        message = str(error.value)
        assert f"'{module}.lora_A.weight' has rank 6" in message, message
        assert "have rank 4" in message and "share one rank" in message
        others = [k for k in tensors if k.endswith("lora_A.weight") and not k.startswith(module)]
        assert not any(f"{k!r} has rank" in message for k in others)


@pytest.mark.parametrize("which", ["A", "B"])
def test_a_pair_disagreeing_with_itself_names_both_keys_and_shapes(tmp_path, which):
    """Only wk's lora_A (or lora_B) has rank 6: the error names wk's two keys and their
    shapes, not another pair."""
    args = tiny_args(vocab_size=512)
    module = "layers.0.attention.wk"
    tensors = _with_rank(random_adapter(args), module, RANK + 2, which)
    path = write_adapter(tmp_path / "lora.safetensors", tensors)
    with pytest.raises(CheckpointError) as error:
        load_lora(path, args)
    message = str(error.value)
    a, b = (list(tensors[f"{module}.lora_{ab}.weight"].shape) for ab in "AB")
    assert f"'{module}.lora_A.weight' {a} and '{module}.lora_B.weight' {b}" in message, message
    assert "disagree on the rank" in message
    rest = message.split(": ", 1)[1]  # after the file name
    assert "wo" not in rest and "wq" not in rest


@pytest.mark.parametrize("lora,field,shown", [
    ({"scaling": 0.5}, "'lora.rank' is missing", None),
    ({"rank": 4}, "'lora.scaling' is missing", None),
    ({"rank": "four", "scaling": 2.0}, "lora.rank must be a positive integer", "'four'"),
    ({"rank": True, "scaling": 2.0}, "lora.rank must be a positive integer", "True"),
    ({"rank": 4.0, "scaling": 2.0}, "lora.rank must be a positive integer", "4.0"),
    ({"rank": 0, "scaling": 2.0}, "lora.rank must be a positive integer", "0"),
    ({"rank": 4, "scaling": "2"}, "lora.scaling must be a number", "'2'"),
    ({"rank": 4, "scaling": False}, "lora.scaling must be a number", "False"),
    ([4, 2.0], "lora must be an object with rank and scaling", "[4, 2.0]"),
])
def test_params_json_lora_block_needs_an_int_rank_and_a_float_scaling(tmp_path, lora, field,
                                                                      shown):
    """As mistral-inference's LoraArgs(rank: int, scaling: float): a params.json lora block
    beside the adapter without either, or with a value of another type, is a ConfigError
    naming the file, the field and the value (a block without rank used to be ignored, and
    scaling 2.0 used)."""
    args = tiny_args(vocab_size=512)
    path = write_adapter(tmp_path / "lora.safetensors", random_adapter(args))
    (tmp_path / "params.json").write_text(json.dumps({**args_json(args), "lora": lora}))
    with pytest.raises(ConfigError) as error:
        load_lora(path, args)
    # The base model's own params.json is read by the same rule (args.lora_args).
    with pytest.raises(ConfigError) as base_error:
        args_from_params_json(tmp_path / "params.json")
    for message in (str(error.value), str(base_error.value)):
        assert message.startswith(f"{tmp_path / 'params.json'}: ") and field in message, message
        if shown is not None:
            assert message.endswith(f"got {shown}")


def test_peft_config_r_and_lora_alpha_are_checked(tmp_path):
    args = tiny_args(vocab_size=512)
    path = write_adapter(tmp_path / "lora.safetensors", random_adapter(args))
    for cfg, message in (({"r": "4"}, "r must be a positive integer, got '4'"),
                         ({"r": 4, "lora_alpha": "8"}, "lora_alpha must be a number, got '8'"),
                         # What peft 0.21 writes for Mixtral experts under transformers 5
                         # (it used to be refused for its rank_pattern, not for this).
                         ({"r": 8, "target_parameters": ["down_proj", "gate_up_proj"],
                           "rank_pattern": {r".*\.gate_up_proj": 8}},
                          "target_parameters = ['down_proj', 'gate_up_proj']: peft adapters on "
                          "parameters (transformers' fused Mixtral experts) are not supported")):
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=re.escape(f"adapter_config.json: {message}")):
            load_lora(path, args)


def args_json(args) -> dict:
    from mistral_jax.config import args_to_params_json

    return args_to_params_json(args)
