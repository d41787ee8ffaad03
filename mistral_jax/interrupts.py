"""Signals as values: SIGINT / SIGTERM / SIGHUP recorded and acted on where the work can stop cleanly.

Commands (`mistral-jax-*`, `python -m mistral_jax.X`): `install_if_command()` runs first
thing when the package is imported, before jax is. From then on a signal ends the process
at once, with exit status 128 + signum (130 / 143 / 129), one word on stderr and no
traceback: a watcher thread woken by the signal calls `os._exit`, so it works while the
main thread imports, loads or sits in an XLA compile (where a KeyboardInterrupt raised in
a callback was dropped, or crashed the process). The main thread's handler only records.
Two kinds of section change that:

    with deferred():        # partial output exists: a signal is only recorded, and
        ...; check()        # check() raises Interrupted at the caller's safe points
    with raising():         # a plain-Python wait (input()): Interrupted is raised at once,
        input("> ")         # so that readline restores the terminal

A library caller (no `install`) keeps Python's handlers: `deferred`, `raising` and `check`
change nothing, and `Interrupts` (the converter's) records signals while it writes.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from typing import Any

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                if hasattr(signal, name))
WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated",
         getattr(signal, "SIGHUP", -1): "hung up"}

# `python -m X` targets and console scripts that are mistral_jax commands.
COMMAND_MODULES = ("mistral_jax", "convert.safetensors_to_orbax", "convert.benchmark")
COMMAND_SCRIPT_PREFIX = "mistral-jax-"

# Main-thread frames that write a file which a cut would leave half-written (JAX's persistent
# compilation cache writes its entries in place): the exit waits until they return.
WRITING_FRAMES = (("compilation_cache.py", "put_executable_and_time"), ("lru_cache.py", "put"))
WRITE_WAIT_S = 10.0
FLUSH_WAIT_S = 0.5


class Interrupted(KeyboardInterrupt):
    """A signal, raised where the work can stop: `exit_status` is 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def exit_status(exc: BaseException) -> int:
    """128 + signum for an `Interrupted`, 130 for a plain KeyboardInterrupt (Python's Ctrl-C)."""
    return getattr(exc, "exit_status", 128 + signal.SIGINT)


def in_gc_callback(frame) -> bool:
    """Whether `frame` runs inside a garbage-collection callback (jax has one)."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


# ----------------------------------------------------------------------------- commands


def started_as_command(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process is a mistral_jax command: a console script `mistral-jax-*`
    (sys.argv[0]), or `python [options] -m MODULE` with MODULE in COMMAND_MODULES or under
    `mistral_jax.` (sys.orig_argv; sys.argv[0] is '-m' while the package is imported)."""
    argv = sys.argv if argv is None else argv
    orig = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    if argv and os.path.basename(argv[0]).startswith(COMMAND_SCRIPT_PREFIX):
        return True
    rest = iter(orig[1:])
    for arg in rest:
        if arg in ("-X", "-W", "--check-hash-based-pycs"):
            next(rest, None)  # an option with a separate value
        elif arg.startswith("-m"):
            module = arg[2:] or next(rest, "")
            return module in COMMAND_MODULES or module.startswith("mistral_jax.")
        elif arg == "-c" or not arg.startswith("-") or arg == "-":
            return False
    return False


_EXIT, _DEFER, _RAISE = "exit", "defer", "raise"


class _State:
    """The process-wide handling once `install`ed: a stack of (signals, policy) sections."""

    def __init__(self) -> None:
        self.installed = False
        self.lock = threading.Lock()  # held to change sections, and by the exit itself
        self.sections: list[tuple[frozenset[int], str]] = []
        self.pending: int | None = None
        self.wake_fd = -1  # the watcher's pipe

    def policy(self, signum: int) -> str:
        for signals, how in reversed(self.sections):
            if signum in signals:
                return how
        return _EXIT


_state = _State()


