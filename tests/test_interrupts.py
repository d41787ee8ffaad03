"""Signals end every command promptly and cleanly (exit 130 / 143 / 129, no traceback, nothing
half-written), whenever they come: during the imports, a compile, a conversion's writing,
the chat's prompt or answer. Real commands in child processes; readiness is read from the
child (its signal mask in /proc, its stderr), never from a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mistral_jax import interrupts
from tests.helpers import random_mistral_state, tiny_args, write_mistral_folder

REPO = Path(__file__).resolve().parents[1]
STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
CRASHES = ("Traceback", "Exception ignored", "Fatal Python error")

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")


class Child:
    """A command in a child process, its stderr collected line by line as it comes."""

    def __init__(self, argv: list[str], stdin: int | None = subprocess.DEVNULL):
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "MISTRAL_JAX_COMPILE_CACHE": "off", "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.out: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stderr, self.lines), (self.proc.stdout, self.out))]
        for r in self.readers:
            r.start()

    def _read(self, stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def wait_for(self, ready, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"ended first ({self.proc.returncode}): {self.err}"
            assert time.monotonic() < deadline, f"not ready after {timeout} s: {self.err}"
            time.sleep(0.005)

    def handles_sighup(self) -> bool:
        """Whether mistral_jax's handlers are installed (Python alone catches SIGINT only)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return False
        caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
        return bool(caught & (1 << (signal.SIGHUP - 1)))

    def stop(self, signum: int, within: float = 30) -> tuple[int, float]:
        """Send `signum`; the exit status and the seconds the child took to end."""
        sent = time.monotonic()
        self.proc.send_signal(signum)
        try:
            status = self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running {within} s after the signal: {self.err}") from None
        took = time.monotonic() - sent
        for r in self.readers:
            r.join(10)
        return status, took


def assert_clean(child: Child, status: int, signum: int) -> None:
    assert status == STATUS[signum], child.err
    assert not any(c in child.err for c in CRASHES), child.err


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("argv0,orig,want", [
    ("/venv/bin/mistral-jax-convert", ["/venv/bin/python", "/venv/bin/mistral-jax-convert"], True),
    ("-m", ["python", "-m", "mistral_jax.sample", "--prompt", "x"], True),
    ("-m", ["python", "-u", "-X", "importtime", "-mmistral_jax.bench"], True),
    ("-m", ["python", "-m", "convert.safetensors_to_orbax", "a", "b"], True),
    ("-m", ["python", "-m", "pytest", "-m", "mistral_jax.sample"], False),
    ("-c", ["python", "-c", "import mistral_jax", "-m", "mistral_jax.x"], False),
    ("script.py", ["python", "script.py", "-m", "mistral_jax.sample"], False),
    ("", ["python"], False),
])
def test_only_commands_install_handlers(argv0, orig, want):
    assert interrupts.started_as_command([argv0], orig) is want


