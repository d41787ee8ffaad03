"""What `sample`, `chat` and `demo` share: flags, up-front validation, model loading, timing.

Each command is `main(argv) -> exit status`, run through `run`, which turns every
`MistralJaxError` (and every argparse error) into one line `error: ...` on stderr and
exit status 2, with no traceback. Everything a user can get wrong is checked before
the weights are read: sampling values, dtype, prompts, the tokenizer, and that the
prompts plus `--max-tokens` fit the model's context.

Informational lines (load time, compile time, tokens/s) go to stderr, so stdout
holds only what the model wrote.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mistral_jax.args import ModelArgs

# The commands use these as cli.X (tests patch them there): re-exported explicitly.
from mistral_jax.cli.timing import CompileTimer as CompileTimer
from mistral_jax.cli.timing import GenStats as GenStats
from mistral_jax.cli.timing import compile_notices as compile_notices
from mistral_jax.cli.timing import log as log
from mistral_jax.cli.timing import log_stats as log_stats
from mistral_jax.cli.timing import timed_generate as timed_generate
from mistral_jax.config import load_args
from mistral_jax.dtypes import DTYPES
from mistral_jax.errors import MistralJaxError, TokenizerError, UserInputError
from mistral_jax.generate import check_fits
from mistral_jax.interrupts import exit_status
from mistral_jax.mesh import initialize_distributed, make_mesh
from mistral_jax.quantize import MODES, is_quantized
from mistral_jax.sampling import check_seed, make_strategy
from mistral_jax.tokenizer import Tokenizer, check_utf8, load_tokenizer, tokenizer_files
from mistral_jax.transformer import Transformer
from mistral_jax.tree import flatten

EXIT_USER_ERROR = 2
COMPILE_CACHE_ENV = "MISTRAL_JAX_COMPILE_CACHE"  # a folder, or 'off'
# Prompts longer than this (or than the model's smallest sliding window) are prefilled in
# chunks of that many tokens unless --chunk-size says otherwise (see `auto_chunk_size`).
AUTO_CHUNK_LIMIT = 4096


# ----------------------------------------------------------------------------- flags


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises `UserInputError` (one line, exit 2, via `run`)."""

    def error(self, message: str):  # type: ignore[override]
        raise UserInputError(f"{message} (see {self.prog} --help)")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--ckpt, --tokenizer, --dtype, --lora, --quantize, --mesh, --compile-cache (+ multi-host
    flags): which model to load and how (see `load_model`)."""
    parser.add_argument(
        "--ckpt", metavar="DIR", type=Path, default=None,
        help="model folder: Mistral layout (params.json + consolidated.safetensors), "
        "Hugging Face layout (config.json + *.safetensors) or a mistral-jax-convert output; "
        "default: the small built-in demo model")
    parser.add_argument(
        "--tokenizer", metavar="PATH", type=Path, default=None,
        help="tokenizer file or folder (default: the one in --ckpt)")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
        help="dtype of the weights and KV cache; auto (default): float32 on a CPU, where "
        "XLA computes bfloat16 through float32 copies of the weights (slower and no smaller), "
        "bfloat16 on GPUs and TPUs (dtypes.auto_dtype)")
    parser.add_argument(
        "--lora", metavar="PATH", type=Path, default=None,
        help="LoRA adapter (mistral-finetune lora.safetensors, or a peft adapter folder), "
        "merged into the weights at load; kept unmerged (applied beside them) when the "
        "model folder's params.json has a lora block, as in mistral-inference")
    parser.add_argument(
        "--quantize", default=None, choices=list(MODES),
        help="quantize the attention and feed-forward weights as they load (weight-only; "
        "compressed-tensors fp8/int8 checkpoints are loaded quantized without this flag)")
    parser.add_argument(
        "--mesh", metavar="SPEC", default=None,
        help="shard the model over several devices: 'data=1,tensor=4,expert=2' (sizes "
        "multiply to the device count, absent axes are 1) or 'auto' (every device along "
        "tensor); default: one device")
    parser.add_argument(
        "--coordinator", metavar="HOST:PORT", default=None,
        help="multi-host: address of process 0 (else $JAX_COORDINATOR_ADDRESS); run the "
        "same command on every host")
    parser.add_argument(
        "--compile-cache", metavar="DIR", type=Path, default=None,
        help="JAX's persistent compilation cache, so that a second start skips most "
        f"compilation (default: ${COMPILE_CACHE_ENV}, else ~/.cache/mistral_jax/"
        "jax_compilation_cache)")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help=f"do not read or write it (or set {COMPILE_CACHE_ENV}=off)")
    parser.add_argument("--num-processes", metavar="N", type=int_at_least(1), default=None,
                        help="multi-host: number of processes (else $JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", metavar="I", type=int_at_least(0), default=None,
                        help="multi-host: this process, 0..N-1 (else $JAX_PROCESS_ID)")


def add_sampling_flags(parser: argparse.ArgumentParser, *, max_tokens: int | None,
                       temperature: float | None, max_tokens_help: str | None = None,
                       temperature_help: str | None = None, top_p: float | None = 1.0,
                       top_p_help: str | None = None) -> None:
    """--max-tokens, --temperature, --top-p, --top-k, --seed (checked by `check_sampling`).

    A None default means "the command decides" (sample: by model); the command then says
    what it chose in `temperature_help` / `top_p_help`."""
    parser.add_argument("--max-tokens", type=int_at_least(1), default=max_tokens,
                        help=max_tokens_help or
                        f"most tokens generated per answer (default: {max_tokens})")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=temperature_help or f">= 0; 0 is greedy (default: {temperature})")
    parser.add_argument("--top-p", type=float, default=top_p,
                        help=top_p_help or "nucleus sampling mass, in (0, 1] (default: 1, off)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample among the k most likely tokens, k >= 1 (default: off)")
    parser.add_argument("--seed", type=int, default=0,
                        help="PRNG seed, an integer in [-2**63, 2**63) (default: 0)")


def add_chunk_flag(parser: argparse.ArgumentParser) -> None:
    """--chunk-size (see `chunk_size_for`)."""
    parser.add_argument(
        "--chunk-size", metavar="N", type=int_at_least(1), default=None,
        help="prefill the prompt through the KV cache N tokens at a time, which bounds the "
        "memory of long prompts (default: a prompt longer than "
        f"{AUTO_CHUNK_LIMIT} tokens, or than the model's smallest sliding window if that is "
        "less, goes in chunks of that many tokens; a shorter one at once)")


def auto_chunk_size(args: ModelArgs, prompt_len: int) -> int | None:
    """The default --chunk-size: None (the prompt at once) for a prompt of at most
    min(AUTO_CHUNK_LIMIT, smallest sliding window) tokens, else that bound.

    Unchunked, prefill's attention builds [T, T] scores per head (34 GB for a 22.5k-token
    chat on the demo model); a chunk of C tokens attends over the cache plus itself, [C,
    S + C] with S the window on windowed layers. mistral-inference's `generate` prefills
    in one chunk unless given a chunk_size; this bounds the memory of long prompts only.
    """
    windows = [w for w in args.layer_windows if w is not None]
    limit = min([AUTO_CHUNK_LIMIT, *windows])
    return limit if prompt_len > limit else None


def chunk_size_for(ns: argparse.Namespace, args: ModelArgs,
                   prompts: Sequence[Sequence[int]]) -> int | None:
    """The chunk_size to prefill `prompts` with: --chunk-size, else `auto_chunk_size`."""
    if getattr(ns, "chunk_size", None) is not None:
        return ns.chunk_size
    return auto_chunk_size(args, max(len(p) for p in prompts))


def check_sampling(ns: argparse.Namespace) -> None:
    """Raise UserInputError for a temperature < 0, top_p outside (0, 1], top_k < 1 or a
    seed outside [-2**63, 2**63)."""
    make_strategy(ns.temperature, ns.top_p, ns.top_k)
    check_seed(ns.seed)


def sampling_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `generate` set by the sampling flags."""
    return dict(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                top_k=ns.top_k, seed=ns.seed)


