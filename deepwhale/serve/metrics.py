"""Prometheus metrics of one server, in their own registry (prometheus-client).

Names follow Prometheus conventions (``_seconds``, ``_total``) and what vLLM users expect to
chart: request latency, time to first token and inter-token latency histograms; prompt and
generated token counters; requests by route and status; queue depth and running batch size
gauges read from the engine at scrape time.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """The server's metrics; ``engine`` supplies the gauges.

    Attributes (all in seconds or counts): ``request_latency`` (by route), ``ttft``, ``itl``,
    ``prompt_tokens``, ``generated_tokens``, ``requests`` (by route and HTTP status).
    """

    def __init__(self, engine_getter) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "deepwhale_request_latency_seconds",
            "End-to-end request latency.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "deepwhale_time_to_first_token_seconds",
            "Time from submission to the first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "deepwhale_inter_token_latency_seconds",
            "Time between consecutive streamed tokens.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "deepwhale_prompt_tokens_total", "Prompt tokens processed.", registry=r
        )
        self.generated_tokens = Counter(
            "deepwhale_generation_tokens_total", "Tokens generated.", registry=r
        )
        self.requests = Counter(
            "deepwhale_requests_total",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        queue = Gauge("deepwhale_queue_depth", "Requests waiting for a slot.", registry=r)
        queue.set_function(lambda: len(engine_getter().waiting))
        running = Gauge("deepwhale_running_sequences", "Sequences in the batch.", registry=r)
        running.set_function(lambda: len(engine_getter().running))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
