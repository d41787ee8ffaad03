"""Prometheus metrics of the server (`GET /metrics`), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0)


class Metrics:
    """Counters, gauges and histograms; the engine thread and the HTTP side both write."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "mistral_jax_"
        self.requests = Counter(f"{p}requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.finishes = Counter(f"{p}request_finish", "Generations ended, by finish reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens of ended generations",
                                     registry=r)
        self.completion_tokens = Counter(f"{p}completion_tokens", "Tokens generated",
                                         registry=r)
        self.running = Gauge(f"{p}requests_running", "Requests holding a slot", registry=r)
        self.waiting = Gauge(f"{p}requests_waiting", "Requests queued for a slot", registry=r)
        self.ttft = Histogram(f"{p}time_to_first_token_seconds",
                              "From arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{p}inter_token_latency_seconds",
                             "Between two tokens of one request", buckets=LATENCY_BUCKETS,
                             registry=r)

    def finished(self, req, reason: str) -> None:
        self.finishes.labels(reason).inc()
        self.prompt_tokens.inc(len(req.prompt))
        self.completion_tokens.inc(len(req.output))

    def render(self) -> bytes:
        return generate_latest(self.registry)
