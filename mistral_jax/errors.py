"""Exceptions a user can act on: each names the file, tensor or parameter at fault."""

from __future__ import annotations


class MistralJaxError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MistralJaxError, ValueError):
    """A params.json / config.json that is missing, unreadable or inconsistent."""


class CheckpointError(MistralJaxError, ValueError):
    """A weights file that is missing, corrupt, or does not match the model's args."""


class TokenizerError(MistralJaxError, ValueError):
    """No tokenizer file in a folder, or a request the tokenizer cannot encode."""


class UserInputError(MistralJaxError, ValueError):
    """A bad argument from the user (sampling parameters, prompt lengths, dtype ...)."""
