"""Model families: a config.json read as transformers reads it, and params.json's newer fields.

config.json. transformers picks the config class by `model_type` (the `architectures`
label only names the head), and each class fills the fields a file leaves out with its
own defaults (`FAMILIES`): Mistral and Mixtral; Ministral (per-layer `layer_types`: some
layers windowed, the others full); Ministral3 (YaRN rotary scaling and a position-dependent
query scale); and Mistral3, a vision-language model whose `text_config` is one of those
(its language model loads, its vision weights are skipped: `checkpoint.py`). As in
transformers' `AutoConfig`, a `model_type: mistral` config that carries `layer_types` is
a Ministral one. Whatever this project cannot run faithfully (another layer type, rope
type or model type, a vision encoder alone) is refused, naming the field.

params.json (Mistral layout). The names vLLM's Mistral-format reader maps: `yarn` {factor,
original_max_position_embeddings, beta (beta_fast), alpha (beta_slow), apply_scale},
`llama_4_scaling` {beta, original_max_position_embeddings}, `tied_embeddings`, a
`sliding_window` list (per layer, None: full attention; `ModelArgs` reads it), and a
`vision_encoder` (or `multimodal`) block beside the language model's fields.

Tied embeddings follow transformers 5: a tied model whose checkpoint still holds an
output head with other values runs with that head (transformers then unties them), so
`tied_embeddings` is true only where the folder's weights have no output head.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from mistral_jax.args import (
    QueryScaleArgs,
    YarnArgs,
    check_moe,
    config_field,
    optional_field,
    positive_int,
    yarn_mscale,
)
from mistral_jax.errors import CheckpointError, ConfigError
from mistral_jax.safetensors_file import read_header, safetensors_files

# transformers' defaults per config class, for the fields a config.json may leave out that
# no tensor's shape tells (MistralConfig, MixtralConfig, MinistralConfig, Ministral3Config).
# `theta`: rope_theta without rope_theta or rope_parameters.rope_theta (default_theta).
FAMILIES: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 4096, "rms_norm_eps": 1e-6, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "theta": 1e4},
    "mixtral": {"sliding_window": None, "rms_norm_eps": 1e-5, "num_key_value_heads": 8,
                "num_local_experts": 8, "num_experts_per_tok": 2,
                "max_position_embeddings": 4096 * 32, "theta": 1e6},
    "ministral": {"sliding_window": 4096, "rms_norm_eps": 1e-6, "num_key_value_heads": 8,
                  "max_position_embeddings": 4096 * 32, "theta": 1e4},
    "ministral3": {"sliding_window": None, "rms_norm_eps": 1e-5, "num_key_value_heads": 8,
                   "head_dim": 128, "max_position_embeddings": 262144, "theta": 1e4},
}
# Ministral3Config's rope_parameters when a file has none.
MINISTRAL3_ROPE = {"type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                   "original_max_position_embeddings": 16384, "beta_fast": 32.0,
                   "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                   "llama_4_scaling_beta": 0.1}
# Mistral3Config's text_config when a file has none (Mistral Small 3.1's language model).
MISTRAL3_TEXT = {"model_type": "mistral", "head_dim": 128, "hidden_act": "silu",
                 "hidden_size": 5120, "intermediate_size": 32768,
                 "max_position_embeddings": 131072, "num_attention_heads": 32,
                 "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                 "rope_theta": 1e9, "sliding_window": None, "vocab_size": 131072}
ARCHITECTURES = {"MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral",
                 "MinistralForCausalLM": "ministral", "Ministral3ForCausalLM": "ministral3",
                 "Mistral3ForConditionalGeneration": "mistral3"}
MULTIMODAL = {"mistral3": True}  # model_type -> tie_word_embeddings default
LAYER_TYPES = ("full_attention", "sliding_attention")
# Not run, and why (the README's table says the same).
REFUSED = {
    "pixtral": "a Pixtral vision encoder alone, with no language model",
    "llava": "Pixtral-12B (LlavaForConditionalGeneration) is not supported",
    "mamba2": "Codestral Mamba (a state-space model, not a transformer) is not supported",
    "mistral4": "Mistral Small 4 (MLA attention + MoE) is not supported",
    "mistral_large4": "Mistral Large 3 (MLA attention + MoE) is not supported",
    "deepseek_v3": "MLA attention + MoE (Mistral Large 3) is not supported",
}

# The output head's names in either layout (and under a Mistral3 language_model prefix).
LM_HEAD_NAMES = ("lm_head.weight", "output.weight", "language_model.lm_head.weight")
# A vision-language checkpoint's language model, renamed to the plain layout's names
# (transformers 5 writes Mistral3 as `language_model.model.*`, loads `model.language_model.*`).
_LM_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."))
# Vision encoder and projector weights of Mistral3 (HF) and of the Mistral layout's
# vision_encoder block: skipped, the language model alone runs (text prompts only).
VISION = re.compile(r"(model\.)?(vision_tower|multi_modal_projector)\..*|"
                    r"(vision_encoder|vision_language_adapter|patch_merger|"
                    r"pre_mm_projector_norm)\..*")
IMAGES_NOTE = ("{folder}: {n} vision-encoder tensors skipped: images are not supported, "
               "text prompts work")


def language_model_name(name: str) -> str:
    """A Mistral3 language-model tensor name as the plain layout names it; others unchanged."""
    for old, new in _LM_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def hf_args(cfg: dict, path: Path) -> dict[str, Any]:
    """ModelArgs keyword arguments from a parsed config.json, as transformers reads it."""
    model_type, text, where, tie_default = _text_config(cfg, path)
    family = model_type
    if where == "" and model_type == "mistral" and "layer_types" in text:
        family = "ministral"  # what transformers' AutoConfig does with such a file
    if where and model_type == "mistral" and text.get("layer_types") is not None:
        raise ConfigError(
            f"{path}: text_config.layer_types with text_config.model_type 'mistral': "
            "transformers' MistralConfig ignores it and windows every layer; set "
            "model_type 'ministral' for per-layer windows, or drop layer_types")
    if text.get("hidden_act", "silu") not in ("silu", "swish"):  # one function (transformers)
        raise ConfigError(f"{path}: {where}hidden_act {text['hidden_act']!r} is not supported "
                          "(Mistral models use 'silu')")
    defaults = FAMILIES[family]
    c = {**{k: v for k, v in defaults.items() if k != "theta"}, **text}
    n_heads = config_field(path, c, "num_attention_heads", "int", where)
    dim = config_field(path, c, "hidden_size", "int", where)
    n_layers = config_field(path, c, "num_hidden_layers", "int", where)
    moe = None
    if family == "mixtral":
        n, k = (_require(c, key, path, where) for key in ("num_local_experts",
                                                        "num_experts_per_tok"))
        try:
            moe = check_moe(n, k, names=(f"{where}num_local_experts", f"{where}num_experts_per_tok"))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    head_dim = optional_field(path, c, "head_dim", "int", where) or dim // n_heads
    max_pos = optional_field(path, c, "max_position_embeddings", "int", where)
    theta, yarn, query_scale = _rope(c, text, path, where, family, head_dim)
    tied = cfg.get("tie_word_embeddings", tie_default) if where else c.get(
        "tie_word_embeddings", False)
    return dict(
        dim=dim,
        n_layers=n_layers,
        head_dim=head_dim,
        hidden_dim=config_field(path, c, "intermediate_size", "int", where),
        n_heads=n_heads,
        n_kv_heads=optional_field(path, c, "num_key_value_heads", "int", where) or n_heads,
        norm_eps=config_field(path, c, "rms_norm_eps", "positive", where),
        vocab_size=config_field(path, c, "vocab_size", "int", where),
        rope_theta=theta,
        sliding_window=_windows(c, path, where, family, n_layers),
        moe=moe,
        max_seq_len=max_pos if "max_position_embeddings" in text else None,
        yarn=yarn,
        llama_4_scaling=query_scale,
        tied_embeddings=bool(tied) and not has_output_head(path.parent, "hf"),
    )


def _text_config(cfg: dict, path: Path) -> tuple[str, dict, str, bool]:
    """(model_type, the language model's config block, its field prefix, tie default)."""
    arch = cfg.get("architectures") or []
    if isinstance(arch, str):  # one name rather than a list of them
        arch = [arch]
    if not isinstance(arch, list):
        raise ConfigError(f"{path}: architectures must be a list of class names, got {arch!r}")
    model_type = cfg.get("model_type")
    if model_type is None:  # the architectures label, else the expert fields
        named = {ARCHITECTURES[a] for a in arch if a in ARCHITECTURES}
        model_type = (named.pop() if len(named) == 1 else
                      "mixtral" if "num_local_experts" in cfg else "mistral")
    if model_type in REFUSED:
        raise ConfigError(f"{path}: model_type {model_type!r}: {REFUSED[model_type]}")
    if model_type not in FAMILIES and model_type not in MULTIMODAL:
        raise ConfigError(f"{path}: unsupported model_type {model_type!r}; expected one of "
                          f"{sorted([*FAMILIES, *MULTIMODAL])}")
    if arch and not any(a in ARCHITECTURES for a in arch):
        raise ConfigError(f"{path}: unsupported architectures {arch}; expected one of "
                          f"{sorted(ARCHITECTURES)}")
    if model_type not in MULTIMODAL:
        return model_type, cfg, "", False
    text = cfg.get("text_config")
    if text is None:
        text = MISTRAL3_TEXT
    if not isinstance(text, dict):
        raise ConfigError(f"{path}: text_config must be an object, got {text!r}")
    sub = text.get("model_type", "mistral")
    if sub in REFUSED:
        raise ConfigError(f"{path}: text_config.model_type {sub!r}: {REFUSED[sub]}")
    if sub not in FAMILIES:
        raise ConfigError(f"{path}: unsupported text_config.model_type {sub!r}; expected one "
                          f"of {sorted(FAMILIES)}")
    return sub, text, "text_config.", MULTIMODAL[model_type]


def _rope(c: dict, text: dict, path: Path, where: str, family: str,
          head_dim: int) -> tuple[float, YarnArgs | None, QueryScaleArgs | None]:
    """(rope_theta, yarn, query scale) as transformers' rope standardization reads them."""
    # transformers 5: a non-empty legacy rope_scaling replaces rope_parameters.
    key = "rope_scaling" if text.get("rope_scaling") else "rope_parameters"
    rope = text.get(key)
    if rope is None and family == "ministral3":
        rope = MINISTRAL3_ROPE
    rope = {} if rope is None else rope
    name = f"{where}{key}"
    if not isinstance(rope, dict):
        raise ConfigError(f"{path}: {name} must be an object or null, got {rope!r}")
    if any(t in rope for t in LAYER_TYPES):
        raise ConfigError(f"{path}: {name} per layer type is not supported")
    for partial in (rope.get("partial_rotary_factor"), text.get("partial_rotary_factor")):
        if partial not in (None, 1, 1.0):
            raise ConfigError(f"{path}: partial_rotary_factor {partial!r} is not supported "
                              "(rotary embeddings over the whole head)")
    theta = rope.get("rope_theta")
    if theta is None:
        theta = text.get("rope_theta")
    if theta is None:
        theta = FAMILIES[family]["theta"]
    theta = config_field(path, {"rope_theta": theta}, "rope_theta", "positive", where)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{path}: {name} rope_type {rope_type!r} is not supported "
                          "(plain rotary embeddings and 'yarn' only)")
    yarn, original = None, rope.get("original_max_position_embeddings")
    if rope_type == "yarn":
        max_pos = c["max_position_embeddings"]
        if text.get("original_max_position_embeddings") is not None:  # wins, as in transformers
            original = text["original_max_position_embeddings"]
        elif original is None:
            original = max_pos
        original = positive_int(original, f"{path}: {name}.original_max_position_embeddings")
        if "factor" not in rope:
            raise ConfigError(f"{path}: {name}.factor is required for rope_type 'yarn'")
        factor = rope["factor"]
        if factor is None:
            factor = positive_int(max_pos, f"{path}: {where}max_position_embeddings") / original
        factor = _number(factor, f"{name}.factor", path)
        attention = rope.get("attention_factor")
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if attention is None:
            attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                         if mscale and mscale_all else yarn_mscale(factor))
        yarn = YarnArgs(factor=factor, original_max_position_embeddings=original,
                        beta_fast=_number(rope.get("beta_fast") or 32, f"{name}.beta_fast", path),
                        beta_slow=_number(rope.get("beta_slow") or 1, f"{name}.beta_slow", path),
                        attention_factor=_number(attention, f"{name}.attention_factor", path),
                        truncate=bool(rope.get("truncate", True)))
    query_scale = None
    if family == "ministral3":  # Ministral3Attention scales its queries; the others do not
        beta = rope.get("llama_4_scaling_beta")
        if beta is None or original is None:
            missing = "llama_4_scaling_beta" if beta is None else "original_max_position_embeddings"
            raise ConfigError(f"{path}: {name}.{missing} is required by model_type 'ministral3' "
                              "(its query scale)")
        beta = _number(beta, f"{name}.llama_4_scaling_beta", path, positive=False)
        query_scale = QueryScaleArgs(beta, positive_int(
            original, f"{path}: {name}.original_max_position_embeddings")) if beta else None
    return theta, yarn, query_scale


