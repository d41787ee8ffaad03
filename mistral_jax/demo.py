"""`python -m mistral_jax.demo`: the command in `mistral_jax.cli.demo`."""

from mistral_jax.cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
