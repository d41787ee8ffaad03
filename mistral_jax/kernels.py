"""Kernel choice as a value: which implementation each hot spot of the model runs.

    kernels = Kernels(moe="pallas")                       # frozen, hashable: static under jit
    model = Transformer.from_folder(path, kernels=kernels)
    logits, cache = forward(params, tokens, positions, cache, args=args, kernels=kernels)

Each field is 'auto' or a named implementation; 'auto' is resolved while tracing from static
facts only (backend, dtype, shapes), by the defaults measured in BENCHMARKS.md:
- attention: 'auto' (cuDNN for a bfloat16/float16 prefill on GPUs, else the reference
  einsums), 'reference', 'xla' or 'cudnn' (the fused `jax.nn.dot_product_attention`).
- moe (the decode path of a MoE layer): 'auto' (tiled on the CPU for float32/int8 experts,
  the Pallas kernel on GPUs for bfloat16/float16/float32 experts, else 'xla', XLA's
  gather), 'xla', 'tiled', 'pallas' or 'pallas-interpret'.
- grouped (the prefill / batched-decode path of a MoE layer, N*k > E): 'auto' (the Pallas
  grouped matmul on GPUs, else 'scan'), 'scan' (`moe_paths.moe_grouped`, a scan over
  row blocks), 'ragged' (`jax.lax.ragged_dot`), 'pallas' or 'pallas-interpret'
  (`moe_gmm.moe_gmm`).
- qmatmul (int8/fp8 weight-only matmuls of few rows): 'auto' (= 'xla'), 'xla', 'pallas' or
  'pallas-interpret'. 'pallas-interpret' runs a Pallas kernel in the interpreter (any backend).

The environment variables MISTRAL_JAX_ATTENTION, MISTRAL_JAX_MOE_KERNEL, MISTRAL_JAX_MOE_GROUPED
and MISTRAL_JAX_QMATMUL
give the default (`default_kernels`), read once when this module is imported; nothing reads
the environment while a function is traced.
"""

from __future__ import annotations

import dataclasses
import os

from mistral_jax.errors import UserInputError

CHOICES = {
    "attention": ("auto", "reference", "xla", "cudnn"),
    "moe": ("auto", "xla", "tiled", "pallas", "pallas-interpret"),
    "grouped": ("auto", "scan", "ragged", "pallas", "pallas-interpret"),
    "qmatmul": ("auto", "xla", "pallas", "pallas-interpret"),
}
ENV = {"attention": "MISTRAL_JAX_ATTENTION", "moe": "MISTRAL_JAX_MOE_KERNEL",
       "grouped": "MISTRAL_JAX_MOE_GROUPED", "qmatmul": "MISTRAL_JAX_QMATMUL"}
_ENV_AT_IMPORT = {field: os.environ.get(name) for field, name in ENV.items()}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which implementation runs where (see the module docstring); UserInputError for a
    value that is not one of `CHOICES[field]`."""

    attention: str = "auto"
    moe: str = "auto"
    qmatmul: str = "auto"
    grouped: str = "auto"

    def __post_init__(self):
        for field, choices in CHOICES.items():
            value = getattr(self, field)
            if value not in choices:
                raise UserInputError(f"kernels {field}={value!r}: expected one of {choices}")


def kernels_from_env(environ: dict[str, str | None]) -> Kernels:
    """Kernels from MISTRAL_JAX_* values (unset: 'auto'); UserInputError naming the variable."""
    values = {}
    for field, name in ENV.items():
        value = (environ.get(name) or "auto").lower()
        if value not in CHOICES[field]:
            raise UserInputError(f"{name}={value!r}: expected one of {CHOICES[field]}")
        values[field] = value
    return Kernels(**values)


def default_kernels() -> Kernels:
    """The default: the MISTRAL_JAX_* environment variables as they were at import, else 'auto'."""
    return kernels_from_env(_ENV_AT_IMPORT)
