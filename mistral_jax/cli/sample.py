"""`python -m mistral_jax.sample`: complete prompts as one batch and print the answers.

    python -m mistral_jax.sample --ckpt DIR --prompt "Once upon a time" --prompt "def fib(n):"
    python -m mistral_jax.sample --ckpt DIR --instruct --prompt "Name three rivers."
    python -m mistral_jax.sample --ckpt DIR --instruct --tools tools.json --prompt "Weather in Paris?"
    python -m mistral_jax.sample --ckpt DIR --fim-prefix "def add(a, b):" --fim-suffix "print(add(1, 2))"

Each answer goes to stdout (several prompts: each followed by a `=====` line): for a plain
prompt the prompt and the text that continues it, as mistral-inference's `mistral-demo`
prints them (--no-echo: the continuation only), for --instruct the assistant's answer, for
FIM the middle; a tool-call answer is printed as a JSON list of {"name", "arguments"}. Load
time, compile time, tokens/s and time to first token go to stderr.

Without --prompt a plain run completes DEFAULT_PROMPT. Without --temperature the built-in demo
model (no --ckpt) samples at DEMO_TEMPERATURE / DEMO_TOP_P, because greedy decoding makes that
tiny model repeat one line; a --ckpt model is decoded greedily. `--temperature 0` is greedy.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral_common.tokens.tokenizers.base import TokenizerVersion

from mistral_jax.cli import common as cli
from mistral_jax.errors import TokenizerError, UserInputError
from mistral_jax.tokenizer import Tokenizer, ToolCall, check_utf8

SEPARATOR = "====================="

# `python -m mistral_jax.sample` (or `--ckpt DIR`) without --prompt completes this prompt.
DEFAULT_PROMPT = "Return the number of"
# Sampling used for the demo model when --temperature is not given: its greedy output loops.
DEMO_TEMPERATURE, DEMO_TOP_P = 0.8, 0.95


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m mistral_jax.sample",
        description="Generate completions for one or more prompts, as one batch.")
    cli.add_model_flags(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt; repeat the flag for a batch of prompts")
    p.add_argument("--instruct", action="store_true",
                   help="wrap each prompt as a user message in the chat template")
    p.add_argument("--system", metavar="TEXT", default=None,
                   help="system prompt (with --instruct)")
    p.add_argument("--tools", metavar="FILE.json", type=Path, default=None,
                   help="OpenAI-style list of functions the model may call (with --instruct); "
                   "a tool-call answer is printed as JSON")
    p.add_argument("--fim-prefix", metavar="TEXT", default=None,
                   help="fill in the middle: the code before the gap (needs a v3+ tokenizer)")
    p.add_argument("--fim-suffix", metavar="TEXT", default=None,
                   help="fill in the middle: the code after the gap")
    cli.add_sampling_flags(
        p, max_tokens=128, temperature=None, top_p=None,
        temperature_help=f">= 0; 0 is greedy (default: {DEMO_TEMPERATURE} with the built-in "
        "demo model, whose greedy output repeats itself; 0 with --ckpt)",
        top_p_help=f"nucleus sampling mass, in (0, 1] (default: {DEMO_TOP_P} when the demo "
        "model samples by default, else 1, off)")
    p.add_argument("--no-echo", action="store_true",
                   help="print only the continuation of a plain prompt, not the prompt itself")
    cli.add_chunk_flag(p)
    return p


def read_tools(path: Path) -> list[dict[str, Any]]:
    """An OpenAI-style function list: [{"type": "function", "function": {"name", ...}}, ...]."""
    try:
        tools = json.loads(path.read_text())
    except OSError as e:
        raise UserInputError(f"--tools {path}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"--tools {path}: not valid JSON ({e})") from None
    if not isinstance(tools, list) or not tools:
        raise UserInputError(f"--tools {path}: expected a non-empty JSON list of functions")
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserInputError(
                f"--tools {path}: item {i} is not a function: expected "
                '{"type": "function", "function": {"name": ..., "parameters": {...}}}')
    return tools


def resolve_sampling(ns: argparse.Namespace) -> None:
    """Fills in --temperature / --top-p left unset: the demo model samples (said on stderr),
    a --ckpt model is greedy."""
    if ns.temperature is None and ns.ckpt is None:
        ns.temperature = DEMO_TEMPERATURE
        ns.top_p = DEMO_TOP_P if ns.top_p is None else ns.top_p
        cli.log(f"sampling with temperature {ns.temperature}, top_p {ns.top_p}, seed {ns.seed} "
                "(the demo model's default; --temperature 0 is greedy)")
    ns.temperature = 0.0 if ns.temperature is None else ns.temperature
    ns.top_p = 1.0 if ns.top_p is None else ns.top_p


def check_flags(ns: argparse.Namespace) -> None:
    """Everything that can be checked before the model folder is opened."""
    resolve_sampling(ns)
    cli.check_sampling(ns)
    fim = ns.fim_prefix is not None or ns.fim_suffix is not None
    if fim:
        for flag, text in (("--fim-prefix", ns.fim_prefix), ("--fim-suffix", ns.fim_suffix)):
            if text is not None:
                check_utf8(text, flag)
        if ns.prompt or ns.instruct or ns.system is not None or ns.tools is not None:
            raise UserInputError("--fim-prefix/--fim-suffix cannot be combined with --prompt, "
                                 "--instruct, --system or --tools: a fill-in-the-middle "
                                 "request is one prompt, without a chat template")
        if not ((ns.fim_prefix or "").strip() or (ns.fim_suffix or "").strip()):
            raise UserInputError("--fim-prefix and --fim-suffix are both empty: give at least one")
    elif not ns.prompt:
        if ns.instruct:  # a chat turn needs a message; a plain completion has a default
            raise UserInputError("--instruct: give at least one --prompt TEXT (the user message)")
        ns.prompt = [DEFAULT_PROMPT]
        cli.log(f"no --prompt given: completing {DEFAULT_PROMPT!r}")
    for i, text in enumerate(ns.prompt):
        cli.check_text(text, f"--prompt #{i + 1}" if len(ns.prompt) > 1 else "--prompt")
    if (ns.tools is not None or ns.system is not None) and not ns.instruct:
        raise UserInputError("--tools and --system need --instruct (they are part of the "
                             "chat template)")
    if ns.system is not None:
        cli.check_text(ns.system, "--system")


def encode_prompts(ns: argparse.Namespace, tok: Tokenizer,
                   tools: list[dict[str, Any]] | None) -> list[list[int]]:
    """Prompt ids: the FIM request, chat-template user messages, or plain text after BOS."""
    if ns.fim_prefix is not None or ns.fim_suffix is not None:
        return [tok.encode_fim(ns.fim_prefix or "", ns.fim_suffix or "")]
    if ns.instruct:
        return [tok.encode_chat([{"role": "user", "content": text}], system=ns.system,
                                tools=tools) for text in ns.prompt]
    return [tok.encode(text, bos=True) for text in ns.prompt]


def tool_calls_json(calls: Sequence[ToolCall]) -> str:
    """Tool calls as one JSON line: [{"name": ..., "arguments": {...}}, ...]."""
    out = []
    for call in calls:
        item: dict[str, Any] = {"name": call.name, "arguments": call.arguments}
        if call.id is not None:
            item["id"] = call.id
        out.append(item)
    return json.dumps(out, ensure_ascii=False)


def continuation(prompt: Sequence[int], ids: Sequence[int], tok: Tokenizer) -> str:
    """The text `ids` add after `prompt`, leading space included (a lone decode drops it)."""
    before, after = tok.decode(prompt), tok.decode([*prompt, *ids])
    return after[len(before):] if after.startswith(before) else tok.decode(ids)


def answer_text(ids: Sequence[int], tok: Tokenizer, parse_tools: bool) -> str:
    """What to print for generated ids: their text, or the parsed tool calls as JSON."""
    if not parse_tools:
        return tok.decode(ids)
    try:
        content, calls = tok.split_tool_calls(ids)
    except TokenizerError as e:  # the model wrote [TOOL_CALLS] but no valid JSON after it
        cli.log(f"warning: {e}")
        return tok.decode(ids)
    if not calls:
        return content
    return f"{content}\n{tool_calls_json(calls)}" if content.strip() else tool_calls_json(calls)


def _main(argv: Sequence[str] | None) -> int:
    ns = build_parser().parse_args(argv)
    check_flags(ns)
    tools = read_tools(ns.tools) if ns.tools is not None else None
    folder, args, tok = cli.prepare(ns)
    if tools is not None and tok.version < TokenizerVersion.v2:
        raise UserInputError(f"--tools needs a tokenizer of version v2 or later; {tok.path} is "
                             f"{tok.version.value}")
    prompts = encode_prompts(ns, tok, tools)
    names = (["the fill-in-the-middle prompt"] if len(prompts) == 1 and not ns.prompt else
             [f"--prompt #{i + 1}" if len(prompts) > 1 else "--prompt"
              for i in range(len(prompts))])
    cli.check_lengths(prompts, ns.max_tokens, args, names)

    model = cli.load_model(ns, folder)
    outputs, stats = cli.timed_generate(prompts, model, eos_id=tok.eos_id,
                                        chunk_size=cli.chunk_size_for(ns, args, prompts),
                                        vocab_limit=cli.decodable_ids(tok, args),
                                        **cli.sampling_kwargs(ns))
    plain = not ns.instruct and ns.fim_prefix is None and ns.fim_suffix is None
    for text, prompt, ids in zip(ns.prompt if plain else prompts, prompts, outputs):
        if plain:
            echo = "" if ns.no_echo else text
            print(echo + continuation(prompt, ids, tok), flush=True)
        else:
            print(answer_text(ids, tok, parse_tools=tools is not None), flush=True)
        if len(outputs) > 1:
            print(SEPARATOR, flush=True)
    cli.log_stats(stats)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m mistral_jax.sample` / `mistral-jax-sample`; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
