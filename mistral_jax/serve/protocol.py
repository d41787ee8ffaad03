"""OpenAI's request and response schemas: validate a JSON body into prompt ids and
`SamplingParams`, and build the response objects and stream chunks.

Every prompt is built by mistral-common (`Tokenizer.encode_chat` / `encode_fim` /
`encode`), as `chat` and `sample` build them. Any invalid value raises `APIError`
with OpenAI's error fields; the HTTP layer turns it into JSON (400 unless said).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import secrets
import string
import time
from collections.abc import Sequence
from typing import Any

from mistral_common.tokens.tokenizers.base import SpecialTokens, TokenizerVersion

from mistral_jax.errors import MistralJaxError
from mistral_jax.sampling import SEED_MAX, SEED_MIN
from mistral_jax.serve.engine import SamplingParams
from mistral_jax.tokenizer import Tokenizer, ToolCall

MAX_STOP_STRINGS = 16
ID_CHARS = string.ascii_letters + string.digits


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = (
            message, param, status, type, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass
class Parsed:
    """A validated request: what the engine runs and how to answer."""

    kind: str  # "chat", "completion" or "fim" (answered in chat's format)
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    top_logprobs: int = 0
    tools: bool = False  # parse tool calls from the output
    forced: list[int] = dataclasses.field(default_factory=list)  # output ids the prompt ends with


def random_id(prefix: str = "", n: int = 24) -> str:
    return prefix + "".join(secrets.choice(ID_CHARS) for _ in range(n))


# ----------------------------------------------------------------------------- field checks


def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, numbers.Real) or isinstance(x, bool) or not math.isfinite(x):
        raise APIError(f"{name} must be a number, got {x!r}", name)
    if x < low or x > high or (low_open and x == low):
        bracket = "(" if low_open else "["
        raise APIError(f"{name} must be in {bracket}{low}, {high}], got {x}", name)
    return float(x)


def _int(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, int) or isinstance(x, bool):
        raise APIError(f"{name} must be an integer, got {x!r}", name)
    if x < low or (high is not None and x > high):
        where = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise APIError(f"{name} must be an integer {where}, got {x}", name)
    return x


def _bool(body: dict, name: str, default: bool = False) -> bool:
    x = body.get(name, default)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise APIError(f"{name} must be true or false, got {x!r}", name)
    return x


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOP_STRINGS):
        raise APIError(f"stop must be a non-empty string or a list of at most "
                       f"{MAX_STOP_STRINGS} non-empty strings, got {stop!r}", "stop")
    return tuple(stops)


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise APIError(f"the model `{model}` does not exist; this server serves `{served}`",
                       "model", status=404, code="model_not_found")


def _unsupported(body: dict, kind: str) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise APIError(f"n must be 1 (one choice per request), got {n!r}", "n")
    if kind == "completion":
        if body.get("best_of") not in (None, 1):
            raise APIError("best_of must be 1: not supported", "best_of")
        if body.get("echo"):
            raise APIError("echo is not supported", "echo")
    if body.get("logit_bias"):
        raise APIError("logit_bias is not supported", "logit_bias")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise APIError(f"response_format {fmt.get('type')!r} is not supported (text only)",
                       "response_format")


def sampling(body: dict, kind: str, prompt_len: int, max_len: int,
             hold_text_after: int | None = None) -> tuple[SamplingParams, int]:
    """SamplingParams from the body's fields, and the number of top logprobs asked."""
    _unsupported(body, kind)
    temperature = _number(body, "temperature", 1.0, 0.0, 1e6)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = body.get("top_k")
    top_k = 0 if top_k in (None, -1) else _int(body, "top_k", 0, 1)
    room = max_len - prompt_len
    names = ["max_tokens", "max_completion_tokens"] if kind == "chat" else ["max_tokens"]
    given = [(n, body[n]) for n in names if body.get(n) is not None]
    name = given[-1][0] if given else "max_tokens"
    max_tokens = _int(body, name, None, 1)
    if room < 1:
        raise APIError(f"the prompt is {prompt_len} tokens, which leaves no room in the "
                       f"context of {max_len} tokens", "messages" if kind == "chat" else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise APIError(f"the prompt is {prompt_len} tokens; with {name}={max_tokens} that is "
                       f"{prompt_len + max_tokens}, beyond the context of {max_len} tokens "
                       f"(at most {room} for this prompt)", name, code="context_length_exceeded")
    seed = body.get("seed", body.get("random_seed"))
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not SEED_MIN <= seed <= SEED_MAX):
        raise APIError(f"seed must be an integer in [-2**63, 2**63), got {seed!r}", "seed")
    presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    if kind == "completion":
        lp = body.get("logprobs")
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5):
            raise APIError(f"logprobs must be an integer in [0, 5], got {lp!r}", "logprobs")
        want, top = lp is not None, lp or 0
    else:
        want = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, 0, 20)
        if top and not want:
            raise APIError("top_logprobs needs logprobs: true", "top_logprobs")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        presence_penalty=presence, frequency_penalty=frequency, stop=_stop(body), logprobs=want,
        hold_text_after=hold_text_after, ignore_eos=_bool(body, "ignore_eos"))
    return params, top


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError("stream_options must be an object", "stream_options")
    usage = bool((opts or {}).get("include_usage", False))
    return stream, usage


