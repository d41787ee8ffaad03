"""`ModelArgs`: the one description of a model, read from params.json or config.json.

Mistral's own folders carry a `params.json` (mistral-inference's `TransformerArgs`);
Hugging Face folders carry a `config.json` (`MistralForCausalLM` / `MixtralForCausalLM`).
Both are parsed into the same frozen, hashable dataclass, so it can be a static
argument of `jax.jit`.

A field left out means what the folder's reference means. params.json: mistral-inference's
`TransformerArgs` (`rope_theta` 1e6, no sliding window). config.json: the defaults of
transformers' `MistralConfig` or `MixtralConfig` (by `model_type`, else `architectures`),
`HF_DEFAULTS`: for Mistral `rope_theta` 1e4, `sliding_window` 4096, `rms_norm_eps` 1e-6; for
Mixtral 1e6, no window, 1e-5; both 8 KV heads (n_heads where the field is null). Mistral 7B
v0.1's params.json omits `rope_theta` although that model was trained with 1e4; pass
`rope_theta=1e4` to `Transformer.from_folder` for that one model in the Mistral layout.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral_jax.errors import ConfigError

MISTRAL_DEFAULT_ROPE_THETA = 1e6
# What transformers' MistralConfig / MixtralConfig (4.x and 5.x alike) take for the fields a
# config.json may leave out that no tensor's shape can tell (or, for the KV heads, that it
# would refuse): a Mixtral config without rope_theta means 1e6, a Mistral one 1e4 and a
# 4096-token window. A null num_key_value_heads means num_attention_heads in both.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 4096, "rms_norm_eps": 1e-6, "num_key_value_heads": 8},
    "mixtral": {"sliding_window": None, "rms_norm_eps": 1e-5, "num_key_value_heads": 8,
                "num_local_experts": 8, "num_experts_per_tok": 2},
}
# Without rope_theta or rope_parameters.rope_theta.
HF_DEFAULT_ROPE_THETA = {"mistral": 1e4, "mixtral": 1e6}
HF_ARCHITECTURES = {"MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral"}

# Fields each file may hold. READ ones change the model (a misspelt field is suggested from
# these); KNOWN ones are read elsewhere or mean nothing here (mistral-inference's batch size,
# transformers' training and generation settings). Any other field gets one warning.
PARAMS_JSON_READ = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                    "norm_eps", "vocab_size", "rope_theta", "sliding_window", "moe", "lora",
                    "max_seq_len", "max_position_embeddings", "quantization")
PARAMS_JSON_KNOWN = ("max_batch_size", "model_type")
PARAMS_JSON_BLOCKS = {"moe": ("num_experts", "num_experts_per_tok"), "lora": ("rank", "scaling")}
CONFIG_JSON_READ = ("hidden_size", "num_hidden_layers", "head_dim", "intermediate_size",
                    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "vocab_size",
                    "rope_theta", "rope_parameters", "rope_scaling", "sliding_window",
                    "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
                    "model_type", "architectures", "hidden_act", "tie_word_embeddings",
                    "quantization_config")
CONFIG_JSON_KNOWN = (
    # MistralConfig / MixtralConfig fields with no effect on inference
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
    "use_cache", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "use_sliding_window", "max_window_layers", "attention_bias",
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


@dataclasses.dataclass(frozen=True)
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int


@dataclasses.dataclass(frozen=True)
class LoraArgs:
    rank: int
    scaling: float = 2.0


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a Mistral/Mixtral model, named as in params.json."""

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = MISTRAL_DEFAULT_ROPE_THETA
    # None, one window for every layer, or a per-layer pattern repeated over the layers.
    sliding_window: int | tuple[int | None, ...] | None = None
    moe: MoeArgs | None = None
    lora: LoraArgs | None = None
    # Longest sequence the model supports, when the folder says (HF max_position_embeddings).
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                     "vocab_size"):
            positive_int(getattr(self, name), name)
        for name in ("norm_eps", "rope_theta"):  # <= 0 would give NaN logits
            object.__setattr__(self, name, float(positive_number(getattr(self, name), name)))
        if self.max_seq_len is not None:
            positive_int(self.max_seq_len, "max_seq_len")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if isinstance(self.sliding_window, list):
            object.__setattr__(self, "sliding_window", tuple(self.sliding_window))
        if isinstance(self.sliding_window, tuple):
            if not self.sliding_window or self.n_layers % len(self.sliding_window):
                raise ConfigError(
                    f"sliding_window pattern of length {len(self.sliding_window)} does not "
                    f"divide n_layers={self.n_layers}"
                )
        for w in self.layer_windows:
            if w is not None and (not isinstance(w, int) or w < 1):
                raise ConfigError(f"sliding_window entries must be positive integers, got {w!r}")
        if self.moe is not None:
            check_moe(self.moe.num_experts, self.moe.num_experts_per_tok)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """The sliding window of each layer (None: full causal attention)."""
        w = self.sliding_window
        if isinstance(w, tuple):
            return w * (self.n_layers // len(w))
        return (w,) * self.n_layers

    @property
    def n_params(self) -> int:
        d, f, v = self.dim, self.hidden_dim, self.vocab_size
        attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * d * f * (self.moe.num_experts if self.moe else 1)
        gate = d * self.moe.num_experts if self.moe else 0
        return self.n_layers * (attn + ffn + gate + 2 * d) + 2 * v * d + d


def positive_int(value: Any, name: str) -> int:
    """`value` if it is an integer >= 1 (not a bool, not a float such as 2.0); else ConfigError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def positive_number(value: Any, name: str) -> float:
    """`value` if it is a finite number > 0 (not a bool); else ConfigError."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return value


def check_moe(num_experts: Any, num_experts_per_tok: Any, *,
              names: tuple[str, str] = ("moe.num_experts", "moe.num_experts_per_tok")) -> MoeArgs:
    """MoeArgs of two positive integers with num_experts_per_tok <= num_experts; else a
    ConfigError naming the fields as `names` (params.json's by default)."""
    n_name, k_name = names
    positive_int(num_experts, n_name)
    positive_int(num_experts_per_tok, k_name)
    if num_experts_per_tok > num_experts:
        raise ConfigError(f"{k_name} must be in [1, {n_name}={num_experts}], "
                          f"got {num_experts_per_tok}")
    return MoeArgs(num_experts, num_experts_per_tok)


def config_field(source: Path, block: dict, key: str, kind: str, where: str = "") -> Any:
    """block[key] checked as a positive 'int', a 'positive' number or a finite 'float' (an
    int is a float too; a bool is neither); ConfigError naming the file, field and value."""
    name = f"{where}{key}"
    if block.get(key) is None:
        raise ConfigError(f"{source}: required field {name!r} is missing")
    v = block[key]
    if kind == "int":
        return positive_int(v, f"{source}: {name}")
    if kind == "positive":
        return float(positive_number(v, f"{source}: {name}"))
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{source}: {name} must be a number, got {v!r}")
    return float(v)


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
    warn_unknown_fields(path, cfg, PARAMS_JSON_READ, PARAMS_JSON_KNOWN)
    for block, fields in PARAMS_JSON_BLOCKS.items():
        if isinstance(cfg.get(block), dict):
            warn_unknown_fields(path, cfg[block], fields, (), where=f"{block}.")
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
    )
    kwargs.update(overrides)
    return _build(path, **kwargs)


