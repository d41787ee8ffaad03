"""Train the demo model shipped in `mistral_jax/demo_model/`.

A Mistral-architecture model of ~4.6M parameters with the real v3 tokenizer of
mistral-common, trained with optax AdamW through the pure
`mistral_jax.model.forward` on text every install of Python already has: the
docstrings of the standard library's own sources (read with `ast`, nothing is
imported) plus the language reference topics of `pydoc_data.topics` (the text
`help("if")` prints). Files, nodes and documents are taken in a fixed order and
every random draw is seeded, so re-running the same command on the same Python
version reproduces the corpus exactly and the weights up to float reduction order.

    python scripts/train_demo_model.py                      # writes mistral_jax/demo_model/
    python scripts/train_demo_model.py --steps 20 --out /tmp/demo --csv /tmp/loss.csv

The folder written is a Mistral-layout checkpoint of this project: params.json,
consolidated.safetensors (bfloat16, Mistral tensor names, PyTorch [out, in]
shapes) and tokenizer.model.v3; `Transformer.from_folder` loads it.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import functools
import hashlib
import json
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mistral_jax.args import ModelArgs
from mistral_jax.config import args_to_params_json
from mistral_jax.model import causal_positions, forward, init_params

DEMO_ARGS = ModelArgs(
    dim=64, n_layers=8, head_dim=16, hidden_dim=192, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
    vocab_size=32768, rope_theta=1e4, sliding_window=256, max_seq_len=None)
# mistral-common ships the v3 SentencePiece tokenizer (Mistral 7B v0.3 / Mixtral) under this name.
TOKENIZER_SOURCE = "mistral_instruct_tokenizer_240323.model.v3"
TOKENIZER_NAME = "tokenizer.model.v3"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3",
             "__pycache__", "turtledemo"}
MIN_DOC_CHARS = 40


# ----------------------------------------------------------------------------- data

def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(qualified name, docstring) of the stdlib's modules, classes and functions, in a fixed order.

    Sources are parsed with `ast` (nothing is imported); files in sorted order, then each
    module's docstring followed by its classes and functions depth-first in source order.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIP_DIRS.intersection(p.relative_to(root).parts))
    out: list[tuple[str, str]] = []

    def visit(node, name: str) -> None:
        doc = ast.get_docstring(node)
        if doc and len(doc) >= MIN_DOC_CHARS:
            out.append((name, doc))
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{name}.{child.name}")

    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        visit(tree, _module_name(path, root))
    return out


def pydoc_topics() -> list[str]:
    """The language reference topics `help()` shows (pydoc_data.topics), sorted by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [topics[k].strip() for k in sorted(topics) if len(topics[k]) >= MIN_DOC_CHARS]


QUESTIONS = ("What does {} do?", "Explain {}.", "What is {} for?", "Tell me about {}.")


def chat_answer(doc: str) -> str:
    """The first paragraph of a docstring, on one line: the answer of a chat example."""
    return " ".join(doc.split("\n\n")[0].split())


