"""Prometheus metrics of the REST ingress, plus the dispatcher's published snapshot.

Every metric is prefixed ``slicefleet_``. The ingress's own metrics live in a private
:class:`~prometheus_client.CollectorRegistry` per service (several services may share a process in tests).
The dispatcher publishes a JSON snapshot to Redis every second (``StateStore.publish_metrics``); on each
scrape the ingress reads it and exposes it through :class:`SnapshotCollector` (missing keys are skipped).

Note: each ingress replica counts only the requests it served; scrape every replica (or run one).
"""

from __future__ import annotations

import re
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "slicefleet_"

_TOKEN_BUCKETS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900)

# (snapshot key, metric name, kind, help)
_SCALARS = [
    ("pool_depth", "pool_depth", "gauge", "Requests waiting in the dispatcher's pool for their next slice."),
    ("running", "running_requests", "gauge", "Requests in batches currently placed on replicas."),
    ("slices_run", "slices_run", "counter", "Request-slices run since the dispatcher started."),
    ("batches_run", "batches_run", "counter", "Batches run since the dispatcher started."),
    ("batch_size_mean", "batch_size_mean", "gauge", "Mean batch size of the batches run."),
    ("backlog_seconds", "backlog_seconds", "gauge", "Predicted seconds of work queued (admission control)."),
    ("slice_time_mape", "slice_time_mape", "gauge", "Mean absolute percentage error of slice-time predictions."),
    ("predicted_slice_seconds_sum", "predicted_slice_seconds", "counter",
     "Sum of predicted slice serving times."),
    ("actual_slice_seconds_sum", "actual_slice_seconds", "counter", "Sum of measured slice serving times."),
]


def _metric_name(key: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", str(key))
    return name if name and not name[0].isdigit() else "_" + name


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class SnapshotCollector:
    """Exposes one dispatcher snapshot (a dict) as gauges and counters."""

    def __init__(self, snapshot: dict):
        self.snapshot = snapshot or {}

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        yield GaugeMetricFamily(PREFIX + "dispatcher_snapshot_present",
                                "1 when the dispatcher's metrics snapshot was found in Redis.",
                                value=1.0 if snap else 0.0)
        for key, name, kind, doc in _SCALARS:
            value = _number(snap.get(key))
            if value is None:
                continue
            if kind == "counter":
                yield CounterMetricFamily(PREFIX + name, doc, value=value)
            else:
                yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        known = {key for key, *_ in _SCALARS} | {"replicas", "time"}
        for key, value in sorted(snap.items()):
            value = _number(value)
            if key in known or value is None:
                continue
            # Anything else the dispatcher adds (epoch, counters, ...) shows up as a plain gauge.
            yield GaugeMetricFamily(PREFIX + "dispatcher_" + _metric_name(key), f"Dispatcher snapshot field {key}.",
                                    value=value)
        replicas = snap.get("replicas")
        if isinstance(replicas, dict) and replicas:
            expected = GaugeMetricFamily(PREFIX + "replica_expected_completion_seconds",
                                         "Seconds until the replica is expected to finish its queued work.",
                                         labels=["replica"])
            busy = CounterMetricFamily(PREFIX + "replica_busy_seconds", "Seconds the replica spent running slices.",
                                       labels=["replica"])
            extra: dict[str, GaugeMetricFamily] = {}
            n_expected = n_busy = 0
            for rid, info in sorted(replicas.items()):
                if not isinstance(info, dict):
                    continue
                v = _number(info.get("expected_completion_s"))
                if v is not None:
                    expected.add_metric([str(rid)], v)
                    n_expected += 1
                v = _number(info.get("busy_seconds"))
                if v is not None:
                    busy.add_metric([str(rid)], v)
                    n_busy += 1
                for field, value in sorted(info.items()):
                    value = _number(value)
                    if field in ("expected_completion_s", "busy_seconds") or value is None:
                        continue
                    name = PREFIX + "replica_" + _metric_name(field)
                    if name not in extra:
                        extra[name] = GaugeMetricFamily(name, f"Replica field {field} (dispatcher snapshot).",
                                                        labels=["replica"])
                    extra[name].add_metric([str(rid)], value)
            if n_expected:
                yield expected
            if n_busy:
                yield busy
            yield from extra.values()


class IngressMetrics:
    """The ingress's own counters and histograms."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(PREFIX + "ingress_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "code"], registry=r)
        self.errors = Counter(PREFIX + "ingress_errors", "HTTP error responses by endpoint and class (4xx, 5xx).",
                              ["endpoint", "class"], registry=r)
        self.finished = Counter(PREFIX + "ingress_finished",
                                "Generation requests ended, by endpoint and outcome (stop, length, timeout, "
                                "disconnected, cancelled, error).", ["endpoint", "outcome"], registry=r)
        self.inflight = Gauge(PREFIX + "ingress_inflight", "Generation requests being served now.", registry=r)
        self.prompt_tokens = Histogram(PREFIX + "prompt_tokens", "Prompt length in tokens.",
                                       buckets=_TOKEN_BUCKETS, registry=r)
        self.predicted_output = Histogram(PREFIX + "predicted_output_tokens",
                                          "Predicted output length (length predictor) at admission.",
                                          buckets=_TOKEN_BUCKETS, registry=r)
        self.actual_output = Histogram(PREFIX + "output_tokens", "Actual output length of finished requests.",
                                       buckets=_TOKEN_BUCKETS, registry=r)
        self.latency = Histogram(PREFIX + "request_latency_seconds",
                                 "End-to-end latency of generation requests (acceptance to last byte).",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Seconds from acceptance to the first output event.", ["endpoint"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter(PREFIX + "ingress_rejected", "Requests refused by admission control (429).",
                                registry=r)

    def observe_response(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if 400 <= status < 500:
            self.errors.labels(endpoint, "4xx").inc()
        elif status >= 500:
            self.errors.labels(endpoint, "5xx").inc()

    def render(self, snapshot: dict | None) -> bytes:
        """Prometheus text: own metrics, then the dispatcher snapshot's."""
        snap_registry = CollectorRegistry(auto_describe=False)
        snap_registry.register(SnapshotCollector(snapshot or {}))
        return generate_latest(self.registry) + generate_latest(snap_registry)
