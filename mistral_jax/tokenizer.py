"""Thin wrapper around mistral-common: find/load a tokenizer, encode prompts, decode outputs.

Every prompt format (chat, tools, FIM) comes from mistral-common; nothing here builds
prompt strings by hand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.converters import convert_openai_messages
from mistral_common.protocol.instruct.messages import SystemMessage
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Tool
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokens, TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import (
    InstructTokenizerV1,
    InstructTokenizerV2,
    InstructTokenizerV3,
    InstructTokenizerV7,
)
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from mistral_jax.errors import TokenizerError, UserInputError

__all__ = [
    "StreamDecoder",
    "Tokenizer",
    "ToolCall",
    "check_utf8",
    "find_tokenizer_file",
    "infer_spm_version",
    "load_tokenizer",
]

_SPM_VERSIONED = re.compile(r"\.model\.v(\d+)(m\d+)?$")
_LOOKED_FOR = (
    "tekken*.json, tokenizer.model.v<N> (Mistral layout), tokenizer.model (Hugging Face layout)"
)
_SPM_INSTRUCT = {
    TokenizerVersion.v1: InstructTokenizerV1,
    TokenizerVersion.v2: InstructTokenizerV2,
    TokenizerVersion.v3: InstructTokenizerV3,
    TokenizerVersion.v7: InstructTokenizerV7,
}


def check_utf8(text: str, name: str) -> str:
    """`text` if it can be written as UTF-8; else UserInputError naming `name` and the byte.

    Bytes that are not UTF-8 reach Python as lone surrogates U+DC80..U+DCFF (the
    'surrogateescape' of command-line arguments, and of stdin in a C locale), which the
    tokenizers cannot encode (sentencepiece raised "Unable to cast Python instance").
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = (f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF
                else f"a lone surrogate U+{code:04X}")
        raise UserInputError(
            f"{name} is not valid UTF-8 text: {what} at character {e.start}; give UTF-8 "
            "text") from None
    return text


