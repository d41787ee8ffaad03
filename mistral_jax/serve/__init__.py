"""An OpenAI-compatible server with continuous batching: `python -m mistral_jax.serve`.

engine.py (slots, the engine thread), device.py (its jitted programs), protocol.py
(request validation, response objects), api.py (FastAPI app), metrics.py (Prometheus).
"""
