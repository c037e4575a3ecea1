"""Prometheus metrics. vLLM's own `vllm:*` metrics share the default registry and come along."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "alignd_requests_total", "HTTP requests by final outcome (499: the client went away)",
    ["endpoint", "decoder", "status"],
)
TOKENS = Counter("alignd_generated_tokens_total", "completion tokens generated", ["decoder"])
LATENCY = Histogram(
    "alignd_request_seconds",
    "time from request to last byte",
    ["decoder"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
IN_FLIGHT = Gauge("alignd_requests_in_flight", "requests being served now")
SAMPLES_IN_FLIGHT = Gauge("alignd_samples_in_flight", "sequences of the requests being served now")
GUIDE_BUDGET_IN_USE = Gauge(
    "alignd_guide_budget_in_use", "guide tokens per engine step held by the guided requests running now"
)
GUIDE_BUDGET_WAITING = Gauge("alignd_guide_budget_waiting", "requests waiting for room in the per-step guide budget")
# From the engine worker, as last read (never waited for).
GUIDED_ROWS_WAITING = Gauge("alignd_guided_rows_waiting",
                            "guided sequences held out of the last step (their turn in the guide budget, or preempted)")
GUIDE_STATES = Gauge("alignd_guide_states", "per-request guide caches held in the worker")
GUIDED_STEPS = Gauge("alignd_guided_steps", "engine steps that ran a guided decoder (since start)")
GUIDED_STEP_SECONDS = Gauge(
    "alignd_guided_step_seconds", "time spent in guided decoder steps inside the engine (since start)"
)
MAX_GUIDED_STEP_SECONDS = Gauge("alignd_max_guided_step_seconds", "the longest guided decoder step (since start)")
GUIDE_TOKENS = Gauge("alignd_guide_tokens", "guide tokens run in guided decoder steps (since start)")
MAX_STEP_GUIDE_TOKENS = Gauge("alignd_max_step_guide_tokens", "the most guide tokens one step ran (since start)")
GUIDE_FAILURES = Gauge("alignd_guide_failures", "rows a guide failed on (since start)", ["guide"])


def observe_worker(stats: dict) -> None:
    GUIDE_STATES.set(stats["guide_states"])
    GUIDED_ROWS_WAITING.set(stats["guided_rows_waiting"])
    GUIDED_STEPS.set(stats["guided_steps"])
    GUIDED_STEP_SECONDS.set(stats["guided_step_seconds"])
    MAX_GUIDED_STEP_SECONDS.set(stats["max_guided_step_seconds"])
    GUIDE_TOKENS.set(stats["guide_tokens"])
    MAX_STEP_GUIDE_TOKENS.set(stats["max_step_guide_tokens"])
    for guide, rows in stats["guide_failures"].items():
        GUIDE_FAILURES.labels(guide).set(rows)
