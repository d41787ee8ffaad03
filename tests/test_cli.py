"""The command line (`sample`, `chat`, `demo`) end to end, on tiny scripted checkpoints.

A scripted checkpoint is a real Mistral-layout folder (params.json, consolidated.safetensors,
the v3 tokenizer of mistral-common) whose weights make greedy decoding follow a fixed
table "this token -> next token": attention and feed-forward outputs are zero, so the
residual stream is the embedding of the current token, a one-hot direction, and the
output head maps that direction to its successor (logit 80 against 0 for every other id).
So each command's exact output is known from the table, and tool calls and FIM answers
can be produced on purpose.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import mistral_common
import numpy as np
import pytest
from safetensors.numpy import save_file

from mistral_jax.cli import chat, demo, sample
from mistral_jax.cli import common as cli
from mistral_jax.dtypes import auto_dtype, resolve_dtype
from mistral_jax.generate import generate
from mistral_jax.tokenizer import StreamDecoder, Tokenizer, load_tokenizer
from mistral_jax.transformer import Transformer
from tests.helpers import (
    random_mistral_state,
    tiny_args,
    tiny_moe_args,
    write_hf_folder,
    write_mistral_folder,
)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(mistral_common.__file__).parent / "data"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
V1 = DATA / "tokenizer.model.v1"
MAX_SEQ_LEN = 256

ANSWER = "Hello! I am a tiny scripted model."  # after [/INST]: every chat turn
PLAIN = {"The cat": "sat on the mat.", "My favourite colour is": "blue."}
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "def mul(x, y):\n    return", "\n\nprint(mul(2, 3))", "x * y"
TOOL_CALL = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


# ----------------------------------------------------------------------------- scripted models


def distinct_ids(tok: Tokenizer, text: str) -> list[int]:
    """Ids of pieces, no id twice, that decode to `text` (so a token -> next table can spell it)."""
    sp = tok.mistral.instruct_tokenizer.tokenizer._model
    pieces: dict[str, int] = {}
    for i in range(sp.get_piece_size()):
        if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)):
            pieces.setdefault(sp.id_to_piece(i).replace("\u2581", " "), i)

    def spell(rest: str, used: tuple[int, ...]) -> list[int] | None:
        if not rest:
            return []
        for k in range(min(len(rest), 16), 0, -1):
            i = pieces.get(rest[:k])
            if i is not None and i not in used:
                tail = spell(rest[k:], (*used, i))
                if tail is not None:
                    return [i, *tail]
        return None

    ids = spell(text, ())
    assert ids is not None and tok.decode(ids) == text
    return ids


def successor_table(*chains: list[int]) -> dict[int, int]:
    """{token: next token} from chains [t0, t1, ..., tn]; a token may not have two successors."""
    table: dict[int, int] = {}
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            assert table.setdefault(a, b) == b, f"token {a} would need two successors"
    return table


def scripted_state(args, table: dict[int, int]) -> dict[str, np.ndarray]:
    """Mistral-named float32 weights whose greedy next token after t is table[t]."""
    assert len(table) <= args.dim
    d = args.dim
    z = np.zeros
    state = {"tok_embeddings.weight": z((args.vocab_size, d), np.float32),
             "output.weight": z((args.vocab_size, d), np.float32),
             "norm.weight": np.ones(d, np.float32)}
    for j, (src, dst) in enumerate(sorted(table.items())):
        state["tok_embeddings.weight"][src, j] = 1.0
        state["output.weight"][dst, j] = 10.0
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes = {"attention.wq": (q, d), "attention.wk": (kv, d), "attention.wv": (kv, d),
                  "attention.wo": (d, q), "feed_forward.w1": (args.hidden_dim, d),
                  "feed_forward.w2": (d, args.hidden_dim), "feed_forward.w3": (args.hidden_dim, d)}
        state.update({p + k + ".weight": z(s, np.float32) for k, s in shapes.items()})
        state[p + "attention_norm.weight"] = np.ones(d, np.float32)
        state[p + "ffn_norm.weight"] = np.ones(d, np.float32)
    return state


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(V3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    args = tiny_args(n_layers=1, vocab_size=tok.n_words, max_seq_len=MAX_SEQ_LEN)
    inst, eos = tok._raw.get_special_token("[/INST]"), tok.eos_id
    assert tok.encode_chat([{"role": "user", "content": "x"}])[-1] == inst

    def enc(text: str) -> list[int]:
        return tok.encode(text, bos=False)

    text_table = successor_table(
        [inst, *enc(ANSWER), eos],
        *([enc(prompt)[-1], *enc(answer), eos] for prompt, answer in PLAIN.items()),
        [tok.encode_fim(FIM_PREFIX, FIM_SUFFIX)[-1], *enc(FIM_MIDDLE), eos],
    )
    tool_calls_id = tok._raw.get_special_token("[TOOL_CALLS]")
    tool_json = '[{"name":"get_weather","arguments": {"city":"Paris"}}]'
    tool_table = successor_table([inst, tool_calls_id, *distinct_ids(tok, tool_json), eos])

    out = {}
    for name, table in (("text", text_table), ("tools", tool_table)):
        state = scripted_state(args, table)
        out[name] = write_mistral_folder(root / name, args, state)
        shutil.copy(V3, out[name] / "tokenizer.model.v3")  # named as in Mistral's folders
    out["hf"] = write_hf_folder(root / "hf", args, scripted_state(args, text_table))
    shutil.copy(V3, out["hf"] / "tokenizer.model")  # HF layout: an unversioned file
    out["no_tokenizer"] = write_mistral_folder(root / "no_tokenizer", args, state)
    out["v1"] = write_mistral_folder(root / "v1", args, state)
    shutil.copy(V1, out["v1"] / "tokenizer.model.v1")
    (root / "tools.json").write_text(json.dumps(TOOLS))
    out["tools_json"] = root / "tools.json"
    (root / "bad_tools.json").write_text('[{"type": "function"')
    out["bad_tools_json"] = root / "bad_tools.json"
    return out


def expected(tok: Tokenizer, text: str) -> str:
    """How the scripted model's answer prints: the decoded ids of `text`."""
    return tok.decode(tok.encode(text, bos=False))


