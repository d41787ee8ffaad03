"""`python -m mistral_jax.demo`: mistral-demo's three fixed prompts, completed as one batch.

    python -m mistral_jax.demo                 # the built-in demo model
    python -m mistral_jax.demo --ckpt DIR      # any model folder

Greedy (temperature 0), 35 new tokens, each prompt printed with its completion and a
`=====` line, as mistral-inference's `mistral-demo` does.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mistral_jax.cli import common as cli

PROMPTS = (
    "This is a test",
    "This is another great test",
    "This is a third test, mistral AI is very good at testing. ",
)
SEPARATOR = "====================="


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m mistral_jax.demo",
                           description="Complete three fixed prompts as one batch (greedy).")
    cli.add_model_flags(p)
    p.add_argument("--max-tokens", type=cli.int_at_least(1), default=35,
                   help="new tokens per prompt (default: 35)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    ns = build_parser().parse_args(argv)
    folder, args, tok = cli.prepare(ns)
    prompts = [tok.encode(text, bos=True) for text in PROMPTS]
    cli.check_lengths(prompts, ns.max_tokens, args, [f"demo prompt #{i + 1}" for i in range(3)])
    model = cli.load_model(ns, folder)
    outputs, stats = cli.timed_generate(prompts, model, max_tokens=ns.max_tokens,
                                        temperature=0.0, eos_id=tok.eos_id,
                                        vocab_limit=cli.decodable_ids(tok, args))
    for prompt, ids in zip(prompts, outputs):
        print(tok.decode(prompt + ids), flush=True)
        print(SEPARATOR, flush=True)
    cli.log_stats(stats)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m mistral_jax.demo`; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