def args_from_hf_config(path: str | Path, **overrides: Any) -> ModelArgs:
    """Parse a Hugging Face `config.json` of MistralForCausalLM or MixtralForCausalLM; fields
    left out take transformers' defaults for the config's model type (`HF_DEFAULTS`)."""
    path = Path(path)
    cfg = read_json(path)
    warn_unknown_fields(path, cfg, CONFIG_JSON_READ, CONFIG_JSON_KNOWN)
    model_type = hf_model_type(cfg, path)
    if cfg.get("tie_word_embeddings"):
        raise ConfigError(f"{path}: tie_word_embeddings=true is not supported by Mistral models")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):  # one function (transformers)
        raise ConfigError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported "
                          "(Mistral models use 'silu')")
    cfg = {**HF_DEFAULTS[model_type], **cfg}  # present keys win, null ones included
    # Checked and named as config.json names them.
    n_heads = config_field(path, cfg, "num_attention_heads", "int")
    dim = config_field(path, cfg, "hidden_size", "int")
    # rope_scaling: transformers 4's name for the block (transformers 5 still reads it).
    rope_key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
    rope = cfg.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{path}: {rope_key} must be an object or null, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{path}: {rope_key} rope_type {rope_type!r} is not supported "
                          "(only plain rotary embeddings)")
    theta = (_optional(cfg, "rope_theta", path, "positive") or rope.get("rope_theta")
             or HF_DEFAULT_ROPE_THETA[model_type])
    moe = None
    if model_type == "mixtral":
        n, k = (_require(cfg, key, path) for key in ("num_local_experts", "num_experts_per_tok"))
        try:  # named as config.json names them
            moe = check_moe(n, k, names=("num_local_experts", "num_experts_per_tok"))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    kwargs = dict(
        dim=dim,
        n_layers=config_field(path, cfg, "num_hidden_layers", "int"),
        head_dim=_optional(cfg, "head_dim", path, "int") or dim // n_heads,
        hidden_dim=config_field(path, cfg, "intermediate_size", "int"),
        n_heads=n_heads,
        n_kv_heads=_optional(cfg, "num_key_value_heads", path, "int") or n_heads,
        norm_eps=config_field(path, cfg, "rms_norm_eps", "positive"),
        vocab_size=config_field(path, cfg, "vocab_size", "int"),
        rope_theta=theta,
        sliding_window=cfg.get("sliding_window"),
        moe=moe,
        max_seq_len=_optional(cfg, "max_position_embeddings", path, "int"),
    )
    kwargs.update(overrides)
    return _build(path, **kwargs)


def hf_model_type(cfg: dict, path: Path) -> str:
    """'mistral' or 'mixtral': the config's `model_type`, else what its `architectures` name,
    else 'mixtral' when it has expert fields; ConfigError for any other model."""
    arch = cfg.get("architectures") or []
    if isinstance(arch, str):  # one name rather than a list of them
        arch = [arch]
    if not isinstance(arch, list):
        raise ConfigError(f"{path}: architectures must be a list of class names, got {arch!r}")
    if arch and not any(a in HF_ARCHITECTURES for a in arch):
        raise ConfigError(
            f"{path}: unsupported architectures {arch}; expected MistralForCausalLM or "
            "MixtralForCausalLM"
        )
    model_type = cfg.get("model_type")
    if model_type is not None:
        if model_type not in HF_DEFAULTS:
            raise ConfigError(f"{path}: unsupported model_type {model_type!r}; expected "
                              "'mistral' or 'mixtral'")
        return model_type
    named = {HF_ARCHITECTURES[a] for a in arch if a in HF_ARCHITECTURES}
    if len(named) == 1:
        return named.pop()
    return "mixtral" if "num_local_experts" in cfg else "mistral"


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
    return out
