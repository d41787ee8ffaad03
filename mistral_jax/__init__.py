"""mistral_jax: Mistral and Mixtral inference as pure JAX functions."""

import warnings

# First, before jax is imported (seconds): a command's Ctrl-C / SIGTERM / SIGHUP must end it
# then too. A library import changes no handler (see interrupts.started_as_command).
from mistral_jax import interrupts as _interrupts

_interrupts.install_if_command()

from mistral_jax.args import LoraArgs, ModelArgs, MoeArgs
from mistral_jax.cache import init_cache
from mistral_jax.config import load_args
from mistral_jax.errors import (
    CheckpointError,
    ConfigError,
    MistralJaxError,
    TokenizerError,
    UserInputError,
)
from mistral_jax.generate import generate, generate_stream
from mistral_jax.model import abstract_params, forward, init_params, logical_axes
from mistral_jax.tokenizer import Tokenizer, load_tokenizer
from mistral_jax.transformer import Transformer

__all__ = [
    "CheckpointError", "ConfigError", "LoraArgs", "MistralJaxError", "ModelArgs", "MoeArgs",
    "Tokenizer", "TokenizerError", "Transformer", "UserInputError", "abstract_params", "forward",
    "generate", "generate_stream", "init_cache", "init_params", "load_args", "load_tokenizer",
    "logical_axes",
]

# `python -m mistral_jax.sharding` (or .quant, .bench ...) runs a module imported above;
# runpy warns about that after this package is imported, before every such command.
warnings.filterwarnings("ignore", category=RuntimeWarning,
                        message=r"'mistral_jax\.\w+' found in sys\.modules after import of "
                                r"package 'mistral_jax'")
