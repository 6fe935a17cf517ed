"""The server's Prometheus metrics (prometheus-client) and the middleware that times every response.

Each :class:`ServerMetrics` owns a ``CollectorRegistry`` of its own, never the process-global
one, so several apps (the tests build many) count independently.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# generate_latest writes the classic text format; newer clients' CONTENT_TYPE_LATEST names 1.0.0.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
RATE_WINDOW_S = 10.0


class ServerMetrics:
    """The metrics of one server instance, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "softprompt_requests_total", "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status"), registry=registry)
        self.errors = Counter(
            "softprompt_errors_total", "Failed requests, by reason.", ("reason",),
            registry=registry)
        self.latency = Histogram(
            "softprompt_request_latency_seconds", "HTTP request latency, by endpoint.",
            ("endpoint",), buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_depth = Gauge(
            "softprompt_queue_depth", "Items waiting in the batching queue.", registry=registry)
        self.batch_size = Histogram(
            "softprompt_batch_size", "Items per batch taken from the queue (all kinds and tasks).",
            buckets=BATCH_BUCKETS, registry=registry)
        self.batch_tasks = Histogram(
            "softprompt_batch_tasks", "Distinct tasks per batch taken from the queue.",
            buckets=BATCH_BUCKETS, registry=registry)
        self.engine_seconds = Histogram(
            "softprompt_engine_call_seconds", "Duration of one engine call, by kind.",
            ("kind",), buckets=LATENCY_BUCKETS, registry=registry)
        self.items = Counter(
            "softprompt_items_total", "Inputs processed by the engine, by kind.", ("kind",),
            registry=registry)
        self.running_sequences = Gauge(
            "softprompt_running_sequences", "Generations the engine is running now.",
            registry=registry)
        self.waiting_sequences = Gauge(
            "softprompt_waiting_sequences", "Generations queued, not yet running.",
            registry=registry)
        self.generated_tokens = Counter(
            "softprompt_generated_tokens_total", "Tokens generated (all requests).",
            registry=registry)
        self.tokens_per_second = Gauge(
            "softprompt_tokens_per_second",
            f"Tokens generated per second over the last {RATE_WINDOW_S:g} seconds.",
            registry=registry)
        self.cancelled = Counter(
            "softprompt_cancelled_generations_total",
            "Generations dropped before finishing (client gone or timed out).", registry=registry)
        self.time_to_first_token = Histogram(
            "softprompt_time_to_first_token_seconds",
            "From a generation's arrival to its first token.", buckets=LATENCY_BUCKETS,
            registry=registry)
        self.time_per_output_token = Histogram(
            "softprompt_time_per_output_token_seconds",
            "Mean time between a generation's tokens after the first.", buckets=TOKEN_BUCKETS,
            registry=registry)
        self._token_times: deque[tuple[float, int]] = deque()
        self._token_lock = threading.Lock()
        self.tokens_per_second.set_function(self._recent_rate)
        self.model_loaded = Gauge(
            "softprompt_model_loaded", "1 once the model has loaded, else 0.", registry=registry)
        self.tasks = Gauge("softprompt_tasks", "Tasks currently loaded.", registry=registry)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Reads the queue depth from ``depth`` at every scrape, so it is never stale."""
        self.queue_depth.set_function(depth)

    def watch_sequences(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Reads the running and waiting generation counts at every scrape."""
        self.running_sequences.set_function(running)
        self.waiting_sequences.set_function(waiting)

    def count_tokens(self, count: int) -> None:
        """Adds generated tokens to the total and to the recent rate."""
        if count <= 0:
            return
        self.generated_tokens.inc(count)
        now = time.monotonic()
        with self._token_lock:
            self._token_times.append((now, count))
            self._forget_before(now - RATE_WINDOW_S)

    def _recent_rate(self) -> float:
        now = time.monotonic()
        with self._token_lock:
            self._forget_before(now - RATE_WINDOW_S)
            return sum(count for _, count in self._token_times) / RATE_WINDOW_S

    def _forget_before(self, moment: float) -> None:
        while self._token_times and self._token_times[0][0] < moment:
            self._token_times.popleft()

    def render(self) -> bytes:
        """Returns every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP response by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The route template (/v1/models/{name}), not the path: label values stay few.
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
