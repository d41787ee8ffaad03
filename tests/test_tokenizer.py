"""Tests for mistral_jax.tokenizer, on the real tokenizer files shipped in mistral_common/data."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_jax.errors import TokenizerError, UserInputError
from mistral_jax.tokenizer import (
    StreamDecoder,
    Tokenizer,
    check_utf8,
    find_tokenizer_file,
    load_tokenizer,
)

DATA = Path(mistral_common.__file__).parent / "data"
SPM_FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
MULTIBYTE = "héllo 世界 🙂 🦜 𝔘𝔫𝔦 ꙮ"


def _tekken_json(version: str) -> dict:
    """tekken_240718.json (a v3 file) relabelled as a later version, as newer models ship it."""
    data = json.loads((DATA / "tekken_240718.json").read_text())
    data["config"]["version"] = version
    if version == "v11":  # > v7 files must list their special tokens ([ARGS], [CALL_ID] are new)
        names = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]"]
        names += [
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
            "[TOOL_CALLS]",
            "[IMG]",
        ]
        names += ["<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]"]
        names += ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]", "[ARGS]", "[CALL_ID]"]
        data["special_tokens"] = [
            {"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(names)
        ]
    return data


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model folders laid out as users have them (Mistral and Hugging Face layouts)."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, Path] = {}

    def make(name: str, files: dict[str, Path | dict]) -> None:
        d = root / name
        d.mkdir()
        (d / "params.json").write_text("{}")
        for fname, src in files.items():
            if isinstance(src, dict):
                (d / fname).write_text(json.dumps(src))
            else:
                shutil.copy(src, d / fname)
        out[name] = d

    for v, f in SPM_FILES.items():
        make(f"mistral_{v}", {f"tokenizer.model.{v}": DATA / f})
        make(f"hf_{v}", {"tokenizer.model": DATA / f})
    make("tekken_v3", {"tekken.json": DATA / "tekken_240718.json"})
    make("tekken_v7", {"tekken.json": _tekken_json("v7")})
    make("tekken_v11", {"tekken.json": _tekken_json("v11")})
    return out


@pytest.fixture(scope="module")
def tok(folders: dict[str, Path]):
    """tok(name) -> Tokenizer, loaded once per folder."""
    return cache(lambda name: load_tokenizer(folders[name]))


def _prompt(t: Tokenizer, ids: list[int]) -> str:
    """Decoded prompt with control tokens kept (SentencePiece pieces show spaces as "▁")."""
    return t.mistral.decode(ids, special_token_policy="keep").replace("\u2581", " ")


def _touch(folder: Path, *names: str) -> None:
    for n in names:
        (folder / n).write_text("")


# ---------------------------------------------------------------- finding files


def test_find_order(tmp_path: Path) -> None:
    _touch(tmp_path, "params.json", "tokenizer.model")
    assert find_tokenizer_file(tmp_path).name == "tokenizer.model"
    _touch(tmp_path, "tokenizer.model.v1", "tokenizer.model.v3", "tokenizer.model.v7m1")
    assert find_tokenizer_file(tmp_path).name == "tokenizer.model.v7m1"
    _touch(tmp_path, "tokenizer.model.v11")  # numeric, not lexicographic, order
    assert find_tokenizer_file(tmp_path).name == "tokenizer.model.v11"
    _touch(tmp_path, "tekken.json")
    assert find_tokenizer_file(tmp_path).name == "tekken.json"
    # a file given directly is used as is
    assert find_tokenizer_file(tmp_path / "tokenizer.model.v3") == tmp_path / "tokenizer.model.v3"
    assert find_tokenizer_file(str(tmp_path / "tokenizer.model")) == tmp_path / "tokenizer.model"


def test_missing_tokenizer_errors(tmp_path: Path) -> None:
    _touch(tmp_path, "params.json", "consolidated.safetensors", "tokenizer.json")
    with pytest.raises(TokenizerError) as e:
        find_tokenizer_file(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "tekken" in msg and "tokenizer.model" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="params.json"):
        load_tokenizer(tmp_path / "params.json")


@pytest.mark.parametrize("text", ["{ not json", "{}", '{"config": 5}', "[]"])
def test_corrupt_file_names_file(tmp_path: Path, text: str) -> None:
    """Not JSON, or JSON that is no tekken file (which mistral-common met with a KeyError
    or TypeError): one TokenizerError naming the file."""
    (tmp_path / "tekken.json").write_text(text)
    with pytest.raises(TokenizerError, match="cannot load tokenizer file .*tekken.json"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "v7"])
def test_plain_tokenizer_model_version_is_inferred(tok, folders, version: str) -> None:
    # mistral-common itself reads any unversioned `tokenizer.model` as v1 ...
    assert MistralTokenizer.from_file(folders[f"hf_{version}"] / "tokenizer.model").version == "v1"
    # ... we infer the version from the control tokens instead.
    hf, mistral = tok(f"hf_{version}"), tok(f"mistral_{version}")
    assert hf.version == mistral.version == version
    msgs = [{"role": "user", "content": "Hi"}]
    assert hf.encode_chat(msgs, system="Be brief.") == mistral.encode_chat(msgs, system="Be brief.")


@pytest.mark.parametrize(
    "name, version, kind, n_words",
    [
        ("mistral_v1", "v1", "sentencepiece", 32000),
        ("mistral_v3", "v3", "sentencepiece", 32768),
        ("mistral_v7", "v7", "sentencepiece", 32768),
        ("tekken_v3", "v3", "tekken", 131072),
        ("tekken_v11", "v11", "tekken", 131072),
    ],
)
def test_load_attributes(tok, name: str, version: str, kind: str, n_words: int) -> None:
    t: Tokenizer = tok(name)
    assert (t.version, t.kind, t.n_words) == (version, kind, n_words)
    assert (t.bos_id, t.eos_id) == (1, 2)
    assert t.stop_ids == (2,)
    assert isinstance(t.mistral, MistralTokenizer)
    assert t.is_tekken == (kind == "tekken")


@pytest.mark.parametrize("name", ["mistral_v1", "mistral_v3", "tekken_v3"])
def test_encode_decode_roundtrip(tok, name: str) -> None:
    t = tok(name)
    text = "Hello world!\n  def f(x):\n      return x  # " + MULTIBYTE
    ids = t.encode(text)
    assert ids[0] == t.bos_id and t.eos_id not in ids
    assert t.encode(text, bos=False) == ids[1:]
    assert t.encode(text, bos=True, eos=True) == ids + [t.eos_id]
    assert t.decode(ids + [t.eos_id]) == text  # bos/eos skipped
    assert t.decode(ids[1:]) == text
    assert t.decode([]) == ""


# --------------------------------------------------------------------- chat


@pytest.mark.parametrize(
    "name", ["mistral_v1", "mistral_v3", "mistral_v7", "tekken_v3", "tekken_v7"]
)
def test_chat_matches_mistral_common(tok, folders, name: str) -> None:
    t = tok(name)
    history = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    system = "You are a terse geography assistant."
    ids = t.encode_chat(history, system=system)

    ref = MistralTokenizer.from_file(find_tokenizer_file(folders[name]))
    request = ChatCompletionRequest(
        messages=[
            SystemMessage(content=system),
            UserMessage(content="What is the capital of France?"),
            AssistantMessage(content="Paris."),
            UserMessage(content="And of Italy?"),
        ]
    )
    assert ids == ref.encode_chat_completion(request).tokens
    assert t.encode_chat(request.messages) == ids  # mistral-common message objects work too

    prompt = _prompt(t, ids)
    assert ids[0] == t.bos_id and prompt.count("[INST]") == 2
    assert system in t.decode(ids) and "Paris." in t.decode(ids)
    if t.version >= "v7":
        assert "[SYSTEM_PROMPT]" in prompt
    assert t.encode_chat(history) != ids  # the system prompt changes the prompt


def test_chat_errors_name_the_parameter(tok) -> None:
    t = tok("mistral_v3")
    with pytest.raises(TokenizerError, match="messages"):
        t.encode_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(TokenizerError, match="v3"):
        t.encode_chat([])


@pytest.mark.parametrize("name", ["mistral_v3", "tekken_v3"])
def test_text_that_is_not_utf8_is_a_user_error_naming_it(tok, name: str) -> None:
    """Bytes that are not UTF-8 arrive as lone surrogates (surrogateescape); sentencepiece
    raised "Unable to cast Python instance of type <class 'str'>" on them."""
    t = tok(name)
    user = {"role": "user", "content": "hi"}
    cases = [
        (lambda: t.encode("\udcff\udcfe bad bytes"), "text is not valid UTF-8 text: byte 0xff "
         "at character 0"),
        (lambda: t.encode_chat([user, {"role": "assistant", "content": "ok"},
                                {"role": "user", "content": "caf\udce9"}]),
         r"messages\[2\].content is not valid UTF-8 text: byte 0xe9 at character 3"),
        (lambda: t.encode_chat([user], system="\ud800"),
         "system is not valid UTF-8 text: a lone surrogate U\\+D800"),
        (lambda: t.encode_chat([user], tools=[{**TOOLS[0], "function": {
            **TOOLS[0]["function"], "description": "\udc80"}}]),
         r"tools\[0\].function.description is not valid UTF-8 text: byte 0x80"),
        (lambda: t.encode_fim("def f(\udcff", ""), "prefix is not valid UTF-8 text: byte 0xff"),
        (lambda: t.encode_fim("a", "\udcfe"), "suffix is not valid UTF-8 text: byte 0xfe"),
    ]
    for call, message in cases:
        with pytest.raises(UserInputError, match=message):
            call()
    assert check_utf8("café ✓", "x") == "café ✓"


# -------------------------------------------------------------------- tools


def _tool_call_answer(t: Tokenizer, calls: list[dict]) -> list[int]:
    """Ids as the model emits a tool call answer (the format mistral-common encodes history with)."""
    tc = t.mistral.instruct_tokenizer.tokenizer.get_special_token("[TOOL_CALLS]")
    if t.version < "v11":  # v2..v7: [TOOL_CALLS] + one JSON list
        return [tc, *t.encode(json.dumps(calls), bos=False), t.eos_id]
    args = t.mistral.instruct_tokenizer.tokenizer.get_special_token("[ARGS]")
    ids: list[int] = []
    for c in calls:  # v11+: [TOOL_CALLS]name[ARGS]{json} per call
        ids += [
            tc,
            *t.encode(c["name"], bos=False),
            args,
            *t.encode(json.dumps(c["arguments"]), bos=False),
        ]
    return ids + [t.eos_id]


@pytest.mark.parametrize(
    "name", ["mistral_v3", "mistral_v7", "tekken_v3", "tekken_v7", "tekken_v11"]
)
def test_tool_round_trip(tok, name: str) -> None:
    t = tok(name)
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "abc123xyz",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "abc123xyz",
            "name": "get_weather",
            "content": "22C, sunny",
        },
        {"role": "assistant", "content": "It is 22C and sunny in Paris."},
        {"role": "user", "content": "And in Zürich and Tokyo?"},
    ]
    ids = t.encode_chat(history, system="Use tools when useful.", tools=TOOLS)
    prompt = _prompt(t, ids)
    assert "[AVAILABLE_TOOLS]" in prompt and "get_weather" in prompt
    assert "[TOOL_CALLS]" in prompt and "[TOOL_RESULTS]" in prompt and "22C, sunny" in prompt
    # a bare function dict is accepted as well
    assert (
        t.encode_chat(history, system="Use tools when useful.", tools=[TOOLS[0]["function"]]) == ids
    )

    calls = [
        {"name": "get_weather", "arguments": {"city": "Zürich"}},
        {"name": "get_weather", "arguments": {"city": "東京", "days": 2}},
    ]
    parsed = t.parse_tool_calls(_tool_call_answer(t, calls))
    assert [(c.name, c.arguments) for c in parsed] == [(c["name"], c["arguments"]) for c in calls]

    answer = t.encode("It is sunny.", bos=False) + [t.eos_id]
    assert t.parse_tool_calls(answer) == []
    assert t.split_tool_calls(answer) == ("It is sunny.", [])


@pytest.mark.parametrize("name", ["mistral_v3", "tekken_v11"])
def test_malformed_tool_call(tok, name: str) -> None:
    t = tok(name)
    tc = t.mistral.instruct_tokenizer.tokenizer.get_special_token("[TOOL_CALLS]")
    bad = '[{"name": "get_weather", "arguments": {"city": '
    ids = [tc, *t.encode(bad, bos=False)]
    with pytest.raises(TokenizerError, match="city"):
        t.parse_tool_calls(ids)


def test_v1_has_no_tool_calls(tok) -> None:
    t = tok("mistral_v1")
    assert t.parse_tool_calls(t.encode("[TOOL_CALLS] hi", bos=False)) == []


# ---------------------------------------------------------------------- FIM


@pytest.mark.parametrize("name", ["mistral_v3", "mistral_v7", "tekken_v3"])
def test_fim(tok, folders, name: str) -> None:
    t = tok(name)
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    ids = t.encode_fim(prefix, suffix)
    ref = MistralTokenizer.from_file(find_tokenizer_file(folders[name]))
    assert ids == ref.encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens
    prompt = _prompt(t, ids)
    assert "[SUFFIX]" in prompt and "[PREFIX]" in prompt
    assert "return" in t.decode(ids) and "print(add(1, 2))" in t.decode(ids)


@pytest.mark.parametrize("name", ["mistral_v1", "mistral_v2", "hf_v1"])
def test_fim_needs_v3(tok, name: str) -> None:
    t = tok(name)
    with pytest.raises(TokenizerError, match=rf"{t.version.value}.*v3"):
        t.encode_fim("a", "b")


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("name", ["mistral_v1", "mistral_v3", "tekken_v3"])
@pytest.mark.parametrize(
    "text", [MULTIBYTE, "  two  spaces\n\n    indented\tcode()\n", "🙂🙂🙂", "plain ascii text"]
)
def test_stream_decoder(tok, name: str, text: str) -> None:
    t = tok(name)
    ids = t.encode(text)
    ids = ids[:1] + [t.eos_id] + ids[1:] + [t.eos_id]  # control tokens are skipped
    sd = StreamDecoder(t)
    chunks = [sd.push(i) for i in ids]
    assert "".join(chunks) + sd.flush() == t.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_stream_decoder_holds_incomplete_utf8(tok) -> None:
    t = tok("tekken_v3")
    ids = t.encode("🙂", bos=False)
    assert len(ids) > 1  # the emoji is split over several byte tokens
    sd = StreamDecoder(t)
    assert [sd.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert sd.push(ids[-1]) == "🙂"
    assert sd.flush() == ""
