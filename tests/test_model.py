"""Parity of the dense model with transformers' MistralForCausalLM (PyTorch, float32),
the rotating KV cache, and clear errors for bad checkpoint folders."""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    both_layouts,
    hf_config,
    random_mistral_state,
    rel_err,
    tiny_args,
    tiny_moe_args,
    torch_logits,
    torch_reference,
    write_hf_folder,
    write_mistral_folder,
)

from mistral_jax.args import MoeArgs
from mistral_jax.cache import init_cache
from mistral_jax.config import args_from_hf_config, args_from_params_json, args_to_params_json
from mistral_jax.errors import CheckpointError, ConfigError, UserInputError
from mistral_jax.kernels import Kernels
from mistral_jax.model import causal_positions, forward
from mistral_jax.transformer import Transformer

# (n_heads, n_kv_heads): GQA ratios 1, 2 and 4; windows on and off; both rope thetas and vocabs.
CONFIGS = {
    "mha_nowin_theta1e6_v32000": dict(n_heads=4, n_kv_heads=4, vocab_size=32000),
    "gqa2_win8_theta1e4_v32768": dict(n_heads=4, n_kv_heads=2, sliding_window=8,
                                      rope_theta=1e4, vocab_size=32768),
    "gqa4_win16_theta1e6_v32768": dict(n_heads=8, n_kv_heads=2, head_dim=8, sliding_window=16,
                                       vocab_size=32768, n_layers=3),
    "gqa4_nowin_theta1e4_v32000": dict(n_heads=8, n_kv_heads=2, head_dim=8, rope_theta=1e4,
                                       vocab_size=32000),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """One random model written in both layouts, plus transformers' model of the HF folder."""
    args = tiny_args(**CONFIGS[request.param])
    _, mistral, hf, ref = both_layouts(tmp_path_factory.mktemp(request.param), args,
                                       seed=len(request.param))
    return args, mistral, hf, ref


@pytest.mark.parametrize("layout", ["mistral", "hf"])
def test_logits_match_transformers_float32(checkpoint, layout):
    args, mistral, hf, ref = checkpoint
    model = Transformer.from_folder(mistral if layout == "mistral" else hf, dtype="float32")
    assert model.args == args.__class__(**{**args.__dict__, "max_seq_len": model.args.max_seq_len})
    tokens = np.random.default_rng(1).integers(0, args.vocab_size, (2, 40))
    assert rel_err(model.logits(tokens), torch_logits(ref, tokens)) <= 1e-5


def _decode_incrementally(model, tokens, prefill_len, cache_len):
    """Prefill `prefill_len` tokens, then feed the rest one at a time; logits [B, T, V]."""
    b, t = tokens.shape
    pos = np.broadcast_to(np.arange(t), (b, t))
    cache = model.init_cache(b, cache_len)
    out, cache = model.forward(tokens[:, :prefill_len], pos[:, :prefill_len], cache)
    steps = [out]
    for i in range(prefill_len, t):
        out, cache = model.forward(tokens[:, i:i + 1], pos[:, i:i + 1], cache)
        steps.append(out)
    return np.concatenate(steps, axis=1)


def test_sliding_window_decode_matches_full_recompute_and_transformers(tmp_path):
    """Window 16, a 40-token prompt (longer than the window), then 20 decoded tokens."""
    args = tiny_args(sliding_window=16, n_layers=2, vocab_size=1000)
    state = random_mistral_state(args, seed=7)
    hf = write_hf_folder(tmp_path / "hf", args, state)
    model = Transformer.from_folder(write_mistral_folder(tmp_path / "m", args, state),
                                    dtype="float32")
    tokens = np.random.default_rng(2).integers(0, args.vocab_size, (1, 60))
    incremental = _decode_incrementally(model, tokens, prefill_len=40, cache_len=64)
    full = np.asarray(model.logits(tokens))
    assert rel_err(incremental, full) <= 1e-5
    # Each decode step equals a from-scratch forward of the sequence so far.
    for step in (40, 47, 59):
        assert rel_err(incremental[:, step], np.asarray(model.logits(tokens[:, :step + 1]))[:, -1]) <= 1e-5
    assert rel_err(full, torch_logits(torch_reference(hf), tokens)) <= 1e-5
    # The window matters: without it the logits past position 16 differ.
    no_window = Transformer(args.__class__(**{**args.__dict__, "sliding_window": None}), model.params)
    assert rel_err(no_window.logits(tokens)[:, 20:], full[:, 20:]) > 1e-3


@pytest.mark.parametrize("window,prefill,cache_len", [
    (None, 5, 32),   # plain cache
    (8, 3, 32),      # decode wraps the 8-slot ring buffer several times
    (8, 13, 32),     # prefill longer than the window, then wrap
    (6, 1, 32),
])
def test_incremental_decode_equals_full_forward(window, prefill, cache_len):
    args = tiny_args(sliding_window=window, vocab_size=500, n_layers=2)
    model = Transformer.random(args, seed=3)
    tokens = np.random.default_rng(4).integers(0, args.vocab_size, (2, 30))
    incremental = _decode_incrementally(model, tokens, prefill, cache_len)
    assert rel_err(incremental, model.logits(tokens)) <= 1e-5


def test_chunked_prefill_equals_full_forward_across_window_wrap():
    args = tiny_args(sliding_window=8, vocab_size=500)
    model = Transformer.random(args, seed=5)
    tokens = np.random.default_rng(6).integers(0, args.vocab_size, (1, 36))
    pos = causal_positions(jnp.asarray(tokens))
    cache = model.init_cache(1, 64)
    outs = []
    for s in range(0, 36, 7):  # chunks of 7 < window, and the last one shorter
        out, cache = model.forward(tokens[:, s:s + 7], pos[:, s:s + 7], cache)
        outs.append(out)
    assert rel_err(np.concatenate(outs, 1), model.logits(tokens)) <= 1e-5


def test_ragged_rows_with_padding_decode_like_single_rows():
    """Rows at different positions (padding = position -1) match each row run alone."""
    args = tiny_args(sliding_window=8, vocab_size=500)
    model = Transformer.random(args, seed=8)
    rng = np.random.default_rng(9)
    lens = [5, 12]
    seqs = [rng.integers(0, 500, n + 4) for n in lens]
    width = max(lens)
    toks = np.zeros((2, width), np.int32)
    pos = np.full((2, width), -1, np.int32)
    for r, n in enumerate(lens):
        toks[r, :n], pos[r, :n] = seqs[r][:n], np.arange(n)
    cache = model.init_cache(2, 32)
    _, cache = model.forward(toks, pos, cache)
    for step in range(4):
        nxt = np.array([[s[n + step]] for s, n in zip(seqs, lens)], np.int32)
        p = np.array([[n + step] for n in lens], np.int32)
        out, cache = model.forward(nxt, p, cache)
        for r, n in enumerate(lens):
            alone = np.asarray(model.logits(seqs[r][None, :n + step + 1]))[0, -1]
            assert rel_err(out[r, 0], alone) <= 1e-5


def test_bfloat16_close_to_float32(tmp_path):
    args = tiny_args(sliding_window=8, vocab_size=1000)
    folder = write_mistral_folder(tmp_path / "m", args, random_mistral_state(args, seed=11))
    f32 = Transformer.from_folder(folder, dtype="float32")
    bf16 = Transformer.from_folder(folder, dtype="bfloat16")
    assert bf16.params["layers_0"]["attention"]["wq"]["kernel"].dtype == jnp.bfloat16
    tokens = np.random.default_rng(12).integers(0, args.vocab_size, (2, 24))
    low = np.asarray(bf16.logits(tokens))
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert rel_err(low, f32.logits(tokens)) <= 2e-2


def test_forward_is_pure_jittable_differentiable_and_vmappable():
    args = tiny_args(vocab_size=300)
    model = Transformer.random(args, seed=13)
    tokens = jnp.asarray(np.random.default_rng(14).integers(0, 300, (3, 10)), jnp.int32)
    pos = causal_positions(tokens)

    def nll(params, toks):
        logits, _ = forward(params, toks[None], jnp.arange(10)[None], None, args=args)
        return -jax.nn.log_softmax(logits[0, :-1])[jnp.arange(9), toks[1:]].mean()

    per_row = jax.jit(jax.vmap(nll, in_axes=(None, 0)))(model.params, tokens)
    full, _ = forward(model.params, tokens, pos, None, args=args)
    expected = -jax.nn.log_softmax(full[:, :-1])
    expected = np.take_along_axis(np.asarray(expected), np.asarray(tokens)[:, 1:, None], -1)
    np.testing.assert_allclose(per_row, expected[..., 0].mean(1), rtol=1e-5)
    grads = jax.grad(lambda p: nll(p, tokens[0]))(model.params)
    g = grads["layers_1"]["attention"]["wq"]["kernel"]
    assert g.shape == (args.dim, args.n_heads, args.head_dim)
    assert np.isfinite(g).all() and np.abs(g).max() > 0
    # The same inputs give the same outputs: no hidden state.
    again, _ = forward(model.params, tokens, pos, None, args=args)
    np.testing.assert_array_equal(full, again)


def test_cache_is_a_plain_pytree_returned_not_mutated():
    args = tiny_args(sliding_window=4, vocab_size=100)
    model = Transformer.random(args)
    cache = init_cache(args, 1, 16, jnp.float32)
    before = jax.tree_util.tree_map(np.asarray, cache)
    _, new = model.forward(np.array([[1, 2, 3, 4, 5, 6]]), np.arange(6)[None], cache)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                           jax.tree_util.tree_map(np.asarray, cache))
    # The ring holds the newest 4 positions, each in slot pos % 4.
    np.testing.assert_array_equal(np.asarray(new[0]["pos"])[0], [4, 5, 2, 3])


