"""Continuous batching: requests share `max_batch` slots of one KV cache, stepped together.

The engine runs in its own thread. The HTTP side hands it a `Request` (`submit`, a
bounded queue) and hears back through `Request.emit(event)`, one event per generated
token. The engine thread collects a turn's events and hands them over at once: to
`Engine.emit_many(pairs)` if set (the HTTP side: one wake-up of its event loop per step,
not one per stream), else to each `Request.emit` in turn (then it must be thread-safe). Each loop turn:

  1. free the slots of cancelled requests; move waiting requests into free slots;
  2. prefill one chunk of the oldest prompt still being read (a long prompt is read a
     chunk per turn, so the running streams go on between its chunks);
  3. dispatch one decode step over the slots in use (the smallest decode bucket that
     covers them), feeding each its last token;
  4. read back the *previous* step's tokens and hand them out (detokenize, stop strings,
     eos, max_tokens), so that host work overlaps the device's step.

A prompt's last token is not prefilled: the next decode step feeds it and samples the
first token, so every token comes from the one sampling program. Greedy output does
not depend on the other slots: each row's computation reads only its own cache rows.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.cache import init_cache
from mistral_jax.model import forward as model_forward
from mistral_jax.sampling import prng_key
from mistral_jax.serve import device
from mistral_jax.tokenizer import StreamDecoder, Tokenizer


class QueueFull(Exception):
    """The waiting queue is full (HTTP 503)."""


class ShuttingDown(Exception):
    """The engine no longer takes requests (HTTP 503)."""


@dataclasses.dataclass
class SamplingParams:
    """What one request asks for; validated by the HTTP layer (protocol.py)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: a random seed
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False  # go on past eos (vLLM's extension; benchmarks of fixed lengths)
    hold_text_after: int | None = None  # a token id (e.g. [TOOL_CALLS]) after which text is held


@dataclasses.dataclass
class Event:
    """New output of one request: `text` since the last event, the ids sampled, per id
    (logprob, [(id, logprob)] top 20) when asked, and the finish reason on the last one."""

    text: str
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None


class Request:
    """One generation; its events go to `emit(event)` (see the module docstring)."""

    def __init__(self, rid: str, prompt: Sequence[int], params: SamplingParams,
                 emit: Callable[[Event], None]) -> None:
        self.id, self.prompt, self.params, self.emit = rid, list(prompt), params, emit
        self.output: list[int] = []
        self.cancelled = False  # set by the HTTP side (client gone)
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


class _Slot:
    """A request in a slot: how far its prompt is read and where its next token goes."""

    def __init__(self, req: Request, tok: Tokenizer, seed: int) -> None:
        self.req = req
        self.prefilled = 0  # prompt tokens written to the cache (all but the last, when done)
        self.pos = len(req.prompt) - 1  # position of the next token fed
        self.dispatched = 0  # decode steps dispatched (= tokens that will be sampled)
        self.fresh = True
        self.key = np.asarray(jax.random.key_data(prng_key(seed)), np.uint32)
        self.decoder = StreamDecoder(tok)
        # Decoded after the prompt's last token, so a continuation keeps its leading space
        # (sentencepiece drops it from a lone first token).
        self.decoder.push(req.prompt[-1])
        self.text = ""  # text decoded so far
        self.sent = 0  # characters of `text` already emitted
        hold = req.params.hold_text_after  # seen (or forced at the prompt's end): text held
        self.holding = hold is not None and req.prompt[-1] == hold

    @property
    def ready(self) -> bool:
        return self.prefilled >= len(self.req.prompt) - 1