def install() -> bool:
    """Handle SIGINT / SIGTERM / SIGHUP the commands' way (see the module docstring).

    Idempotent; only from the main thread (returns False elsewhere). A signal ignored when
    this runs (SIGHUP under nohup, SIGINT in a background job) stays ignored."""
    if _state.installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(write_fd, False)
        # Python's C-level handler writes each signal's number here at once, whatever the
        # main thread is doing; the watcher acts on it.
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (OSError, ValueError):  # e.g. Windows, which wants a socket: Python's handlers stay
        os.close(read_fd)
        os.close(write_fd)
        return False
    _state.wake_fd = write_fd
    for signum in SIGNALS:
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):
            signal.signal(signum, _on_signal)
    threading.Thread(target=_watch, args=(read_fd,), name="mistral_jax-signals",
                     daemon=True).start()
    _state.installed = True
    return True


def install_if_command() -> bool:
    """`install()` when this process is a mistral_jax command (`started_as_command`)."""
    return started_as_command() and install()


def installed() -> bool:
    return _state.installed


def _on_signal(signum: int, frame: Any) -> None:
    """The main thread's handler: raises only inside `raising()`, and never inside a GC
    callback (where Python prints and drops it); otherwise it records."""
    how = _state.policy(signum)
    if how == _RAISE and not in_gc_callback(frame):
        _state.pending = None
        raise Interrupted(signum)
    if _state.pending is None:
        _state.pending = signum
    if how == _EXIT:  # the watcher may have looked while a section that has ended was open
        try:
            os.write(_state.wake_fd, bytes([signum]))
        except OSError:
            pass


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        for signum in data:
            if signum in SIGNALS:
                _act(signum)


def _act(signum: int) -> None:
    """The watcher's response to one signal: end the process unless a section says otherwise."""
    if _state.policy(signum) == _RAISE:
        time.sleep(0.25)  # the main thread raises it, unless it was in a GC callback
        if _state.pending is None:
            return
    with _state.lock:  # no section starts meanwhile (e.g. the converter's partial output)
        if _state.policy(signum) == _DEFER:
            return  # check() acts on it
        _wait_for_writes()
        end(signum)


def _wait_for_writes() -> None:
    main = sys._current_frames().get(threading.main_thread().ident)
    deadline = time.monotonic() + WRITE_WAIT_S
    while _writing(main) and time.monotonic() < deadline:
        time.sleep(0.01)
        main = sys._current_frames().get(threading.main_thread().ident)


def _writing(frame) -> bool:
    while frame is not None:
        code = frame.f_code
        if any(code.co_filename.endswith(f) and code.co_name == name
               for f, name in WRITING_FRAMES):
            return True
        frame = frame.f_back
    return False


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # closed, a broken pipe, a reentrant call: nothing more to save
            pass


def end(signum: int) -> None:
    """End the process now: what stdout holds is flushed (waiting at most FLUSH_WAIT_S, in
    case the main thread blocks it), one word goes to stderr, exit status 128 + signum."""
    flusher = threading.Thread(target=_flush_std, daemon=True)
    flusher.start()
    flusher.join(FLUSH_WAIT_S)
    try:
        os.write(2, f"\n{WORDS.get(signum, 'stopped')}\n".encode())
    except OSError:  # the terminal is gone (SIGHUP)
        pass
    os._exit(128 + signum)


class _Section:
    def __init__(self, signals: tuple[int, ...], how: str):
        self.entry = (frozenset(signals), how)
        self.active = False

    def __enter__(self) -> _Section:
        if _state.installed and threading.current_thread() is threading.main_thread():
            with _state.lock:
                _state.sections.append(self.entry)
            self.active = True
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if not self.active:
            return
        with _state.lock:
            _state.sections.remove(self.entry)
            signum = _state.pending
            if signum is None or _state.policy(signum) == _DEFER:
                return
            _state.pending = None
            if isinstance(exc, Interrupted):
                return  # already on its way out
            if _state.policy(signum) == _EXIT:
                end(signum)  # recorded in the section: acted on as it ends
        raise Interrupted(signum)