def _element_order_kept(dims: list[int], reference: tuple[int, ...]) -> bool:
    """True when an array of `dims` (row-major) lists its elements in the order of an array
    of `reference`'s shape: its dims merge or split `reference`'s without reordering them."""
    def cuts(shape):
        out, n = set(), 1
        for d in shape:
            n *= d
            out.add(n)
        return out
    return cuts(dims) <= cuts(reference) or cuts(reference) <= cuts(dims)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_reads_the_kv_cache_in_its_stored_order(batch):
    """The compiled decode step holds no re-ordered copy of a layer's k or v cache.

    With the cache stored [B, S, K, Hd], XLA transposed every layer's whole k and v
    cache on every step so its batched matmuls over (batch, KV head) could read it:
    about 3x the cache bytes. Stored [B, K, S, Hd], it is read as stored.
    """
    import re

    args = tiny_args(dim=256, head_dim=64, n_heads=8, n_kv_heads=2, hidden_dim=768,
                     vocab_size=1000)
    model = Transformer.random(args)
    s = 512
    cache = jax.eval_shape(lambda: init_cache(args, batch, s, jnp.float32))
    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    step = jax.jit(functools.partial(forward, args=args), donate_argnums=(3,))
    hlo = step.lower(model.params, token, token, cache).compile().as_text()
    stored = tuple(cache[0]["k"].shape)
    size = int(np.prod(stored))
    arrays = re.findall(r"= \w+\[([\d,]+)\]\{([\d,]*)\}", hlo)
    cache_sized = [(d, layout) for d, layout in arrays
                   if int(np.prod([int(x) for x in d.split(",")])) == size]
    assert cache_sized  # the cache buffers themselves
    for d, layout in cache_sized:
        dims = [int(x) for x in d.split(",")]
        row_major = [int(x) for x in layout.split(",")] == list(range(len(dims)))[::-1]
        assert row_major and _element_order_kept(dims, stored), (d, layout)


