"""The FastAPI app: OpenAI's endpoints over an `Engine` running in its own thread.

Handlers validate the body (protocol.py), submit a `Request` and read its events from
an asyncio queue that the engine thread fills (`loop.call_soon_threadsafe`), so the
event loop never waits on the device. A client that goes away cancels its request,
which frees its slot at the engine's next turn.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistral_jax.errors import TokenizerError
from mistral_jax.serve import protocol
from mistral_jax.serve.engine import Engine, Event, QueueFull, ShuttingDown
from mistral_jax.serve.engine import Request as EngineRequest
from mistral_jax.serve.metrics import Metrics
from mistral_jax.serve.protocol import APIError, Parsed
from mistral_jax.tokenizer import Tokenizer

DISCONNECT_POLL_S = 0.5


def _emit_many(pairs) -> None:
    """Engine thread: hand a turn's events to their requests' event loops, one wake-up per
    loop (uvicorn has one; a test client may run a loop per request)."""
    by_loop: dict[Any, list] = {}
    for req, ev in pairs:
        by_loop.setdefault(req.loop, []).append((req, ev))
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_fan_out, group)
        except RuntimeError:  # the loop closed: nobody is listening any more
            pass


def _fan_out(pairs) -> None:
    for req, ev in pairs:
        req.emit(ev)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(engine: Engine, tok: Tokenizer, *, model_name: str, max_model_len: int,
               api_key: str | None = None, metrics: Metrics | None = None) -> FastAPI:
    app = FastAPI(title="mistral_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    app.state.deadline = None  # after a drain: when the streams still open are ended here
    metrics = metrics or Metrics()
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": f"{e.detail}: {request.method} "
                                       f"{request.url.path}", "type": kind, "param": None,
                                       "code": None}}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}: {e}",
                                       "type": "server_error", "param": None, "code": None}},
                            status_code=500)

    app.add_middleware(_AuthAndCount, api_key=api_key, metrics=metrics)

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created,
                "owned_by": "mistral_jax", "max_model_len": max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            return error_response(APIError(f"the model `{name}` does not exist", "model",
                                           status=404, code="model_not_found"))
        return model_card()

    async def read_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        protocol.check_model(body, model_name)
        return body

    async def serve(request: Request, parse) -> Response:
        try:
            body = await read_body(request)
            parsed = parse(body)
        except APIError as e:
            return error_response(e)
        events: asyncio.Queue[Event] = asyncio.Queue()
        engine.emit_many = _emit_many
        emit = events.put_nowait

        prefix = "cmpl-" if parsed.kind == "completion" else "chatcmpl-"
        req = EngineRequest(protocol.random_id(prefix), parsed.prompt, parsed.params, emit)
        req.loop = asyncio.get_running_loop()
        try:
            if app.state.draining:
                raise ShuttingDown("the server is shutting down")
            engine.submit(req)
        except (QueueFull, ShuttingDown) as e:
            return error_response(APIError(f"server busy: {e}; retry later", status=503,
                                           type="server_overloaded",
                                           code="server_overloaded"))
        if parsed.stream:
            return StreamingResponse(_stream(req, parsed, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(request, req, parsed, events)

    def _finish_tools(parsed: Parsed, req: EngineRequest, reason: str):
        """(held text or None, tool_calls or None, finish_reason) of a finished chat answer.

        The engine holds back the text after [TOOL_CALLS]; parsed, it becomes tool_calls,
        else (malformed JSON from the model) that text is returned to be sent as content.
        """
        if not parsed.tools:
            return None, None, reason
        ids = parsed.forced + req.output
        try:
            _, calls = tok.split_tool_calls(ids)
        except TokenizerError:
            calls = None
        if calls:
            return None, protocol.tool_calls_json(calls), "tool_calls"
        marker = req.params.hold_text_after
        held = tok.decode(ids[ids.index(marker) + 1:]) if marker in ids else ""
        return held or None, None, reason

    async def next_event(req: EngineRequest, events: asyncio.Queue[Event]) -> Event | None:
        """The request's next event; None after DISCONNECT_POLL_S without one. Past a
        drain's deadline (the engine busy, e.g. compiling), an 'abort' made up here."""
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            deadline = app.state.deadline
            if deadline is not None and time.monotonic() > deadline:
                req.cancel()
                return Event("", [], None, "abort")
            return None

    async def _complete(request: Request, req: EngineRequest, parsed: Parsed,
                        events: asyncio.Queue[Event]) -> Response:
        text, items = [], []
        while True:
            ev = await next_event(req, events)
            if ev is None:
                if await request.is_disconnected():
                    req.cancel()
                    return Response(status_code=499)
                continue
            text.append(ev.text)
            if ev.logprobs:
                items.extend(zip(ev.token_ids, ev.logprobs))
            if ev.finish_reason is not None:
                break
        reason = ev.finish_reason
        out = protocol.envelope(parsed.kind, req.id, model_name, chunk=False)
        usage = protocol.usage(len(req.prompt), len(req.output))
        full = "".join(text)
        if parsed.kind == "completion":
            lp = (protocol.completion_logprobs(tok, items, parsed.top_logprobs)
                  if parsed.params.logprobs else None)
            choice = {"index": 0, "text": full, "logprobs": lp, "finish_reason": reason}
        else:
            held, calls, reason = _finish_tools(parsed, req, reason)
            message: dict[str, Any] = {"role": "assistant", "content": full + (held or "")}
            if calls:
                message["tool_calls"] = calls
                message["content"] = full or None
            lp = (protocol.chat_logprobs(tok, items, parsed.top_logprobs)
                  if parsed.params.logprobs else None)
            choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": reason}
        return JSONResponse({**out, "choices": [choice], "usage": usage})

    async def _stream(req: EngineRequest, parsed: Parsed,
                      events: asyncio.Queue[Event]) -> AsyncIterator[str]:
        def sse(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(delta: dict[str, Any] | None, reason: str | None = None, lp=None,
                  text: str | None = None) -> str:
            head = protocol.envelope(parsed.kind, req.id, model_name, chunk=True)
            if parsed.kind == "completion":
                c = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": reason}
            else:
                c = {"index": 0, "delta": delta or {}, "logprobs": lp, "finish_reason": reason}
            return sse({**head, "choices": [c]})

        finished = False
        try:
            if parsed.kind != "completion":
                yield chunk({"role": "assistant", "content": ""})
            offset = 0
            while True:
                ev = await next_event(req, events)
                if ev is None:
                    continue
                lp = None
                if parsed.params.logprobs and ev.logprobs:
                    items = list(zip(ev.token_ids, ev.logprobs))
                    lp = (protocol.completion_logprobs(tok, items, parsed.top_logprobs, offset)
                          if parsed.kind == "completion"
                          else protocol.chat_logprobs(tok, items, parsed.top_logprobs))
                offset += len(ev.text)
                reason = ev.finish_reason
                if reason is None:
                    if ev.text or lp:
                        yield chunk({"content": ev.text}, lp=lp, text=ev.text)
                    continue
                finished = True
                if ev.text or lp:
                    yield chunk({"content": ev.text}, lp=lp, text=ev.text)
                if parsed.kind != "completion":
                    held, calls, reason = _finish_tools(parsed, req, reason)
                    if calls:
                        deltas = [{"index": k, **c} for k, c in enumerate(calls)]
                        yield chunk({"tool_calls": deltas})
                    elif held:
                        yield chunk({"content": held})
                yield chunk(None, reason=reason)
                break
            if parsed.include_usage:
                head = protocol.envelope(parsed.kind, req.id, model_name, chunk=True)
                yield sse({**head, "choices": [],
                           "usage": protocol.usage(len(req.prompt), len(req.output))})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the server stops): free the slot
                req.cancel()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serve(request, lambda b: protocol.parse_chat(b, tok, max_model_len))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, lambda b: protocol.parse_completion(
            b, tok, max_model_len, engine.vocab_limit or engine.args.vocab_size))

    @app.post("/v1/fim/completions")
    async def fim(request: Request):
        return await serve(request, lambda b: protocol.parse_completion(
            b, tok, max_model_len, engine.vocab_limit or engine.args.vocab_size, fim=True))

    app.state.metrics = metrics
    return app


class _AuthAndCount:
    """ASGI middleware: the bearer token on /v1/* (with --api-key), and the request
    counter by endpoint and status. (Starlette's BaseHTTPMiddleware wraps streamed
    bodies in a task that shutdown cancels; plain ASGI does not.)"""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.api_key is not None:
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization", b"") != f"Bearer {self.api_key}".encode():
                self.metrics.requests.labels(path, "401").inc()
                response = error_response(APIError(
                    "missing or incorrect API key: send the header `Authorization: Bearer "
                    "<key>`", status=401, code="invalid_api_key"))
                await response(scope, receive, send)
                return
        status = []

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(path, str(status[0] if status else 500)).inc()