def test_importing_the_library_changes_no_handler():
    code = ("import signal, mistral_jax, mistral_jax.interrupts as i; "
            "print(i.installed(), signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.split() == ["False", "True"], done.stderr


# ----------------------------------------------------------------------------- sample


@linux_only
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_the_imports_ends_sample(signum):
    """It used to be printed and dropped in jax's GC callback: the command ran on, exit 0."""
    child = Child([sys.executable, "-m", "mistral_jax.sample", "--max-tokens", "4"])
    child.wait_for(child.handles_sighup)
    assert child.err == ""  # nothing printed yet: still importing
    status, took = child.stop(signum)
    assert_clean(child, status, signum)
    assert "no --prompt given" not in child.err and not child.out  # it did not run on
    assert took < 10


@linux_only
def test_ctrl_c_during_a_compile_ends_sample_at_once():
    """The notice comes before the compile; Ctrl-C then exits 130 without waiting for the
    compile, and never crashes (a KeyboardInterrupt inside XLA's callbacks did, 4 of 14)."""
    child = Child([sys.executable, "-m", "mistral_jax.sample", "--max-tokens", "4"])
    child.wait_for(lambda: "compiling for prompts of up to 16 tokens" in child.err)
    status, took = child.stop(signal.SIGINT)
    assert_clean(child, status, signal.SIGINT)
    assert child.err.rstrip().endswith("interrupted") and not child.out
    assert took < 10


# ----------------------------------------------------------------------------- convert


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    args = tiny_args(vocab_size=512)
    return write_mistral_folder(tmp_path_factory.mktemp("src") / "model", args,
                                random_mistral_state(args, seed=1))


def no_output(dst: Path) -> bool:
    return not dst.exists() and not list(dst.parent.glob(f".{dst.name}.*"))


@linux_only
def test_a_signal_during_the_imports_ends_the_console_script(source, tmp_path):
    """`mistral-jax-convert SRC DST --verify` as pip's wrapper script runs it."""
    script = tmp_path / "mistral-jax-convert"
    script.write_text("import sys\nfrom mistral_jax.convert import main\nsys.exit(main())\n")
    dst = tmp_path / "out"
    child = Child([sys.executable, str(script), str(source), str(dst), "--verify"])
    child.wait_for(child.handles_sighup)
    status, _ = child.stop(signal.SIGINT)
    assert_clean(child, status, signal.SIGINT)
    assert no_output(dst) and not child.out


# The real command, with each tensor copy slowed down and announced on stderr, so that the
# signal surely comes while the partial output is being written.
SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from mistral_jax import interrupts
    interrupts.install()  # what `python -m mistral_jax.convert` does on importing the package
    import mistral_jax.orbax_write as w
    copy = w._copy
    def slow_copy(value, dtype, pool):
        print("copying", file=sys.stderr, flush=True)
        time.sleep(0.2)
        return copy(value, dtype, pool)
    w._copy = slow_copy
    from mistral_jax.convert import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])  # SIGINT: test_convert.py
def test_a_signal_while_converting_removes_the_partial_output(source, tmp_path, signum):
    """SIGHUP (the terminal closed) used to leave the hidden .DST.partial-* folder behind."""
    dst = tmp_path / "out"
    child = Child([sys.executable, "-c", SLOW_CONVERT, str(source), str(dst), "--quiet"])
    child.wait_for(lambda: child.err.count("copying") >= 2)
    assert list(tmp_path.glob(".out.partial-*"))  # the partial output exists
    status, took = child.stop(signum)
    assert_clean(child, status, signum)
    assert "the destination was left as it was" in child.err
    assert no_output(dst) and took < 10


# ----------------------------------------------------------------------------- chat


@linux_only
def test_chat_ctrl_c_stops_an_answer_after_its_compile_and_at_the_prompt_exits_130():
    child = Child([sys.executable, "-m", "mistral_jax.chat", "--max-tokens", "8",
                   "--no-warmup"], stdin=subprocess.PIPE)
    child.wait_for(lambda: "chat with" in child.err)
    child.proc.stdin.write("hello\n")
    child.proc.stdin.flush()
    child.wait_for(lambda: "compiling for prompts of up to" in child.err)
    child.proc.send_signal(signal.SIGINT)  # during the compile: acted on once it returns
    child.wait_for(lambda: "(answer stopped)" in child.err)
    assert child.proc.poll() is None  # the chat goes on
    status, _ = child.stop(signal.SIGINT)  # at the prompt: the chat ends
    assert_clean(child, status, signal.SIGINT)


def test_the_exit_waits_for_a_compilation_cache_entry_being_written():
    """JAX writes its persistent cache entries in place: `_writing` spots such a frame in the
    main thread's stack (the exit then waits until it returns)."""
    scope: dict = {}
    exec(compile("def put(frames):\n    return frames()\n", "/x/jax/_src/lru_cache.py", "exec"),
         scope)
    assert scope["put"](lambda: interrupts._writing(sys._getframe()))
    assert not interrupts._writing(sys._getframe())


def test_deferred_sections_record_and_act_at_check_or_at_their_end():
    code = textwrap.dedent("""
        import signal, time
        from mistral_jax import interrupts
        interrupts.install()
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.3)  # the watcher leaves it to the section
            try:
                interrupts.check()
            except KeyboardInterrupt as e:
                print("check raised", interrupts.exit_status(e), flush=True)
        print("went on", flush=True)
        with interrupts.deferred():
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.3)
            print("finished the section", flush=True)
        print("never printed", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 143, done.stderr
    assert done.stdout.splitlines() == ["check raised 130", "went on", "finished the section"]
    assert done.stderr.strip() == "terminated"
