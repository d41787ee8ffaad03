"""Test-wide settings: the CLI's persistent compilation cache stays off in tests (so no
test writes under ~/.cache), except where a test names a cache folder itself."""

import os

os.environ.setdefault("MISTRAL_JAX_COMPILE_CACHE", "off")
