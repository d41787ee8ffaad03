"""`python -m mistral_jax.chat`: the command in `mistral_jax.cli.chat`."""

from mistral_jax.cli.chat import main

if __name__ == "__main__":
    raise SystemExit(main())