# ---------------------------------------------------------------- args


def test_missing_rope_theta_follows_each_reference(tmp_path):
    args = tiny_args(rope_theta=5e5)
    m = write_mistral_folder(tmp_path / "m", args, random_mistral_state(args))
    h = write_hf_folder(tmp_path / "h", args, random_mistral_state(args))
    for path in (m / "params.json", h / "config.json"):
        cfg = json.loads(path.read_text())
        cfg.pop("rope_theta")
        path.write_text(json.dumps(cfg))
    assert args_from_params_json(m / "params.json").rope_theta == 1e6  # mistral-inference
    assert args_from_hf_config(h / "config.json").rope_theta == 1e4  # transformers' MistralConfig
    assert Transformer.from_folder(m, dtype="float32", rope_theta=1e4).args.rope_theta == 1e4


# config.json fields that a file may leave out and transformers fills in (by model type);
# also set to null where transformers 5 reads null as a value (no window, head_dim derived).
HF_LEFT_OUT = ("rope_theta", "sliding_window", "rms_norm_eps", "num_key_value_heads", "head_dim")
HF_MIXTRAL_LEFT_OUT = ("num_local_experts", "num_experts_per_tok")
HF_CONFIG_CASES = [(f, "left out", moe) for moe in (False, True) for f in HF_LEFT_OUT] + [
    (f, "left out", True) for f in HF_MIXTRAL_LEFT_OUT] + [
    (f, "null", moe) for moe in (False, True) for f in ("sliding_window", "head_dim")]


@pytest.mark.parametrize(("field", "how", "moe"), HF_CONFIG_CASES,
                         ids=[f"{f}-{h}-{'mixtral' if m else 'mistral'}"
                              for f, h, m in HF_CONFIG_CASES])
