"""A model folder's config -> `ModelArgs`: Mistral's params.json, or Hugging Face's config.json
(read as transformers reads it, `hf_config.py`); and back to params.json.

    args, layout = load_args(folder)        # layout 'mistral' or 'hf'
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mistral_jax.args import (
    MISTRAL_DEFAULT_ROPE_THETA,
    LoraArgs,
    ModelArgs,
    check_moe,
    config_field,
    yarn_mscale,
)
from mistral_jax.errors import ConfigError
from mistral_jax.hf_config import hf_args, params_json_extras


def _optional(cfg: dict, key: str, source: Path, kind: str) -> Any:
    """cfg[key] checked as `config_field` does, or None when absent or null."""
    return None if cfg.get(key) is None else config_field(source, cfg, key, kind)


def lora_args(block: Any, source: Path) -> LoraArgs:
    """A params.json `lora` block: `rank` (positive int) and `scaling` (number), both
    required as in mistral-inference's LoraArgs; else a ConfigError naming file and field."""
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: lora must be an object with rank and scaling, got {block!r}")
    return LoraArgs(config_field(source, block, "rank", "int", "lora."),
                    config_field(source, block, "scaling", "float", "lora."))


def _require(cfg: dict, key: str, source: Path) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{source}: required field {key!r} is missing")
    return cfg[key]


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
    req = {k: config_field(path, cfg, k, "int") for k in (
        "dim", "n_layers", "hidden_dim", "n_heads", "vocab_size")}
    req["norm_eps"] = config_field(path, cfg, "norm_eps", "positive")
    n_kv_heads = _optional(cfg, "n_kv_heads", path, "int") or req["n_heads"]
    head_dim = _optional(cfg, "head_dim", path, "int") or req["dim"] // req["n_heads"]
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
        rope_theta=_optional(cfg, "rope_theta", path, "positive") or MISTRAL_DEFAULT_ROPE_THETA,
        sliding_window=cfg.get("sliding_window"),
        moe=moe,
        lora=lora,
        max_seq_len=(_optional(cfg, "max_seq_len", path, "int")
                     or _optional(cfg, "max_position_embeddings", path, "int")),
        **params_json_extras(cfg, path),
    )
    kwargs.update(overrides)
    return _build(path, **kwargs)


def args_from_hf_config(path: str | Path, **overrides: Any) -> ModelArgs:
    """Parse a Hugging Face `config.json` as transformers reads it (`hf_config.py`): the class
    its model_type names (Mistral, Mixtral, Ministral, Ministral3, or the language model of
    Mistral3), with that class's defaults for the fields left out."""
    path = Path(path)
    return _build(path, **{**hf_args(read_json(path), path), **overrides})


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
