"""Prometheus metrics. vLLM's own `vllm:*` metrics share the default registry and come along."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("alignd_requests_total", "HTTP requests served", ["endpoint", "decoder", "status"])
TOKENS = Counter("alignd_generated_tokens_total", "completion tokens generated", ["decoder"])
LATENCY = Histogram(
    "alignd_request_seconds",
    "time from request to last byte",
    ["decoder"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
IN_FLIGHT = Gauge("alignd_requests_in_flight", "requests being served now")
GUIDE_STATES = Gauge("alignd_guide_states", "per-request guide caches held in the worker")
GUIDED_STEPS = Gauge("alignd_guided_steps", "engine steps that ran a guided decoder (since start)")
GUIDED_STEP_SECONDS = Gauge(
    "alignd_guided_step_seconds", "time spent in guided decoder steps inside the engine (since start)"
)


def observe_worker(stats: dict[str, float]) -> None:
    GUIDE_STATES.set(stats["guide_states"])
    GUIDED_STEPS.set(stats["guided_steps"])
    GUIDED_STEP_SECONDS.set(stats["guided_step_seconds"])
