"""The current Mistral families against transformers' own classes (float32 logits, greedy
continuations): Ministral (per-layer windows), Nemo (head_dim != dim / n_heads), Ministral3
(YaRN, query scale, tied embeddings) and Mistral3 (language model of a vision-language
checkpoint), each written by transformers (`save_pretrained`) and, where the family is
published that way, in the Mistral layout of the same weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import rel_err, torch_logits
from safetensors.numpy import save_file

from mistral_jax.cache import cache_sizes
from mistral_jax.config import args_from_hf_config, args_from_params_json, args_to_params_json
from mistral_jax.errors import ConfigError
from mistral_jax.generate import generate
from mistral_jax.transformer import Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, rms_norm_eps=1e-5,
            max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
# Ministral3's yarn block, shrunk so that a 48-token prompt crosses original_max (16) twice.
YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
        "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}


def _randomize(model, seed: int):
    """Weights of O(1) logits (transformers' 0.02-std init gives near-ties that make greedy
    continuations fragile): norms near 1, matrices std 1/sqrt(fan_in), embeddings std 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model.eval()


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


def _ours_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> Mistral's interleaved rows (the inverse of its permute)."""
    d1, d2 = w.shape
    return w.reshape(n_heads, 2, d1 // n_heads // 2, d2).transpose(0, 2, 1, 3).reshape(d1, d2)


HF_TO_MISTRAL = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                 "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                 "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                 "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                 "post_attention_layernorm": "ffn_norm"}


def _mistral_folder(folder, lm, params: dict, extra: dict | None = None):
    """The Mistral layout (params.json + consolidated.safetensors) of a transformers language
    model `lm` (a *ForCausalLM): names, interleaved q/k rows; `extra` tensors added as is."""
    cfg = lm.config
    state = {k: v.detach().numpy() for k, v in lm.state_dict().items()}
    out = {"tok_embeddings.weight": state["model.embed_tokens.weight"],
           "norm.weight": state["model.norm.weight"]}
    if not params.get("tied_embeddings"):
        out["output.weight"] = state["lm_head.weight"]
    for name, w in state.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        if not m:
            continue
        if m[2] == "self_attn.q_proj":
            w = _ours_rows(w, cfg.num_attention_heads)
        elif m[2] == "self_attn.k_proj":
            w = _ours_rows(w, cfg.num_key_value_heads)
        out[f"layers.{m[1]}.{HF_TO_MISTRAL[m[2]]}.weight"] = w
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    save_file({**out, **(extra or {})}, folder / "consolidated.safetensors")
    return folder


def _base_params(**kw) -> dict:
    """params.json fields of TEXT, as Mistral names them."""
    t = {**TEXT, **kw}
    return {"dim": t["hidden_size"], "n_layers": t["num_hidden_layers"],
            "head_dim": t["head_dim"], "hidden_dim": t["intermediate_size"],
            "n_heads": t["num_attention_heads"], "n_kv_heads": t["num_key_value_heads"],
            "norm_eps": t["rms_norm_eps"], "vocab_size": t["vocab_size"]}


def _tokens(n: int, seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TEXT["vocab_size"], (batch, n))


def _check_logits(folder, ref, n: int = 48):
    model = Transformer.from_folder(folder, dtype="float32")
    tokens = _tokens(n)
    assert rel_err(model.logits(tokens), torch_logits(ref, tokens)) <= 1e-5
    return model


def _check_greedy(model, ref, prompt_len: int, new: int):
    prompt = _tokens(prompt_len, seed=3, batch=1)
    with torch.no_grad():
        out = ref.generate(torch.as_tensor(prompt), max_new_tokens=new, do_sample=False,
                           min_new_tokens=new)
    expected = out[0, prompt_len:].tolist()
    got, _ = generate([prompt[0].tolist()], model, max_tokens=new)
    assert got[0] == expected


# ------------------------------------------------------------------- Ministral 8B


LAYER_TYPES = ["sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def ministral(tmp_path_factory):
    cfg = transformers.MinistralConfig(**TEXT, sliding_window=8, layer_types=LAYER_TYPES,
                                       rope_theta=1e8)
    ref = _randomize(transformers.MinistralForCausalLM(cfg), seed=1)
    root = tmp_path_factory.mktemp("ministral")
    mistral = _mistral_folder(root / "mistral", ref, {
        **_base_params(), "rope_theta": 1e8, "sliding_window": [8, None]})
    return ref, _save(ref, root / "hf"), mistral


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_ministral_per_layer_windows_match_transformers(ministral, layout):
    ref, hf, mistral = ministral
    model = _check_logits(hf if layout == "hf" else mistral, ref)
    assert model.args.layer_windows == (8, None)
    # one cache per layer, sized to that layer's window
    assert cache_sizes(model.args, 64) == [8, 64]


def test_ministral_decode_past_the_window_matches_transformers_generate(ministral):
    ref, hf, _ = ministral
    _check_greedy(Transformer.from_folder(hf, dtype="float32"), ref, prompt_len=20, new=16)


def test_mistral_labelled_config_with_layer_types_is_read_as_transformers_reads_it(
        ministral, tmp_path):
    """model_type 'mistral' + architectures MistralForCausalLM + layer_types: transformers'
    AutoConfig makes it a Ministral (full layers unwindowed); every layer windowed was >100%
    off."""
    ref, hf, _ = ministral
    folder = tmp_path / "relabelled"
    folder.mkdir()
    for f in hf.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (folder / "config.json").write_text(json.dumps(cfg))
    auto = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager")
    assert type(auto).__name__ == "MinistralForCausalLM"
    model = _check_logits(folder, ref)
    assert model.args.layer_windows == (8, None)


# ------------------------------------------------------------------- Nemo 12B


def test_nemo_head_dim_apart_from_dim_over_heads_matches_transformers(tmp_path):
    cfg = transformers.MistralConfig(**{**TEXT, "head_dim": 32}, sliding_window=None,
                                     rope_theta=1e6)
    ref = _randomize(transformers.MistralForCausalLM(cfg), seed=2)
    hf = _save(ref, tmp_path / "hf")
    mistral = _mistral_folder(tmp_path / "mistral", ref, {
        **_base_params(head_dim=32), "rope_theta": 1e6})
    for folder in (hf, mistral):
        model = _check_logits(folder, ref)
        assert (model.args.head_dim, model.args.dim // model.args.n_heads) == (32, 16)


# ------------------------------------------------------------------- Ministral 3


def _ministral3(rope: dict, seed: int, tie: bool = True):
    cfg = transformers.Ministral3Config(**TEXT, rope_parameters=dict(rope),
                                        tie_word_embeddings=tie)
    return _randomize(transformers.Ministral3ForCausalLM(cfg), seed=seed)


@pytest.fixture(scope="module")
def ministral3(tmp_path_factory):
    ref = _ministral3(YARN, seed=4)
    root = tmp_path_factory.mktemp("ministral3")
    mistral = _mistral_folder(root / "mistral", ref, {
        **_base_params(), "rope_theta": 1e6, "tied_embeddings": True,
        "yarn": {"factor": 4.0, "original_max_position_embeddings": 16, "beta": 32.0,
                 "alpha": 1.0, "apply_scale": False},
        "llama_4_scaling": {"original_max_position_embeddings": 16, "beta": 0.1}})
    return ref, _save(ref, root / "hf"), mistral


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_ministral3_yarn_query_scale_tied_match_transformers(ministral3, layout):
    ref, hf, mistral = ministral3
    model = _check_logits(hf if layout == "hf" else mistral, ref)
    a = model.args
    assert a.tied_embeddings and "output" not in model.params
    assert (a.yarn.factor, a.yarn.attention_factor, a.llama_4_scaling.beta) == (4.0, 1.0, 0.1)


def test_ministral3_decode_past_original_max_matches_transformers_generate(ministral3):
    ref, hf, _ = ministral3
    _check_greedy(Transformer.from_folder(hf, dtype="float32"), ref, prompt_len=12, new=30)


def test_yarn_attention_factor_from_factor_untied_matches_transformers(tmp_path):
    """Without mscale / mscale_all_dim the factor sets the attention factor (0.1 ln 4 + 1);
    an untied head; and each part matters (logits move without it)."""
    rope = {k: v for k, v in YARN.items() if k not in ("mscale", "mscale_all_dim")}
    ref = _ministral3(rope, seed=5, tie=False)
    model = _check_logits(_save(ref, tmp_path / "hf"), ref)
    assert abs(model.args.yarn.attention_factor - (0.1 * np.log(4) + 1)) < 1e-12
    assert not model.args.tied_embeddings
    full = np.asarray(model.logits(_tokens(48)))
    for change in ({"yarn": None}, {"llama_4_scaling": None}):
        other = Transformer(model.args.__class__(**{**model.args.__dict__, **change}),
                            model.params)
        assert rel_err(other.logits(_tokens(48)), full) > 1e-3


# ------------------------------------------------------------------- Mistral 3 (vision)


def _vision_config() -> dict:
    return dict(model_type="pixtral", hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, head_dim=8, image_size=32,
                patch_size=8)


@pytest.mark.parametrize("text_type", ["mistral", "ministral3"])
def test_mistral3_language_model_matches_transformers_and_skips_vision(tmp_path, capfd,
                                                                       text_type):
    text = {**TEXT, "model_type": text_type}
    if text_type == "mistral":  # Mistral Small 3.1: rope 1e9, no window
        text.update(rope_theta=1e9, sliding_window=None)
    else:  # Ministral 3: yarn + query scale
        text.update(rope_parameters=dict(YARN))
    cfg = transformers.Mistral3Config(text_config=text, vision_config=_vision_config(),
                                      tie_word_embeddings=False)
    ref = _randomize(transformers.Mistral3ForConditionalGeneration(cfg), seed=6)
    hf = _save(ref, tmp_path / "hf")
    capfd.readouterr()
    model = _check_logits(hf, ref)
    err = capfd.readouterr().err
    assert len(re.findall("images are not supported", err)) == 1, err
    assert (model.args.llama_4_scaling is not None) == (text_type == "ministral3")
    if text_type == "mistral":
        assert model.args.rope_theta == 1e9 and model.args.sliding_window is None


def test_mistral3_mistral_layout_with_a_vision_block(tmp_path, capfd):
    text = {**TEXT, "model_type": "mistral", "rope_theta": 1e9, "sliding_window": None}
    cfg = transformers.Mistral3Config(text_config=text, vision_config=_vision_config(),
                                      tie_word_embeddings=False)
    ref = _randomize(transformers.Mistral3ForConditionalGeneration(cfg), seed=7)
    lm = transformers.MistralForCausalLM(transformers.MistralConfig(**text))
    lm.model.load_state_dict(ref.model.language_model.state_dict())
    lm.lm_head.load_state_dict(ref.lm_head.state_dict())
    vision = {"vision_encoder.transformer.layers.0.attention.wq.weight": np.ones((16, 16), np.float32),
              "vision_language_adapter.w_in.weight": np.ones((64, 16), np.float32),
              "patch_merger.merging_layer.weight": np.ones((16, 64), np.float32)}
    folder = _mistral_folder(tmp_path / "m", lm.eval(), {
        **_base_params(), "rope_theta": 1e9,
        "vision_encoder": {"hidden_size": 16, "num_channels": 3, "image_size": 32,
                           "patch_size": 8, "num_hidden_layers": 1}}, extra=vision)
    capfd.readouterr()
    _check_logits(folder, ref)
    assert "3 vision-encoder tensors skipped: images are not supported" in capfd.readouterr().err


# ------------------------------------------------------------------- round trip, refusals


def test_params_json_round_trip_of_the_new_fields(ministral3, ministral):
    for _, hf, _ in (ministral3, ministral):
        args = args_from_hf_config(hf / "config.json")
        path = hf.parent / "params_rt.json"
        path.write_text(json.dumps(args_to_params_json(args)))
        assert args_from_params_json(path) == args


def _refused(tmp_path, cfg: dict, message: str, name: str = "config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    read = args_from_hf_config if name == "config.json" else args_from_params_json
    with pytest.raises(ConfigError, match=re.escape(f"{path}: ") + message):
        read(path)


HF_BASE = {"model_type": "ministral", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 100,
           "sliding_window": 8}


@pytest.mark.parametrize("patch, message", [
    ({"layer_types": ["full_attention", "chunked_attention"]},
     "layer_types entry 'chunked_attention' is not supported"),
    ({"layer_types": ["full_attention"]}, "layer_types must be a list of num_hidden_layers=2"),
    ({"layer_types": ["sliding_attention"] * 2, "sliding_window": None},
     "layer_types has sliding_attention layers but sliding_window is null"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}},
     "rope_parameters rope_type 'longrope' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling rope_type 'linear' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn"}}, r"rope_parameters.factor is required"),
    ({"model_type": "pixtral"}, "model_type 'pixtral': a Pixtral vision encoder alone"),
    ({"model_type": "mistral4"}, "model_type 'mistral4': Mistral Small 4"),
    ({"model_type": "ministral3", "rope_parameters": {"rope_type": "default"}},
     r"rope_parameters.llama_4_scaling_beta is required"),
    ({"model_type": "mistral3", "text_config": {"model_type": "mistral",
                                                "layer_types": ["full_attention"] * 2}},
     "text_config.layer_types with text_config.model_type 'mistral'"),
])
def test_configs_not_run_faithfully_are_refused_naming_the_field(tmp_path, patch, message):
    _refused(tmp_path, {**HF_BASE, **patch}, message)


