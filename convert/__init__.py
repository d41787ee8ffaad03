"""Command-line converters. `python -m convert.safetensors_to_orbax SRC DST` (see mistral_jax.convert)."""