def test_config_json_fields_left_out_mean_what_transformers_reads(tmp_path, field, how, moe):
    """Each optional field dropped from (or nulled in) a config.json: the args equal what
    transformers' AutoConfig makes of the same file (a Mistral without rope_theta is 1e4 and
    windowed at 4096, a Mixtral 1e6 and unwindowed; both 8 KV heads)."""
    from transformers import AutoConfig

    # Every value unlike either default, so that a default taken shows.
    args = tiny_args(n_heads=16, n_kv_heads=16, head_dim=8, sliding_window=64, rope_theta=5e5,
                     norm_eps=1e-3, moe=MoeArgs(4, 1) if moe else None)
    path = tmp_path / "config.json"
    cfg = hf_config(args)
    if how == "left out":
        cfg.pop(field)
    else:
        cfg[field] = None
    path.write_text(json.dumps(cfg))
    ours, ref = args_from_hf_config(path), AutoConfig.from_pretrained(tmp_path)
    theta = getattr(ref, "rope_theta", None) or ref.rope_parameters["rope_theta"]
    got = (ours.rope_theta, ours.sliding_window, ours.norm_eps, ours.n_kv_heads, ours.head_dim)
    assert got == (theta, ref.sliding_window, ref.rms_norm_eps, ref.num_key_value_heads,
                   ref.head_dim or ref.hidden_size // ref.num_attention_heads)
    if moe:
        assert ours.moe == MoeArgs(ref.num_local_experts, ref.num_experts_per_tok)
    assert ref.model_type == ("mixtral" if moe else "mistral")


def test_config_json_model_type_picks_the_defaults_and_unknown_ones_are_refused(tmp_path):
    path = tmp_path / "config.json"
    cfg = hf_config(tiny_moe_args())
    for key in ("rope_theta", "sliding_window", "model_type"):
        cfg.pop(key)
    path.write_text(json.dumps(cfg))  # architectures alone says Mixtral
    a = args_from_hf_config(path)
    assert (a.rope_theta, a.sliding_window, a.moe is not None) == (1e6, None, True)
    cfg.pop("architectures")
    path.write_text(json.dumps(cfg))  # nor that: the expert fields say Mixtral
    assert args_from_hf_config(path).rope_theta == 1e6
    for bad, msg in (({"model_type": "llama"}, "model_type 'llama'"),
                     ({"architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
                     ({"hidden_act": "gelu"}, "hidden_act 'gelu'")):
        path.write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ConfigError, match=f"config.json: .*{msg}"):
            args_from_hf_config(path)


def test_hf_config_rope_parameters_and_per_layer_window(tmp_path):
    cfg = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-5, "vocab_size": 100,
           "rope_parameters": {"rope_type": "default", "rope_theta": 2e5}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = args_from_hf_config(tmp_path / "config.json")
    # No sliding_window key: MistralConfig's default window, 4096.
    assert (a.rope_theta, a.head_dim, a.sliding_window) == (2e5, 16, 4096)
    p = tiny_args(n_layers=4, sliding_window=[8, None]).layer_windows
    assert p == (8, None, 8, None)


# ---------------------------------------------------------------- bad input


@pytest.fixture()
def good_folder(tmp_path):
    args = tiny_args(vocab_size=100)
    return write_mistral_folder(tmp_path / "m", args, random_mistral_state(args)), args


def test_folder_without_params_or_config(tmp_path):
    with pytest.raises(ConfigError, match="no params.json .* or config.json"):
        Transformer.from_folder(tmp_path)


def test_folder_that_does_not_exist_or_is_a_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere: not a directory \(it does not exist\)$"):
        Transformer.from_folder(tmp_path / "nowhere")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"a_file: not a directory \(it is a file\)$"):
        Transformer.from_folder(tmp_path / "a_file")


@pytest.mark.parametrize("dtype, shown", [(None, "None"), (3.5, "3.5"), (object, "object"),
                                          (np.int32, "int32")])
def test_bad_dtype_is_shown_as_given(good_folder, dtype, shown):
    with pytest.raises(UserInputError) as error:
        Transformer.from_folder(good_folder[0], dtype=dtype)
    assert str(error.value) == f"dtype must be bfloat16, float16 or float32, got {shown}"


def test_params_json_missing_field_names_it(good_folder):
    folder, _ = good_folder
    cfg = json.loads((folder / "params.json").read_text())
    del cfg["hidden_dim"]
    (folder / "params.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"params.json: required field 'hidden_dim'"):
        Transformer.from_folder(folder)


@pytest.mark.parametrize("layout,field,value,shown", [
    ("mistral", "dim", "64", "'64'"),
    ("mistral", "n_kv_heads", 2.5, "2.5"),
    ("mistral", "head_dim", True, "True"),
    ("mistral", "norm_eps", "1e-5", "'1e-5'"),
    ("hf", "hidden_size", "64", "'64'"),
    ("hf", "num_key_value_heads", 2.0, "2.0"),
    ("hf", "intermediate_size", 0, "0"),
    ("hf", "rms_norm_eps", "1e-5", "'1e-5'"),
    ("mistral", "norm_eps", -1, "-1"),  # <= 0: NaN logits
    ("mistral", "rope_theta", -1, "-1"),
    ("hf", "rope_theta", 0, "0"),
    ("hf", "rms_norm_eps", -1e-5, "-1e-05"),
    ("mistral", "max_seq_len", "256", "'256'"),  # used to fail in a '>' deep in the CLI
    ("mistral", "max_seq_len", -5, "-5"),
    ("hf", "max_position_embeddings", 256.0, "256.0"),
])
def test_bad_size_field_is_named_as_its_file_names_it(tmp_path, layout, field, value, shown):
    """A size that is not a positive integer (or an epsilon or rope theta that is not a
    positive number) is a ConfigError naming the file and the field by the file's own name
    (config.json's hidden_size, not params.json's dim), never a traceback or NaN logits."""
    args = tiny_args(vocab_size=100)
    write = write_mistral_folder if layout == "mistral" else write_hf_folder
    folder = write(tmp_path / layout, args, random_mistral_state(args))
    name = "params.json" if layout == "mistral" else "config.json"
    cfg = json.loads((folder / name).read_text())
    cfg[field] = value
    (folder / name).write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as error:
        Transformer.from_folder(folder)
    message = str(error.value)
    assert message.startswith(f"{folder / name}: {field} must be a "), message
    assert message.endswith(f"got {shown}"), message


@pytest.mark.parametrize("patch, message", [
    ({"rope_parameters": "x"}, "rope_parameters must be an object or null, got 'x'"),
    # transformers 4's name for the block, which transformers 5 still reads: it used to
    # be ignored, the model then running without the scaling the file asks for.
    # (yarn runs since issue #19: tests/test_families.py)
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}},
     "rope_scaling rope_type 'longrope'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling rope_type 'linear'"),
    ({"architectures": 5}, "architectures must be a list of class names, got 5"),
])
def test_bad_rope_block_or_architectures_in_config_json_is_named(tmp_path, patch, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**hf_config(tiny_args()), **patch}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        args_from_hf_config(path)


