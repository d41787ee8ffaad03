"""`python -m mistral_jax.bench`."""

import sys

from mistral_jax.bench.run import main

sys.exit(main())
