"""The server in-process: tool calls from a model whose output is forced (a `forward` that
emits a fixed script of ids), the per-slot sampler, and the start-up memory check."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastapi.testclient import TestClient

from mistral_jax.cli import common as cli
from mistral_jax.config import load_args
from mistral_jax.errors import UserInputError
from mistral_jax.serve import device
from mistral_jax.serve.__main__ import cache_bytes, check_memory
from mistral_jax.serve.api import create_app
from mistral_jax.serve.engine import Engine
from mistral_jax.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def demo():
    folder = cli.demo_model_folder()
    args, _ = load_args(folder)
    return args, load_tokenizer(folder)


def forced_forward(script, base):
    """A `forward` whose next token after position p is script[p - base]: the decode step
    that feeds the prompt's last token (position base) samples script[0]."""
    ids = jnp.asarray(script, jnp.int32)

    def forward(params, tokens, positions, cache, *, args, logits_index=None,
                fresh_prefill=False):
        nxt = ids[jnp.clip(positions - base, 0, len(script) - 1)]  # [B, T]
        logits = jax.nn.one_hot(nxt, args.vocab_size) * 30.0
        if logits_index is not None:
            logits = jnp.take_along_axis(logits, logits_index[:, None, None], axis=1)
        return logits, cache

    return forward


def serve_script(demo, script, prompt_len):
    args, tok = demo
    engine = Engine({}, args, tok, max_batch=2, max_seq_len=256, dtype=jnp.float32,
                    max_chunk=32, forward=forced_forward(script, prompt_len - 1),
                    log=lambda m: None)
    engine.start()
    return engine, TestClient(create_app(engine, tok, model_name="m", max_model_len=256))


def tool_call_ids(tok, before=""):
    call = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    tool_calls = tok.mistral.instruct_tokenizer.tokenizer.get_special_token("[TOOL_CALLS]")
    head = tok.encode(before, bos=False) if before else []
    return [*head, tool_calls, *tok.encode(call, bos=False), tok.eos_id]


@pytest.mark.parametrize("before", ["", "Let me check."])
def test_tool_calls(demo, before):
    _, tok = demo
    prompt = tok.encode_chat(MESSAGES, tools=TOOLS)
    engine, client = serve_script(demo, tool_call_ids(tok, before), len(prompt))
    try:
        body = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "temperature": 0,
                "max_tokens": 100}
        r = client.post("/v1/chat/completions", json=body).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == (before or None)
        (call,) = choice["message"]["tool_calls"]
        assert re.fullmatch(r"[A-Za-z0-9]{9}", call["id"]) and call["type"] == "function"
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert r["usage"]["prompt_tokens"] == len(prompt)

        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            chunks = [json.loads(x[6:]) for x in s.iter_lines() if x and x != "data: [DONE]"]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert "".join(d.get("content") or "" for d in deltas) == before  # no JSON leaks
        calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
        assert len(calls) == 1 and calls[0][0]["index"] == 0
        assert calls[0][0]["function"]["name"] == "get_weather"
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        engine.stop()


def test_tool_choice_required_and_history(demo):
    _, tok = demo
    # "required": the prompt ends with [TOOL_CALLS], so the model writes only the JSON.
    prompt = tok.encode_chat(MESSAGES, tools=TOOLS)
    engine, client = serve_script(demo, tool_call_ids(tok)[1:], len(prompt) + 1)
    try:
        r = client.post("/v1/chat/completions", json={
            "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
            "max_tokens": 100}).json()
        assert r["choices"][0]["finish_reason"] == "tool_calls"
        call = r["choices"][0]["message"]["tool_calls"][0]
        # The call and its result go back in as history, as the openai client sends them.
        history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
        r = client.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS,
                                                      "max_tokens": 4})
        assert r.status_code == 200, r.text
        bad = client.post("/v1/chat/completions", json={
            "messages": MESSAGES, "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "nope"}}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"
    finally:
        engine.stop()


def test_sampler_rows_are_independent():
    """A row's sample depends on its logits, values and seed only, not on its neighbours."""
    sample = jax.jit(device.sample_rows)
    key = np.asarray(jax.random.key_data(jax.random.key(3)))
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    t = jnp.array([0.0, 1.0, 0.7, 1.0])
    p = jnp.array([1.0, 0.9, 1.0, 1.0])
    k = jnp.array([0, 0, 5, 1])
    keys = jnp.asarray(np.stack([key] * 4))
    n = jnp.array([0, 2, 2, 9])
    together = sample(logits, t, p, k, keys, n)
    for i in range(4):
        alone = sample(logits[i:i + 1], t[i:i + 1], p[i:i + 1], k[i:i + 1],
                                   keys[i:i + 1], n[i:i + 1])
        assert int(alone[0]) == int(together[i])
    assert int(together[0]) == int(jnp.argmax(logits[0]))  # temperature 0: greedy
    assert int(together[3]) == int(jnp.argmax(logits[3]))  # top_k 1
    ranked = jnp.argsort(-logits[2])[:5]
    draws = {int(sample(logits[2:3], t[2:3], p[2:3], k[2:3], keys[2:3],
                                    jnp.array([j]))[0]) for j in range(40)}
    assert draws <= set(ranked.tolist()) and len(draws) > 1  # top_k 5, several seeds' draws


def test_memory_check(demo):
    args, _ = demo
    per_slot = cache_bytes(args, 1, 4096, jnp.float32)
    # 8 layers with a 256-token window: the cache holds 256 positions, not 4096.
    assert per_slot == 8 * 256 * (2 * 2 * 16 * 4 + 4)
    assert cache_bytes(args, 16, 4096, jnp.float32) == 16 * per_slot
    check_memory(args, 8, 4096, jnp.float32)
    with pytest.raises(UserInputError, match=r"lower --max-batch \(at most \d+ fits\)"):
        check_memory(args, 10**9, 4096, jnp.float32)
