"""`python -m mistral_jax.sample`: the command in `mistral_jax.cli.sample`."""

from mistral_jax.cli.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