def _windows(c: dict, path: Path, where: str, family: str, n_layers: int):
    """The sliding window of every layer: one for all (Mistral, Mixtral, Ministral3), or
    per `layer_types` entry (Ministral)."""
    window = c.get("sliding_window")
    if window is not None:
        window = positive_int(window, f"{path}: {where}sliding_window")
    if family != "ministral":
        return window
    types = c.get("layer_types")
    if types is None:  # MinistralConfig's default
        return window
    if not isinstance(types, list) or len(types) != n_layers:
        raise ConfigError(f"{path}: {where}layer_types must be a list of num_hidden_layers="
                          f"{n_layers} entries, got {types!r}")
    for t in types:
        if t not in LAYER_TYPES:
            raise ConfigError(f"{path}: {where}layer_types entry {t!r} is not supported "
                              f"(expected {' or '.join(LAYER_TYPES)})")
    if window is None and "sliding_attention" in types:
        raise ConfigError(f"{path}: {where}layer_types has sliding_attention layers but "
                          f"{where}sliding_window is null")
    return tuple(window if t == "sliding_attention" else None for t in types)


def params_json_extras(cfg: dict, path: Path) -> dict[str, Any]:
    """ModelArgs keyword arguments for params.json's newer fields (vLLM's names); refuses
    the model types and blocks this project does not run, naming the field."""
    model_type = cfg.get("model_type", "transformer")
    if model_type == "mamba":
        raise ConfigError(f"{path}: model_type 'mamba': {REFUSED['mamba2']}")
    if model_type != "transformer":
        raise ConfigError(f"{path}: model_type {model_type!r} is not supported "
                          "(expected 'transformer')")
    if cfg.get("qk_nope_head_dim") or cfg.get("q_lora_rank") or cfg.get("kv_lora_rank"):
        raise ConfigError(f"{path}: qk_nope_head_dim / kv_lora_rank: MLA attention (Mistral "
                          "Small 4, Mistral Large 3) is not supported")
    moe = cfg.get("moe")
    if isinstance(moe, dict) and (moe.get("num_shared_experts") or 0) > 0:
        raise ConfigError(f"{path}: moe.num_shared_experts: shared-expert MoE (Mistral Large "
                          "3) is not supported")
    if cfg.get("activation", "silu") not in ("silu", "swish"):
        raise ConfigError(f"{path}: activation {cfg['activation']!r} is not supported "
                          "(Mistral models use 'silu')")
    out: dict[str, Any] = {}
    yarn = cfg.get("yarn")
    if yarn:
        if not isinstance(yarn, dict):
            raise ConfigError(f"{path}: yarn must be an object, got {yarn!r}")
        known = {"factor", "original_max_position_embeddings", "beta", "alpha",
                 "apply_scale", "attention_factor", "truncate"}
        for k in yarn:
            if k not in known:
                raise ConfigError(f"{path}: yarn.{k} is not a known YaRN field "
                                  f"(expected {sorted(known)})")
        for k in ("factor", "original_max_position_embeddings"):
            if yarn.get(k) is None:
                raise ConfigError(f"{path}: yarn block is missing required field {k!r}")
        factor = _number(yarn["factor"], "yarn.factor", path)
        # vLLM: mscale_all_dim 1 without mscale -> transformers' 0.1 ln(factor) + 1;
        # apply_scale false -> no magnitude correction (attention_factor 1).
        attention = yarn.get("attention_factor",
                             yarn_mscale(factor) if yarn.get("apply_scale", True) else 1.0)
        out["yarn"] = YarnArgs(
            factor=factor,
            original_max_position_embeddings=positive_int(
                yarn["original_max_position_embeddings"],
                f"{path}: yarn.original_max_position_embeddings"),
            beta_fast=_number(yarn.get("beta", 32.0), "yarn.beta", path),
            beta_slow=_number(yarn.get("alpha", 1.0), "yarn.alpha", path),
            attention_factor=_number(attention, "yarn.attention_factor", path),
            truncate=bool(yarn.get("truncate", True)))
    scaling = cfg.get("llama_4_scaling")
    if scaling:
        if not isinstance(scaling, dict) or any(
                scaling.get(k) is None for k in ("beta", "original_max_position_embeddings")):
            raise ConfigError(f"{path}: llama_4_scaling must be an object with beta and "
                              f"original_max_position_embeddings, got {scaling!r}")
        beta = _number(scaling["beta"], "llama_4_scaling.beta", path, positive=False)
        if beta:
            out["llama_4_scaling"] = QueryScaleArgs(beta, positive_int(
                scaling["original_max_position_embeddings"],
                f"{path}: llama_4_scaling.original_max_position_embeddings"))
    tied = cfg.get("tied_embeddings", False)
    if not isinstance(tied, bool):
        raise ConfigError(f"{path}: tied_embeddings must be true or false, got {tied!r}")
    out["tied_embeddings"] = tied and not has_output_head(path.parent, "mistral")
    return out


def has_output_head(folder: Path, layout: str) -> bool:
    """Whether the folder's safetensors headers hold an output head (lm_head / output)."""
    try:
        files = safetensors_files(folder, layout)
    except CheckpointError:  # no weights here (a config alone, a converted folder)
        return False
    return any(name in LM_HEAD_NAMES for f in files for name in read_header(f))


def _number(value: Any, name: str, path: Path, positive: bool = True) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or (positive and value <= 0)):
        kind = "a positive number" if positive else "a number"
        raise ConfigError(f"{path}: {name} must be {kind}, got {value!r}")
    return float(value)


def _require(c: dict, key: str, path: Path, where: str) -> Any:
    if c.get(key) is None:
        raise ConfigError(f"{path}: required field {where + key!r} is missing")
    return c[key]
