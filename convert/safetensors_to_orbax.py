"""`python -m convert.safetensors_to_orbax SRC DST ...` from a checkout: the converter
command, `mistral_jax.convert.main` (installed as `mistral-jax-convert`)."""

import sys

from mistral_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
