"""generate: prefill + one jitted decode loop, checked against teacher-forced full forwards.

Each behaviour runs on two models with the `forward(params, tokens, positions, cache, *,
args)` contract: a toy whose logits are an embedding of the last token plus a
position-weighted sum over everything in its cache (so a wrong position, a padding
token written to the cache, or a missed token all change the output), and a tiny random
Mistral model (a sliding window shorter than the prompts, then full attention; MoE).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.decode import bucket
from mistral_jax.errors import UserInputError
from mistral_jax.generate import generate, generate_from_params, generate_stream

# The module itself (`mistral_jax.generate` the attribute is the function, as in mistral-inference).
gen = importlib.import_module("mistral_jax.generate")

# ----------------------------------------------------------------------------- toy model

TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class ToyArgs:
    vocab_size: int = 23
    max_seq_len: int | None = None


def toy_init_cache(args, batch_size, max_seq_len, dtype):
    """Records the token and absolute position held by each slot (slot = position % size)."""
    del args, dtype
    return {
        "tok": jnp.zeros((batch_size, max_seq_len), jnp.int32),
        "pos": jnp.full((batch_size, max_seq_len), -1, jnp.int32),
    }


def toy_forward(params, tokens, positions, cache, *, args, logits_index=None, fresh_prefill=False):
    """logits[b, t] = A[token] + sum over cached (q <= position) of cos(0.37 q + 1) * B[token_q]."""
    del args
    TRACES[toy_forward] += 1  # Python runs only while jax traces
    if cache is None:
        cache = toy_init_cache(None, tokens.shape[0], tokens.shape[1], None)
    size = cache["pos"].shape[1]
    slot = jnp.where(positions >= 0, positions % size, size)  # padding: out of range, dropped

    def write(buf, idx, val):
        return buf.at[idx].set(val, mode="drop")

    tok_c = jax.vmap(write)(cache["tok"], slot, tokens)
    pos_c = jax.vmap(write)(cache["pos"], slot, positions)
    seen = (pos_c[:, None, :] >= 0) & (pos_c[:, None, :] <= positions[:, :, None])  # [B, T, S]
    weight = jnp.where(seen, jnp.cos(0.37 * pos_c + 1.0)[:, None, :], 0.0)
    logits = params["A"][tokens] + jnp.einsum("bts,bsv->btv", weight, params["B"][tok_c])
    if logits_index is not None:  # the model contract: keep one position per row
        logits = jnp.take_along_axis(logits, logits_index[:, None, None], axis=1)
    return logits.astype(jnp.float32), {"tok": tok_c, "pos": pos_c}


def counting_forward(params, tokens, positions, cache, *, args, logits_index=None,
                     fresh_prefill=False):
    """toy_forward under its own name, so its traces are counted apart from other tests."""
    TRACES[counting_forward] += 1
    return toy_forward(params, tokens, positions, cache, args=args, logits_index=logits_index)


def toy_params(vocab=23, seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return {
        "A": 2.0 * jax.random.normal(ka, (vocab, vocab)),
        "B": 0.7 * jax.random.normal(kb, (vocab, vocab)),
    }


# ----------------------------------------------------------------------------- setups


@dataclasses.dataclass
class Setup:
    """A model under test: params, args and its functions (None: mistral_jax.model's)."""

    params: Any
    args: Any
    forward: Any = None
    init_cache: Any = None

    def run(self, prompts, **kw):
        kw.setdefault("max_tokens", 12)
        if self.forward is not None:
            kw.update(forward=self.forward, init_cache=self.init_cache)
        return generate_from_params(self.params, self.args, prompts, **kw)

    def full_logits(self, ids):
        """Teacher-forced: one full causal forward over ids [T] -> f32[T, V].

        ids are padded with token 0 to a fixed length so one compiled forward serves
        every call; causal attention keeps the logits of the first T positions exact.
        """
        padded = np.zeros((1, FULL_LEN), np.int32)
        padded[0, : len(ids)] = ids
        positions = np.arange(FULL_LEN, dtype=np.int32)[None]
        fwd = self.forward or gen.model_forward
        logits, _ = _jit_full(self.params, padded, positions, args=self.args, fwd=fwd)
        return np.asarray(logits[0, : len(ids)])


FULL_LEN = 64


@functools.partial(jax.jit, static_argnames=("args", "fwd"))
def _jit_full(params, tokens, positions, *, args, fwd):
    return fwd(params, tokens, positions, None, args=args)


def _toy():
    return Setup(toy_params(), ToyArgs(), toy_forward, toy_init_cache)


def _tiny():
    """Two layers, a window of 6 (shorter than most prompts) then full attention; MoE FFNs."""
    from mistral_jax.args import MoeArgs
    from mistral_jax.model import abstract_params
    from tests.helpers import tiny_args

    args = tiny_args(vocab_size=96, sliding_window=(6, None), moe=MoeArgs(4, 2))
    # Random weights drawn in numpy on the declared shapes: skips compiling flax's init.
    rng = np.random.default_rng(0)

    def draw(leaf):
        if leaf.ndim == 1:  # norm weights
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(args.dim), jnp.float32)

    return Setup(jax.tree.map(draw, abstract_params(args)), args)