def test_plain_rope_scaling_and_a_single_architecture_name_load(tmp_path):
    path = tmp_path / "config.json"
    for patch in ({"rope_scaling": None}, {"rope_scaling": {"rope_type": "default"}},
                  {"architectures": "MistralForCausalLM"}, {"hidden_act": "swish"}):
        path.write_text(json.dumps({**hf_config(tiny_args()), **patch}))
        assert args_from_hf_config(path).rope_theta == 1e6


def test_truncated_safetensors_names_the_file(good_folder):
    folder, _ = good_folder
    f = folder / "consolidated.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="consolidated.safetensors: not a valid safetensors"):
        Transformer.from_folder(folder)


def test_corrupt_header_names_the_file(good_folder):
    folder, _ = good_folder
    f = folder / "consolidated.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"{not json!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="consolidated.safetensors: not a valid safetensors"):
        Transformer.from_folder(folder)


def _rewrite(folder, args, change):
    from safetensors.numpy import load_file, save_file

    f = folder / "consolidated.safetensors"
    state = load_file(f)
    change(state)
    save_file(state, f)


def test_missing_tensor_is_named(good_folder):
    folder, args = good_folder
    _rewrite(folder, args, lambda s: s.pop("layers.1.attention.wk.weight"))
    with pytest.raises(CheckpointError, match="layers_1/attention/wk/kernel"):
        Transformer.from_folder(folder)


def test_wrong_shape_is_named(good_folder):
    folder, args = good_folder
    _rewrite(folder, args, lambda s: s.update({"layers.0.feed_forward.w2.weight":
                                               np.zeros((args.dim, 7), np.float32)}))
    with pytest.raises(CheckpointError, match=r"'layers.0.feed_forward.w2.weight' has shape \[64, 7\], expected \[64, 128\]"):
        Transformer.from_folder(folder)