def check_text(text: str, flag: str) -> str:
    """A prompt given on the command line: UTF-8 text (see `check_utf8`), not empty or only
    whitespace."""
    check_utf8(text, flag)
    if not text.strip():
        raise UserInputError(f"{flag} is empty: give a non-empty text")
    return text


# ----------------------------------------------------------------------------- the model


def demo_model_folder() -> Path:
    """Where the built-in demo model ships inside the package (may be absent)."""
    return Path(str(importlib.resources.files("mistral_jax").joinpath("demo_model")))


def resolve_ckpt(ns: argparse.Namespace) -> Path:
    """--ckpt, or the built-in demo model when it is omitted (said so on stderr)."""
    if ns.ckpt is not None:
        return ns.ckpt
    folder = demo_model_folder()
    if not (folder / "params.json").is_file():
        raise UserInputError(
            f"no --ckpt given and the built-in demo model is not installed ({folder} has no "
            "params.json): pass --ckpt DIR with a model folder")
    log(f"no --ckpt given: running the built-in demo model ({folder}), a tiny model "
        "trained on Python docstrings")
    return folder


def prepare(ns: argparse.Namespace) -> tuple[Path, ModelArgs, Tokenizer]:
    """Folder, args and tokenizer of the requested model, without reading any weight.

    Joins a multi-host run first (before anything touches a device) when asked to.
    """
    initialize_distributed(getattr(ns, "coordinator", None), getattr(ns, "num_processes", None),
                           getattr(ns, "process_id", None))
    if getattr(ns, "mesh", None) not in (None, "auto"):
        try:  # the spec and the device count, before anything is read; from_folder takes it
            ns.mesh = make_mesh(ns.mesh)
        except UserInputError as e:
            raise UserInputError(f"--mesh: {e}") from None
    folder = resolve_ckpt(ns)
    args, _ = load_args(folder)
    tok_path = ns.tokenizer if ns.tokenizer is not None else folder
    try:
        tok = load_tokenizer(tok_path)
    except TokenizerError as e:
        if ns.tokenizer is not None:
            raise
        raise TokenizerError(f"{e}; pass --tokenizer PATH") from None
    if tok.n_words > args.vocab_size:
        others = ([] if ns.tokenizer is not None or not Path(folder).is_dir()
                  else [f.name for f in tokenizer_files(Path(folder)) if f != Path(tok.path)])
        hint = (f"; this folder also has {', '.join(others)}: pass --tokenizer PATH to use it"
                if others else "")
        raise TokenizerError(
            f"tokenizer {tok.path} has {tok.n_words} tokens but the model in {folder} has "
            f"vocab_size={args.vocab_size}: they do not belong together{hint}")
    return folder, args, tok