class Engine:
    """Continuous batching over `max_batch` slots (see the module docstring)."""

    def __init__(self, params: Any, args: Any, tok: Tokenizer, *, max_batch: int,
                 max_seq_len: int, dtype: Any, max_chunk: int = 256, max_waiting: int = 256,
                 vocab_limit: int | None = None, forward=model_forward,
                 metrics: Any = None, log: Callable[[str], None] | None = None) -> None:
        self.params, self.args, self.tok = params, args, tok
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.vocab_limit = vocab_limit
        self.forward = forward
        self.metrics = metrics
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.buckets = device.decode_buckets(max_batch)
        self.chunks = device.chunk_buckets(min(max_chunk, max_seq_len))
        self.cache = init_cache(args, max_batch, max_seq_len, dtype)
        n_vocab = vocab_limit or args.vocab_size
        self.counts = jnp.zeros((max_batch, n_vocab), jnp.int32)
        self.prev = jnp.zeros((max_batch,), jnp.int32)
        # Unbounded itself: `submit` refuses a request when max_waiting are queued beyond
        # the free slots (requests the engine has not pulled yet count as waiting).
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.max_waiting = max_waiting
        self._submit_lock = threading.Lock()
        self.slots: list[_Slot | None] = [None] * max_batch
        self.accepting = True
        self._abort_at: float | None = None  # drain deadline: then running requests end
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._rng = np.random.default_rng()
        self._outbox: list[tuple[Request, Event]] = []
        self.emit_many: Callable[[list[tuple[Request, Event]]], None] | None = None

    # ------------------------------------------------------------------ public, any thread

    def submit(self, req: Request) -> None:
        """Queue a request; QueueFull or ShuttingDown if it cannot be taken."""
        if not self.accepting:
            raise ShuttingDown("the server is shutting down")
        if self.error is not None:
            raise ShuttingDown(f"the engine stopped ({type(self.error).__name__})")
        with self._submit_lock:
            free = self.max_batch - self.running
            if self.waiting.qsize() >= self.max_waiting + free:
                raise QueueFull(f"{self.max_waiting} requests are already waiting for a slot")
            self.waiting.put_nowait(req)
        self._set_gauges()

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def drain(self, grace_s: float) -> None:
        """Stop taking requests; those running may go on for grace_s seconds, then end
        with finish_reason 'abort' (as do the waiting ones, at once)."""
        self.accepting = False
        self._abort_at = time.perf_counter() + grace_s

    def idle(self) -> bool:
        return self.running == 0 and self.waiting.empty()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def warmup(self) -> None:
        """Compile every decode bucket and prefill chunk (idle slots: nothing changes)."""
        for b in self.buckets:
            self._dispatch_rows(b, [None] * b)
        for c in self.chunks:
            self.cache = device.prefill_chunk_jit(
                self.params, self.cache, jnp.int32(0), np.zeros((1, c), np.int32),
                np.full((1, c), -1, np.int32), jnp.bool_(True), args=self.args,
                forward=self.forward)
        self.cache = device.clear_slot_jit(self.cache, jnp.int32(0))
        jax.block_until_ready((self.cache, self.prev))

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        pending = None
        try:
            while not self._stop.is_set():
                self._reap()
                self._admit(block=pending is None and self.running == 0)
                self._prefill_one()
                dispatched = self._dispatch()
                if pending is not None:
                    self._deliver(*pending)
                pending = dispatched
                self._flush()
        except BaseException as e:  # the HTTP side reports it; requests end
            self.error = e
            self.log(f"engine error: {type(e).__name__}: {e}")
            self.accepting = False
            for s in self.slots:
                if s is not None:
                    self._finish(s, "abort")
            self._reap()  # and the waiting ones
            self._flush()

    def _reap(self) -> None:
        """Free cancelled slots; after a drain's deadline, end everything with 'abort'."""
        abort = self._abort_at is not None and time.perf_counter() >= self._abort_at
        if not self.accepting:
            while True:  # requests that never started: end them now
                try:
                    req = self.waiting.get_nowait()
                except queue.Empty:
                    break
                req.finish_reason = "abort"
                self._outbox.append((req, Event("", [], None, "abort")))
        for i, s in enumerate(self.slots):
            if s is None:
                continue
            if s.req.cancelled:
                self.slots[i] = None
                self._log_done(s.req, "cancelled")
            elif abort:
                self._finish(s, "abort")

    def _admit(self, block: bool) -> None:
        while None in self.slots:
            try:
                req = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
            except queue.Empty:
                break
            block = False
            if req.cancelled:
                continue
            seed = req.params.seed
            if seed is None:
                seed = int(self._rng.integers(0, 2**63 - 1))
            i = self.slots.index(None)
            self.slots[i] = _Slot(req, self.tok, seed)
            if len(req.prompt) == 1:
                self.cache = device.clear_slot_jit(self.cache, jnp.int32(i))
            if req.params.presence_penalty or req.params.frequency_penalty:
                self.counts = device.reset_counts_jit(self.counts, jnp.int32(i))
        self._set_gauges()

    def _prefill_one(self) -> None:
        """One chunk of the earliest-arrived prompt still being read."""
        todo = [(s.req.arrival, i) for i, s in enumerate(self.slots) if s is not None and not s.ready]
        if not todo:
            return
        i = min(todo)[1]
        s = self.slots[i]
        end = len(s.req.prompt) - 1
        n = min(end - s.prefilled, self.chunks[-1])
        c = next(c for c in self.chunks if c >= n)
        tokens = np.zeros((1, c), np.int32)
        positions = np.full((1, c), -1, np.int32)
        tokens[0, :n] = s.req.prompt[s.prefilled:s.prefilled + n]
        positions[0, :n] = np.arange(s.prefilled, s.prefilled + n)
        self.cache = device.prefill_chunk_jit(
            self.params, self.cache, jnp.int32(i), tokens, positions,
            jnp.bool_(s.prefilled == 0), args=self.args, forward=self.forward)
        s.prefilled += n

    def _dispatch(self):
        """Dispatch a decode step over the ready slots; returns what `_deliver` needs."""
        live = [i for i, s in enumerate(self.slots)
                if s is not None and s.ready and s.dispatched < s.req.params.max_tokens]
        if not live:
            return None
        b = next(b for b in self.buckets if b > max(live))
        rows = [self.slots[i] if i in live else None for i in range(b)]
        return self._dispatch_rows(b, rows)

    def _dispatch_rows(self, b: int, rows: list[_Slot | None]):
        feed = np.full(b, -1, np.int32)
        positions = np.full(b, -1, np.int32)
        temperature = np.zeros(b, np.float32)
        top_p = np.ones(b, np.float32)
        top_k = np.zeros(b, np.int32)
        keys = np.zeros((b, 2), np.uint32)
        counter = np.zeros(b, np.int32)
        presence = np.zeros(b, np.float32)
        frequency = np.zeros(b, np.float32)
        fresh = np.zeros(b, bool)
        want_lp = np.zeros(b, bool)
        for i, s in enumerate(rows):
            if s is None:
                continue
            p = s.req.params
            if s.fresh:
                feed[i] = s.req.prompt[-1]
            positions[i] = s.pos
            temperature[i], top_p[i], top_k[i] = p.temperature, p.top_p, p.top_k
            keys[i], counter[i] = s.key, s.dispatched
            presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
            fresh[i], want_lp[i] = s.fresh, p.logprobs
            s.fresh = False
            s.pos += 1
            s.dispatched += 1
        self.cache, self.counts, self.prev, tokens, *out = device.decode_step_jit(
            self.params, self.cache, self.counts, self.prev, feed, positions, temperature,
            top_p, top_k, keys, counter, presence, frequency, fresh, want_lp, args=self.args,
            forward=self.forward, vocab_limit=self.vocab_limit)
        for x in (tokens, *out):
            x.copy_to_host_async()
        return rows, tokens, out, want_lp.any()

    def _deliver(self, rows, tokens, out, want_lp) -> None:
        tokens = np.asarray(tokens)
        chosen, top_ids, top_lp = (np.asarray(x) for x in out) if want_lp else (None,) * 3
        now = time.perf_counter()
        for i, s in enumerate(rows):
            if s is None or self.slots[i] is not s:
                continue  # idle row, or a request ended since this step was dispatched
            req, t = s.req, int(tokens[i])
            if req.first_token_at is None:
                req.first_token_at = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - req.arrival)
            elif self.metrics is not None:
                self.metrics.itl.observe(now - req.last_token_at)
            req.last_token_at = now
            if t == self.tok.eos_id and not req.params.ignore_eos:
                self._finish(s, "stop")
                continue
            req.output.append(t)
            lps = None
            if req.params.logprobs and chosen is not None:
                lps = [(float(chosen[i]), list(zip(top_ids[i].tolist(), top_lp[i].tolist())))]
            if t == req.params.hold_text_after:
                s.holding = True
            text = "" if s.holding else self._text(s, t)
            stopped = s.req.finish_reason == "stop"
            if stopped:
                self._finish(s, "stop", text=text, ids=[t], logprobs=lps)
            elif len(req.output) >= req.params.max_tokens:
                self._finish(s, "length", text=text, ids=[t], logprobs=lps)
            else:
                self._outbox.append((req, Event(text, [t], lps)))

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        if not out:
            return
        if self.emit_many is not None:
            self.emit_many(out)
        else:
            for req, ev in out:
                req.emit(ev)

    def _text(self, s: _Slot, t: int) -> str:
        """Text to emit after token t: held back while it may be the start of a stop
        string; a stop string found ends the request (finish_reason set to 'stop')."""
        s.text += s.decoder.push(t)
        stops = s.req.params.stop
        if stops:
            start = max(0, s.sent - max(len(x) for x in stops))
            hits = [k for k in (s.text.find(x, start) for x in stops) if k >= 0]
            if hits:
                s.text = s.text[:min(hits)]
                s.req.finish_reason = "stop"
                out, s.sent = s.text[s.sent:], len(s.text)
                return out
            hold = max(len(x) for x in stops) - 1
            end = max(s.sent, len(s.text) - hold)
        else:
            end = len(s.text)
        out, s.sent = s.text[s.sent:end], end
        return out

    def _finish(self, s: _Slot, reason: str, text: str = "", ids: Sequence[int] = (),
                logprobs=None) -> None:
        i = self.slots.index(s)
        self.slots[i] = None
        req = s.req
        if reason != "stop" or not req.params.stop or req.finish_reason != "stop":
            if not s.holding:  # the rest of the text: held stop-string prefixes, partial UTF-8
                s.text += s.decoder.flush()
                text += s.text[s.sent:]
        req.finish_reason = reason
        self._outbox.append((req, Event(text, list(ids), logprobs, reason)))
        self._log_done(req, reason)
        self._set_gauges()

    def _log_done(self, req: Request, reason: str) -> None:
        n = len(req.output)
        ttft = (req.first_token_at - req.arrival) if req.first_token_at else float("nan")
        span = (req.last_token_at - req.first_token_at) if req.first_token_at else 0.0
        rate = (n - 1) / span if n > 1 and span > 0 else float("nan")
        self.log(f"request {req.id}: {len(req.prompt)} prompt tokens, {n} completion tokens, "
                 f"TTFT {ttft:.3f} s, {rate:.1f} tokens/s, {reason}")
        if self.metrics is not None:
            self.metrics.finished(req, reason)

    def _set_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self.running)
            self.metrics.waiting.set(max(0, self.waiting.qsize() - (self.max_batch - self.running)))
