"""Sampling strategies: small frozen dataclasses, each one method from logits to token ids.

A strategy is a pytree: `Sampling`'s temperature and top_p are its leaves (traced values
under `jax.jit`), while top_k and whether top-p truncation is on at all are static. So
the decode loop in `generate.py` is compiled once for greedy and once per (top_k, top-p
on/off) combination; a new temperature or top_p value reuses the compiled program.
Strategies built from Python numbers are also hashable and compare by value. Build one
from user-facing values with `make_strategy`, which validates them and picks `Greedy` at
temperature 0.

Seeds: `prng_key(seed)` turns any seed in [-2**63, 2**63) into a PRNG key, a distinct
key for each seed (`check_seed` refuses others).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Always the most likely token (argmax; the lowest id on ties). A pytree without leaves."""

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits f32[B, V], key (unused) -> token ids int32[B]."""
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sample from softmax(logits / temperature), truncated by top-k then top-p.

    top_k keeps the k most likely tokens (None: all). top_p (nucleus) then keeps,
    over the probabilities renormalised after top-k and sorted in decreasing
    order, the smallest prefix whose mass is >= top_p; the top token is always kept.
    """

    temperature: float
    top_p: float = 1.0
    top_k: int | None = None
    # top-p truncation on (top_p < 1): static, so the values of top_p < 1 share one program.
    nucleus: bool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_temperature(self.temperature, allow_zero=False)
        _check_top_p(self.top_p)
        _check_top_k(self.top_k)
        object.__setattr__(self, "nucleus", self.top_p < 1.0)

    def tree_flatten(self) -> tuple[tuple, tuple]:
        return (self.temperature, self.top_p), (self.top_k, self.nucleus)

    @classmethod
    def tree_unflatten(cls, aux: tuple, leaves: tuple) -> Sampling:
        """Rebuild around traced leaves: no validation (that ran on the Python values)."""
        obj = object.__new__(cls)
        for name, value in zip(("temperature", "top_p", "top_k", "nucleus"), (*leaves, *aux)):
            object.__setattr__(obj, name, value)
        return obj

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits f32[B, V], a PRNG key -> token ids int32[B]."""
        # The row's maximum subtracted first: a tiny temperature then sends every other
        # logit to -inf (the greedy limit) instead of overflowing them all to +-inf. A
        # subnormal temperature counts as float32's smallest normal one (XLA may flush
        # subnormals to zero, and 0 / 0 is NaN).
        logits = logits.astype(jnp.float32)
        temperature = jnp.maximum(jnp.float32(self.temperature), jnp.finfo(jnp.float32).tiny)
        logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
        vocab = logits.shape[-1]
        k = vocab if self.top_k is None else min(self.top_k, vocab)
        if k == vocab and not self.nucleus:
            return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
        # Work in sorted order: top_k gives the k best logits [B, k] in decreasing order
        # and their ids, so ties are cut exactly at k and top-p is a prefix mask.
        top_logits, top_ids = jax.lax.top_k(logits, k)
        if self.nucleus:
            probs = jax.nn.softmax(top_logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, k], 0 for the top token
            top_logits = jnp.where(mass_before < self.top_p, top_logits, -jnp.inf)
        choice = jax.random.categorical(key, top_logits, axis=-1)  # [B], index into top_ids
        return jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class FirstIds:
    """`strategy` choosing among ids [0, n) only: a model whose vocabulary is padded past its
    tokenizer's (fine-tunes with vocab_size 32002 over a 32000-token tokenizer.model) must
    not emit ids that the tokenizer cannot decode. n is static."""

    strategy: Greedy | Sampling
    n: int

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits f32[B, V], a PRNG key -> token ids int32[B], each < n."""
        return self.strategy(logits[..., : self.n], key)


Strategy = Greedy | Sampling | FirstIds
jax.tree_util.register_pytree_node(Greedy, lambda g: ((), None), lambda aux, leaves: Greedy())
jax.tree_util.register_pytree_node_class(Sampling)
jax.tree_util.register_pytree_node(
    FirstIds, lambda f: ((f.strategy,), f.n), lambda n, leaves: FirstIds(leaves[0], n))


def make_strategy(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
    vocab_limit: int | None = None,
) -> Strategy:
    """Validate user sampling parameters; `Greedy()` at temperature 0, else `Sampling`;
    with `vocab_limit`, wrapped in `FirstIds` to choose only ids below it."""
    _check_temperature(temperature, allow_zero=True)
    _check_top_p(top_p)
    _check_top_k(top_k)
    vocab_limit = _python_number(vocab_limit)
    if vocab_limit is not None and not (
            isinstance(vocab_limit, numbers.Integral) and not isinstance(vocab_limit, bool)
            and vocab_limit >= 1):
        raise UserInputError(f"vocab_limit must be None or an integer >= 1, got {vocab_limit!r}")
    if temperature == 0:
        strategy = Greedy()
    else:
        strategy = Sampling(
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=None if top_k is None else int(_python_number(top_k)),
        )
    return strategy if vocab_limit is None else FirstIds(strategy, int(vocab_limit))


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer


def check_seed(seed: object) -> int:
    """`seed` if it is an integer in [SEED_MIN, SEED_MAX]; else UserInputError naming `seed`."""
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        raise UserInputError(f"seed must be an integer, got {seed!r}")
    if not SEED_MIN <= seed <= SEED_MAX:
        raise UserInputError(
            f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] (-2**63 to 2**63 - 1), "
            f"got {seed}")
    return int(seed)


def prng_key(seed: int) -> jax.Array:
    """The PRNG key of a seed in [-2**63, 2**63) (checked): a typed key, shape [].

    Seeds in [0, 2**32) give `jax.random.key(seed)`, unchanged. JAX without x64 keeps
    only a seed's low 32 bits (2**32 and 0 would share a key; -1 and 2**32 - 1 too), so
    every other seed, taken as an unsigned 64-bit number hi * 2**32 + lo, gives
    `fold_in(key(lo), hi)` with hi >= 1: a distinct key per seed, the same with or
    without x64.
    """
    unsigned = check_seed(seed) % 2**64
    low, high = unsigned & 0xFFFFFFFF, unsigned >> 32
    key = jax.random.key(low)
    return key if high == 0 else jax.random.fold_in(key, high)


def _python_number(x: object) -> object:
    """A 0-d NumPy/JAX array of ints or floats as the Python number it holds; else x as it
    is (a traced value too: it cannot be checked here)."""
    if (isinstance(x, (np.ndarray, np.generic, jax.Array)) and x.ndim == 0
            and (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer))):
        try:
            return x.item()
        except jax.errors.ConcretizationTypeError:
            return x
    return x


def _is_real(x: object) -> bool:
    """A finite real number: Python's, NumPy's, or a 0-d array holding one."""
    x = _python_number(x)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_temperature(t: object, *, allow_zero: bool) -> None:
    if allow_zero and not (_is_real(t) and t >= 0):
        raise UserInputError(f"temperature must be >= 0 (0 means greedy), got {t!r}")
    if not allow_zero and not (_is_real(t) and t > 0):
        raise UserInputError(f"temperature must be > 0 for Sampling (use Greedy for 0), got {t!r}")


def _check_top_p(p: object) -> None:
    if not (_is_real(p) and 0 < p <= 1):
        raise UserInputError(f"top_p must be in (0, 1], got {p!r}")


def _check_top_k(k: object) -> None:
    k = _python_number(k)
    if k is not None and not (
        isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1
    ):
        raise UserInputError(f"top_k must be None or an integer >= 1, got {k!r}")
