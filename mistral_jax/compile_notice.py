"""Compiles announced as they start: a jitted function's Python body runs only when JAX
traces it, just before lowering and compiling, so a call there marks a compile to come.

    with listening(lambda program, shapes: print("compiling", program, shapes)):
        generate(...)     # prefill / decode announce themselves on a cache miss only

`announce` is a trace-time side effect that never touches the computation; with no
listener (the library's default) it does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

# listener(program, shapes): program 'prefill' / 'decode' / 'decode step'; shapes e.g.
# {'batch': 1, 'prompt_len': 16, 'cache_len': 1024, 'new_tokens': 512}
Listener = Callable[[str, dict[str, Any]], None]

_listener: contextvars.ContextVar[Listener | None] = contextvars.ContextVar(
    "mistral_jax_compile_listener", default=None)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send the announcements made in this thread's `with` block to `listener`."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def announce(program: str, **shapes: Any) -> None:
    """Called from inside a function JAX is tracing: tells the listener, if any."""
    listener = _listener.get()
    if listener is not None:
        listener(program, shapes)
