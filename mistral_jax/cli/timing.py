"""Compiles the user can see: a notice on stderr before each compile, and timings as the
user waited (compiles included) with the compile time beside them.

    with compile_notices():                       # "compiling for prompts of up to 16 tokens ..."
        out, stats = timed_generate(prompts, model, max_tokens=32)
    log_stats(stats)                              # "compiled in 6.85 s" + tokens/s, time to first token
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from mistral_jax.compile_notice import listening
from mistral_jax.generate import generate
from mistral_jax.transformer import Transformer


def log(message: str) -> None:
    """One informational line on stderr."""
    print(message, file=sys.stderr, flush=True)


class CompileTimer:
    """Seconds JAX spends tracing, lowering and compiling while the `with` block runs.

    Read from `jax.monitoring` events, so a first call can be split into compile time
    and run time without compiling anything twice.
    """

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._active = False

    def _listen(self, event: str, duration: float, *args: Any, **kwargs: Any) -> None:
        if self._active and event in self.EVENTS:
            self.seconds += duration

    def __enter__(self) -> CompileTimer:
        self._active = True
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
        if unregister is not None:
            try:
                unregister(self._listen)
            except (AssertionError, ValueError, KeyError):
                pass


def describe_compile(program: str, shapes: dict[str, Any]) -> str:
    """The notice for a compile about to start (see compile_notice.announce)."""
    batch = shapes.get("batch", 1)
    rows = f", {batch} rows" if batch > 1 else ""
    if program == "prefill":
        what = f"prompts of up to {shapes['prompt_len']} tokens{rows}"
    else:
        what = f"answers of up to {shapes['new_tokens']} tokens{rows}"
    return f"compiling for {what} (once: cached afterwards) ..."


@contextlib.contextmanager
def compile_notices(say=log) -> Iterator[list[str]]:
    """Say on stderr (through `say`) that a compile starts, before it does: once per `with`
    block, at the first program JAX traces in it (none when everything is compiled).
    Yields the list of notices given."""
    given: list[str] = []

    def listener(program: str, shapes: dict[str, Any]) -> None:
        if not given:
            given.append(describe_compile(program, shapes))
            say(given[-1])

    with listening(listener):
        yield given


@dataclasses.dataclass
class GenStats:
    """Timings of one generation, as the user waited: compiles included, and beside them.

    first_token_s counts from the call to the first sampled token (prompt processing, and
    any compile before it: first_compile_s of it); total_s the whole call (compile_s of it).
    """

    n_tokens: int
    first_token_s: float
    total_s: float
    compile_s: float = 0.0
    first_compile_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second once compiled (compile time taken out)."""
        run = self.total_s - self.compile_s
        return self.n_tokens / run if run > 0 else float("inf")

    def summary(self) -> str:
        first = f"time to first token {self.first_token_s:.3f} s"
        if self.compile_s <= 0:
            return f"{self.n_tokens} tokens in {self.total_s:.2f} s: " \
                   f"{self.tokens_per_s:.1f} tokens/s, {first}"
        if self.first_compile_s > 0:
            first += f" ({self.first_compile_s:.2f} s of it compiling)"
        return (f"{self.n_tokens} tokens in {self.total_s:.2f} s ({self.compile_s:.2f} s of it "
                f"compiling): {self.tokens_per_s:.1f} tokens/s once compiled, {first}")


def timed_generate(prompts: Sequence[Sequence[int]], model: Transformer,
                   **options: Any) -> tuple[list[list[int]], GenStats]:
    """`generate.generate(prompts, model, **options)`, timed as the user waits (stopped once
    after the prompts' first token), with a notice on stderr before any compile.

    Returns the generated ids per prompt (cut at eos, as `generate` does) and the timings.
    """
    marks: dict[str, float] = {}
    with CompileTimer() as compile_timer, compile_notices():
        start = time.perf_counter()

        def first_token() -> None:
            marks["first"] = time.perf_counter() - start
            marks["compile_first"] = compile_timer.seconds

        out, _ = generate(prompts, model, on_first_token=first_token, **options)
        total = time.perf_counter() - start
    stats = GenStats(n_tokens=sum(len(o) for o in out), first_token_s=marks["first"],
                     total_s=total, compile_s=compile_timer.seconds,
                     first_compile_s=marks["compile_first"])
    return out, stats


def log_stats(stats: GenStats) -> None:
    """Compile time (if any), then tokens/s and time to first token, on stderr."""
    if stats.compile_s > 0:
        log(f"compiled in {stats.compile_s:.2f} s")
    log(stats.summary())
