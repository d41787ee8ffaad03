"""A model folder's config -> `ModelArgs`: Mistral's params.json, or Hugging Face's config.json
(read as transformers reads it, `hf_config.py`); and back to params.json.

    args, layout = load_args(folder)        # layout 'mistral' or 'hf'
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral_jax.args import (
    MISTRAL_DEFAULT_ROPE_THETA,
    LoraArgs,
    ModelArgs,
    check_moe,
    config_field,
    optional_field,
    yarn_mscale,
)
from mistral_jax.errors import ConfigError
from mistral_jax.hf_config import hf_args, params_json_extras

# Fields each file may hold. READ ones change the model (a misspelt field is suggested from
# these); KNOWN ones are read elsewhere or mean nothing here (mistral-inference's batch size,
# transformers' training and generation settings). Any other field gets one warning.
PARAMS_JSON_READ = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                    "norm_eps", "vocab_size", "rope_theta", "sliding_window", "moe", "lora",
                    "max_seq_len", "max_position_embeddings", "quantization", "yarn",
                    "llama_4_scaling", "tied_embeddings")
PARAMS_JSON_KNOWN = ("max_batch_size", "model_type", "vision_encoder")
PARAMS_JSON_BLOCKS = {"moe": ("num_experts", "num_experts_per_tok"), "lora": ("rank", "scaling")}
CONFIG_JSON_READ = ("hidden_size", "num_hidden_layers", "head_dim", "intermediate_size",
                    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "vocab_size",
                    "rope_theta", "rope_parameters", "rope_scaling", "sliding_window",
                    "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
                    "model_type", "architectures", "hidden_act", "tie_word_embeddings",
                    "quantization_config", "layer_types", "text_config")
CONFIG_JSON_KNOWN = (
    # MistralConfig / MixtralConfig fields with no effect on inference
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
    "use_cache", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "use_sliding_window", "max_window_layers", "attention_bias",
    # Mistral3Config's vision side (images are not supported; hf_config.py says so once)
    "vision_config", "image_token_index", "projector_hidden_act", "vision_feature_layer",
    "multimodal_projector_bias", "spatial_merge_size",
    # PretrainedConfig's own (transformers 4 and 5)
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "id2label", "label2id",
    "is_encoder_decoder", "is_decoder", "problem_type", "return_dict", "output_attentions",
    "output_hidden_states", "chunk_size_feed_forward", "torchscript", "use_bfloat16",
    "pruned_heads", "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tf_legacy_loss", "finetuning_task", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "auto_map", "_attn_implementation",
    "_attn_implementation_autoset", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens")
_WARNED: set[tuple[str, str]] = set()  # (file, field): each warned about once per process


def warn_unknown_fields(source: Path, cfg: dict, read: Sequence[str], known: Sequence[str],
                        where: str = "") -> list[str]:
    """One stderr line per field of `cfg` that is neither read nor known, naming the closest
    read field (difflib) when there is one: a misspelt field would otherwise be silently
    left at its default. Each (file, field) is reported once; returns the lines printed."""
    lines = []
    for key in cfg:
        name = f"{where}{key}"
        if key in read or key in known or (str(source), name) in _WARNED:
            continue
        _WARNED.add((str(source), name))
        close = difflib.get_close_matches(str(key), read, n=1, cutoff=0.75)
        hint = f"; did you mean {where + close[0]!r}?" if close else ""
        lines.append(f"warning: {source}: field {name!r} is not read by mistral_jax{hint}")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines



def lora_args(block: Any, source: Path) -> LoraArgs:
    """A params.json `lora` block: `rank` (positive int) and `scaling` (number), both
    required as in mistral-inference's LoraArgs; else a ConfigError naming file and field."""
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: lora must be an object with rank and scaling, got {block!r}")
    return LoraArgs(config_field(source, block, "rank", "int", "lora."),
                    config_field(source, block, "scaling", "float", "lora."))


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object at top level")
    return cfg


