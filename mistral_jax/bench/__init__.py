"""`python -m mistral_jax.bench`: prefill and decode speed, against the hardware's limits.

presets.py (model shapes), probes.py (bandwidth / FLOP/s probes and datasheet peaks),
costs.py (bytes per decode step, FLOPs per prefill), vs_transformers.py (the same weights
in PyTorch), run.py (the command). docs/design/benchmark.md has the details.
"""
