"""Compiles the user can see: a notice on stderr before a compile starts (once per call, none
when everything is compiled), time to first token as the user waited with the compile time
beside it, and chat's warm-up compiling what its first turns need."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import mistral_common
import pytest

from mistral_jax.cli import chat
from mistral_jax.cli import timing as cli
from mistral_jax.generate import generate
from mistral_jax.transformer import Transformer
from tests.helpers import random_mistral_state, tiny_args, write_mistral_folder

V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


def test_stats_count_the_compile_in_the_wait_and_show_it_beside():
    stats = cli.GenStats(n_tokens=12, first_token_s=4.35, total_s=4.65, compile_s=4.30,
                         first_compile_s=4.25)
    assert stats.tokens_per_s == pytest.approx(12 / 0.35)
    assert stats.summary() == ("12 tokens in 4.65 s (4.30 s of it compiling): 34.3 tokens/s once "
                               "compiled, time to first token 4.350 s (4.25 s of it compiling)")
    warm = cli.GenStats(n_tokens=12, first_token_s=0.047, total_s=0.3)
    assert warm.summary() == "12 tokens in 0.30 s: 40.0 tokens/s, time to first token 0.047 s"


def test_log_stats_says_compiled_in_only_after_a_compile(capsys):
    cli.log_stats(cli.GenStats(n_tokens=1, first_token_s=2.0, total_s=2.5, compile_s=1.5,
                               first_compile_s=1.5))
    assert capsys.readouterr().err.splitlines()[0] == "compiled in 1.50 s"
    cli.log_stats(cli.GenStats(n_tokens=1, first_token_s=0.1, total_s=0.2))
    assert "compiled" not in capsys.readouterr().err


@pytest.mark.parametrize("program,shapes,want", [
    ("prefill", {"batch": 1, "prompt_len": 512}, "compiling for prompts of up to 512 tokens"),
    ("prefill", {"batch": 4, "prompt_len": 16}, "compiling for prompts of up to 16 tokens, 4 rows"),
    ("decode step", {"batch": 1, "new_tokens": 64}, "compiling for answers of up to 64 tokens"),
])
def test_the_notice_names_the_shapes(program, shapes, want):
    assert cli.describe_compile(program, shapes) == f"{want} (once: cached afterwards) ..."


def unique_model(tmp_path: Path, hidden_dim: int) -> Path:
    """A tiny model whose shapes no other test compiles (args are static under jit), with the
    v3 tokenizer, so that what compiles here is known."""
    args = tiny_args(n_layers=1, hidden_dim=hidden_dim, vocab_size=32768)
    folder = write_mistral_folder(tmp_path / "model", args, random_mistral_state(args, seed=2))
    shutil.copy(V3, folder / "tokenizer.model.v3")
    return folder


def test_a_notice_comes_before_each_compile_and_the_wait_includes_it(tmp_path, capsys):
    model = Transformer.from_folder(unique_model(tmp_path, hidden_dim=88))
    capsys.readouterr()
    _, first = cli.timed_generate([[1, 5, 9]], model, max_tokens=4)
    assert capsys.readouterr().err.splitlines() == [
        "compiling for prompts of up to 16 tokens (once: cached afterwards) ..."]
    assert first.compile_s > 0 and 0 < first.first_compile_s <= first.compile_s
    assert first.first_token_s >= first.first_compile_s  # the wait, compile included
    assert first.total_s >= first.compile_s

    _, again = cli.timed_generate([[1, 7, 9]], model, max_tokens=4)
    assert capsys.readouterr().err == ""  # compiled: no notice
    assert again.compile_s == 0 and again.first_compile_s == 0

    said: list[str] = []
    with cli.compile_notices(said.append):  # any sink; once per block
        generate([list(range(1, 21))], model, max_tokens=4)  # a new prompt bucket: 2 programs
    assert said == ["compiling for prompts of up to 32 tokens (once: cached afterwards) ..."]


def test_chat_warm_up_compiles_what_the_first_turns_need(tmp_path, capsys, monkeypatch):
    """After --warmup, the first turn compiles nothing (without it, it compiles: see
    test_cli's chat test)."""
    folder = unique_model(tmp_path, hidden_dim=104)
    monkeypatch.setattr(chat, "WARMUP_TOKENS", 16)  # fewer programs, faster
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code = chat.main(["--ckpt", str(folder), "--warmup", "--max-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "compiled for prompts of up to 16 tokens" in err
    assert "compiling for" not in err and "time to first token" in err


def test_warmup_lengths_cover_both_ends_of_each_bucket():
    assert chat.warmup_lengths(9, 128) == [9, 16, 17, 32, 33, 64, 65, 128]
    assert chat.warmup_lengths(40, 64) == [40, 64]
    assert chat.warmup_lengths(200, 128) == [200, 256]  # a long system prompt: its own bucket