def _build(source: Path, **kwargs: Any) -> ModelArgs:
    try:
        return ModelArgs(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def args_from_params_json(path: str | Path, **overrides: Any) -> ModelArgs:
    """Parse a Mistral `params.json` (mistral-inference's TransformerArgs)."""
    path = Path(path)
    cfg = read_json(path)
    warn_unknown_fields(path, cfg, PARAMS_JSON_READ, PARAMS_JSON_KNOWN)
    for block, fields in PARAMS_JSON_BLOCKS.items():
        if isinstance(cfg.get(block), dict):
            warn_unknown_fields(path, cfg[block], fields, (), where=f"{block}.")
    req = {k: config_field(path, cfg, k, "int") for k in (
        "dim", "n_layers", "hidden_dim", "n_heads", "vocab_size")}
    req["norm_eps"] = config_field(path, cfg, "norm_eps", "positive")
    n_kv_heads = optional_field(path, cfg, "n_kv_heads", "int") or req["n_heads"]
    head_dim = optional_field(path, cfg, "head_dim", "int") or req["dim"] // req["n_heads"]
    moe = None
    if cfg.get("moe") is not None:  # an empty block is incomplete, as in mistral-inference
        m = cfg["moe"]
        if not isinstance(m, dict):
            raise ConfigError(f"{path}: moe must be an object with num_experts and "
                              f"num_experts_per_tok, got {m!r}")
        for key in ("num_experts", "num_experts_per_tok"):
            if m.get(key) is None:
                raise ConfigError(f"{path}: moe block is missing required field {key!r}")
        try:
            moe = check_moe(m["num_experts"], m["num_experts_per_tok"])
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    lora = None if cfg.get("lora") is None else lora_args(cfg["lora"], path)
    kwargs = dict(
        req,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rope_theta=optional_field(path, cfg, "rope_theta", "positive") or MISTRAL_DEFAULT_ROPE_THETA,
        sliding_window=cfg.get("sliding_window"),
        moe=moe,
        lora=lora,
        max_seq_len=(optional_field(path, cfg, "max_seq_len", "int")
                     or optional_field(path, cfg, "max_position_embeddings", "int")),
        **params_json_extras(cfg, path),
    )
    kwargs.update(overrides)
    return _build(path, **kwargs)


def args_from_hf_config(path: str | Path, **overrides: Any) -> ModelArgs:
    """Parse a Hugging Face `config.json` as transformers reads it (`hf_config.py`): the class
    its model_type names (Mistral, Mixtral, Ministral, Ministral3, or the language model of
    Mistral3), with that class's defaults for the fields left out."""
    path = Path(path)
    cfg = read_json(path)
    warn_unknown_fields(path, cfg, CONFIG_JSON_READ, CONFIG_JSON_KNOWN)
    return _build(path, **{**hf_args(cfg, path), **overrides})


def check_folder(folder: str | Path) -> Path:
    """`folder` as a Path; ConfigError if it does not exist or is not a directory."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "it does not exist" if not folder.exists() else "it is a file"
        raise ConfigError(f"{folder}: not a directory ({what})")
    return folder


def load_args(folder: str | Path, **overrides: Any) -> tuple[ModelArgs, str]:
    """Read the args of a model folder; returns (args, layout) with layout 'mistral' or 'hf'."""
    folder = check_folder(folder)
    if (folder / "params.json").is_file():
        return args_from_params_json(folder / "params.json", **overrides), "mistral"
    if (folder / "config.json").is_file():
        return args_from_hf_config(folder / "config.json", **overrides), "hf"
    raise ConfigError(f"{folder}: no params.json (Mistral layout) or config.json (HF layout)")


def args_to_params_json(args: ModelArgs) -> dict:
    """The params.json dict that `args_from_params_json` reads back as `args`."""
    out = {k: getattr(args, k) for k in (
        "dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps",
        "vocab_size", "rope_theta")}
    if args.sliding_window is not None:
        w = args.sliding_window
        out["sliding_window"] = list(w) if isinstance(w, tuple) else w
    if args.moe is not None:
        out["moe"] = dataclasses.asdict(args.moe)
    if args.lora is not None:
        out["lora"] = dataclasses.asdict(args.lora)
    if args.max_seq_len is not None:
        out["max_seq_len"] = args.max_seq_len
    if args.yarn is not None:  # vLLM's names: beta -> beta_fast, alpha -> beta_slow
        y = args.yarn
        out["yarn"] = {"factor": y.factor,
                       "original_max_position_embeddings": y.original_max_position_embeddings,
                       "beta": y.beta_fast, "alpha": y.beta_slow}
        if y.attention_factor == 1.0:
            out["yarn"]["apply_scale"] = False
        elif y.attention_factor != yarn_mscale(y.factor):
            out["yarn"]["attention_factor"] = y.attention_factor  # (read back by this project)
        if not y.truncate:
            out["yarn"]["truncate"] = False
    if args.llama_4_scaling is not None:
        q = args.llama_4_scaling
        out["llama_4_scaling"] = {"beta": q.beta,
                                  "original_max_position_embeddings": q.original_max_position_embeddings}
    if args.tied_embeddings:
        out["tied_embeddings"] = True
    return out