@pytest.mark.parametrize("patch, message", [
    ({"model_type": "mamba"}, "model_type 'mamba': Codestral Mamba"),
    ({"qk_nope_head_dim": 128}, "qk_nope_head_dim / kv_lora_rank: MLA attention"),
    ({"yarn": {"factor": 4.0, "original_max_position_embeddings": 16, "gamma": 1}},
     r"yarn.gamma is not a known YaRN field"),
    ({"llama_4_scaling": {"beta": 0.1}}, "llama_4_scaling must be an object with beta and"),
])
def test_params_json_not_run_faithfully_is_refused(tmp_path, patch, message):
    _refused(tmp_path, {**_base_params(), **patch}, message, name="params.json")


@pytest.mark.parametrize("cfg", [
    {**HF_BASE, "model_type": "mistral", "layer_types": ["sliding_attention", "full_attention"]},
    {**HF_BASE, "rope_theta": 5e5, "rope_parameters": {"rope_type": "default", "rope_theta": 2e5}},
    {**HF_BASE, "model_type": "ministral3", "sliding_window": None},
    {**HF_BASE, "model_type": "ministral3", "rope_parameters": {**YARN, "factor": None},
     "max_position_embeddings": 64},
    {**HF_BASE, "model_type": "mistral", "rope_scaling": {"type": "yarn", "factor": 2.0},
     "original_max_position_embeddings": 32, "max_position_embeddings": 256},
    # both blocks: transformers 5 takes the legacy rope_scaling when it is not empty
    {**HF_BASE, "model_type": "mistral", "rope_theta": 3e5,
     "rope_parameters": {"rope_type": "default", "rope_theta": 2e5},
     "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": 16,
                      "original_max_position_embeddings": 64}},
])
def test_fields_left_out_mean_what_transformers_reads(tmp_path, cfg):
    """The args equal what transformers' AutoConfig (and its rope standardization) makes
    of the same file: layer types, rope_theta priority, Ministral3's defaults, yarn fields."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours, ref = args_from_hf_config(tmp_path / "config.json"), AutoConfig.from_pretrained(tmp_path)
    rope = ref.rope_parameters
    assert ours.rope_theta == rope["rope_theta"]
    assert ours.head_dim == (getattr(ref, "head_dim", None)
                             or ref.hidden_size // ref.num_attention_heads)
    types = getattr(ref, "layer_types", None) or ["sliding_attention"] * ref.num_hidden_layers
    want = tuple(ref.sliding_window if t == "sliding_attention" else None for t in types)
    assert ours.layer_windows == want
    if rope["rope_type"] == "yarn":
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](ref, "cpu")
        from mistral_jax.rope import inv_frequencies

        np.testing.assert_allclose(  # float32 pow: numpy and torch differ by an ulp
            inv_frequencies(ours.head_dim, ours.rope_theta, ours.yarn), inv_freq.numpy(),
            rtol=1e-6)
        assert ours.yarn.attention_factor == factor
    else:
        assert ours.yarn is None


def test_converted_folders_of_the_new_families_give_the_same_logits(ministral, ministral3,
                                                                     tmp_path):
    from mistral_jax.convert import convert

    for i, (ref, hf, _) in enumerate((ministral, ministral3)):
        dst = tmp_path / f"converted{i}"
        convert(hf, dst, dtype="float32")
        direct = Transformer.from_folder(hf, dtype="float32")
        converted = _check_logits(dst, ref)
        assert converted.args == direct.args


def test_an_image_in_a_chat_message_is_a_clear_error(tmp_path):
    """tekken_240911 (Pixtral's) has an image config: without the refusal mistral-common
    encodes the image as [IMG] tokens that the language model alone would read as text
    (or, without opencv, as here, raises an ImportError traceback)."""
    import shutil

    import mistral_common

    from mistral_jax.errors import TokenizerError
    from mistral_jax.tokenizer import load_tokenizer

    data = Path(mistral_common.__file__).parent / "data"
    shutil.copy(data / "tekken_240911.json", tmp_path / "tekken.json")
    tok = load_tokenizer(tmp_path)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
             "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="}}
    text = {"type": "text", "text": "What is in this image?"}
    with pytest.raises(TokenizerError, match=r"^messages\[1\] has an image \(image_url\): images "
                                             "are not supported"):
        tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "user", "content": [text, image]}])
    assert tok.encode_chat([{"role": "user", "content": [text]}])  # text chunks still work
