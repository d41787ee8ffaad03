"""Sampling strategies: greedy, temperature / top-k / top-p, seeds, parameter validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.errors import UserInputError
from mistral_jax.sampling import FirstIds, Greedy, Sampling, make_strategy

# A fixed 6-token distribution, probabilities in decreasing order.
PROBS = np.array([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])
N_DRAWS = 20_000


def _frequencies(strategy, probs=PROBS, seed=0, n=N_DRAWS):
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, len(probs)))
    ids = np.asarray(jax.jit(strategy)(logits, jax.random.key(seed)))
    assert ids.dtype == np.int32 and ids.shape == (n,)
    return np.bincount(ids, minlength=len(probs)) / n


def _assert_matches(freq, expected, n=N_DRAWS):
    """Each empirical frequency within 4 standard errors; zero-probability ids never drawn."""
    expected = np.asarray(expected)
    se = np.sqrt(expected * (1 - expected) / n)
    for i, (f, p) in enumerate(zip(freq, expected)):
        if p == 0:
            assert f == 0, f"token {i} is excluded but was drawn with frequency {f}"
        else:
            assert abs(f - p) <= 4 * se[i], f"token {i}: frequency {f:.4f}, expected {p:.4f}"


def _renorm(p):
    return np.asarray(p) / np.sum(p)


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (7, 50))
    ids = Greedy()(logits, jax.random.key(0))
    assert ids.dtype == jnp.int32
    np.testing.assert_array_equal(ids, np.argmax(np.asarray(logits), axis=-1))


def test_make_strategy_is_greedy_at_temperature_zero():
    assert make_strategy(0.0) == Greedy()
    assert make_strategy(0, top_p=0.5, top_k=3) == Greedy()
    assert make_strategy(0.7, top_p=0.9, top_k=40) == Sampling(0.7, 0.9, 40)


def test_strategies_are_hashable_static_args():
    assert hash(Sampling(0.7, 0.9, 40)) == hash(make_strategy(0.7, 0.9, 40))
    assert len({Greedy(), Greedy(), Sampling(1.0), Sampling(1.0)}) == 2


def test_same_seed_same_tokens_different_seed_differs():
    logits = jax.random.normal(jax.random.key(2), (64, 100))
    s = Sampling(temperature=1.0)
    a = s(logits, jax.random.key(0))
    b = s(logits, jax.random.key(0))
    c = s(logits, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))


def test_plain_sampling_matches_softmax():
    _assert_matches(_frequencies(Sampling(temperature=1.0)), PROBS)


def test_temperature_flattens_distribution():
    # softmax(log p / 2) is proportional to sqrt(p).
    _assert_matches(_frequencies(Sampling(temperature=2.0)), _renorm(np.sqrt(PROBS)))


def test_top_k_frequencies_match_truncated_renormalised():
    expected = _renorm(np.where(np.arange(6) < 4, PROBS, 0.0))
    _assert_matches(_frequencies(Sampling(temperature=1.0, top_k=4)), expected)


def test_top_p_keeps_smallest_prefix_with_enough_mass():
    # Cumulative mass 0.35, 0.60, 0.75, ...: top_p=0.7 keeps the first three tokens.
    expected = _renorm(np.where(np.arange(6) < 3, PROBS, 0.0))
    _assert_matches(_frequencies(Sampling(temperature=1.0, top_p=0.7)), expected)


def test_top_p_applies_after_top_k_renormalisation():
    # After top_k=4 the masses are 0.402, 0.287, 0.172, 0.138 (cumulative 0.402, 0.690,
    # 0.862): top_p=0.8 keeps three. Without top_k first, 0.8 would keep four.
    expected = _renorm(np.where(np.arange(6) < 3, PROBS, 0.0))
    _assert_matches(_frequencies(Sampling(temperature=1.0, top_p=0.8, top_k=4)), expected)


def test_tiny_top_p_always_keeps_top_token():
    freq = _frequencies(Sampling(temperature=1.0, top_p=1e-6), n=2000)
    np.testing.assert_array_equal(freq, [1, 0, 0, 0, 0, 0])


def test_top_k_one_is_greedy_and_large_top_k_is_clamped():
    logits = jax.random.normal(jax.random.key(3), (16, 30))
    np.testing.assert_array_equal(
        Sampling(1.0, top_k=1)(logits, jax.random.key(0)), Greedy()(logits, None)
    )
    ids = Sampling(1.0, top_k=1000)(logits, jax.random.key(0))
    assert ids.shape == (16,) and np.all((np.asarray(ids) >= 0) & (np.asarray(ids) < 30))


@pytest.mark.parametrize("temperature", [1e-20, 1e-38, 1e-45])
@pytest.mark.parametrize("top_k", [None, 5])
def test_tiny_temperature_is_the_greedy_limit(temperature, top_k):
    """logits / 1e-38 overflows to +-inf (categorical then draws junk): the row maximum is
    subtracted first, so every token but the argmax gets -inf."""
    logits = jax.random.normal(jax.random.key(4), (16, 30)) * 5
    ids = jax.jit(Sampling(temperature, top_k=top_k))(logits, jax.random.key(0))
    np.testing.assert_array_equal(ids, Greedy()(logits, None))


@pytest.mark.parametrize("strategy", [Greedy(), Sampling(1.0), Sampling(0.7, top_p=0.9, top_k=3)])
def test_vocab_limit_chooses_only_the_first_ids(strategy):
    """FirstIds: the best ids lie past the limit; every choice is still below it, and under
    jit the wrapper is a pytree whose limit is static."""
    logits = jnp.concatenate([jax.random.normal(jax.random.key(5), (64, 20)),
                              jnp.full((64, 4), 50.0)], axis=1)
    limited = make_strategy(getattr(strategy, "temperature", 0.0),
                            getattr(strategy, "top_p", 1.0), getattr(strategy, "top_k", None),
                            vocab_limit=20)
    assert limited == FirstIds(strategy, 20)
    ids = np.asarray(jax.jit(limited)(logits, jax.random.key(0)))
    assert ids.max() < 20
    if isinstance(strategy, Greedy):
        np.testing.assert_array_equal(ids, np.argmax(np.asarray(logits)[:, :20], axis=-1))
    for bad in (0, 2.5, True):
        with pytest.raises(UserInputError, match="vocab_limit must be None or an integer >= 1"):
            make_strategy(vocab_limit=bad)


def test_sampling_values_may_be_numpy_or_jax_scalars():
    s = make_strategy(jnp.float32(0.5), top_p=np.float64(0.75), top_k=jnp.int32(3))
    assert s == Sampling(0.5, 0.75, 3)
    assert make_strategy(jnp.bfloat16(0)) == Greedy()
    for bad in (jnp.array([0.5]), jnp.array(True), np.bool_(True)):
        with pytest.raises(UserInputError, match="temperature must be >= 0"):
            make_strategy(bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_p=-0.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_k=0), "top_k must be None or an integer >= 1"),
        (dict(temperature=1.0, top_k=2.5), "top_k must be None or an integer >= 1"),
        (dict(temperature=1.0, top_k=True), "top_k must be None or an integer >= 1"),
        (dict(temperature=1.0, top_k=jnp.float32(2.0)), "top_k must be None or an integer >= 1"),
        (dict(temperature=0.0, top_k=-3), "top_k must be None or an integer >= 1"),
    ],
)
def test_make_strategy_rejects_bad_values(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        make_strategy(**kwargs)


def test_sampling_rejects_zero_temperature():
    with pytest.raises(UserInputError, match="temperature must be > 0"):
        Sampling(temperature=0.0)


def test_check_seed_takes_signed_64_bit_integers_only():
    from mistral_jax.sampling import check_seed

    assert check_seed(2**63 - 1) == 2**63 - 1 and check_seed(-(2**63)) == -(2**63)
    assert check_seed(np.int64(7)) == 7
    for bad in (2**63, -(2**63) - 1, True, 1.0, "3"):
        with pytest.raises(UserInputError, match="seed must be an integer"):
            check_seed(bad)