SETUPS = {"toy": _toy, "tiny": _tiny}


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request):
    return SETUPS[request.param]()


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


# Shared shapes keep compiles few: a batch of 8 (or 5, padded to 8) prompts of up to 20
# tokens (bucket 32) and max_tokens=12 (cache bucket 32).
RAGGED = [3, 17, 1, 9, 20, 5, 12, 2]


@pytest.fixture(scope="module")
def ragged(setup):
    """(prompts, tokens, logprobs) of one greedy run over the RAGGED batch."""
    prompts = _prompts(setup.args.vocab_size, RAGGED)
    return (prompts, *setup.run(prompts))


# ----------------------------------------------------------------------------- behaviour


def test_greedy_alone_equals_inside_ragged_batch(setup, ragged):
    prompts, batch_tokens, batch_lps = ragged
    assert all(len(t) == 12 for t in batch_tokens)
    for i in (1, 4):
        alone_tokens, alone_lps = setup.run([prompts[i]])
        assert alone_tokens[0] == batch_tokens[i]
        np.testing.assert_allclose(alone_lps[0], batch_lps[i], atol=1e-5)


def test_greedy_tokens_are_argmax_of_teacher_forced_logits(setup, ragged):
    for prompt, out, _ in zip(*ragged):
        logits = setup.full_logits(prompt + out)
        assert out == np.argmax(logits[len(prompt) - 1 : -1], axis=-1).tolist()


def test_logprobs_equal_teacher_forced_full_forward(setup):
    prompts = _prompts(setup.args.vocab_size, RAGGED[:5], seed=1)  # batch padded to 8
    tokens, logprobs = setup.run(prompts, temperature=0.9, top_k=20, seed=3)
    for prompt, out, lps in zip(prompts, tokens, logprobs):
        assert len(out) == len(lps) == 12
        logits = setup.full_logits(prompt + out)
        ref = jax.nn.log_softmax(logits[len(prompt) - 1 : -1], axis=-1)
        np.testing.assert_allclose(lps, np.asarray(ref)[np.arange(len(out)), out], atol=1e-5)


def test_eos_stops_one_row_while_others_continue(setup, ragged):
    prompts, free, free_lps = ragged
    # An eos that row 0 samples at some step k >= 1 and not before.
    k = next(k for k in range(1, 12) if free[0][k] not in free[0][:k])
    eos = free[0][k]
    tokens, logprobs = setup.run(prompts, eos_id=eos)
    assert tokens[0] == free[0][:k]
    np.testing.assert_allclose(logprobs[0], free_lps[0][:k], atol=1e-6)
    for row, ref in zip(tokens[1:], free[1:]):
        assert row == (ref[: ref.index(eos)] if eos in ref else ref)
    assert max(len(t) for t in tokens) > k


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunked_prefill_equals_unchunked(setup, ragged, chunk_size):
    prompts, ref_tokens, ref_lps = ragged
    tokens, lps = setup.run(prompts, chunk_size=chunk_size)
    assert tokens == ref_tokens
    np.testing.assert_allclose(np.asarray(lps), np.asarray(ref_lps), atol=1e-5)


# ----------------------------------------------------------------------------- toy only


def test_loop_ends_when_all_rows_are_done():
    s = _toy()
    prompt = _prompts(23, [6], seed=6)[0]
    free, _ = s.run([prompt], max_tokens=20)
    k = next(k for k in range(1, 20) if free[0][k] not in free[0][:k])
    state, eos, static = gen._start(
        s.params, s.args, [prompt], max_tokens=20, strategy=gen.make_strategy(), seed=0,
        eos_id=free[0][k], chunk_size=None, dtype=jnp.float32, forward=toy_forward,
        init_cache=toy_init_cache,
    )  # fmt: skip
    state = gen.decode_jit(s.params, state, eos, jnp.int32(20), **static)
    assert int(state.step) == k + 1  # the eos was the last token sampled
    assert bool(state.done[0])


