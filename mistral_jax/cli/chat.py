"""`python -m mistral_jax.chat`: an interactive multi-turn instruct chat, streamed token by token.

    python -m mistral_jax.chat --ckpt DIR --system "Answer in one sentence."

Type a message and press Enter; the answer streams to stdout as it is generated.
`/reset` starts a new conversation, `/quit` or Ctrl-D leaves, Ctrl-C stops an answer (at
the prompt it ends the chat, exit status 130). At a terminal the programs the first turns
need are compiled at start-up, behind a progress bar (`--warmup` / `--no-warmup`).
Any other single word starting with '/' is taken for a mistyped command: a notice lists
the commands and nothing is sent. A line starting with '//' is sent with one '/' less
(`//etc` sends "/etc"). Each turn re-encodes the whole conversation with the chat
template (as mistral-chat does); timings and notices go to stderr.
"""

from __future__ import annotations

import argparse
import io
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
from tqdm import tqdm

from mistral_jax import interrupts
from mistral_jax.args import ModelArgs
from mistral_jax.cli import common as cli
from mistral_jax.decode import bucket
from mistral_jax.errors import MistralJaxError, UserInputError
from mistral_jax.generate import generate_stream
from mistral_jax.sampling import SEED_MIN
from mistral_jax.tokenizer import StreamDecoder, Tokenizer, check_utf8
from mistral_jax.transformer import Transformer

DEFAULT_MAX_TOKENS = 512
# --warmup compiles prefill for each prompt bucket from the shortest first turn up to this
# many tokens (a conversation only grows through them), and the decode step they share.
WARMUP_TOKENS = 128
COMMANDS = ("/reset", "/quit")
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
    cli.add_chunk_flag(p)
    p.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=None,
        help="compile at start-up, behind a progress bar, the programs the first turns need "
        f"(prompts of up to {WARMUP_TOKENS} tokens), so that they do not stall (default: on "
        "when stdin is a terminal)")
    return p


def read_message(interactive: bool) -> str | None:
    """The next user line, or None at end of input (Ctrl-D, or no stdin at all)."""
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        return None
    try:
        if interactive:
            return input("> ")
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except EOFError:
        return None


def keep_bad_bytes() -> None:
    """Read stdin with 'surrogateescape', so a line that is not UTF-8 arrives as text that
    `check_utf8` reports (byte and all) instead of a UnicodeDecodeError ending the chat."""
    try:
        sys.stdin.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass  # no stdin, or not a text file (a test's StringIO): nothing to decode


def shortest_turn(tok: Tokenizer, system: str | None) -> int:
    """Tokens of the shortest possible first turn: the system prompt (if any) and a
    one-token user message, through the chat template."""
    with_one = tok.encode_chat([{"role": "user", "content": "a"}], system=system)
    return len(with_one) - len(tok.encode("a", bos=False)) + 1


def check_room(tok: Tokenizer, ns: argparse.Namespace, args: ModelArgs) -> None:
    """Refuse at startup a --system / --max-tokens that leaves no room for any message."""
    if args.max_seq_len is None:
        return
    shortest = shortest_turn(tok, ns.system)
    what = "with the --system prompt, " if ns.system is not None else ""
    if shortest >= args.max_seq_len:
        raise UserInputError(
            f"a one-token message is {shortest} tokens {what}through the chat template: it "
            f"leaves no room for an answer in the model's context of {args.max_seq_len}: "
            "shorten --system")
    if ns.max_tokens is not None and shortest + ns.max_tokens > args.max_seq_len:
        raise UserInputError(
            f"--max-tokens {ns.max_tokens} leaves no room for a message in the model's "
            f"context of {args.max_seq_len} (a one-token message is {shortest} tokens "
            f"{what}through the chat template): use at most {args.max_seq_len - shortest}")


def parse_line(text: str) -> tuple[str, str]:
    """What a user line asks: ("skip", ""), ("command", "/reset"), ("unknown", word) for a
    single word starting with '/' that is no command, or ("send", text) ('//...' sends the
    line with its first '/' removed)."""
    stripped = text.strip()
    if not stripped:
        return "skip", ""
    if stripped.startswith("//"):
        return "send", text.replace("/", "", 1)
    if stripped in COMMANDS:
        return "command", stripped
    if stripped.startswith("/") and len(stripped.split()) == 1:
        return "unknown", stripped
    return "send", text