def test_unknown_extra_tensor_is_named(good_folder):
    folder, args = good_folder
    _rewrite(folder, args, lambda s: s.update({"layers.5.attention.wq.weight": np.zeros((4, 4), np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.5.attention.wq.weight'"):
        Transformer.from_folder(folder)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_weight_is_refused_like_the_converter_refuses_it(good_folder, tmp_path, dtype):
    """A norm stored as I32 (etc.) used to load, cast to floats; the loader and the
    converter now give the same error (int8 / fp8 only as compressed-tensors weights)."""
    from mistral_jax.convert import convert

    folder, args = good_folder
    _rewrite(folder, args, lambda s: s.update({"norm.weight": np.ones(args.dim, dtype)}))
    with pytest.raises(CheckpointError) as loading:
        Transformer.from_folder(folder)
    with pytest.raises(CheckpointError) as converting:
        convert(folder, tmp_path / "out")
    name = {np.int32: "I32", np.int64: "I64", np.uint8: "U8", np.bool_: "BOOL"}[dtype]
    assert str(loading.value) == str(converting.value) == (
        f"{folder / 'consolidated.safetensors'}: tensor 'norm.weight' has dtype {name}; expected "
        "one of ['BF16', 'F16', 'F32', 'F64', 'F8_E4M3', 'I8']")
    assert not (tmp_path / "out").exists()


def test_int8_weight_without_its_scale_is_refused(good_folder):
    folder, args = good_folder
    _rewrite(folder, args, lambda s: s.update({"norm.weight": np.ones(args.dim, np.int8)}))
    with pytest.raises(CheckpointError, match="'norm.weight' is stored as I8 but the checkpoint "
                                              "has no weight_scale"):
        Transformer.from_folder(folder)


def test_missing_shard_in_index_is_named(tmp_path):
    args = tiny_args(vocab_size=100)
    hf = write_hf_folder(tmp_path / "h", args, random_mistral_state(args), shards=2)
    (hf / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
        Transformer.from_folder(hf)


@pytest.mark.parametrize("weight_map", [[1, 2], {"x": 5}, {"x": "../model.safetensors"}, "a"])
def test_malformed_weight_map_in_the_index_is_named(tmp_path, weight_map):
    args = tiny_args(vocab_size=100)
    hf = write_hf_folder(tmp_path / "h", args, random_mistral_state(args), shards=2)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: weight_map must "
                       "map tensor names to file names in the folder"):
        Transformer.from_folder(hf)


def test_hf_weights_hidden_by_a_params_json_are_named_with_the_way_out(tmp_path):
    """params.json + config.json + HF weights: params.json wins, and the error says that the
    HF files are there and how to read them (it said only 'no weight files')."""
    args = tiny_args(vocab_size=100)
    hf = write_hf_folder(tmp_path / "h", args, random_mistral_state(args), shards=2)
    (hf / "params.json").write_text(json.dumps(args_to_params_json(args)))
    with pytest.raises(CheckpointError) as error:
        Transformer.from_folder(hf)
    assert str(error.value) == (
        f"{hf}: no weight files (consolidated*.safetensors) for the Mistral layout; the folder "
        "also has config.json and model-00001-of-00002.safetensors, "
        "model-00002-of-00002.safetensors (HF layout): to read those, pass --format hf to "
        "mistral-jax-convert, or move params.json out of the folder for "
        "Transformer.from_folder (which reads params.json when both configs are there)")
    (hf / "params.json").rename(tmp_path / "params.json")
    Transformer.from_folder(hf)  # as the message says


def test_pytorch_checkpoint_is_named_as_not_read(tmp_path):
    folder = tmp_path / "pth"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(args_to_params_json(tiny_args())))
    (folder / "consolidated.00.pth").write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match=r"pth: no weight files \(consolidated\*\.safetensors"
                                              r"\) for the Mistral layout; consolidated\.00\.pth: "
                                              r"PyTorch pickle checkpoints are not read, only "
                                              r"safetensors files"):
        Transformer.from_folder(folder)


def test_shard_missing_from_the_index_is_named_when_weights_are_missing(tmp_path):
    args = tiny_args(vocab_size=100)
    hf = write_hf_folder(tmp_path / "h", args, random_mistral_state(args), shards=2)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if v == "model-00001-of-00002.safetensors"}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"weights missing from the checkpoint: .*; "
                                              r"model\.safetensors\.index\.json does not list "
                                              r"model-00002-of-00002\.safetensors, which the "
                                              r"folder has"):
        Transformer.from_folder(hf)


