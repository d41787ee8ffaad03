"""`python -m mistral_jax.chat`: an interactive multi-turn instruct chat, streamed token by token.

    python -m mistral_jax.chat --ckpt DIR --system "Answer in one sentence."

Type a message and press Enter; the answer streams to stdout as it is generated.
`/reset` starts a new conversation, `/quit` or Ctrl-D leaves, Ctrl-C stops an answer.
Each turn re-encodes the whole conversation with the chat template (as mistral-chat does);
timings go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from mistral_jax import cli
from mistral_jax.args import ModelArgs
from mistral_jax.errors import MistralJaxError, UserInputError
from mistral_jax.generate import generate_stream
from mistral_jax.tokenizer import StreamDecoder, Tokenizer
from mistral_jax.transformer import Transformer

DEFAULT_MAX_TOKENS = 512
HELP = "/reset starts a new conversation, /quit or Ctrl-D exits, Ctrl-C stops an answer"


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m mistral_jax.chat",
                           description=f"Interactive instruct chat ({HELP}).")
    cli.add_model_flags(p)
    p.add_argument("--system", metavar="TEXT", default=None, help="system prompt")
    cli.add_sampling_flags(
        p, max_tokens=None, temperature=0.7,
        max_tokens_help=f"most tokens per answer (default: {DEFAULT_MAX_TOKENS}, or what is "
        "left of the model's context if that is less)")
    return p


def read_message(interactive: bool) -> str | None:
    """The next user line, or None at end of input (Ctrl-D)."""
    try:
        if interactive:
            return input("> ")
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except EOFError:
        return None


def answer_budget(prompt: list[int], ns: argparse.Namespace, args: ModelArgs) -> int:
    """--max-tokens, checked against the context; by default whatever fits, up to 512."""
    if ns.max_tokens is not None:
        cli.check_lengths([prompt], ns.max_tokens, args, ["the conversation"])
        return ns.max_tokens
    if args.max_seq_len is None:
        return DEFAULT_MAX_TOKENS
    if len(prompt) >= args.max_seq_len:
        raise UserInputError(f"the conversation is {len(prompt)} tokens and fills the model's "
                             f"context of {args.max_seq_len}")
    return min(DEFAULT_MAX_TOKENS, args.max_seq_len - len(prompt))


def answer(model: Transformer, tok: Tokenizer, prompt: list[int], max_tokens: int,
           ns: argparse.Namespace, turn: int) -> str:
    """Stream the answer of turn 0, 1, ... to stdout; returns its text (cut short by Ctrl-C).

    Turn n samples with seed `--seed + n`, so asking again after /reset gives a new draw.
    """
    stream = StreamDecoder(tok)
    ids: list[int] = []
    sampling = {**cli.sampling_kwargs(ns), "max_tokens": max_tokens, "seed": ns.seed + turn}
    with cli.CompileTimer() as compile_timer:
        start = time.perf_counter()
        first = None
        try:
            for token in generate_stream(prompt, model, eos_id=tok.eos_id, **sampling):
                if first is None:
                    first = time.perf_counter() - start - compile_timer.seconds
                ids.append(token)
                sys.stdout.write(stream.push(token))
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(stream.flush() + "\n")
            cli.log("(answer stopped)")
            return tok.decode(ids)
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
        total = time.perf_counter() - start - compile_timer.seconds
    if turn == 0 or compile_timer.seconds > 0:
        cli.log(f"compiled in {compile_timer.seconds:.2f} s")
    stats = cli.GenStats(n_tokens=len(ids), first_token_s=first or 0.0, total_s=total,
                         compile_s=compile_timer.seconds)
    cli.log(f"[{stats.summary()}]")
    return tok.decode(ids)


def _main(argv: Sequence[str] | None) -> int:
    ns = build_parser().parse_args(argv)
    cli.check_sampling(ns)
    if ns.system is not None:
        cli.check_text(ns.system, "--system")
    folder, args, tok = cli.prepare(ns)
    if args.max_seq_len is not None and (ns.max_tokens or 0) >= args.max_seq_len:
        raise UserInputError(
            f"--max-tokens {ns.max_tokens} leaves no room for a message in the model's "
            f"context of {args.max_seq_len}: use at most {args.max_seq_len - 1}")
    model = cli.load_model(ns, folder)

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    cli.log(f"chat with {folder} ({HELP})")
    messages: list[dict[str, Any]] = []
    n_answers = 0
    while True:
        try:
            text = read_message(interactive)
        except KeyboardInterrupt:
            text = None
        if text is None:  # Ctrl-D / end of input
            if interactive:
                print()
            return 0
        command = text.strip()
        if not command:
            continue
        if command == "/quit":
            return 0
        if command == "/reset":
            messages = []
            cli.log("(new conversation)")
            continue
        turn = [*messages, {"role": "user", "content": text}]
        try:
            prompt = tok.encode_chat(turn, system=ns.system)
            max_tokens = answer_budget(prompt, ns, args)
        except MistralJaxError as e:  # this turn only: the chat goes on
            cli.log(f"error: {' '.join(str(e).split())} (/reset starts a new conversation)")
            continue
        reply = answer(model, tok, prompt, max_tokens, ns, n_answers)
        n_answers += 1
        messages = turn
        if reply:  # mistral-common rejects an empty assistant message
            messages.append({"role": "assistant", "content": reply})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m mistral_jax.chat` / `mistral-jax-chat`; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