def test_same_seed_same_output_different_seed_differs():
    s = _toy()
    prompts = _prompts(23, [5, 9], seed=7)
    a = s.run(prompts, temperature=1.0, seed=11)
    b = s.run(prompts, temperature=1.0, seed=11)
    c = s.run(prompts, temperature=1.0, seed=12)
    assert a == b
    assert a[0] != c[0]


def test_every_seed_in_range_gives_its_own_key_and_small_seeds_keep_theirs():
    """JAX without x64 keeps a seed's low 32 bits: 0 and 2**32 (or -1 and 2**32 - 1) would
    sample alike. Each seed here samples differently; seeds below 2**32 keep jax's key."""
    from mistral_jax.sampling import prng_key

    s = _toy()
    prompts = _prompts(23, [5, 9], seed=7)
    seeds = [0, 2**32, -1, 2**32 - 1, 2**63 - 1, -(2**63), 2**32 + 1]
    runs = [s.run(prompts, max_tokens=16, temperature=1.0, seed=seed)[0] for seed in seeds]
    for i in range(len(seeds)):
        for j in range(i):
            assert runs[i] != runs[j], (seeds[i], seeds[j])
    for seed in (0, 1, 12345, 2**31, 2**32 - 1):
        assert np.array_equal(jax.random.key_data(prng_key(seed)),
                              jax.random.key_data(jax.random.key(seed)))


def test_generate_accepts_a_2d_integer_array_as_a_batch():
    s = _toy()
    prompts = _prompts(23, [6, 6], seed=3)
    assert s.run(np.array(prompts), max_tokens=4) == s.run(prompts, max_tokens=4)
    assert s.run(tuple(map(tuple, prompts)), max_tokens=4) == s.run(prompts, max_tokens=4)


def test_new_prompt_length_in_same_bucket_does_not_retrace():
    s = dataclasses.replace(_toy(), forward=counting_forward)
    s.run(_prompts(23, [5, 3, 7], seed=8), max_tokens=7)
    traced = TRACES[counting_forward]
    assert traced > 0
    # Other prompt lengths, batch size and max_tokens, all in the same buckets.
    s.run(_prompts(23, [9, 10, 2, 11], seed=9), max_tokens=5)
    s.run(_prompts(23, [13], seed=10) * 3, max_tokens=2, eos_id=4, seed=1)
    assert TRACES[counting_forward] == traced
    s.run(_prompts(23, [17], seed=11), max_tokens=5)  # prompt bucket 32: compiles anew
    assert TRACES[counting_forward] > traced


def test_new_temperature_or_top_p_value_does_not_retrace():
    s = dataclasses.replace(_toy(), forward=counting_forward)
    prompts = _prompts(23, [5, 9], seed=12)
    hot = s.run(prompts, max_tokens=7, temperature=5.0, top_p=0.95, seed=3)
    traced = TRACES[counting_forward]
    assert traced > 0
    # Temperature and top_p are traced values: other values reuse the compiled programs ...
    cold = s.run(prompts, max_tokens=7, temperature=1e-4, top_p=0.5, seed=3)
    assert TRACES[counting_forward] == traced
    # ... and still take effect: near-zero temperature samples the argmax, 5.0 does not.
    assert cold == s.run(prompts, max_tokens=7)
    assert hot != cold
    # top_k and switching top-p truncation on or off change the program's shape.
    s.run(prompts, max_tokens=7, temperature=1.0, top_p=0.95, top_k=3, seed=3)
    assert TRACES[counting_forward] > traced