def expected_continuation(tok: Tokenizer, prompt: str) -> str:
    """How sample prints a plain completion: the text after the prompt, leading space kept."""
    ids = tok.encode(prompt, bos=True)
    full = tok.decode(ids + tok.encode(PLAIN[prompt], bos=False))
    assert full.startswith(tok.decode(ids))
    return full[len(tok.decode(ids)):]


def run_module(module: str, *argv: str, stdin: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", module, *argv], input=stdin, text=True,
                          capture_output=True, cwd=REPO, env=env, timeout=300)


# ----------------------------------------------------------------------------- end to end


def test_sample_batch_prints_each_completion_and_timings(folders, tok):
    prompts = list(PLAIN)
    res = run_module("mistral_jax.sample", "--ckpt", str(folders["text"]), "--prompt", prompts[0],
                     "--prompt", prompts[1], "--max-tokens", "12", "--dtype", "float32")
    assert res.returncode == 0, res.stderr
    want = []
    for p in prompts:
        want += [p + expected_continuation(tok, p), sample.SEPARATOR]  # the prompt is echoed
    assert res.stdout.splitlines() == want
    for part in ("loading text", "loaded ", "compiled in ", "tokens/s", "time to first token"):
        assert part in res.stderr
    assert "Traceback" not in res.stderr