def deferred(signals: tuple[int, ...] = SIGNALS) -> _Section:
    """A section where `signals` are only recorded; `check()` raises them as `Interrupted`.
    One still recorded when the section ends is acted on then. Nothing without `install`."""
    return _Section(signals, _DEFER)


def raising(signals: tuple[int, ...] = SIGNALS) -> _Section:
    """A section where `signals` raise `Interrupted` at once in the main thread (for plain
    Python waits such as input(), never around jax calls). Nothing without `install`."""
    return _Section(signals, _RAISE)


def check() -> None:
    """Raise `Interrupted` for a signal recorded inside `deferred()`; else nothing."""
    signum = _state.pending
    if signum is not None and _state.policy(signum) == _DEFER:
        _state.pending = None
        raise Interrupted(signum)


class keyboard_interrupts:
    """Without `install` (a command's main() called in-process): SIGTERM and SIGHUP raise
    `Interrupted` as Ctrl-C raises KeyboardInterrupt, for the `with` block. Else nothing."""

    def __enter__(self) -> keyboard_interrupts:
        self.saved: dict[int, Any] = {}
        if _state.installed or threading.current_thread() is not threading.main_thread():
            return self
        for signum in SIGNALS:
            if signum != signal.SIGINT and signal.getsignal(signum) == signal.SIG_DFL:
                self.saved[signum] = signal.signal(signum, _raise)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)


def _raise(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


# ----------------------------------------------------------------------------- the converter


class Interrupts:
    """The converter's signals, from `with` to its end. Under `install` (a command): until
    `defer()` a signal ends the process at once (nothing is written yet); from `defer()` on
    it is only recorded (`deferred()`), and `check()` raises it as `Interrupted`.

    A library caller: SIGINT / SIGTERM / SIGHUP are recorded instead of letting their
    handlers raise wherever Python is (a KeyboardInterrupt raised in a GC callback is
    printed and dropped, and one raised while the partial output is removed would leave
    it behind); `check()` then calls the previous handler, or raises `Interrupted` for the
    default action, which `__exit__` turns back into that signal once unwound. Until
    `defer()` the handler also runs at once, unless Python is in a GC callback. Outside the
    main thread, or for a signal that was ignored, nothing changes."""

    SIGNALS = SIGNALS

    def __init__(self):
        self.saved: dict[int, Any] = {}
        self.pending: int | None = None
        self.immediate = True
        self.section: _Section | None = None

    def __enter__(self) -> Interrupts:
        if _state.installed:
            return self
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous not in (signal.SIG_IGN, None):
                    self.saved[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self.pending is None:
            self.pending = signum
        if not self.immediate:
            return
        if in_gc_callback(frame):  # what it raised would be printed and dropped:
            return  # the next check() acts on it
        self._act(signum)
        self.pending = None

    def defer(self) -> None:
        """From now on only record signals (after acting on one already recorded)."""
        if _state.installed and self.section is None:
            self.section = deferred()
            self.section.__enter__()
        self.immediate = False
        self.check()

    def check(self) -> None:
        """Act on a recorded signal: under `install`, raise Interrupted; else call its
        previous handler (which raises, as Python's SIGINT handler does), or for the default
        action raise Interrupted. A handler that returns lets the conversion go on."""
        if _state.installed:
            check()
            return
        signum, self.pending = self.pending, None
        if signum is not None:
            self._act(signum)

    def _act(self, signum: int) -> None:
        handler = self.saved[signum]
        if handler == signal.SIG_DFL:
            raise Interrupted(signum)
        handler(signum, None)

    def __exit__(self, kind, exc, tb) -> None:
        if self.section is not None:
            self.section.__exit__(kind, exc, tb)
            return
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        if isinstance(exc, Interrupted) and self.saved.get(exc.signum) == signal.SIG_DFL:
            signal.raise_signal(exc.signum)  # the default action: the process ends here
            raise SystemExit(exc.exit_status)
        if isinstance(exc, Exception):
            self.check()  # a signal recorded while an error unwound: the signal wins
