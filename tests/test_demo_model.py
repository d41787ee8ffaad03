"""The demo model shipped in `mistral_jax/demo_model/` and the script that trains it."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import mistral_jax
from mistral_jax.config import load_args
from mistral_jax.generate import generate
from mistral_jax.model import causal_positions, forward, init_params
from mistral_jax.tokenizer import load_tokenizer
from mistral_jax.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(mistral_jax.__file__).parent / "demo_model"
LOSS_CSV = REPO / "scripts" / "demo_loss.csv"
MAX_BYTES = 10_000_000


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "train_demo_model", REPO / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_demo_model", module)
    spec.loader.exec_module(module)
    return module


train = _load_script()


@pytest.fixture(scope="module")
def demo():
    return Transformer.from_folder(DEMO, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO)


def test_demo_folder_is_a_complete_mistral_checkpoint_under_10_mb():
    names = {p.name for p in DEMO.iterdir()}
    assert {"params.json", "consolidated.safetensors", "tokenizer.model.v3", "TRAINING.md"} <= names
    size = sum(p.stat().st_size for p in DEMO.iterdir())
    assert size <= MAX_BYTES, f"demo model folder is {size} bytes"
    args, layout = load_args(DEMO)
    assert layout == "mistral"
    assert args == train.DEMO_ARGS
    with safe_open(DEMO / "consolidated.safetensors", framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_demo_tokenizer_is_mistral_commons_v3_file(tokenizer, demo):
    shipped = (DEMO / "tokenizer.model.v3").read_bytes()
    assert shipped == train.tokenizer_path().read_bytes()
    assert tokenizer.version.value == "v3"
    assert tokenizer.n_words == demo.args.vocab_size


def test_demo_checkpoint_round_trips_through_from_folder(demo):
    # bf16 -> float32 is exact, so exporting the loaded params must give back the file's tensors.
    exported = train.params_to_mistral_state(demo.params, demo.args)
    stored = load_file(DEMO / "consolidated.safetensors")
    assert sorted(exported) == sorted(stored)
    for name, w in stored.items():
        np.testing.assert_array_equal(exported[name], w.astype(np.float32), err_msg=name)


def test_sub_vocabulary_loss_equals_full_vocabulary_loss():
    # Training on the tokens the corpus uses, all other tokens sharing one output column, is
    # the full-vocabulary cross-entropy of the model `expand_vocab` writes out.
    args = dataclasses.replace(train.DEMO_ARGS, dim=32, n_layers=1, head_dim=8, hidden_dim=64,
                               vocab_size=512)
    used = np.arange(3, 512, 7)
    full_init = init_params(args, 0)
    sub = train.sub_vocab_params(full_init, used)
    shared = jax.random.normal(jax.random.PRNGKey(1), (args.dim,))
    sub["output"]["kernel"] = sub["output"]["kernel"].at[:, -1].set(shared)
    sub_args = dataclasses.replace(args, vocab_size=len(used) + 1)
    full = train.expand_vocab(sub, used, full_init)
    assert full["output"]["kernel"].shape == (args.dim, 512)
    np.testing.assert_array_equal(full["output"]["kernel"][:, 5], shared)  # token 5 is unused

    lookup = np.full(512, -1)
    lookup[used] = np.arange(len(used))
    batch = used[np.random.default_rng(0).integers(0, len(used), (2, 17))]
    want = train.loss_fn(full, jnp.asarray(batch), args)
    got = train.loss_fn(sub, jnp.asarray(lookup[batch]), sub_args, 512 - len(used))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_loss_curve_goes_down_and_matches_checkpoint_metadata():
    with open(LOSS_CSV) as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val_loss"]) for r in rows]
    assert len(rows) >= 5
    assert all(later < earlier for earlier, later in zip(val, val[1:])), val
    # 4 nats per token better than guessing uniformly over the vocabulary.
    assert val[-1] < np.log(train.DEMO_ARGS.vocab_size) - 4.0
    with safe_open(DEMO / "consolidated.safetensors", framework="np") as f:
        meta = f.metadata()
    assert meta["steps"] == rows[-1]["step"]
    assert float(meta["final_val_loss"]) == val[-1]


@pytest.mark.slow
def test_shipped_weights_reproduce_recorded_validation_loss(demo, tokenizer):
    """The full-vocabulary loss of the shipped (bf16) weights on the held-out documents."""
    with safe_open(DEMO / "consolidated.safetensors", framework="np") as f:
        meta = f.metadata()
    train_stream, val_stream, sha, _ = train.corpus(tokenizer)
    if sha != meta["corpus_sha256"]:
        pytest.skip(f"this Python's stdlib docstrings differ from the training corpus "
                    f"({meta['corpus']})")
    val = train.split_windows(val_stream, 256)[:32]
    kernel = demo.params["output"]["kernel"]
    unused = np.ones(demo.args.vocab_size, bool)
    unused[np.unique(np.concatenate([train_stream, val_stream]))] = False

    @jax.jit
    def loss_and_unused_mass(params, batch):
        logits, _ = forward(params, batch[:, :-1], causal_positions(batch[:, :-1]), None,
                            args=demo.args)
        return train.loss_fn(params, batch, demo.args), jax.nn.softmax(logits)[..., unused].sum(-1)

    results = [loss_and_unused_mass(demo.params, jnp.asarray(val[i:i + 8]))
               for i in range(0, len(val), 8)]
    got = float(np.mean([r[0] for r in results]))
    # Training evaluated float32 weights; the shipped ones are rounded to bfloat16.
    assert abs(got - float(meta["final_val_loss"])) < 0.05, got
    # Tokens the corpus never uses share one output column (see TRAINING.md), learned to be low.
    np.testing.assert_array_equal(kernel[:, unused], np.repeat(kernel[:, unused][:, :1], unused.sum(), 1))
    assert float(np.mean([r[1] for r in results])) < 0.01


def _word_share(text: str, vocabulary: set[str]) -> float:
    words = re.findall(r"[A-Za-z]+", text)
    return sum(w.lower() in vocabulary for w in words) / max(len(words), 1)


def test_greedy_completion_reads_as_english_unlike_random_weights(demo, tokenizer):
    from pydoc_data.topics import topics

    vocabulary = {w.lower() for t in topics.values() for w in re.findall(r"[A-Za-z]+", t)}
    prompts = ["Return the number of", "This module provides", "Raise ValueError if the"]
    ids = [tokenizer.encode(p) for p in prompts]
    out, _ = generate(ids, demo, max_tokens=32, eos_id=tokenizer.eos_id)
    random_model = Transformer.random(demo.args, seed=1)
    noise, _ = generate(ids, random_model, max_tokens=32, eos_id=tokenizer.eos_id)
    trained_texts = [tokenizer.decode(o) for o in out]
    trained = np.mean([_word_share(t, vocabulary) for t in trained_texts])
    untrained = np.mean([_word_share(tokenizer.decode(o), vocabulary) for o in noise])
    assert sum(len(re.findall(r"[A-Za-z]+", t)) for t in trained_texts) >= 15, trained_texts
    assert trained >= 0.85, trained_texts
    assert trained > untrained + 0.3, (trained, untrained)


def test_training_script_end_to_end_on_a_tiny_corpus(tmp_path, monkeypatch):
    docs = ["Return the sum of the two arguments, which must be numbers.",
            "Open the file and return a stream. Raise OSError upon failure."] * 4
    monkeypatch.setattr(train, "stdlib_docstrings",
                        lambda: [(f"mod.f{i}", d) for i, d in enumerate(docs)])
    monkeypatch.setattr(train, "pydoc_topics", lambda: docs[:2])
    monkeypatch.setattr(train, "DEMO_ARGS", dataclasses.replace(
        train.DEMO_ARGS, dim=16, n_layers=1, head_dim=8, hidden_dim=32, n_heads=2, n_kv_heads=1))
    out, loss_csv = tmp_path / "model", tmp_path / "loss.csv"
    train.main(["--steps", "4", "--batch", "2", "--seq-len", "8", "--eval-every", "2",
                "--out", str(out), "--csv", str(loss_csv)])
    model = Transformer.from_folder(out, dtype="float32")
    assert model.args == train.DEMO_ARGS
    assert load_tokenizer(out).version.value == "v3"
    with open(loss_csv) as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2", "4"]
    tokens = jnp.asarray([load_tokenizer(out).encode(docs[0])])
    logits, _ = forward(model.params, tokens, causal_positions(tokens), None, args=model.args)
    assert bool(jnp.isfinite(logits).all())
    assert not (tmp_path / "model.tmp").exists()
