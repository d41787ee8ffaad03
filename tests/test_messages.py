"""Messages a newcomer met (issue #20): each one line that says what is wrong and what to do."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import mistral_jax
from mistral_jax import sharding
from mistral_jax.args import ModelArgs
from mistral_jax.bench import run as bench
from mistral_jax.cli import common as cli
from mistral_jax.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(mistral_jax.__file__).parent / "demo_model"
# Mixtral-8x22B-Instruct-v0.1's params.json: what the README's sharding example plans.
MIXTRAL_8X22B = {"dim": 6144, "n_layers": 56, "head_dim": 128, "hidden_dim": 16384,
                 "n_heads": 48, "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32768,
                 "rope_theta": 1e6, "moe": {"num_experts": 8, "num_experts_per_tok": 2}}


def test_bench_vs_transformers_without_torch_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    assert bench.main(["--preset", "tiny", "--vs-transformers", "--no-compile-cache"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("error: --vs-transformers needs torch (not installed here): pip "
                            "install torch transformers (or the test extra), or drop "
                            "--vs-transformers\n")
    assert captured.out == ""  # refused before any work


def _args(max_seq_len: int) -> ModelArgs:
    return ModelArgs(dim=8, n_layers=1, head_dim=4, hidden_dim=16, n_heads=2, n_kv_heads=1,
                     norm_eps=1e-5, vocab_size=32, max_seq_len=max_seq_len)


@pytest.mark.parametrize("n_prompt, short_by", [(20, 5), (16, 1)])
def test_a_prompt_longer_than_the_context_says_by_how_much(n_prompt, short_by):
    with pytest.raises(UserInputError) as e:
        cli.check_lengths([list(range(n_prompt))], 8, _args(16), ["--prompt"])
    message = str(e.value)
    assert message == (f"--prompt is too long: {n_prompt} tokens, and the model's context of 16 "
                       "must hold the prompt and at least one new token; shorten it by at "
                       f"least {short_by} tokens")
    assert "--max-tokens" not in message


def test_a_prompt_that_fits_but_not_with_max_tokens_names_the_largest_max_tokens():
    with pytest.raises(UserInputError, match=r"lower --max-tokens \(at most 6\)"):
        cli.check_lengths([list(range(10))], 8, _args(16), ["--prompt"])
    cli.check_lengths([list(range(10))], 6, _args(16), ["--prompt"])  # fits: no error


def test_sharding_plan_says_1_device_and_the_readme_example_is_its_output(tmp_path, capsys):
    assert sharding.main([str(DEMO), "--mesh", "tensor=1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("mesh data=1,tensor=1,expert=1 (1 device), ") and "devices" not in first

    readme = (REPO / "docs" / "sharding.md").read_text()  # the README's sharding page
    block = re.search(r"```bash\n(python -m mistral_jax\.sharding .*?)```", readme, re.S).group(1)
    command, *shown = block.strip().splitlines()
    mesh = command.split("--mesh ")[1].split()[0]
    folder = tmp_path / "Mixtral-8x22B-Instruct-v0.1"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(MIXTRAL_8X22B))
    assert sharding.main([str(folder), "--mesh", mesh]) == 0
    assert capsys.readouterr().out.splitlines() == [line.removeprefix("# ") for line in shown]