def test_inconsistent_heads_in_params_json(good_folder):
    folder, _ = good_folder
    cfg = json.loads((folder / "params.json").read_text())
    cfg["n_kv_heads"] = 3
    (folder / "params.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="params.json: n_heads .* multiple of n_kv_heads"):
        Transformer.from_folder(folder)


def test_logits_index_keeps_one_position_per_row():
    args = tiny_args(vocab_size=200, sliding_window=4)
    model = Transformer.random(args, seed=21)
    tokens = jnp.asarray(np.random.default_rng(22).integers(0, 200, (3, 9)), jnp.int32)
    pos = causal_positions(tokens)
    full, _ = forward(model.params, tokens, pos, None, args=args)
    idx = jnp.array([8, 0, 5], jnp.int32)
    picked, _ = forward(model.params, tokens, pos, None, args=args, logits_index=idx)
    assert picked.shape == (3, 1, 200)
    np.testing.assert_allclose(picked[:, 0], full[jnp.arange(3), idx], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["reference", "xla"])
def test_fresh_prefill_equals_prefill_through_the_cache(attention, monkeypatch):
    """fresh_prefill skips the empty cache slots (and, with a fused kernel, the reference
    branch): same logits and the same cache as the general path, windows and padding included."""
    args = tiny_args(sliding_window=(6, None), vocab_size=300)
    model = Transformer.random(args, seed=31)
    lens = [13, 4]
    toks = np.random.default_rng(32).integers(0, 300, (2, 16)).astype(np.int32)
    pos = np.full((2, 16), -1, np.int32)
    for r, n in enumerate(lens):
        pos[r, :n] = np.arange(n)
    results = []
    for fresh in (False, True):
        cache = init_cache(args, 2, 32, jnp.float32)
        step = functools.partial(forward, args=args, fresh_prefill=fresh,
                                 kernels=Kernels(attention=attention))
        logits, cache = jax.jit(step)(model.params, toks, pos, cache)
        results.append((np.asarray(logits), cache))
    (general, cache_a), (fresh, cache_b) = results
    for r, n in enumerate(lens):
        assert rel_err(fresh[r, :n], general[r, :n]) <= 1e-5
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           cache_a, cache_b)


# ------------------------------------------------------------- inputs of logits / forward


def test_logits_with_seqlens_equals_each_sequence_alone():
    """mistral-inference's call shape: flat tokens + seqlens -> flat logits, each sequence
    attending only within itself."""
    model = Transformer.random(tiny_args(vocab_size=256), seed=1)
    a, b, c = [1, 2, 3], [4, 5], [6]
    flat = model.logits(np.array(a + b + c), seqlens=[3, 2, 1])
    alone = jnp.concatenate([model.logits(s) for s in (a, b, c)])
    assert flat.shape == (6, 256)
    np.testing.assert_allclose(np.asarray(flat), np.asarray(alone), atol=1e-6)
    with pytest.raises(UserInputError, match="seqlens positive lengths summing"):
        model.logits(np.array(a + b), seqlens=[3, 3])


@pytest.mark.parametrize("tokens,message", [
    ([[1, 2], [3]], "rows of different lengths: concatenate them and pass seqlens="),
    ([[1.5, 2.0]], "tokens must be integer ids, got dtype float64"),
    ([[1, 999]], r"token ids must be in \[0, vocab_size=256\)"),
])
def test_bad_tokens_for_logits_are_explained(tokens, message):
    model = Transformer.random(tiny_args(vocab_size=256), seed=1)
    with pytest.raises(UserInputError, match=message):
        model.logits(tokens)


def test_forward_checks_token_and_cache_shapes_before_running():
    """Wrong shapes fail with what was expected, not deep inside the model: 1-D tokens,
    a cache for another batch size, n_kv_heads or layer count, an integer cache (which
    used to run, casting keys to integers)."""
    args = tiny_args(vocab_size=256)
    model = Transformer.random(args, seed=1)
    tok, pos = jnp.array([[1, 2]]), jnp.array([[0, 1]])
    cases = [
        ((jnp.array([1, 2]), jnp.array([0, 1]), None), "tokens must be an integer [B, T] array"),
        ((tok, pos, init_cache(args, 2, 16, jnp.float32)), "cache[0]['k'] is float32 (2, 2, 16, 16)"),
        ((tok, pos, init_cache(tiny_args(vocab_size=256, n_kv_heads=4), 1, 16, jnp.float32)),
         "n_kv_heads=2"),
        ((tok, pos, init_cache(args, 1, 16, jnp.int32)), "cache[0]['k'] is int32"),
        ((tok, pos, init_cache(args, 1, 16, jnp.float32)[:1]), "cache must hold n_layers=2"),
        ((tok, jnp.array([[0, 1, 2]]), None), "must have the same [B, T] shape"),
        ((tok, pos, [dict(c, pos=c["pos"][:, :2]) for c in init_cache(args, 1, 16, jnp.float32)]),
         "cache[0]['pos'] is int32 (1, 2); expected an integer [B=1, S=16] array"),
        ((tok, pos, [dict(c, pos=c["pos"].astype(jnp.float32))
                     for c in init_cache(args, 1, 16, jnp.float32)]), "cache[0]['pos'] is float32"),
    ]
    pure = functools.partial(forward, model.params, args=args)
    for inputs, message in cases:
        for run in (model.forward, pure):
            with pytest.raises(UserInputError) as error:
                run(*inputs)
            assert message in str(error.value), str(error.value)
    logits, _ = model.forward(tok, pos, init_cache(args, 1, 16, jnp.float32))
    assert logits.shape == (1, 2, 256)


