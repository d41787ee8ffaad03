"""Compute dtypes by name: 'bfloat16', 'float32', 'float16' and 'auto'.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax.errors import UserInputError

DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32,
          "fp32": jnp.float32, "float16": jnp.float16, "fp16": jnp.float16}


def auto_dtype() -> str:
    """What dtype='auto' loads: float32 on the CPU backend, where XLA computes bfloat16
    through float32 copies of the weights (2x slower decode and no smaller: BENCHMARKS.md,
    "bfloat16 on the CPU"), bfloat16 on GPUs and TPUs."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """'bfloat16' / 'float32' / 'float16' / 'auto' (`auto_dtype`) or a dtype -> a numpy
    dtype; else UserInputError."""
    if isinstance(dtype, str):
        if dtype == "auto":
            dtype = auto_dtype()
        if dtype not in DTYPES:
            raise UserInputError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, "
                                 f"got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype is None:  # (numpy reads None as float64)
        raise UserInputError("dtype must be bfloat16, float16 or float32, got None")
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise UserInputError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}") from None
    if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16)):
        raise UserInputError(f"dtype must be bfloat16, float16 or float32, got {dt}")
    return dt