def check_lengths(prompts: Sequence[Sequence[int]], max_tokens: int, args: ModelArgs,
                  names: Sequence[str]) -> None:
    """Each prompt plus --max-tokens must fit the model's context (when the folder states
    it), checked before the weights load (`generate.check_fits`)."""
    for ids, name in zip(prompts, names):
        check_fits(len(ids), max_tokens, args.max_seq_len, name, max_tokens_name="--max-tokens")


def load_model(ns: argparse.Namespace, folder: Path) -> Transformer:
    """Read the weights of `folder` as the flags ask (progress bar, then the load time).

    Also turns on the persistent compilation cache unless --no-compile-cache.
    """
    if not getattr(ns, "no_compile_cache", True):
        enable_compilation_cache(ns.compile_cache)
    kwargs: dict[str, Any] = dict(dtype=ns.dtype, progress=True)
    # Flags that change loading go here, each one line.
    kwargs["mesh"] = getattr(ns, "mesh", None)
    kwargs["lora_path"] = getattr(ns, "lora", None)
    kwargs["quantize"] = getattr(ns, "quantize", None)
    model = Transformer.from_folder(folder, **kwargs)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
    log(f"loaded {folder} ({n_params / 1e6:.1f}M parameters, "
        f"{weight_format(model.params, model.dtype)}) in {model.load_seconds:.2f} s")
    return model