def test_chat_streams_answers_over_stdin_reset_and_quit(folders, tok):
    long = "word " * 60  # about 60 tokens: with --max-tokens 200 beyond the context of 256
    res = run_module("mistral_jax.chat", "--ckpt", str(folders["text"]), "--system", "Be brief.",
                     "--max-tokens", "200",
                     stdin=f"hello\n\n/reset\n{long}\nhi there\n/quit\nnever read\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [expected(tok, ANSWER)] * 2
    assert "(new conversation)" in res.stderr and "time to first token" in res.stderr
    assert "error: the conversation is" in res.stderr and f"context of {MAX_SEQ_LEN}" in res.stderr
    assert "compiled in" in res.stderr and "Traceback" not in res.stderr
    # stdin is no terminal: no warm-up, so the first turn says it compiles before it does
    assert -1 < res.stderr.find("compiling for prompts of up to") < res.stderr.find("time to first")


def test_second_start_reads_the_persistent_compilation_cache(folders, tmp_path):
    cache, unused = tmp_path / "cache", tmp_path / "unused"
    argv = ("--ckpt", str(folders["text"]), "--prompt", "The cat", "--max-tokens", "4")
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # store even fast compilations
    first = run_module("mistral_jax.sample", *argv, "--compile-cache", str(cache), env=env)
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first start wrote no compiled program"
    second = run_module("mistral_jax.sample", *argv, "--compile-cache", str(cache), env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert sorted(p.name for p in cache.iterdir()) == entries  # every program was a cache hit
    off = run_module("mistral_jax.sample", *argv, "--no-compile-cache",
                     env={**env, "MISTRAL_JAX_COMPILE_CACHE": str(unused)})
    assert off.returncode == 0, off.stderr
    assert not unused.exists()


def test_user_error_is_one_line_exit_2_without_traceback(folders):
    res = run_module("mistral_jax.sample", "--ckpt", str(folders["text"]), "--prompt", "hi",
                     "--temperature", "-0.5")
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["error: temperature must be >= 0 (0 means greedy), got -0.5"]
    assert res.stdout == ""


# ----------------------------------------------------------------------------- in process


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tool_call_answer_is_printed_as_parsed_json(folders, capsys):
    code, out, err = run_main(sample.main, [
        "--ckpt", folders["tools"], "--instruct", "--tools", folders["tools_json"],
        "--prompt", "What is the weather in Paris?"], capsys)
    assert code == 0, err
    assert json.loads(out) == TOOL_CALL


def test_fim_prints_the_middle(folders, tok, capsys):
    code, out, err = run_main(sample.main, [
        "--ckpt", folders["text"], "--fim-prefix", FIM_PREFIX, "--fim-suffix", FIM_SUFFIX], capsys)
    assert code == 0, err
    assert out == expected(tok, FIM_MIDDLE) + "\n"


def test_hf_layout_folder_gives_the_same_completion(folders, tok, capsys):
    prompt = "The cat"
    code, out, err = run_main(sample.main, ["--ckpt", folders["hf"], "--prompt", prompt], capsys)
    assert code == 0, err
    assert out == prompt + expected_continuation(tok, prompt) + "\n"


def test_converted_orbax_folder_gives_the_same_completion(folders, tok, capsys, tmp_path):
    from mistral_jax.convert import convert

    convert(folders["text"], tmp_path / "converted", dtype="bfloat16")
    prompt = "My favourite colour is"
    code, out, err = run_main(sample.main, ["--ckpt", tmp_path / "converted", "--prompt", prompt],
                              capsys)
    assert code == 0, err
    assert out == prompt + expected_continuation(tok, prompt) + "\n"


def test_instruct_sample_follows_the_chat_template(folders, tok, capsys):
    code, out, err = run_main(sample.main, ["--ckpt", folders["text"], "--instruct", "--system",
                                            "Be brief.", "--prompt", "hello"], capsys)
    assert code == 0, err
    assert out == expected(tok, ANSWER) + "\n"


def test_demo_completes_the_three_prompts_as_one_batch(folders, tok, capsys):
    code, out, err = run_main(demo.main, ["--ckpt", folders["text"], "--max-tokens", "4"], capsys)
    assert code == 0, err
    blocks = out.split(demo.SEPARATOR + "\n")
    assert blocks[-1] == "" and len(blocks) == len(demo.PROMPTS) + 1
    for block, prompt in zip(blocks, demo.PROMPTS):
        assert block.startswith(prompt.strip())
    assert "tokens/s" in err


def test_no_ckpt_runs_the_built_in_demo_model(folders, tok, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "demo_model_folder", lambda: tmp_path / "missing")
    code, out, err = run_main(sample.main, ["--prompt", "The cat"], capsys)
    assert code == 2 and "no --ckpt given" in err and "--ckpt DIR" in err
    monkeypatch.setattr(cli, "demo_model_folder", lambda: folders["text"])
    code, out, err = run_main(sample.main, ["--prompt", "The cat", "--temperature", "0"], capsys)
    assert code == 0, err
    assert out == "The cat" + expected_continuation(tok, "The cat") + "\n"
    assert "built-in demo model" in err and "sampling with" not in err
    # No argument at all: the demo model completes a default prompt (one the scripted
    # checkpoint knows, so the exact continuation can be checked), greedily with
    # --temperature 0, and echoes it as mistral-demo does.
    monkeypatch.setattr(sample, "DEFAULT_PROMPT", "The cat")
    code, out, err = run_main(sample.main, ["--temperature", "0"], capsys)
    assert code == 0, err
    assert out == "The cat" + expected_continuation(tok, "The cat") + "\n"
    assert "no --prompt given" in err
    code, out, err = run_main(sample.main, ["--temperature", "0", "--no-echo"], capsys)
    assert code == 0 and out == expected_continuation(tok, "The cat") + "\n", err


def test_sample_samples_the_demo_model_by_default_and_is_greedy_with_a_ckpt(
        folders, tok, capsys, monkeypatch):
    """The demo model's greedy output loops, so without --temperature it samples (and says
    so on stderr and in --help); a --ckpt model stays greedy; --temperature 0 is greedy."""
    seen = []

    def record(prompts, model, **kw):
        seen.append(kw)
        return [[] for _ in prompts], cli.GenStats(0, 0.0, 0.0, 0.0)

    monkeypatch.setattr(cli, "timed_generate", record)
    monkeypatch.setattr(cli, "demo_model_folder", lambda: folders["text"])
    for argv, temperature, top_p in (([], sample.DEMO_TEMPERATURE, sample.DEMO_TOP_P),
                                     (["--top-p", "0.5"], sample.DEMO_TEMPERATURE, 0.5),
                                     (["--temperature", "0"], 0.0, 1.0),
                                     (["--ckpt", folders["text"]], 0.0, 1.0)):
        code, out, err = run_main(sample.main, [str(a) for a in argv], capsys)
        assert code == 0, err
        assert (seen[-1]["temperature"], seen[-1]["top_p"]) == (temperature, top_p), argv
        assert ("sampling with temperature 0.8" in err) == (temperature > 0), argv
        assert out == sample.DEFAULT_PROMPT + "\n"  # the default prompt, echoed
    text = sample.build_parser().format_help()
    assert "default: 0.8 with the built-in demo model" in " ".join(text.split())


def test_chat_ctrl_d_exits_cleanly(folders, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # end of input at the first prompt
    code, out, err = run_main(chat.main, ["--ckpt", folders["text"]], capsys)
    assert code == 0 and out == "", err
    assert "/quit or Ctrl-D exits" in err


def test_timed_generate_equals_generate(tmp_path):
    from mistral_jax.generate import generate
    from mistral_jax.transformer import Transformer

    # Random weights, loaded as sample loads the scripted models (same compiled programs).
    args = tiny_args(n_layers=1, vocab_size=32768, max_seq_len=MAX_SEQ_LEN)
    folder = write_mistral_folder(tmp_path / "random", args, random_mistral_state(args, seed=3))
    model = Transformer.from_folder(folder)
    prompts = [[1, 5, 9, 300, 7000, 31000]]
    kw = dict(max_tokens=128, eos_id=2)
    got, stats = cli.timed_generate(prompts, model, **kw)
    assert got == generate(prompts, model, **kw)[0]
    assert stats.n_tokens == sum(map(len, got))
    assert stats.first_token_s >= 0 and stats.total_s >= stats.first_token_s - 1e-6


BAD_SAMPLE_ARGS = [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "a", "--prompt", "  "], "--prompt #2 is empty"),
    (["--prompt", "hi", "--max-tokens", "300"],
     f"beyond the model's context of {MAX_SEQ_LEN}"),
    (["--prompt", "hi", "--max-tokens", "0"], "--max-tokens: must be an integer >= 1"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--top-k", "0"], "top_k must be None or an integer >= 1"),
    (["--prompt", "hi", "--dtype", "int4"], "--dtype: invalid choice: 'int4'"),
    (["--prompt", "hi", "--temperature", "warm"], "--temperature: invalid float value"),
    (["--instruct"], "give at least one --prompt"),
    (["--prompt", "hi", "--tools", "{tools_json}"], "--tools and --system need --instruct"),
    (["--instruct", "--prompt", "hi", "--tools", "{bad_tools_json}"], "not valid JSON"),
    (["--instruct", "--prompt", "hi", "--tools", "{missing}"], "cannot read it"),
    (["--prompt", "hi", "--fim-prefix", "a"], "cannot be combined with --prompt"),
    # (It used to say that --system/--tools need --instruct, which FIM then refused.)
    (["--fim-prefix", "def f(", "--system", "x"], "cannot be combined with --prompt, "
     "--instruct, --system or --tools"),
    (["--fim-prefix", "def f(", "--tools", "{tools_json}"], "without a chat template"),
    (["--prompt", "hi", "--seed", str(2**63)], "seed must be an integer in "
     "[-9223372036854775808, 9223372036854775807] (-2**63 to 2**63 - 1), got 9223372036854775808"),
    (["--prompt", "hi", "--seed", "99999999999999999999"], "seed must be an integer in "),
    (["--prompt", "hi", "--seed", str(-(2**63) - 1)], "seed must be an integer in "),
    # Bytes that are not UTF-8 reach argv as lone surrogates (surrogateescape).
    (["--prompt", "\udcff\udcfe bad bytes"],
     "--prompt is not valid UTF-8 text: byte 0xff at character 0"),
    (["--prompt", "ok", "--prompt", "caf\udce9"], "--prompt #2 is not valid UTF-8 text: byte 0xe9"),
    (["--instruct", "--system", "\udc80", "--prompt", "hi"],
     "--system is not valid UTF-8 text: byte 0x80"),
    (["--fim-prefix", "def f(\udcff"], "--fim-prefix is not valid UTF-8 text: byte 0xff at "
     "character 6"),
    (["--fim-prefix", "a", "--fim-suffix", "\udcfe"], "--fim-suffix is not valid UTF-8 text"),
    (["--instruct", "--system", "", "--prompt", "hi"], "--system is empty: give a non-empty text"),
    (["--instruct", "--system", "  ", "--prompt", "hi"], "--system is empty"),
    (["--prompt", "hi", "--chunk-size", "0"], "--chunk-size: must be an integer >= 1"),
]


@pytest.mark.parametrize("argv, message", BAD_SAMPLE_ARGS)
def test_bad_sample_input_is_one_line_naming_the_parameter(folders, capsys, argv, message):
    argv = [a.format(**{**{k: str(v) for k, v in folders.items()}, "missing": "/nonexistent"})
            for a in argv]
    code, out, err = run_main(sample.main, ["--ckpt", folders["text"], *argv], capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert message in err


def test_bad_folders_and_tokenizers_fail_before_loading(folders, capsys, tmp_path):
    cases = [
        (["--ckpt", folders["no_tokenizer"], "--prompt", "hi"], "no tokenizer file in"),
        (["--ckpt", tmp_path / "nowhere", "--prompt", "hi"], "not a directory"),
        (["--ckpt", folders["v1"], "--fim-prefix", "a", "--fim-suffix", "b"],
         "FIM needs a v3 or later tokenizer"),
        (["--ckpt", folders["v1"], "--instruct", "--tools", folders["tools_json"], "--prompt",
          "hi"], "--tools needs a tokenizer of version v2 or later"),
        (["--ckpt", folders["text"], "--tokenizer", DATA / "tekken_240718.json", "--prompt", "hi"],
         "has 131072 tokens but the model in"),
    ]
    for argv, message in cases:
        code, out, err = run_main(sample.main, argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert "loaded" not in err
    code, out, err = run_main(chat.main, ["--ckpt", folders["text"], "--top-p", "2"], capsys)
    assert code == 2 and "top_p must be in (0, 1]" in err
    code, out, err = run_main(demo.main, ["--ckpt", folders["no_tokenizer"]], capsys)
    assert code == 2 and "no tokenizer file in" in err and "--tokenizer PATH" in err


def test_a_mismatched_tokenizer_names_the_other_tokenizer_files_of_the_folder(folders, capsys,
                                                                               tmp_path):
    """With tekken.json beside the matching tokenizer.model.v3, tekken is found first (as
    documented) and refused for its vocabulary; the error names the v3 file and --tokenizer."""
    both = tmp_path / "both"
    shutil.copytree(folders["text"], both)
    shutil.copy(DATA / "tekken_240718.json", both / "tekken.json")
    code, _, err = run_main(sample.main, ["--ckpt", both, "--prompt", "hi"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "tekken.json has 131072 tokens" in err
    assert "this folder also has tokenizer.model.v3: pass --tokenizer PATH" in err


# ----------------------------------------------------------------------------- random weights
# Random tiny models with the v3 tokenizer: Mixtral in both layouts, a dense model and a
# LoRA adapter for it. Each command's tokens are checked against the Python API.

N_TOKENS = 8
RANDOM_PROMPT = "The cat"


def lora_adapter(args, seed: int, rank: int = 4) -> dict[str, np.ndarray]:
    """Mistral-format adapter tensors (lora_A [r, in], lora_B [out, r]) for every attention
    and feed-forward weight of a dense model; lora_B non-zero, so the model changes."""
    rng = np.random.default_rng(seed)
    d, f = args.dim, args.hidden_dim
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"attention.wq": (q, d), "attention.wk": (kv, d), "attention.wv": (kv, d),
              "attention.wo": (d, q), "feed_forward.w1": (f, d), "feed_forward.w2": (d, f),
              "feed_forward.w3": (f, d)}
    out = {}
    for i in range(args.n_layers):
        for module, (n_out, n_in) in shapes.items():
            p = f"layers.{i}.{module}."
            out[p + "lora_A.weight"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)
                                        ).astype(np.float32)
            out[p + "lora_B.weight"] = (0.5 * rng.standard_normal((n_out, rank))
                                        ).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def random_folders(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random")
    out = {}
    margs = tiny_moe_args(vocab_size=tok.n_words)  # 4 experts, top 2, 2 layers
    mstate = random_mistral_state(margs, seed=6)
    out["mixtral"] = write_mistral_folder(root / "mixtral", margs, mstate)
    shutil.copy(V3, out["mixtral"] / "tokenizer.model.v3")
    out["mixtral_hf"] = write_hf_folder(root / "mixtral_hf", margs, mstate)
    shutil.copy(V3, out["mixtral_hf"] / "tokenizer.model")
    args = tiny_args(n_layers=1, vocab_size=tok.n_words)
    out["dense"] = write_mistral_folder(root / "dense", args, random_mistral_state(args, seed=5))
    shutil.copy(V3, out["dense"] / "tokenizer.model.v3")
    out["lora"] = root / "adapter" / "lora.safetensors"
    out["lora"].parent.mkdir()
    save_file(lora_adapter(args, seed=1), out["lora"])
    return out


def api_ids(folder: Path, prompt: list[int], **load) -> list[int]:
    """Greedy ids of the Python API: Transformer.from_folder(folder, **load) + generate, in
    the dtype the CLI's default --dtype auto loads (float32 on this CPU)."""
    model = Transformer.from_folder(folder, **{"dtype": "auto", **load})
    return generate([prompt], model, max_tokens=N_TOKENS, temperature=0.0, eos_id=2)[0][0]


def sample_ids(argv, capsys, monkeypatch) -> tuple[list[int], str, str]:
    """Run sample (one prompt) and return the ids it generated, its stdout and its stderr."""
    seen = []

    def record(prompts, model, **kw):
        ids, stats = real(prompts, model, **kw)
        seen.append(ids)
        return ids, stats

    real = cli.timed_generate
    monkeypatch.setattr(cli, "timed_generate", record)
    code, out, err = run_main(sample.main, [*argv, "--max-tokens", N_TOKENS], capsys)
    assert code == 0, err
    assert len(seen) == 1 and len(seen[0]) == 1
    return seen[0][0], out, err


def test_sample_on_mixtral_both_layouts_equals_generate(random_folders, tok, capsys,
                                                        monkeypatch):
    prompt = tok.encode(RANDOM_PROMPT, bos=True)
    mistral, out, _ = sample_ids(["--ckpt", random_folders["mixtral"], "--prompt", RANDOM_PROMPT],
                                 capsys, monkeypatch)
    hf, hf_out, _ = sample_ids(["--ckpt", random_folders["mixtral_hf"], "--prompt",
                                RANDOM_PROMPT], capsys, monkeypatch)
    assert len(mistral) == N_TOKENS  # no early eos: every step is compared
    assert hf == mistral and hf_out == out
    assert mistral == api_ids(random_folders["mixtral"], prompt)
    assert out == RANDOM_PROMPT + sample.continuation(prompt, mistral, tok) + "\n"


def test_sample_lora_flag_loads_the_adapter(random_folders, tok, capsys, monkeypatch):
    prompt = tok.encode(RANDOM_PROMPT, bos=True)
    argv = ["--ckpt", random_folders["dense"], "--prompt", RANDOM_PROMPT]
    plain, _, _ = sample_ids(argv, capsys, monkeypatch)
    with_lora, out, _ = sample_ids([*argv, "--lora", random_folders["lora"]], capsys, monkeypatch)
    assert with_lora != plain  # the adapter changes the answer
    assert with_lora == api_ids(random_folders["dense"], prompt, lora_path=random_folders["lora"])
    assert out == RANDOM_PROMPT + sample.continuation(prompt, with_lora, tok) + "\n"


def test_lora_help_says_when_the_adapter_stays_unmerged_and_loading_does_so(random_folders,
                                                                           tmp_path):
    from mistral_jax.tree import flatten

    for module in (sample, chat):
        text = " ".join(module.build_parser().format_help().split())
        assert ("merged into the weights at load; kept unmerged (applied beside them) when the "
                "model folder's params.json has a lora block") in text
    dense, adapter = random_folders["dense"], random_folders["lora"]
    with_block = tmp_path / "with_lora_block"
    with_block.mkdir()
    cfg = json.loads((dense / "params.json").read_text())
    cfg["lora"] = {"rank": 4, "scaling": 2.0}
    (with_block / "params.json").write_text(json.dumps(cfg))
    (with_block / "consolidated.safetensors").symlink_to(dense / "consolidated.safetensors")
    for folder, unmerged in ((dense, False), (with_block, True)):
        ns = sample.build_parser().parse_args(["--ckpt", str(folder), "--lora", str(adapter),
                                               "--no-compile-cache", "--prompt", "x"])
        params = flatten(cli.load_model(ns, folder).params)
        assert any(path[-1] == "lora_a" for path in params) == unmerged, folder


@pytest.mark.parametrize("mode, stored", [("int8", "int8"), ("fp8", "fp8")])
def test_sample_quantize_flag_quantizes_at_load(random_folders, tok, capsys, monkeypatch, mode,
                                                stored):
    prompt = tok.encode(RANDOM_PROMPT, bos=True)
    ids, _, err = sample_ids(["--ckpt", random_folders["dense"], "--prompt", RANDOM_PROMPT,
                              "--quantize", mode], capsys, monkeypatch)
    assert ids == api_ids(random_folders["dense"], prompt, quantize=mode)
    assert f"parameters, {stored} weights, float32 activations) in " in err


def test_load_line_names_the_plain_dtype(random_folders, capsys, monkeypatch):
    _, _, err = sample_ids(["--ckpt", random_folders["dense"], "--prompt", RANDOM_PROMPT,
                            "--dtype", "float32"], capsys, monkeypatch)
    assert "parameters, float32) in " in err and "weights" not in err


def test_default_dtype_is_float32_on_the_cpu_and_bfloat16_on_accelerators(random_folders, capsys,
                                                                         monkeypatch):
    """--dtype auto (the default) loads float32 on the CPU backend, where XLA computes bfloat16
    through float32 copies of the weights, and bfloat16 on GPUs/TPUs; a named dtype stands."""
    base = ["--ckpt", random_folders["dense"], "--prompt", RANDOM_PROMPT]
    assert sample.build_parser().parse_args([str(a) for a in base]).dtype == "auto"
    _, _, err = sample_ids(base, capsys, monkeypatch)
    assert "parameters, float32) in " in err
    _, _, err = sample_ids([*base, "--dtype", "bfloat16"], capsys, monkeypatch)
    assert "parameters, bfloat16) in " in err
    assert auto_dtype() == "float32" and resolve_dtype("float16") == np.float16
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert auto_dtype() == "bfloat16" and resolve_dtype("auto") == jnp.bfloat16


def test_weight_format_of_quantized_params():
    from mistral_jax.model import init_params
    from mistral_jax.quantize import quantize_params

    args = tiny_args(n_layers=1, vocab_size=64)
    params = init_params(args, 0, np.float32)
    assert cli.weight_format(params, np.float32) == "float32"
    int8 = quantize_params(params, "int8")
    assert cli.weight_format(int8, "bfloat16") == "int8 weights, bfloat16 activations"
    # A checkpoint that quantizes the inputs of its layers too (compressed-tensors).
    fp8 = dict(quantize_params(params, "fp8"))
    layer = dict(fp8["layers_0"])
    layer["attention"] = {**layer["attention"],
                          "wq": {**layer["attention"]["wq"], "input_scale": np.zeros((), np.float32)}}
    fp8["layers_0"] = layer
    assert cli.weight_format(fp8, "bfloat16") == "fp8 weights and activations, bfloat16 elsewhere"


def test_chat_with_lora_and_fp8_equals_the_api(random_folders, tok, capsys, monkeypatch):
    folder, adapter = random_folders["dense"], random_folders["lora"]
    seen: list[int] = []

    def record(*a, **kw):
        for token in real(*a, **kw):
            seen.append(token)
            yield token

    real = chat.generate_stream
    monkeypatch.setattr(chat, "generate_stream", record)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/quit\n"))
    code, out, err = run_main(chat.main, ["--ckpt", folder, "--lora", adapter, "--quantize", "fp8",
                                          "--temperature", "0", "--max-tokens", N_TOKENS], capsys)
    assert code == 0, err
    prompt = tok.encode_chat([{"role": "user", "content": "hello"}])
    want = api_ids(folder, prompt, lora_path=adapter, quantize="fp8")
    assert seen == want and len(want) == N_TOKENS
    assert want != api_ids(folder, prompt, quantize="fp8")  # the adapter matters here too
    stream = StreamDecoder(tok)
    assert out == "".join(stream.push(t) for t in want) + stream.flush() + "\n"
    assert "fp8 weights, float32 activations" in err


def test_bad_lora_adapter_is_one_line_naming_the_key(random_folders, tok, capsys, tmp_path):
    tensors = lora_adapter(tiny_args(n_layers=1, vocab_size=tok.n_words), seed=2)
    key = "layers.0.attention.wx.lora_A.weight"
    tensors[key] = tensors["layers.0.attention.wq.lora_A.weight"]
    save_file(tensors, tmp_path / "lora.safetensors")
    for main, extra in ((sample.main, ["--prompt", "hi"]), (chat.main, [])):
        code, out, err = run_main(main, ["--ckpt", random_folders["dense"], "--lora",
                                         tmp_path / "lora.safetensors", *extra], capsys)
        assert code == 2 and out == ""
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and repr(key) in err, err
        assert "loaded" not in err


@pytest.mark.parametrize("layout", ["mistral", "hf"])
def test_non_numeric_expert_count_is_one_line_exit_2(tmp_path, capsys, layout):
    args = tiny_moe_args(vocab_size=64)
    state = random_mistral_state(args)
    if layout == "mistral":
        folder = write_mistral_folder(tmp_path / "m", args, state)
        file, field = folder / "params.json", "moe.num_experts_per_tok"
        cfg = json.loads(file.read_text())
        cfg["moe"]["num_experts_per_tok"] = "two"
    else:
        folder = write_hf_folder(tmp_path / "h", args, state)
        file, field = folder / "config.json", "num_experts_per_tok"
        cfg = json.loads(file.read_text())
        cfg["num_experts_per_tok"] = "two"
    file.write_text(json.dumps(cfg))
    code, out, err = run_main(sample.main, ["--ckpt", folder, "--prompt", "hi"], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {file}: {field} must be a positive integer, got 'two'"]


# ----------------------------------------------------------------------------- chat input


def chat_run(folder, stdin, capsys, monkeypatch, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
    return run_main(chat.main, ["--ckpt", folder, *argv], capsys)


def test_chat_with_stdin_closed_exits_as_at_end_of_input(folders, capsys, monkeypatch):
    # `python -m mistral_jax.chat <&-`: Python sets sys.stdin to None.
    code, out, err = chat_run(folders["text"], None, capsys, monkeypatch)
    assert code == 0 and out == "", err
    assert "Traceback" not in err


@pytest.mark.parametrize("io_encoding", [None, "utf-8:strict"])
def test_chat_reports_a_line_that_is_not_utf8_and_goes_on(folders, tok, io_encoding):
    # A real process, bytes on stdin: the bad line is reported, the next one answered.
    # Python reads stdin with surrogateescape in a C / C.UTF-8 locale, strictly in others
    # (as PYTHONIOENCODING=utf-8:strict asks): chat must take both.
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if io_encoding is not None:
        env["PYTHONIOENCODING"] = io_encoding
    res = subprocess.run(
        [sys.executable, "-m", "mistral_jax.chat", "--ckpt", str(folders["text"]),
         "--max-tokens", "20"], input=b"caf\xe9\nhello\n/quit\n", capture_output=True,
        cwd=REPO, timeout=300, env=env)
    err = res.stderr.decode()
    assert res.returncode == 0, err
    assert res.stdout.decode().splitlines() == [expected(tok, ANSWER)]
    assert "error: the message is not valid UTF-8 text: byte 0xe9 at character 3" in err
    assert "Traceback" not in err


def test_chat_bad_system_prompt_is_one_line_before_loading(folders, capsys, monkeypatch):
    for system, message in (("\udcff", "--system is not valid UTF-8 text: byte 0xff"),
                            ("", "--system is empty")):
        code, out, err = chat_run(folders["text"], "hi\n", capsys, monkeypatch,
                                  "--system", system)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert "loaded" not in err


def test_chat_unknown_slash_word_is_not_sent_and_double_slash_sends_it(folders, tok, capsys,
                                                                        monkeypatch):
    prompts = []

    def record(prompt, *a, **kw):
        prompts.append(prompt)
        return real(prompt, *a, **kw)

    real = chat.generate_stream
    monkeypatch.setattr(chat, "generate_stream", record)
    code, out, err = chat_run(folders["text"], "/unknown-command\n /rest \n//etc\n"
                              "/usr/bin is a folder\n//quit\n/quit\n", capsys, monkeypatch)
    assert code == 0, err
    for word in ("/unknown-command", "/rest"):
        assert (f"{word}: not a command, not sent; commands: /reset, /quit (to send a line "
                "starting with '/', begin it with '//')") in err
    # Sent: '//etc' as "/etc", then a line of several words (the answer is added to the chat).
    assert [tok.decode(p) for p in prompts[:2]] == [
        tok.decode(tok.encode_chat([{"role": "user", "content": "/etc"}])),
        tok.decode(tok.encode_chat([{"role": "user", "content": "/etc"},
                                    {"role": "assistant", "content": expected(tok, ANSWER)},
                                    {"role": "user", "content": "/usr/bin is a folder"}]))]
    assert len(prompts) == 3 and tok.decode(prompts[2]).endswith("/quit")  # sent, not obeyed
    assert out.splitlines() == [expected(tok, ANSWER)] * 3


def test_chat_parse_line_and_turn_seed():
    assert chat.parse_line("  ") == ("skip", "")
    assert chat.parse_line(" /reset ") == ("command", "/reset")
    assert chat.parse_line("/rest") == ("unknown", "/rest")
    assert chat.parse_line("/") == ("unknown", "/")
    assert chat.parse_line("//reset") == ("send", "/reset")
    assert chat.parse_line("/a b") == ("send", "/a b")
    assert chat.turn_seed(5, 2) == 7
    assert chat.turn_seed(2**63 - 1, 1) == -(2**63)  # wraps inside the seed range


def test_chat_max_tokens_must_leave_room_for_a_one_token_message(folders, tok, capsys,
                                                                 monkeypatch):
    shortest = len(tok.encode_chat([{"role": "user", "content": "a"}]))
    with_system = len(tok.encode_chat([{"role": "user", "content": "a"}], system="Be brief."))
    assert with_system > shortest
    for extra, most in (([], MAX_SEQ_LEN - shortest),
                        (["--system", "Be brief."], MAX_SEQ_LEN - with_system)):
        code, out, err = chat_run(folders["text"], "a\n", capsys, monkeypatch,
                                  "--max-tokens", most + 1, *extra)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"--max-tokens {most + 1} leaves no room for a message" in err
        assert f"use at most {most}" in err and "loaded" not in err
        code, out, err = chat_run(folders["text"], "a\n", capsys, monkeypatch,
                                  "--max-tokens", most, *extra)
        assert code == 0 and out.splitlines() == [expected(tok, ANSWER)], err
        assert "error" not in err
    code, out, err = chat_run(folders["text"], "a\n", capsys, monkeypatch,
                              "--system", "word " * 300)
    assert code == 2 and "shorten --system" in err and "loaded" not in err


def test_chat_says_when_an_answer_is_cut_at_the_context(folders, tok, capsys, monkeypatch):
    answer_len = len(tok.encode(ANSWER, bos=False))
    n = 1
    while len(tok.encode_chat([{"role": "user", "content": "word " * n}])) < MAX_SEQ_LEN - 4:
        n += 1
    room = MAX_SEQ_LEN - len(tok.encode_chat([{"role": "user", "content": "word " * n}]))
    assert 0 < room < answer_len  # the answer cannot end within the context
    code, out, err = chat_run(folders["text"], f"{'word ' * n}\n", capsys, monkeypatch)
    assert code == 0, err
    assert out == tok.decode(tok.encode(ANSWER, bos=False)[:room]) + "\n"
    assert (f"(answer cut at the model's context of {MAX_SEQ_LEN} tokens; /reset starts a new "
            "conversation)") in err
    code, out, err = chat_run(folders["text"], "hello\n", capsys, monkeypatch)
    assert code == 0 and "answer cut" not in err  # ended by eos


# ----------------------------------------------------------------------------- chunked prefill


@pytest.fixture(scope="module")
def windowed_folder(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> Path:
    """A random dense model with a sliding window of 8 and no max_seq_len."""
    args = tiny_args(n_layers=2, vocab_size=tok.n_words, sliding_window=8)
    folder = write_mistral_folder(tmp_path_factory.mktemp("windowed") / "w", args,
                                  random_mistral_state(args, seed=9))
    shutil.copy(V3, folder / "tokenizer.model.v3")
    return folder


LONG_PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the mat"


def spy_chunks(monkeypatch) -> list[tuple[int, int]]:
    """Record (prompt columns T, chunk_size) of every prefill."""
    gen = importlib.import_module("mistral_jax.generate")
    seen = []
    real = gen.prefill_jit

    def spy(params, tokens, *a, **kw):
        seen.append((tokens.shape[1], kw["chunk_size"]))
        return real(params, tokens, *a, **kw)

    monkeypatch.setattr(gen, "prefill_jit", spy)
    return seen


def test_auto_chunk_size_rule():
    assert cli.auto_chunk_size(tiny_args(), 4096) is None
    assert cli.auto_chunk_size(tiny_args(), 4097) == cli.AUTO_CHUNK_LIMIT == 4096
    assert cli.auto_chunk_size(tiny_args(sliding_window=256), 256) is None
    assert cli.auto_chunk_size(tiny_args(sliding_window=256), 257) == 256
    assert cli.auto_chunk_size(tiny_args(sliding_window=(6, None)), 7) == 6
    assert cli.auto_chunk_size(tiny_args(sliding_window=8192), 5000) == 4096


def test_sample_prefills_a_long_prompt_in_window_sized_chunks(windowed_folder, tok, capsys,
                                                              monkeypatch):
    prompt = tok.encode(LONG_PROMPT, bos=True)
    assert 16 < len(prompt) <= 32  # prompt bucket 32: 4 chunks of the window, 8
    seen = spy_chunks(monkeypatch)
    argv = ["--ckpt", windowed_folder, "--prompt", LONG_PROMPT, "--dtype", "float32"]
    chunked, out, _ = sample_ids(argv, capsys, monkeypatch)
    assert seen == [(32, 8)]
    whole, whole_out, _ = sample_ids([*argv, "--chunk-size", "1000"], capsys, monkeypatch)
    assert seen[1:] == [(32, 32)]  # --chunk-size beyond the prompt: one chunk
    assert chunked == whole and out == whole_out and len(chunked) == N_TOKENS
    model = Transformer.from_folder(windowed_folder, dtype="float32")
    assert chunked == generate([prompt], model, max_tokens=N_TOKENS, eos_id=2)[0][0]
    del seen[:]
    sample_ids([*argv, "--chunk-size", "5"], capsys, monkeypatch)
    assert seen == [(35, 5)]
    sample_ids(["--ckpt", windowed_folder, "--prompt", "The cat", "--dtype", "float32"], capsys,
               monkeypatch)
    assert seen[1:] == [(16, 16)]  # a short prompt: at once, as before


def test_chat_prefills_a_long_message_in_chunks(windowed_folder, tok, capsys, monkeypatch):
    seen = spy_chunks(monkeypatch)
    argv = ["--temperature", "0", "--max-tokens", N_TOKENS, "--dtype", "float32"]
    code, chunked, err = chat_run(windowed_folder, f"{LONG_PROMPT}\n", capsys, monkeypatch, *argv)
    assert code == 0, err
    assert seen == [(32, 8)]
    code, whole, err = chat_run(windowed_folder, f"{LONG_PROMPT}\n", capsys, monkeypatch, *argv,
                                "--chunk-size", "64")
    assert code == 0, err
    assert seen[1:] == [(32, 32)] and chunked == whole


def test_full_attention_model_chunks_beyond_the_limit(random_folders, tok, capsys, monkeypatch):
    monkeypatch.setattr(cli, "AUTO_CHUNK_LIMIT", 16)
    seen = spy_chunks(monkeypatch)
    sample_ids(["--ckpt", random_folders["dense"], "--prompt", LONG_PROMPT], capsys, monkeypatch)
    assert seen == [(32, 16)]


OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes."


def test_out_of_memory_is_one_line_suggesting_a_smaller_chunk_size(folders, tok, capsys,
                                                                   monkeypatch):
    import jax

    def oom(*a, **kw):
        raise jax.errors.JaxRuntimeError(f"{OOM}\nBufferAssignment OOM Debugging.\n...")

    monkeypatch.setattr(cli, "timed_generate", oom)
    code, out, err = run_main(sample.main, ["--ckpt", folders["text"], "--prompt", "hi"], capsys)
    assert code == 2 and out == ""
    assert err.splitlines()[-1] == (
        f"error: out of memory ({OOM}): prefill a long prompt in smaller pieces with a lower "
        "--chunk-size, or lower --max-tokens or the prompt's length")
    assert "Traceback" not in err

    def other(*a, **kw):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(cli, "timed_generate", other)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        sample.main(["--ckpt", str(folders["text"]), "--prompt", "hi"])


def test_chat_out_of_memory_ends_the_turn_not_the_chat(folders, tok, capsys, monkeypatch):
    import jax

    calls = []

    def first_fails(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise jax.errors.JaxRuntimeError(OOM)
        return real(*a, **kw)

    real = chat.generate_stream
    monkeypatch.setattr(chat, "generate_stream", first_fails)
    code, out, err = chat_run(folders["text"], "hello\nhello\n/quit\n", capsys, monkeypatch)
    assert code == 0, err
    assert out.splitlines() == [expected(tok, ANSWER)]
    assert f"error: out of memory ({OOM})" in err and "--chunk-size" in err


def test_ids_past_the_tokenizer_in_a_padded_vocabulary_are_never_sampled(tmp_path, tok, capsys,
                                                                          monkeypatch):
    """A model whose vocab_size is padded past its tokenizer (fine-tunes ship 32002 rows over
    a 32000-token tokenizer.model): the scripted model ranks a padded id first after the
    prompt, which sample and chat used to emit and then die decoding (IndexError). They
    now sample among the tokenizer's ids only and print the best decodable one."""
    args = tiny_args(n_layers=1, vocab_size=tok.n_words + 8, max_seq_len=MAX_SEQ_LEN)
    prompt_last = tok.encode("The cat", bos=True)[-1]
    inst = tok._raw.get_special_token("[/INST]")
    best = tok.encode("blue", bos=False)[0]
    padded = tok.n_words + 3
    table = {prompt_last: padded, inst: padded, best: tok.eos_id}
    state = scripted_state(args, table)
    for j, src in enumerate(sorted(table)):  # second best after the prompt: a decodable id
        if table[src] == padded:
            state["output.weight"][best, j] = 5.0
    folder = write_mistral_folder(tmp_path / "padded", args, state)
    shutil.copy(V3, folder / "tokenizer.model.v3")
    model = Transformer.from_folder(folder, dtype="float32")
    assert generate([tok.encode("The cat", bos=True)], model, max_tokens=1)[0] == [[padded]]

    code, out, err = run_main(sample.main, ["--ckpt", folder, "--prompt", "The cat",
                                            "--max-tokens", "4"], capsys)
    assert code == 0, err
    assert out.splitlines() == [
        "The cat" + sample.continuation(tok.encode("The cat", bos=True), [best], tok)]
    code, out, err = chat_run(folder, "hello\n", capsys, monkeypatch, "--max-tokens", "4")
    assert code == 0 and "Traceback" not in err, err
    assert tok.decode([best]) in out