def corpus(tokenizer) -> tuple[np.ndarray, np.ndarray, str, dict]:
    """(train stream, validation stream, sha256 of the texts, stats), streams int32 [N].

    Each docstring is a document ([bos] text [eos]); every third public one also becomes a
    chat example: the v3 chat prompt of a question about it, then its first paragraph, then
    [eos] (mistral-common's encoding of an assistant answer). The pydoc topics follow as
    documents. Every 50th docstring (with its chat example) and topic is held out.
    """
    train: list[int] = []
    val: list[int] = []
    sha = hashlib.sha256()
    n_chat = 0
    named = stdlib_docstrings()
    for i, (name, doc) in enumerate(named):
        ids = tokenizer.encode(doc, bos=True, eos=True)
        sha.update(doc.encode() + b"\x00")
        if i % 3 == 0 and not any(p.startswith("_") for p in name.split(".")):
            question = QUESTIONS[(i // 3) % len(QUESTIONS)].format(name)
            answer = chat_answer(doc)
            ids += tokenizer.encode_chat([{"role": "user", "content": question}])
            ids += tokenizer.encode(answer, bos=False, eos=True)
            sha.update(question.encode() + b"\x00" + answer.encode() + b"\x00")
            n_chat += 1
        (val if i % 50 == 0 else train).extend(ids)
    topics = pydoc_topics()
    for i, doc in enumerate(topics):
        sha.update(doc.encode() + b"\x00")
        (val if i % 50 == 0 else train).extend(tokenizer.encode(doc, bos=True, eos=True))
    stats = {"docstrings": len(named), "chat_examples": n_chat, "topics": len(topics),
             "chars": sum(len(d) for _, d in named) + sum(map(len, topics))}
    return np.asarray(train, np.int32), np.asarray(val, np.int32), sha.hexdigest(), stats


def tokenizer_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / TOKENIZER_SOURCE


def split_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into non-overlapping [N, seq_len + 1] windows (inputs + shifted targets)."""
    n = (len(stream) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


# ----------------------------------------------------------------------------- model

def loss_fn(params, batch: jax.Array, args: ModelArgs, n_unused: int = 0) -> jax.Array:
    """Mean next-token cross-entropy (nats). batch int32 [B, T + 1].

    With `n_unused` > 0 the model is a sub-vocabulary model whose last output column stands for
    `n_unused` tokens of the full vocabulary that share that column (so share one logit) and
    never occur in the data: they count n_unused times in the softmax normaliser.
    """
    tokens, targets = batch[:, :-1], batch[:, 1:]
    logits, _ = forward(params, tokens, causal_positions(tokens), None, args=args)
    if n_unused:
        shared = logits[..., -1]
        logits = logits[..., :-1]
    lse = jax.nn.logsumexp(logits, axis=-1)
    if n_unused:
        lse = jnp.logaddexp(lse, jnp.log(float(n_unused)) + shared)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (lse - target_logit).mean()


def sub_vocab_params(full, used: np.ndarray) -> dict:
    """Full-vocabulary params -> the sub-vocabulary model `loss_fn` trains.

    Output columns: the used tokens', then one shared column for all the others (zero at
    start); embedding rows: the used tokens', then one row that no input ever selects.
    """
    emb, out = full["embedding"], full["output"]["kernel"]
    return {**full,
            "embedding": jnp.concatenate([emb[used], jnp.zeros_like(emb[:1])]),
            "output": {"kernel": jnp.concatenate([out[:, used], jnp.zeros_like(out[:, :1])], 1)}}


def expand_vocab(params, used: np.ndarray, full_init) -> dict:
    """Sub-vocabulary params (see `sub_vocab_params`) -> full-vocabulary params.

    Every unused token gets the trained shared output column; its embedding row keeps its
    random init from `full_init` (no input ever contains it).
    """
    p = jax.tree_util.tree_map(np.asarray, params)
    emb = np.array(full_init["embedding"], np.float32)
    emb[used] = p["embedding"][:-1]
    kernel = p["output"]["kernel"]
    out = np.repeat(kernel[:, -1:], emb.shape[0], axis=1)
    out[:, used] = kernel[:, :-1]
    return {**p, "embedding": emb, "output": {"kernel": out}}


def make_optimizer(lr: float, warmup: int, steps: int, weight_decay: float):
    warmup = min(warmup, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                  end_value=lr * 0.1)
    # No weight decay on norm scales (1-d leaves).
    mask = functools.partial(jax.tree_util.tree_map, lambda p: p.ndim > 1)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=mask))
    return opt, schedule


def params_to_mistral_state(params, args: ModelArgs) -> dict[str, np.ndarray]:
    """The params pytree -> Mistral checkpoint tensors (names and PyTorch [out, in] shapes).

    The inverse of `mistral_jax.checkpoint.tensor_target` for the Mistral layout (dense models).
    """
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    hd = args.head_dim
    state = {"tok_embeddings.weight": p["embedding"], "norm.weight": p["norm"]["weight"],
             "output.weight": p["output"]["kernel"].T}
    for i in range(args.n_layers):
        layer, pre = p[f"layers_{i}"], f"layers.{i}."
        attn = layer["attention"]
        for name in ("wq", "wk", "wv"):
            k = attn[name]["kernel"]  # [D, H, Hd] -> [H * Hd, D]
            state[pre + f"attention.{name}.weight"] = k.transpose(1, 2, 0).reshape(-1, args.dim)
        wo = attn["wo"]["kernel"]  # [H, Hd, D] -> [D, H * Hd]
        state[pre + "attention.wo.weight"] = wo.reshape(args.n_heads * hd, args.dim).T
        for name in ("w1", "w2", "w3"):
            state[pre + f"feed_forward.{name}.weight"] = layer["feed_forward"][name]["kernel"].T
        state[pre + "attention_norm.weight"] = layer["attention_norm"]["weight"]
        state[pre + "ffn_norm.weight"] = layer["ffn_norm"]["weight"]
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def save_folder(params, args: ModelArgs, out: Path, metadata: dict[str, str]) -> None:
    """Write params.json + consolidated.safetensors (bf16) + tokenizer.model.v3 into `out`.

    Written to a sibling temp folder first and swapped in, so a failure leaves `out` untouched.
    """
    import ml_dtypes
    from safetensors.numpy import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in params_to_mistral_state(params, args).items()}
    save_file(state, tmp / "consolidated.safetensors", metadata=metadata)
    (tmp / "params.json").write_text(json.dumps(args_to_params_json(args), indent=2) + "\n")
    shutil.copyfile(tokenizer_path(), tmp / TOKENIZER_NAME)
    if out.exists():  # keep files we do not produce (e.g. TRAINING.md)
        for f in out.iterdir():
            if not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(out)
    tmp.rename(out)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "mistral_jax" / "demo_model")
    ap.add_argument("--csv", type=Path, default=REPO / "scripts" / "demo_loss.csv")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args(argv)

    from mistral_jax.tokenizer import load_tokenizer

    full_args = DEMO_ARGS
    tokenizer = load_tokenizer(tokenizer_path())
    train_stream, val_stream, corpus_sha, stats = corpus(tokenizer)
    # Train on the sub-vocabulary the corpus uses, the other tokens sharing one output column
    # (exact for that model, see `loss_fn`): ~3x less work in the output layer, which
    # dominates this model's compute.
    used = np.unique(np.concatenate([train_stream, val_stream]))
    lookup = np.full(full_args.vocab_size, -1, np.int32)
    lookup[used] = np.arange(len(used), dtype=np.int32)
    args = dataclasses.replace(full_args, vocab_size=len(used) + 1)  # + the shared column
    n_unused = full_args.vocab_size - len(used)
    train = lookup[split_windows(train_stream, opts.seq_len)]
    val = lookup[split_windows(val_stream, opts.seq_len)][:32]
    print(f"python {sys.version.split()[0]}: {stats}, sha256 {corpus_sha[:16]}; "
          f"{train.size - len(train)} train tokens in {len(train)} "
          f"windows, {val.shape[0]} val windows; {len(used)} distinct tokens; "
          f"{full_args.n_params / 1e6:.2f}M params", flush=True)

    full_init = init_params(full_args, jax.random.PRNGKey(opts.seed), jnp.float32)
    params = sub_vocab_params(full_init, used)
    opt, schedule = make_optimizer(opts.lr, opts.warmup, opts.steps, opts.weight_decay)
    opt_state = opt.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, args, n_unused)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(lambda params, batch: loss_fn(params, batch, args, n_unused))

    def validate(params) -> float:
        starts = range(0, len(val), opts.batch)
        losses = [float(eval_loss(params, val[i:i + opts.batch])) for i in starts]
        return float(np.average(losses, weights=[len(val[i:i + opts.batch]) for i in starts]))

    rng = np.random.default_rng(opts.seed)
    order = rng.permutation(len(train))
    cursor = 0
    opts.csv.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    running = []
    for step in range(1, opts.steps + 1):
        if cursor + opts.batch > len(order):
            order, cursor = rng.permutation(len(train)), 0
        batch = jnp.asarray(train[order[cursor:cursor + opts.batch]])
        cursor += opts.batch
        params, opt_state, loss = train_step(params, opt_state, batch)
        running.append(loss)
        if step % opts.eval_every == 0 or step == opts.steps:
            train_loss = float(np.mean(jax.device_get(running)))
            running = []
            val_loss = validate(params)
            elapsed = time.perf_counter() - start
            rows.append({"step": step, "tokens": step * opts.batch * opts.seq_len,
                         "train_loss": round(train_loss, 4), "val_loss": round(val_loss, 4),
                         "lr": f"{float(schedule(step)):.2e}", "seconds": round(elapsed, 1)})
            print(rows[-1], flush=True)
            with open(opts.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    meta = {"corpus": f"python {sys.version.split()[0]} stdlib docstrings + pydoc_data.topics",
            "corpus_sha256": corpus_sha, "steps": str(opts.steps),
            "final_val_loss": str(rows[-1]["val_loss"]),
            "command": (f"python scripts/train_demo_model.py --steps {opts.steps} --batch {opts.batch} "
                        f"--seq-len {opts.seq_len} --lr {opts.lr} --warmup {opts.warmup} "
                        f"--weight-decay {opts.weight_decay} --seed {opts.seed}")}
    save_folder(expand_vocab(params, used, full_init), full_args, opts.out, meta)
    print(f"saved {opts.out} ({sum(f.stat().st_size for f in opts.out.iterdir()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
