"""Prometheus metrics written by hand in the text exposition format (version 0.0.4).

Three metric kinds, each thread-safe (the batcher's worker thread and the event loop both write):

* :class:`Counter`: a monotonically increasing value per label set (``*_total``).
* :class:`Gauge`: a value that goes up and down (queue depth, tasks loaded).
* :class:`Histogram`: cumulative ``_bucket{le=...}`` counts plus ``_sum`` and ``_count``.

A :class:`Registry` renders them all; :class:`ServerMetrics` is the set the server uses.
No ``prometheus_client`` dependency: the format is small and stable, see
https://prometheus.io/docs/instrumenting/exposition_formats/.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

LabelValues = tuple[str, ...]


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True))
    return "{" + pairs + "}"


class _Metric:
    """Shared bookkeeping: name, help text, label names, a lock."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: expected labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def header(self) -> list[str]:
        """Returns the ``# HELP`` and ``# TYPE`` lines."""
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class _ValueMetric(_Metric):
    """One float per label set: the shared state of counters and gauges."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {}
        if not self.label_names:
            self._values[()] = 0.0

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        """Returns the current value of one series (0 if never changed)."""
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels_text(self.label_names, key)} {_format_value(value)}"
                for key, value in items]


class Counter(_ValueMetric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Adds ``amount`` (>= 0) to the series named by ``labels``."""
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up (got {amount})")
        self._add(amount, labels)


class Gauge(_ValueMetric):
    """A value that can go up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        """Sets one series to ``value``."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Adds ``amount`` (may be negative) to one series."""
        self._add(amount, labels)


@dataclass
class _HistogramSeries:
    counts: list[int]
    total: float = 0.0
    count: int = 0


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with their sum and count.

    Args:
        name: Metric name (without ``_bucket``/``_sum``/``_count``).
        help_text: The ``# HELP`` text.
        buckets: Increasing finite upper bounds; ``+Inf`` is added.
        labels: Label names.
    """

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float],
                 labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        bounds = [float(bound) for bound in buckets]
        if not bounds or any(b >= a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
            raise ValueError(f"{name}: buckets must be non-empty and strictly increasing")
        if "le" in self.label_names:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        self.buckets = tuple(bounds)
        self._series: dict[LabelValues, _HistogramSeries] = {}
        if not self.label_names:
            self._series[()] = _HistogramSeries([0] * len(self.buckets))

    def observe(self, value: float, **labels: str) -> None:
        """Records one observation in the series named by ``labels``."""
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _HistogramSeries([0] * len(self.buckets))
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    series.counts[index] += 1
                    break
            series.total += value
            series.count += 1

    def snapshot(self, **labels: str) -> tuple[list[int], float, int]:
        """Returns ``(cumulative bucket counts, sum, count)`` of one series."""
        with self._lock:
            series = self._series.get(self._key(labels))
            if series is None:
                return [0] * len(self.buckets), 0.0, 0
            cumulative, running = [], 0
            for count in series.counts:
                running += count
                cumulative.append(running)
            return cumulative, series.total, series.count

    def render(self) -> list[str]:
        lines = []
        with self._lock:
            items = sorted((key, _HistogramSeries(list(s.counts), s.total, s.count))
                           for key, s in self._series.items())
        bucket_names = (*self.label_names, "le")
        for key, series in items:
            running = 0
            for bound, count in zip(self.buckets, series.counts, strict=True):
                running += count
                labels = _labels_text(bucket_names, (*key, _format_value(bound)))
                lines.append(f"{self.name}_bucket{labels} {running}")
            labels = _labels_text(bucket_names, (*key, "+Inf"))
            lines.append(f"{self.name}_bucket{labels} {series.count}")
            plain = _labels_text(self.label_names, key)
            lines.append(f"{self.name}_sum{plain} {_format_value(series.total)}")
            lines.append(f"{self.name}_count{plain} {series.count}")
        return lines


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> _Metric:
        """Adds ``metric``; its name must be new."""
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        """Returns every metric in the text exposition format."""
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.header())
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """The metrics of one server instance (one registry per app, so tests stay independent)."""

    def __init__(self) -> None:
        self.registry = Registry()
        add = self.registry.register
        self.requests = add(Counter(
            "softprompt_requests_total", "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status")))
        self.errors = add(Counter(
            "softprompt_errors_total", "Failed requests, by reason.", ("reason",)))
        self.latency = add(Histogram(
            "softprompt_request_latency_seconds", "HTTP request latency, by endpoint.",
            LATENCY_BUCKETS, ("endpoint",)))
        self.queue_depth = add(Gauge(
            "softprompt_queue_depth", "Items waiting in the batching queue."))
        self.batch_size = add(Histogram(
            "softprompt_batch_size", "Items per batch taken from the queue (all kinds and tasks).",
            BATCH_BUCKETS))
        self.batch_tasks = add(Histogram(
            "softprompt_batch_tasks", "Distinct tasks per batch taken from the queue.",
            BATCH_BUCKETS))
        self.engine_seconds = add(Histogram(
            "softprompt_engine_call_seconds", "Duration of one engine call, by kind.",
            LATENCY_BUCKETS, ("kind",)))
        self.items = add(Counter(
            "softprompt_items_total", "Inputs processed by the engine, by kind.", ("kind",)))
        self.model_loaded = add(Gauge(
            "softprompt_model_loaded", "1 once the model has loaded, else 0."))
        self.tasks = add(Gauge("softprompt_tasks", "Tasks currently loaded."))

    def render(self) -> str:
        """Returns the exposition text."""
        return self.registry.render()
