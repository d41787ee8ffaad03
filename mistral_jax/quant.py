"""`python -m mistral_jax.quant`: how far int8 / fp8 logits are from bfloat16 (a report).

The quantization itself is `mistral_jax.quantize` (docs/design/quantization.md).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.cli.common import run as run_command
from mistral_jax.errors import UserInputError
from mistral_jax.model import random_params
from mistral_jax.orbax_restore import folder_quantization
from mistral_jax.presets import PRESETS
from mistral_jax.quantize import MODES, param_bytes, quantize_params
from mistral_jax.tokenizer import load_tokenizer
from mistral_jax.transformer import Transformer, jit_forward


def quality(forward_ref: Callable, forward_q: Callable, prompts: np.ndarray,
            new_tokens: int = 16) -> dict[str, float]:
    """Compare two models on fixed prompts [B, T]: relative logit error and greedy agreement.

    `forward_*(tokens [B, L], positions [B, L]) -> logits [B, L, V]` (positions -1: padding).
    Returns rel_err (max |dq - dref| / max |dref| over the prompts' logits), rms_rel_err
    (root-mean-square of the difference over that of the reference), top1_agreement
    (teacher-forced next-token argmax agreement over every prompt position), and
    greedy_agreement (fraction of `new_tokens` greedy continuation tokens equal, position by
    position, each model continuing its own text).
    """
    b, t = prompts.shape
    length = t + new_tokens
    tokens = np.zeros((b, length), np.int32)
    tokens[:, :t] = prompts
    pos = np.where(np.arange(length) < t, np.arange(length), -1).astype(np.int32)
    pos = np.broadcast_to(pos, (b, length))
    ref = np.asarray(forward_ref(tokens, pos), np.float64)[:, :t]
    got = np.asarray(forward_q(tokens, pos), np.float64)[:, :t]
    result = {
        "rel_err": float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))),
        "rms_rel_err": float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2))),
        "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
    }
    outs = []
    for fwd in (forward_ref, forward_q):
        seq, p = tokens.copy(), pos.copy()
        for i in range(t, length):
            logits = np.asarray(fwd(seq, p))
            seq[:, i] = logits[:, i - 1].argmax(-1)
            p[:, i] = i
        outs.append(seq[:, t:])
    result["greedy_agreement"] = float(np.mean(outs[0] == outs[1]))
    return result


PROMPTS = (
    "Return the number of items in a container.",
    "def read_config(path):\n    \"\"\"Read a JSON configuration file and return a dict.",
    "The quick brown fox jumps over the lazy dog, and the dog does not seem to mind.",
    "Raise ValueError if the argument is negative; otherwise return its square root.",
    "class Cache:\n    \"\"\"A least-recently-used cache with a fixed number of slots.",
    "Open the file in binary mode, read it in chunks of 4096 bytes and compute its hash.",
    "Return a new list with the elements of the iterable sorted in ascending order.",
    "import os\nimport sys\n\ndef main(argv):\n    \"\"\"Parse the command line arguments and",
)


def text_prompts(tok, n: int, length: int) -> np.ndarray:
    """[n, length] token ids of the fixed texts PROMPTS (BOS first): prompt i is text i,
    continued by the texts after it (one per line, wrapping around) until it has `length`
    tokens, then cut to `length`. UserInputError for more prompts than texts."""
    if not 1 <= n <= len(PROMPTS):
        raise UserInputError(f"--prompts must be in [1, {len(PROMPTS)}] (the fixed texts) with "
                             f"--ckpt, got {n}")
    if length < 2:
        raise UserInputError(f"--prompt-len must be at least 2 (BOS and one token), got {length}")
    rows = []
    for i in range(n):
        text, j = PROMPTS[i], i
        ids = tok.encode(text)
        while len(ids) < length:
            j += 1
            text += "\n" + PROMPTS[j % len(PROMPTS)]
            ids = tok.encode(text)
        rows.append(ids[:length])
    return np.array(rows, np.int32)


def _main(argv=None) -> int:
    """`python -m mistral_jax.quant`: quality of int8 / fp8 against bfloat16, one JSON line each."""
    p = argparse.ArgumentParser(prog="python -m mistral_jax.quant", description=_main.__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path,
                     help="a model folder (prompts: the fixed texts, tokenized, each continued "
                          "by the next texts to --prompt-len tokens)")
    src.add_argument("--preset", default="tiny",
                     help="random weights of a mistral_jax.bench preset (prompts: random tokens)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--prompts", type=int, default=8,
                   help=f"how many prompts (at most {len(PROMPTS)} with --ckpt)")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens per prompt, BOS included")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)

    if ns.prompts < 1 or ns.prompt_len < 2 or ns.new_tokens < 1:
        raise UserInputError(f"--prompts and --new-tokens must be >= 1 and --prompt-len "
                             f">= 2, got {ns.prompts}, {ns.new_tokens} and {ns.prompt_len}")
    if ns.ckpt is not None:
        stored = folder_quantization(ns.ckpt) if ns.ckpt.is_dir() else None
        if stored is not None:  # checked before anything loads
            raise UserInputError(
                f"--ckpt {ns.ckpt} holds quantized weights ({stored}): this report "
                "compares quantization against the bfloat16 weights; give the "
                "unquantized folder it was converted from")
        tok = load_tokenizer(ns.ckpt)
        prompts = text_prompts(tok, ns.prompts, ns.prompt_len)
        model = Transformer.from_folder(ns.ckpt, dtype="bfloat16")
        args, params, name = model.args, model.params, str(ns.ckpt)
    else:
        if ns.preset not in PRESETS:
            raise UserInputError(f"--preset must be one of {sorted(PRESETS)}, "
                                 f"got {ns.preset!r}")
        args, name = PRESETS[ns.preset], ns.preset
        params = random_params(args, ns.seed, jnp.bfloat16)  # leaf by leaf, as the bench
        prompts = np.random.default_rng(ns.seed).integers(
            0, args.vocab_size, (ns.prompts, ns.prompt_len)).astype(np.int32)
    if args.max_seq_len is not None and ns.prompt_len + ns.new_tokens > args.max_seq_len:
        raise UserInputError(f"--prompt-len {ns.prompt_len} + --new-tokens {ns.new_tokens} "
                             f"exceeds the model's max_seq_len={args.max_seq_len}")

    def fwd(tree):
        return lambda t, pos: jit_forward(tree, jnp.asarray(t), jnp.asarray(pos), None,
                                          args=args)[0]

    for mode in ns.modes:
        qparams = quantize_params(params, mode)
        report = quality(fwd(params), fwd(qparams), prompts, ns.new_tokens)
        print(json.dumps({"model": name, "mode": mode, "reference": "bfloat16",
                          "device": jax.devices()[0].device_kind,
                          "prompts": list(prompts.shape), "new_tokens": ns.new_tokens,
                          "weight_bytes": param_bytes(qparams),
                          "bf16_weight_bytes": param_bytes(params), **report}), flush=True)
        del qparams
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command; an error a user can act on is one line `error: ...` and exit status 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
