"""`python -m mistral_jax.serve` in a subprocess on the demo model, driven by the real
`openai` client and raw HTTP: outputs against `generate`, continuous batching, bad input,
the API key, a dropped client, the bounded queue and SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from mistral_jax.cli import common as cli
from mistral_jax.generate import generate
from mistral_jax.tokenizer import load_tokenizer
from mistral_jax.transformer import Transformer

KEY = "test-key"
CONTEXT = 256


class Server:
    def __init__(self, *flags: str, cache: Path, log: Path) -> None:
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mistral_jax.serve", "--port", "0", "--compile-cache",
             str(cache), *flags], stdout=subprocess.DEVNULL, stderr=self.log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 240
        while time.time() < deadline:
            m = re.search(r"ready: serving \S+ on (http://\S+)", log.read_text())
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start:\n{log.read_text()}")

    signalled = False

    def terminate(self) -> None:
        self.signalled = True
        self.proc.send_signal(signal.SIGTERM)

    def stderr(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None and not self.signalled:
            self.terminate()
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compile_cache")


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache_dir):
    s = Server("--max-batch", "8", "--max-seq-len", str(CONTEXT), "--prefill-chunk", "32",
               "--max-waiting", "2", "--api-key", KEY, cache=cache_dir,
               log=tmp_path_factory.mktemp("log") / "server.log")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """The demo model in this process: what `generate` answers is what the server must."""
    folder = cli.demo_model_folder()
    return Transformer.from_folder(folder, dtype="float32"), load_tokenizer(folder)


def greedy_ids(reference, prompt, n):
    model, tok = reference
    out, _ = generate([prompt], model, max_tokens=n, eos_id=tok.eos_id)
    return out[0]


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers, timeout=120, **kw)


def test_health_models_metrics(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == ["demo_model"]
    assert models[0].model_extra["max_model_len"] == CONTEXT
    text = httpx.get(server.url + "/metrics").text
    for name in ("mistral_jax_requests_total", "mistral_jax_time_to_first_token_seconds_bucket",
                 "mistral_jax_inter_token_latency_seconds_bucket",
                 "mistral_jax_requests_running", "mistral_jax_requests_waiting",
                 "mistral_jax_prompt_tokens_total", "mistral_jax_completion_tokens_total"):
        assert name in text


def test_completion_equals_generate(server, client, reference):
    _, tok = reference
    prompt = "Return the number of"
    ids = greedy_ids(reference, tok.encode(prompt, bos=True), 12)
    expected = tok.decode([*tok.encode(prompt, bos=True), *ids])[len(prompt):]
    r = client.completions.create(model="demo_model", prompt=prompt, max_tokens=12,
                                  temperature=0)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)), 12)
    # Token ids as the prompt, streamed: the same text in pieces, ending with [DONE].
    pieces = list(client.completions.create(model="demo_model", prompt=tok.encode(prompt),
                                            max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == expected
    assert pieces[-1].choices[0].finish_reason == "length"
    with httpx.stream("POST", server.url + "/v1/completions", headers={
            "Authorization": f"Bearer {KEY}"}, json={"prompt": prompt, "max_tokens": 2,
                                                      "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_chat_stream_and_not(client, reference):
    _, tok = reference
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Return the sum"}]
    prompt = tok.encode_chat(messages)
    ids = greedy_ids(reference, prompt, 10)
    expected, reason = tok.decode(ids), "length" if len(ids) == 10 else "stop"
    r = client.chat.completions.create(model="demo_model", messages=messages, max_tokens=10,
                                       temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(ids)
    chunks = list(client.chat.completions.create(
        model="demo_model", messages=messages, max_completion_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == len(ids) and not chunks[-1].choices


def test_fim(server, client, reference):
    _, tok = reference
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    prompt = tok.encode_fim(prefix, suffix)  # ends with the prefix's last token
    # The middle as text that follows that token: its leading space kept (a lone decode of
    # the middle's ids drops it).
    last = tok.decode(prompt[-1:])
    expected = tok.decode([prompt[-1], *greedy_ids(reference, prompt, 8)])[len(last):]
    r = client.completions.create(model="demo_model", prompt=prefix, suffix=suffix,
                                  max_tokens=8, temperature=0)
    assert r.choices[0].text == expected
    r = post(server, "/v1/fim/completions", {"prompt": prefix, "suffix": suffix,
                                             "max_tokens": 8, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_concurrent_greedy_equals_alone(client):
    prompts = [f"Return the {w} of" for w in
               ("number", "name", "list", "value", "path", "size", "type", "sum")]

    def ask(p, n):
        return client.completions.create(model="demo_model", prompt=p, max_tokens=n,
                                         temperature=0).choices[0].text

    alone = [ask(p, 8 + i) for i, p in enumerate(prompts)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts, [8 + i for i in range(8)]))
    assert together == alone
    assert len(set(alone)) > 1


def test_seed_stop_and_penalties(client, reference):
    def ask(**kw):
        r = client.completions.create(model="demo_model", prompt="Return the", **kw)
        return r.choices[0].text, r.choices[0].finish_reason

    a = ask(max_tokens=16, temperature=1.0, seed=7)
    assert a == ask(max_tokens=16, temperature=1.0, top_p=1.0, seed=7)
    assert {ask(max_tokens=16, temperature=1.0, seed=s)[0] for s in range(4)} != {a[0]}
    greedy, _ = ask(max_tokens=16, temperature=0)
    cut = greedy.split()[2]
    text, reason = ask(max_tokens=16, temperature=0, stop=[cut, "zzz"])
    assert reason == "stop" and text == greedy[:greedy.index(cut)]
    penalized, _ = ask(max_tokens=16, temperature=0, frequency_penalty=2.0)
    assert penalized != greedy


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", '{"prompt": "x",', 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "seed": "a"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "word " * CONTEXT}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tool_choice": "sometimes", "tools": [
                                  {"type": "function", "function": {"name": "f"}}]},
     400, "tool_choice"),
    ("/v1/nothing", {}, 404, None),
])
def test_bad_input(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_api_key(server):
    body = {"prompt": "x", "max_tokens": 1}
    assert post(server, "/v1/completions", body, key=None).status_code == 401
    r = post(server, "/v1/completions", body, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # open without a key


def test_disconnect_then_normal_request(server, client):
    with httpx.stream("POST", server.url + "/v1/completions", headers={
            "Authorization": f"Bearer {KEY}"}, json={
            "prompt": "Return the", "max_tokens": 200, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 10
    while "cancelled" not in server.stderr() and time.time() < deadline:
        time.sleep(0.1)
    assert re.search(r"request cmpl-\w+: 3 prompt tokens, \d+ completion tokens, .*cancelled",
                     server.stderr())
    r = client.completions.create(model="demo_model", prompt="Return the", max_tokens=3)
    assert r.usage.completion_tokens == 3
    assert "mistral_jax_requests_running 0.0" in httpx.get(server.url + "/metrics").text


def test_queue_full_gives_503(server):
    # 8 slots + 2 waiting: of 16 long requests sent at once, some are refused.
    barrier = threading.Barrier(16)

    def ask(_):
        barrier.wait()
        return post(server, "/v1/completions", {"prompt": "Return the", "max_tokens": 120,
                                                "temperature": 0}).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(ask, range(16)))
    assert set(codes) == {200, 503} and codes.count(200) >= 10


def test_sigterm_ends_streams_and_exits_0(tmp_path, cache_dir):
    s = Server("--max-batch", "2", "--no-warmup", "--shutdown-grace", "0.5", cache=cache_dir,
               log=tmp_path / "server.log")
    try:
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
                "ignore_eos": True, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:  # until a first token: the programs are compiled
                if line.startswith("data: ") and '"content": ""' not in line:
                    break
            s.terminate()
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
    finally:
        rc = s.stop()
    assert rc == 0
    assert "Traceback" not in s.stderr() and "SIGTERM" in s.stderr()