def test_bucket_rule():
    assert [bucket(n) for n in (1, 15, 16, 17, 100)] == [16, 16, 16, 32, 128]
    assert [bucket(n, minimum=1) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


@dataclasses.dataclass
class ToyModel:
    params: Any
    args: Any
    dtype: Any = jnp.float32


def test_generate_stream_yields_the_batch_tokens():
    s = _toy()
    prompt = _prompts(23, [7], seed=12)[0]
    free, _ = s.run([prompt], max_tokens=10)
    eos = free[0][4] if free[0][4] not in free[0][:4] else None
    ref, _ = s.run([prompt], max_tokens=10, eos_id=eos)
    model = ToyModel(s.params, s.args)
    streamed = list(
        generate_stream(prompt, model, max_tokens=10, eos_id=eos, forward=toy_forward,
                        init_cache=toy_init_cache)
    )  # fmt: skip
    assert streamed == ref[0]


def test_generate_stream_dispatches_the_next_step_before_reading_a_token(monkeypatch):
    """Token i is read back only once step i+1 is in flight (the host round trip overlaps
    device work), no step is dispatched past max_tokens, and the tokens stay the same."""
    gen = importlib.import_module("mistral_jax.generate")  # the package's `generate` is the function

    s = _toy()
    prompt = _prompts(23, [7], seed=12)[0]
    ref, _ = s.run([prompt], max_tokens=5)
    calls = []
    step = gen.decode_step_jit
    monkeypatch.setattr(gen, "decode_step_jit", lambda *a, **k: calls.append(1) or step(*a, **k))
    stream = generate_stream(prompt, ToyModel(s.params, s.args), max_tokens=5,
                             forward=toy_forward, init_cache=toy_init_cache)
    got = []
    for i, token in enumerate(stream):
        got.append(token)
        assert len(calls) == min(i + 1, 4), (i, len(calls))  # step i+1 already dispatched
    assert got == ref[0] and len(calls) == 4
    one = generate_stream(prompt, ToyModel(s.params, s.args), max_tokens=1,
                          forward=toy_forward, init_cache=toy_init_cache)
    assert list(one) == ref[0][:1]  # a single token: no step dispatched, none read twice


def test_generate_uses_model_params_args_and_dtype(setup, ragged):
    from mistral_jax.transformer import Transformer

    if setup.forward is not None:
        pytest.skip("generate() runs mistral_jax.model")
    prompts, ref_tokens, ref_lps = ragged
    model = Transformer(setup.args, setup.params)
    assert generate(prompts, model, max_tokens=12) == (ref_tokens, ref_lps)
    assert list(generate_stream(prompts[1], model, max_tokens=12)) == ref_tokens[1]


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "prompts must be a non-empty list"),
        ([[1, 2], []], {}, r"prompts\[1\] is empty"),
        ([[1, 2]], dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        ([[1, 2]], dict(max_tokens=2.0), "max_tokens must be an integer >= 1"),
        ([[1, 2, 3]], dict(max_tokens=8), r"prompts\[0\] has 3 tokens.*max_seq_len=10"),
        ([[1, 99]], {}, r"prompts\[0\] holds token id 99 outside \[0, vocab_size=23\)"),
        ([[1, 2]], dict(chunk_size=0), "chunk_size must be None or an integer >= 1"),
        ([[1, 2]], dict(eos_id=-3), r"eos_id must be None or a token id in \[0, vocab_size=23\)"),
        ([[1, 2]], dict(eos_id=23), r"eos_id .*vocab_size=23\), got 23"),
        ([[1, 2]], dict(eos_id=2**40), r"eos_id .*got 1099511627776"),
        ([[1, 2]], dict(eos_id=2.0), r"eos_id .*got 2.0"),
        ([[1, 2]], dict(vocab_limit=24), r"vocab_limit must be at most vocab_size=23, got 24"),
        ([1, 2, 3], {}, r"prompts must be a batch .*flat list of ints: wrap one prompt as \[ids\]"),
        (np.array([1, 2, 3]), {}, r"1-D array of token ids: wrap one prompt as \[ids\]"),
        (np.ones((2, 2), np.float32), {}, r"2-D integer array \[B, T\].*shape \(2, 2\)"),
        ([[1, 2], 3], {}, r"prompts\[1\] must be a flat list of integer token ids, got int"),
        ([[1, 2]], dict(seed=2**63), r"seed must be an integer in \[-9223372036854775808, "
         r"9223372036854775807\].*got 9223372036854775808"),
        ([[1, 2]], dict(seed=2**70), r"seed must be an integer in .*2\*\*63"),
        ([[1, 2]], dict(seed=-(2**63) - 1), r"seed must be an integer in "),
        ([[1, 2]], dict(seed=1.0), r"seed must be an integer, got 1.0"),
        ([[1, 2]], dict(temperature=-1.0), "temperature must be >= 0"),
        ([[1, 2]], dict(temperature=1.0, top_p=2.0), r"top_p must be in \(0, 1\]"),
        ([[1, 2]], dict(temperature=1.0, top_k=0), "top_k must be None or an integer >= 1"),
    ],
)
def test_bad_input_raises_user_input_error(prompts, kwargs, message):
    s = dataclasses.replace(_toy(), args=ToyArgs(max_seq_len=10))
    kwargs.setdefault("max_tokens", 3)
    with pytest.raises(UserInputError, match=message):
        s.run(prompts, **kwargs)


def test_generate_stream_validates_when_called():
    with pytest.raises(UserInputError, match="max_tokens must be an integer >= 1"):
        generate_stream([1, 2], ToyModel(toy_params(), ToyArgs()), max_tokens=0)


def test_prompt_plus_max_tokens_up_to_max_seq_len_is_accepted():
    s = dataclasses.replace(_toy(), args=ToyArgs(max_seq_len=10))
    tokens, _ = s.run([[1, 2, 3]], max_tokens=7)
    assert len(tokens[0]) == 7