def _tokenizer_error(e: MistralJaxError, param: str) -> APIError:
    return APIError(" ".join(str(e).split()), param)


# ----------------------------------------------------------------------------- requests


def parse_chat(body: dict, tok: Tokenizer, max_len: int) -> Parsed:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError("messages must be a non-empty list of message objects", "messages")
    tools = body.get("tools") or None
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise APIError("tools must be a list of tool objects", "tools")
    choice = body.get("tool_choice", "auto")
    tool_calls_id = None
    forced: list[int] = []
    if tools:
        if tok.version < TokenizerVersion.v2:
            raise APIError(f"tools need a v2 or later tokenizer; this model's is "
                           f"{tok.version.value}", "tools")
        tool_calls_id = tok._raw.get_special_token(SpecialTokens.tool_calls.value)
        names = [(t.get("function") or {}).get("name") for t in tools]
        if choice == "none":
            tools = None
        elif choice == "required":
            forced = [tool_calls_id]
        elif isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if name not in names:
                raise APIError(f"tool_choice names the function {name!r}, which is not in "
                               "tools", "tool_choice")
            tools = [t for t, n in zip(tools, names) if n == name]
            forced = [tool_calls_id]
        elif choice != "auto":
            raise APIError("tool_choice must be 'auto', 'none', 'required' or "
                           '{"type": "function", "function": {"name": ...}}', "tool_choice")
    try:
        prompt = tok.encode_chat(messages, tools=tools) + forced
    except MistralJaxError as e:
        raise _tokenizer_error(e, "messages") from None
    params, top = sampling(body, "chat", len(prompt), max_len,
                           hold_text_after=tool_calls_id if tools else None)
    stream, usage = _stream(body)
    return Parsed("chat", prompt, params, stream, usage, top, bool(tools), forced)


def _token_ids(x: Any, vocab: int) -> list[int] | None:
    if isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        bad = [i for i in x if not 0 <= i < vocab]
        if bad:
            raise APIError(f"prompt holds token id {bad[0]} outside [0, {vocab})", "prompt")
        return list(x)
    return None


def parse_completion(body: dict, tok: Tokenizer, max_len: int, vocab: int,
                     fim: bool = False) -> Parsed:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise APIError("suffix must be a string", "suffix")
    ids = _token_ids(prompt, vocab)
    if ids is None and not isinstance(prompt, str):
        raise APIError("prompt must be a string or a list of token ids (one prompt per "
                       "request)", "prompt")
    if fim or suffix is not None:
        if ids is not None:
            raise APIError("fill-in-the-middle (suffix) needs a text prompt", "prompt")
        if tok.version < TokenizerVersion.v3:
            raise APIError(f"suffix (fill-in-the-middle) needs a v3 or later tokenizer; this "
                           f"model's is {tok.version.value}", "suffix")
        if not (prompt.strip() or (suffix or "").strip()):
            raise APIError("prompt and suffix are both empty", "prompt")
        try:
            ids = tok.encode_fim(prompt, suffix or "")
        except MistralJaxError as e:
            raise _tokenizer_error(e, "prompt") from None
    elif ids is None:
        if not prompt:
            raise APIError("prompt is empty", "prompt")
        try:
            ids = tok.encode(prompt, bos=True)
        except MistralJaxError as e:
            raise _tokenizer_error(e, "prompt") from None
    params, top = sampling(body, "fim" if fim else "completion", len(ids), max_len)
    stream, usage = _stream(body)
    return Parsed("fim" if fim else "completion", ids, params, stream, usage, top)


# ----------------------------------------------------------------------------- responses


def piece(tok: Tokenizer, i: int) -> str:
    """The token's own text (sentencepiece's '▁' as a space, a byte piece <0x0A> as its
    character when it is ASCII), for logprobs."""
    try:
        text = tok._raw.id_to_piece(int(i))
    except Exception:  # noqa: BLE001  (a tokenizer without pieces)
        return tok.decode([int(i)])
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        with contextlib.suppress(ValueError):
            code = int(text[3:5], 16)
            if code < 128:
                return chr(code)
    return text.replace("\u2581", " ")


def chat_logprobs(tok: Tokenizer, items, top: int) -> dict[str, Any]:
    def entry(i, lp):
        t = piece(tok, i)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, x) for j, x in alts[:top]]}
                        for i, (lp, alts) in items]}


def completion_logprobs(tok: Tokenizer, items, top: int, offset: int = 0) -> dict[str, Any]:
    tokens = [piece(tok, i) for i, _ in items]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for _, (lp, _) in items],
            "top_logprobs": [{piece(tok, j): x for j, x in alts[:top]} for _, (_, alts) in items],
            "text_offset": offsets}


def tool_calls_json(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's tool_calls, with Mistral's 9-character ids where the model gave none."""
    return [{"id": c.id or random_id(n=9), "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in calls]


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def envelope(kind: str, rid: str, model: str, chunk: bool) -> dict[str, Any]:
    obj = ("text_completion" if kind == "completion"
           else "chat.completion.chunk" if chunk else "chat.completion")
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model}