@pytest.mark.parametrize("window, max_seq_len, ok_up_to", [
    (None, 8, 7),   # no window: the ring buffer would wrap and drop keys still in view
    (16, 8, 7),     # a cache shorter than the window: the same
    (8, 8, None),   # a cache as long as the window: wrapping is exact, any position goes
])
def test_positions_past_the_cache_are_refused_where_wrapping_would_be_wrong(
        window, max_seq_len, ok_up_to):
    """Decoding past init_cache's max_seq_len used to wrap silently (a model without a
    window quietly got one of max_seq_len, logits off by ~0.3); now a UserInputError, from
    the Transformer and from the pure forward, for host (NumPy) positions. Device arrays
    are not read (that would wait for the device on every call), nor traced ones."""
    args = tiny_args(vocab_size=100, sliding_window=window)
    model = Transformer.random(args, seed=2)
    tokens = np.random.default_rng(0).integers(0, 100, (1, 12))
    full = np.asarray(model.logits(tokens))
    pure = functools.partial(forward, model.params, args=args)
    for run in (model.forward, pure):
        cache = model.init_cache(1, max_seq_len)
        for i in range(12):
            step = (jnp.asarray(tokens[:, i:i + 1]), np.array([[i]]), cache)
            if ok_up_to is not None and i > ok_up_to:
                with pytest.raises(UserInputError, match=f"position {i} is beyond the cache: "
                                   f"layer 0 holds {max_seq_len} positions"):
                    run(*step)
                break
            logits, cache = run(*step)
            assert rel_err(logits[:, 0], full[:, i]) <= 1e-5, i
    step = jax.jit(pure)(jnp.asarray(tokens[:, :1]), jnp.array([[11]]), model.init_cache(1, 8))
    assert step[0].shape == (1, 1, 100)  # traced positions: unchecked
    step = model.forward(jnp.asarray(tokens[:, :1]), jnp.array([[11]]), model.init_cache(1, 8))
    assert step[0].shape == (1, 1, 100)  # device positions: unchecked, never synced


# ----------------------------------------------------------------------------- random_params


def test_random_params_match_the_declared_params_and_their_scales():
    from mistral_jax.model import abstract_params, random_params
    from mistral_jax.tree import flatten

    args = tiny_args()
    params = random_params(args, seed=3, dtype=jnp.float32)
    flat, abstract = flatten(params), flatten(abstract_params(args, jnp.float32))
    assert {p: (v.shape, v.dtype) for p, v in flat.items()} == {
        p: (v.shape, v.dtype) for p, v in abstract.items()}
    w2 = flat[("layers_0", "feed_forward", "w2", "kernel")]
    assert abs(float(jnp.std(w2)) * np.sqrt(args.hidden_dim) - 1) < 0.1  # std 1/sqrt(fan_in)
    wo = flat[("layers_0", "attention", "wo", "kernel")]  # fan-in: heads x head_dim
    assert abs(float(jnp.std(wo)) * np.sqrt(args.n_heads * args.head_dim) - 1) < 0.15
    assert abs(float(jnp.std(flat[("embedding",)])) - 1) < 0.1
    assert bool(jnp.all(flat[("norm", "weight")] == 1))
    # Chunks are independent draws, not one chunk repeated.
    assert not np.allclose(np.asarray(flat[("embedding",)][:1]), np.asarray(flat[("embedding",)][1:2]))
    tokens = jnp.ones((1, 4), jnp.int32)
    logits, _ = forward(params, tokens, causal_positions(tokens), None, args=args)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_random_params_draw_a_large_weight_in_chunks_with_small_temporaries():
    """A Mixtral-8x7B expert weight (1.9 GB in float32) compiles to a loop whose temporaries
    are a small fraction of the weight (one program for all weights took 2.6x the model)."""
    from mistral_jax.model import RANDOM_CHUNK_ELEMENTS, _chunk_rows, _random_normal

    shape = (8, 4096, 14336)
    rows = _chunk_rows(shape)
    assert rows * shape[-1] <= RANDOM_CHUNK_ELEMENTS and (8 * 4096) % rows == 0
    assert _chunk_rows((3, 5)) == 3 and _chunk_rows((7, RANDOM_CHUNK_ELEMENTS * 2)) == 1
    compiled = _random_normal.lower(jax.random.PRNGKey(0), 0.01, shape, jnp.float32).compile()
    memory = compiled.memory_analysis()
    out = np.prod(shape) * 4
    assert memory.output_size_in_bytes == out
    assert memory.temp_size_in_bytes < out / 10