def _check_strings(value: Any, name: str) -> None:
    """`check_utf8` on every string in nested dicts / lists (a chat message, a tool)."""
    if isinstance(value, str):
        check_utf8(value, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(item, f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_strings(item, f"{name}[{i}]")
    elif hasattr(value, "model_dump"):  # a mistral-common (pydantic) message or tool
        _check_strings(value.model_dump(), name)


def _is_tokenizer_name(name: str) -> bool:
    tekken = name.startswith("tekken") and name.endswith(".json")
    return tekken or name.endswith(".model") or _SPM_VERSIONED.search(name) is not None


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files of a model folder, in the order `find_tokenizer_file` prefers
    them: `tekken*.json` (last name first), then `tokenizer.model.vN[mM]` (highest first),
    then a plain `tokenizer.model`."""
    tekken = sorted((p for p in folder.glob("tekken*.json") if p.is_file()), reverse=True)
    versioned = sorted(
        (p for p in folder.glob("*.model.v*") if p.is_file() and _SPM_VERSIONED.search(p.name)),
        key=lambda p: (int(_SPM_VERSIONED.search(p.name).group(1)), p.name), reverse=True)
    plain = [folder / "tokenizer.model"] if (folder / "tokenizer.model").is_file() else []
    return [*tekken, *versioned, *plain]


def find_tokenizer_file(folder: str | Path) -> Path:
    """Return the tokenizer file of a model folder (or `folder` itself if it is a tokenizer file).

    Order: `tekken*.json`, then the highest `tokenizer.model.vN[mM]`, then a plain
    `tokenizer.model` (Hugging Face layout).
    """
    path = Path(folder)
    if path.is_file():
        if not _is_tokenizer_name(path.name):
            raise TokenizerError(
                f"{path} is not a tokenizer file: expected a name like tekken*.json, "
                "tokenizer.model or tokenizer.model.v<N>"
            )
        return path
    if not path.is_dir():
        raise TokenizerError(
            f"tokenizer path {path} does not exist (expected a model folder or file)"
        )
    found = tokenizer_files(path)
    if found:
        return found[0]
    hint = (
        " (tokenizer.json of HF `tokenizers` is not supported)"
        if (path / "tokenizer.json").exists()
        else ""
    )
    raise TokenizerError(f"no tokenizer file in {path}: looked for {_LOOKED_FOR}{hint}")


def infer_spm_version(path: str | Path) -> TokenizerVersion:
    """Version of an unversioned SentencePiece file, from its control tokens.

    mistral-common treats a bare `tokenizer.model` as v1, which is wrong for e.g.
    Mistral-7B-Instruct-v0.3 (v3). Rules: `[SYSTEM_PROMPT]` -> v7, `[PREFIX]`/`[SUFFIX]`
    -> v3, `[TOOL_CALLS]` -> v2, otherwise v1. (An image config cannot be inferred: text only.)
    """
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    pieces = {sp.id_to_piece(i) for i in range(min(sp.get_piece_size(), 1000)) if sp.is_control(i)}
    if SpecialTokens.begin_system.value in pieces:
        return TokenizerVersion.v7
    if SpecialTokens.prefix.value in pieces and SpecialTokens.suffix.value in pieces:
        return TokenizerVersion.v3
    if SpecialTokens.tool_calls.value in pieces:
        return TokenizerVersion.v2
    return TokenizerVersion.v1


def _load_mistral(path: Path) -> MistralTokenizer:
    if path.name.endswith(".model"):  # unversioned SentencePiece: infer, don't default to v1
        version = infer_spm_version(path)
        spm = SentencePieceTokenizer(path, tokenizer_version=version)
        return MistralTokenizer(
            _SPM_INSTRUCT[version](spm),
            validator=get_validator(version, mode=ValidationMode.test),
            request_normalizer=get_normalizer(version, spm.model_settings_builder),
        )
    return MistralTokenizer.from_file(path)


@dataclass(frozen=True)
class ToolCall:
    """One function call emitted by the model."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


class Tokenizer:
    """A loaded Mistral tokenizer (see `load_tokenizer`)."""

    def __init__(self, mistral: MistralTokenizer, path: Path | None = None) -> None:
        self.mistral = mistral
        self.path = path
        self._raw = mistral.instruct_tokenizer.tokenizer

    def __repr__(self) -> str:
        return f"Tokenizer(version={self.version.value!r}, kind={self.kind!r}, path={str(self.path)!r})"

    @property
    def version(self) -> TokenizerVersion:
        """Instruct format version, a `str` enum ("v1", "v2", "v3", "v7", "v11", ...) that compares numerically."""
        return self._raw.version

    @property
    def kind(self) -> str:
        """ "tekken" or "sentencepiece"."""
        return "tekken" if self.is_tekken else "sentencepiece"

    @property
    def is_tekken(self) -> bool:
        return isinstance(self._raw, Tekkenizer)

    @property
    def bos_id(self) -> int:
        return self._raw.bos_id

    @property
    def eos_id(self) -> int:
        return self._raw.eos_id

    @property
    def n_words(self) -> int:
        return self._raw.n_words

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end generation."""
        return (self.eos_id,)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text` (UTF-8 text: see `check_utf8`)."""
        return self._raw.encode(check_utf8(text, "text"), bos=bos, eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, skipping bos/eos and other control tokens."""
        return self.mistral.decode([int(i) for i in ids])

    def _name(self) -> str:
        return f"tokenizer {self.version.value} ({self.path or self.kind})"

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any] | Any],
        *,
        system: str | None = None,
        tools: Sequence[dict[str, Any] | Tool] | None = None,
    ) -> list[int]:
        """Prompt ids for a chat (OpenAI-style dicts or mistral-common messages), ready to generate."""
        _check_strings(list(messages), "messages")
        if system is not None:
            check_utf8(system, "system")
        _check_strings(list(tools or []), "tools")
        try:
            msgs = [convert_openai_messages([m])[0] if isinstance(m, dict) else m for m in messages]
            _refuse_images(msgs)
            if system is not None:
                msgs.insert(0, SystemMessage(content=system))
            tool_objs = None
            if tools:
                tool_objs = [
                    t
                    if isinstance(t, Tool)
                    else Tool.from_openai(
                        t if "function" in t else {"type": "function", "function": t}
                    )
                    for t in tools
                ]
            request = ChatCompletionRequest(messages=msgs, tools=tool_objs)
            return self.mistral.encode_chat_completion(request).tokens
        except TokenizerError:
            raise
        except (MistralCommonException, ValueError, AssertionError, KeyError, TypeError) as e:
            raise TokenizerError(
                f"cannot encode chat `messages`/`tools` with {self._name()}: {type(e).__name__}: {e}"
            ) from e

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """Fill-in-the-middle prompt ids (needs a v3 or later tokenizer)."""
        if self.version < TokenizerVersion.v3:
            raise TokenizerError(
                f"FIM is not supported by {self._name()}: FIM needs a v3 or later tokenizer"
            )
        check_utf8(prefix, "prefix")
        check_utf8(suffix, "suffix")
        try:
            return self.mistral.encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens
        except (MistralCommonException, ValueError, AssertionError) as e:
            raise TokenizerError(f"cannot encode FIM request with {self._name()}: {e}") from e

    def split_tool_calls(self, ids: Sequence[int]) -> tuple[str, list[ToolCall]]:
        """Split generated ids into (text content, tool calls); no `[TOOL_CALLS]` -> (text, [])."""
        ids = [int(i) for i in ids]
        if self.version < TokenizerVersion.v2:
            return self.decode(ids), []
        tool_calls_id = self._raw.get_special_token(SpecialTokens.tool_calls.value)
        if tool_calls_id not in ids:
            return self.decode(ids), []
        content, chunks = _split_content_and_tool_calls(ids, tool_calls_id)
        try:
            calls = _decode_tool_calls(chunks, self._raw)
            parsed = [
                ToolCall(
                    name=c.function.name,
                    arguments=json.loads(c.function.arguments),
                    id=None if c.id in (None, "null") else c.id,
                )
                for c in calls
            ]
        except ValueError as e:  # json.JSONDecodeError and InvalidToolCallError are ValueErrors
            text = self.decode(ids[len(content) :])
            raise TokenizerError(f"malformed tool call from {self._name()}: {text!r} ({e})") from e
        for c in parsed:
            if not isinstance(c.arguments, dict):
                raise TokenizerError(f"tool call arguments are not a JSON object: {c.arguments!r}")
        return self.decode(content), parsed

    def parse_tool_calls(self, ids: Sequence[int]) -> list[ToolCall]:
        """Tool calls in a generated answer (`[]` for a plain-text answer)."""
        return self.split_tool_calls(ids)[1]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a model folder, or a tokenizer file."""
    file = find_tokenizer_file(path)
    try:
        return Tokenizer(_load_mistral(file), file)
    except (MistralCommonException, ValueError, AssertionError, RuntimeError, OSError,
            KeyError, TypeError, AttributeError) as e:  # the last three: JSON of another shape
        why = f"no field {e} where one was expected" if isinstance(e, KeyError) else e
        raise TokenizerError(f"cannot load tokenizer file {file}: {why}") from e


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text new since the last push.

    Text that ends in an incomplete UTF-8 sequence ("\\ufffd") is held back until the
    following tokens complete it (`flush()` returns whatever is still held).
    Decodes a short window of recent ids, so cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._start = 0  # window start: first id of the last emitted chunk
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prev = self.tokenizer.decode(self.ids[self._start : self._read])
        text = self.tokenizer.decode(self.ids[self._start :])
        if len(text) <= len(prev) or text.endswith("\ufffd"):
            return ""
        self._start, self._read = self._read, len(self.ids)
        return text[len(prev) :]

    def flush(self) -> str:
        prev = self.tokenizer.decode(self.ids[self._start : self._read])
        text = self.tokenizer.decode(self.ids[self._start :])
        self._start = self._read = len(self.ids)
        return text[len(prev) :]


def _refuse_images(messages: Sequence[Any]) -> None:
    """TokenizerError for an image chunk in any message: a tokenizer with an image config
    would encode it as [IMG] tokens that the language model alone (no vision encoder) reads
    as text, giving answers about an image it never saw."""
    for i, m in enumerate(messages):
        content = getattr(m, "content", None)
        for chunk in content if isinstance(content, list) else []:
            if getattr(chunk, "type", None) in ("image", "image_url"):
                raise TokenizerError(
                    f"messages[{i}] has an image ({chunk.type}): images are not supported "
                    "(the vision encoder is not run); send text only")