def turn_seed(seed: int, turn: int) -> int:
    """--seed + turn, wrapped into [-2**63, 2**63) (so --seed 2**63-1 works past turn 0)."""
    return (seed + turn - SEED_MIN) % 2**64 + SEED_MIN


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
    An answer that stops because it filled the model's context (no eos) says so on stderr.
    """
    stream = StreamDecoder(tok)
    ids: list[int] = []
    sampling = {**cli.sampling_kwargs(ns), "max_tokens": max_tokens,
                "seed": turn_seed(ns.seed, turn)}
    chunk_size = cli.chunk_size_for(ns, model.args, [prompt])
    # Ctrl-C stops the answer: recorded, and acted on between tokens (never inside a compile);
    # SIGTERM / SIGHUP still end the chat at once.
    with cli.CompileTimer() as compile_timer, cli.compile_notices(), \
            interrupts.deferred((signal.SIGINT,)):
        start = time.perf_counter()
        first = first_compile = None
        try:
            for token in generate_stream(prompt, model, eos_id=tok.eos_id,
                                         chunk_size=chunk_size,
                                         vocab_limit=cli.decodable_ids(tok, model.args),
                                         **sampling):
                if first is None:
                    first = time.perf_counter() - start
                    first_compile = compile_timer.seconds
                ids.append(token)
                sys.stdout.write(stream.push(token))
                sys.stdout.flush()
                interrupts.check()
            interrupts.check()
        except KeyboardInterrupt:
            sys.stdout.write(stream.flush() + "\n")
            sys.stdout.flush()
            cli.log("(answer stopped)")
            return tok.decode(ids)
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
        total = time.perf_counter() - start
    stats = cli.GenStats(n_tokens=len(ids), first_token_s=first or 0.0, total_s=total,
                         compile_s=compile_timer.seconds, first_compile_s=first_compile or 0.0)
    cli.log_stats(stats)
    context = model.args.max_seq_len
    if context is not None and len(ids) == max_tokens and len(prompt) + len(ids) >= context:
        cli.log(f"(answer cut at the model's context of {context} tokens; /reset starts a "
                "new conversation)")
    return tok.decode(ids)


def warmup_lengths(shortest: int, up_to: int = WARMUP_TOKENS) -> list[int]:
    """Prompt lengths whose programs cover turns of `shortest` up to `up_to` tokens: both
    ends of each prefill bucket (decode.bucket), since a turn's token budget, and with it
    the cache's length, can differ across one: [9, 16, 17, 32, 33, 64, 65, 128] for 9, 128."""
    lengths, n, up_to = [], shortest, max(up_to, bucket(shortest))
    while bucket(n) <= up_to:
        lengths += [n] if bucket(n) == n else [n, bucket(n)]
        n = bucket(n) + 1
    return lengths


def warm_up(model: Transformer, tok: Tokenizer, ns: argparse.Namespace, progress: bool) -> int:
    """Compile, behind a progress bar, what turns of `warmup_lengths` tokens need: each
    prompt is prefilled and one token decoded with the budget a real turn of that length
    gets (same shapes, same programs; a length compiled already runs in milliseconds).
    Returns the longest prompt length warmed up."""
    lengths = warmup_lengths(shortest_turn(tok, ns.system), WARMUP_TOKENS)
    bar = tqdm(lengths, desc="compiling for the first turns", unit="prompt size",
               disable=not progress, file=sys.stderr, leave=False)
    start = time.perf_counter()
    done = 0
    for n in bar:
        prompt = [tok.bos_id] * n
        try:
            budget = answer_budget(prompt, ns, model.args)
        except MistralJaxError:  # no room for an answer at this length (nor beyond)
            break
        sampling = {**cli.sampling_kwargs(ns), "max_tokens": budget}
        tokens = generate_stream(prompt, model, eos_id=None,
                                 chunk_size=cli.chunk_size_for(ns, model.args, [prompt]),
                                 vocab_limit=cli.decodable_ids(tok, model.args), **sampling)
        next(tokens, None)  # dispatches the first decode step: compiled too
        done = n
    bar.close()
    cli.log(f"compiled for prompts of up to {done} tokens in {time.perf_counter() - start:.1f} s "
            "(longer ones compile when they come)")
    return done


def _main(argv: Sequence[str] | None) -> int:
    ns = build_parser().parse_args(argv)
    cli.check_sampling(ns)
    if ns.system is not None:
        cli.check_text(ns.system, "--system")
    folder, args, tok = cli.prepare(ns)
    check_room(tok, ns, args)
    model = cli.load_model(ns, folder)

    keep_bad_bytes()
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if ns.warmup or (ns.warmup is None and interactive):
        warm_up(model, tok, ns, progress=sys.stderr.isatty())
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
            with interrupts.raising():  # at the prompt a signal ends the chat (readline tidies up)
                text = read_message(interactive)
        except KeyboardInterrupt as e:
            print(file=sys.stderr)
            return interrupts.exit_status(e)
        if text is None:  # Ctrl-D / end of input
            if interactive:
                print()
            return 0
        kind, text = parse_line(text)
        if kind == "skip":
            continue
        if kind == "unknown":
            cli.log(f"{text}: not a command, not sent; commands: {', '.join(COMMANDS)} (to "
                    "send a line starting with '/', begin it with '//')")
            continue
        if kind == "command" and text == "/quit":
            return 0
        if kind == "command" and text == "/reset":
            messages = []
            cli.log("(new conversation)")
            continue
        try:
            check_utf8(text, "the message")
        except UserInputError as e:  # this line only: the chat goes on
            cli.log(f"error: {e}")
            continue
        turn = [*messages, {"role": "user", "content": text}]
        try:
            prompt = tok.encode_chat(turn, system=ns.system)
            max_tokens = answer_budget(prompt, ns, args)
        except MistralJaxError as e:  # this turn only: the chat goes on
            cli.log(f"error: {' '.join(str(e).split())} (/reset starts a new conversation)")
            continue
        try:
            reply = answer(model, tok, prompt, max_tokens, ns, n_answers)
        except jax.errors.JaxRuntimeError as e:  # out of memory: this turn only
            message = cli.out_of_memory(e)
            if message is None:
                raise
            cli.log(f"error: {message} (/reset starts a new conversation)")
            continue
        n_answers += 1
        messages = turn
        if reply:  # mistral-common rejects an empty assistant message
            messages.append({"role": "assistant", "content": reply})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m mistral_jax.chat` / `mistral-jax-chat`; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
