"""`ModelArgs`: the one description of a model, a frozen, hashable dataclass (static under
`jax.jit`), and the checks of its fields. Reading it from a folder's params.json or
config.json is config.py (and hf_config.py).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from mistral_jax.errors import ConfigError

MISTRAL_DEFAULT_ROPE_THETA = 1e6

@dataclasses.dataclass(frozen=True)
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int


@dataclasses.dataclass(frozen=True)
class LoraArgs:
    rank: int
    scaling: float = 2.0


@dataclasses.dataclass(frozen=True)
class YarnArgs:
    """YaRN rotary scaling (transformers' rope_type 'yarn'; params.json's `yarn` block).

    `attention_factor` multiplies cos and sin (so every attention score by its square);
    readers resolve it from factor / mscale / mscale_all_dim / apply_scale as the references do.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True  # round the correction range outwards (transformers' default)

    def __post_init__(self) -> None:
        for name in ("factor", "beta_fast", "beta_slow", "attention_factor"):
            object.__setattr__(self, name, float(positive_number(getattr(self, name),
                                                                 f"yarn.{name}")))
        positive_int(self.original_max_position_embeddings, "yarn.original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class QueryScaleArgs:
    """The position-dependent query scale 1 + beta * log(1 + floor(pos / original_max)) of
    transformers' Ministral3 (`llama_4_scaling_beta`) and params.json's `llama_4_scaling`."""

    beta: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) \
                or not math.isfinite(self.beta):
            raise ConfigError(f"llama_4_scaling.beta must be a number, got {self.beta!r}")
        object.__setattr__(self, "beta", float(self.beta))
        positive_int(self.original_max_position_embeddings,
                     "llama_4_scaling.original_max_position_embeddings")


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
    yarn: YarnArgs | None = None  # None: plain rotary embeddings with rope_theta
    llama_4_scaling: QueryScaleArgs | None = None  # None: queries unscaled
    tied_embeddings: bool = False  # the output head is the embedding (no `output` weight)

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
        if not isinstance(self.tied_embeddings, bool):
            raise ConfigError(f"tied_embeddings must be true or false, got {self.tied_embeddings!r}")

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
        heads = 1 if self.tied_embeddings else 2  # embedding (+ output)
        return self.n_layers * (attn + ffn + gate + 2 * d) + heads * v * d + d


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


def optional_field(source: Path, block: dict, key: str, kind: str, where: str = "") -> Any:
    """block[key] checked as `config_field` does, or None when absent or null."""
    return None if block.get(key) is None else config_field(source, block, key, kind, where)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