QUANTIZED_NAMES = {"int8": "int8", "float8_e4m3fn": "fp8"}


def weight_format(params: Any, dtype: Any) -> str:
    """How the weights are stored, for the load line: 'bfloat16', or for quantized
    weights (--quantize, or a quantized checkpoint) e.g. 'int8 weights, bfloat16
    activations' ('... weights and activations' where the checkpoint quantizes inputs too)."""
    flat = flatten(params)
    stored = sorted({QUANTIZED_NAMES.get(str(x.dtype), str(x.dtype))
                     for x in flat.values() if is_quantized(x)})
    if not stored:
        return str(np.dtype(dtype))
    quant = "/".join(stored)
    if any(path[-1].endswith("input_scale") for path in flat):
        return f"{quant} weights and activations, {np.dtype(dtype)} elsewhere"
    return f"{quant} weights, {np.dtype(dtype)} activations"


# ----------------------------------------------------------------------------- compile cache


def default_cache_dir() -> Path:
    """$MISTRAL_JAX_COMPILE_CACHE, else ~/.cache/mistral_jax/jax_compilation_cache (or
    under $XDG_CACHE_HOME)."""
    env = os.environ.get(COMPILE_CACHE_ENV)
    if env and env != "off":
        return Path(env).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mistral_jax" / "jax_compilation_cache"


def enable_compilation_cache(cache_dir: str | Path | None = None,
                             min_compile_secs: float | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache (entry points call this, not the library).

    Compiled programs are written to `cache_dir` (default `default_cache_dir()`) and
    read back by later processes, so a second start of the same model and shapes skips
    most compilation. Programs that compiled in under `min_compile_secs` are not stored
    (None: JAX's setting, 1 s unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says
    otherwise). With no `cache_dir`, $JAX_COMPILATION_CACHE_DIR wins if set, and
    $MISTRAL_JAX_COMPILE_CACHE=off turns the cache off (returns None).
    """
    if cache_dir is None:
        if os.environ.get(COMPILE_CACHE_ENV) == "off":
            return None
        if jax.config.jax_compilation_cache_dir:
            return Path(jax.config.jax_compilation_cache_dir)
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"compilation cache {path}: cannot create it ({e.strerror or e})") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if min_compile_secs is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return path


# ----------------------------------------------------------------------------- generating


def decodable_ids(tok: Tokenizer, args: ModelArgs) -> int | None:
    """`generate`'s vocab_limit for a model and its tokenizer: the tokenizer's size where the
    model's vocabulary is padded past it (ids the tokenizer cannot decode), else None."""
    return tok.n_words if tok.n_words < args.vocab_size else None


# ----------------------------------------------------------------------------- running


def out_of_memory(e: BaseException) -> str | None:
    """For XLA's out-of-memory error (a JaxRuntimeError saying RESOURCE_EXHAUSTED or Out of
    memory), one line saying so and what to lower; None for any other error."""
    text = str(e)
    if not isinstance(e, jax.errors.JaxRuntimeError) or not (
            "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()):
        return None
    first = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return (f"out of memory ({first}): prefill a long prompt in smaller pieces with a lower "
            "--chunk-size, or lower --max-tokens or the prompt's length")


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None) -> int:
    """Run a command; a MistralJaxError, or running out of device memory, becomes one line
    `error: ...` on stderr and exit status 2."""
    try:
        return main(argv) or 0
    except MistralJaxError as e:
        message = " ".join(str(e).split())
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except jax.errors.JaxRuntimeError as e:
        message = out_of_memory(e)
        if message is None:
            raise
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:  # in-process; a command ends at once (interrupts.install)
        print(file=sys.stderr)
        return exit_status(e)
