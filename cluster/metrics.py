"""Prometheus metrics of the API: every series declared once, in :data:`SERIES`.

Two families of names:

* ``slicefleet:*`` mirror vLLM's serving series (``vllm:*`` in ``vllm/v1/metrics/loggers.py``) with the same
  suffixes, types, ``model_name`` label and, where the unit matches, the same buckets, so a vLLM Grafana query
  works here with only the prefix changed. vLLM measures inside one engine; here a request is timed where its
  tokens reach the client (the ingress) and queued/running/KV figures come from the dispatcher, which is the
  one place that sees the whole fleet.
* ``slicefleet_*`` are Slicefleet's own: HTTP outcomes, the length predictor, slices and batches, placement.

Where the numbers come from (``source`` in the table):

* ``ingress``: a :class:`prometheus_client.CollectorRegistry` per :class:`IngressMetrics` (several services
  may share a process in tests, so never the global registry). Counts only what this ingress replica served.
* ``dispatcher`` / ``replica``: the dispatcher's :class:`~cluster.messages.MetricsSnapshot`, which it
  republishes to Redis every second (``DispatcherStore.publish_metrics``); :class:`SnapshotCollector` turns
  the snapshot read at scrape time into series. A series' ``key`` names the snapshot field it exports;
  ``replica`` rows come from the snapshot's per-replica entries and carry a ``replica`` label.
  These are global facts: every ingress replica exposes the same values, so dashboards take ``max``.

docs/metrics.md is the user-facing table; a test checks it against :data:`SERIES` and a live cluster.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from cluster.messages import HistogramSnapshot, MetricsSnapshot

PREFIX = "slicefleet_"
VLLM_PREFIX = "slicefleet:"

# vLLM's defaults (vllm/v1/metrics/buckets.py, vLLM 0.32), copied so that histogram_quantile over our series
# and over vLLM's resolves the same way.
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                               7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0)
# Slicefleet's own token histograms keep their powers of two (their dashboards already read them).
TOKEN_BUCKETS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def buckets_1_2_5(limit: int) -> tuple[float, ...]:
    """vLLM's ``build_1_2_5_buckets``: 1, 2, 5, 10, 20, 50, ... up to ``limit`` (its request-token buckets)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** exp
            if v > limit:
                return tuple(out)
            out.append(float(v))
        exp += 1


@dataclass(frozen=True)
class Series:
    """One exported metric family. ``name`` is the family name (a counter is exported as ``name_total``);
    ``key`` is the snapshot field (dispatcher/replica sources); ``buckets`` None for a histogram means the
    request-token buckets, which depend on the model's context length."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    source: str = "ingress"  # ingress | dispatcher | replica
    key: str | None = None
    buckets: tuple[float, ...] | None = field(default=None, repr=False)

    @property
    def exported(self) -> str:
        """The name a query uses (counters get ``_total``; histograms add ``_bucket``/``_sum``/``_count``)."""
        return self.name + "_total" if self.kind == "counter" else self.name


M, R = ("model_name",), ("model_name", "replica")
V, P = VLLM_PREFIX, PREFIX

SERIES: tuple[Series, ...] = (
    # ---- vLLM's serving series, measured at the ingress ---------------------------------------------------
    Series(V + "prompt_tokens", "counter", "Prompt tokens of requests whose prefill has completed (first token "
           "out).", M),
    Series(V + "generation_tokens", "counter", "Output tokens delivered to clients.", M),
    Series(V + "request_success", "counter", "Finished requests by finish reason (stop, length, abort, error).",
           M + ("finished_reason",)),
    Series(V + "request_prompt_tokens", "histogram", "Prompt length of finished requests, tokens.", M),
    Series(V + "request_generation_tokens", "histogram", "Output length of finished requests, tokens.", M),
    Series(V + "request_params_max_tokens", "histogram", "The max_tokens budget of finished requests.", M),
    Series(V + "time_to_first_token_seconds", "histogram", "Seconds from arrival to the first output token.", M,
           buckets=TIME_TO_FIRST_TOKEN_BUCKETS),
    Series(V + "inter_token_latency_seconds", "histogram", "Seconds between successive output tokens after the "
           "first chunk (a chunk of k tokens counts k gaps of 1/k of its wait).", M,
           buckets=INTER_TOKEN_LATENCY_BUCKETS),
    Series(V + "time_per_output_token_seconds", "histogram", "Older vLLM name of inter_token_latency_seconds "
           "(same observations), for dashboards written against older vLLM releases.", M,
           buckets=INTER_TOKEN_LATENCY_BUCKETS),
    Series(V + "request_time_per_output_token_seconds", "histogram", "Per request: seconds from the first chunk "
           "to the last over the tokens that came after the first chunk.", M, buckets=INTER_TOKEN_LATENCY_BUCKETS),
    Series(V + "e2e_request_latency_seconds", "histogram", "Seconds from arrival to the request's end.", M,
           buckets=REQUEST_LATENCY_BUCKETS),
    # ---- vLLM's serving series, from the dispatcher's snapshot -------------------------------------------
    Series(V + "request_queue_time_seconds", "histogram", "Seconds from arrival until the dispatcher first "
           "placed the request on a replica.", M, "dispatcher", "queue_time", REQUEST_LATENCY_BUCKETS),
    Series(V + "num_requests_waiting", "gauge", "Requests in the dispatcher's pool: not yet started, or between "
           "slices.", M, "dispatcher", "pool_depth"),
    Series(V + "num_requests_running", "gauge", "Requests placed on the replica (in its running or queued "
           "batches).", R, "replica", "running_requests"),
    Series(V + "kv_cache_usage_perc", "gauge", "KV cache the dispatcher has reserved on the replica, as a share "
           "of its budget (1 = full): the bound it places against, not the engine's own allocator.", R,
           "replica", "kv_usage"),
    Series(V + "gpu_cache_usage_perc", "gauge", "Older vLLM name of kv_cache_usage_perc (same values).", R,
           "replica", "kv_usage"),
    Series(V + "num_preemptions", "counter", "Requests that lost their place on a replica and will be prefilled "
           "again elsewhere: moves at a slice boundary plus requests re-queued from a lost replica or an "
           "overdue batch.", M, "dispatcher", "preemptions"),
    # ---- Slicefleet: the HTTP API -------------------------------------------------------------------------
    Series(P + "ingress_requests", "counter", "HTTP requests by endpoint and status code.", ("endpoint", "code")),
    Series(P + "ingress_errors", "counter", "HTTP error responses by endpoint and class (4xx, 5xx).",
           ("endpoint", "class")),
    Series(P + "ingress_finished", "counter", "Generation requests ended, by endpoint and outcome (stop, length, "
           "timeout, disconnected, cancelled, error).", ("endpoint", "outcome")),
    Series(P + "ingress_inflight", "gauge", "Generation requests being served now by this ingress replica."),
    Series(P + "ingress_rejected", "counter", "Requests refused by admission control (429)."),
    Series(P + "predicted_output_tokens", "histogram", "Output length the length predictor expected at "
           "admission, tokens.", buckets=TOKEN_BUCKETS),
    # ---- Slicefleet: the dispatcher ------------------------------------------------------------------------
    Series(P + "dispatcher_snapshot_present", "gauge", "1 when the dispatcher's metrics snapshot was found in "
           "Redis (all dispatcher series are missing otherwise).", (), "dispatcher"),
    Series(P + "dispatcher_epoch", "gauge", "Dispatcher incarnation; it grows by one at each restart.", (),
           "dispatcher", "epoch"),
    Series(P + "scheduler_mode", "gauge", "1 for the scheduling mode the dispatcher runs.", ("mode",),
           "dispatcher", "mode"),
    Series(P + "pool_depth", "gauge", "Requests waiting in the dispatcher's pool for their next slice.", (),
           "dispatcher", "pool_depth"),
    Series(P + "running_requests", "gauge", "Requests in batches currently placed on replicas.", (), "dispatcher",
           "running"),
    Series(P + "backlog_seconds", "gauge", "Predicted seconds of queued work (what admission control compares "
           "with api.max_backlog_seconds).", (), "dispatcher", "backlog_seconds"),
    Series(P + "slices_run", "counter", "Request-slices run.", (), "dispatcher", "slices_run"),
    Series(P + "batches_run", "counter", "Batches (one-row leases in continuous slices) run.", (), "dispatcher",
           "batches_run"),
    Series(P + "batch_size_mean", "gauge", "Mean batch size of the batches run.", (), "dispatcher",
           "batch_size_mean"),
    Series(P + "requests_finished", "counter", "Requests the dispatcher closed as finished.", (), "dispatcher",
           "requests_finished"),
    Series(P + "tokens_generated", "counter", "Output tokens the replicas reported (valid tokens).", (),
           "dispatcher", "tokens_generated"),
    Series(P + "pad_tokens", "counter", "Padding positions computed (rows shorter than their batch's longest).",
           (), "dispatcher", "pad_tokens"),
    Series(P + "invalid_tokens", "counter", "Positions computed for rows that had already finished.", (),
           "dispatcher", "invalid_tokens"),
    Series(P + "reprefill_tokens", "counter", "Tokens prefilled again because a request resumed without its KV "
           "cache.", (), "dispatcher", "reprefill_tokens"),
    Series(P + "kv_reused_batches", "counter", "Batches that resumed on a replica still holding their KV cache.",
           (), "dispatcher", "kv_reused_batches"),
    Series(P + "early_returns", "counter", "Requests that finished while others in their batch still needed "
           "tokens.", (), "dispatcher", "early_returns"),
    Series(P + "moves", "counter", "Running requests moved to another replica at a slice boundary.", (),
           "dispatcher", "moves"),
    Series(P + "requests_requeued", "counter", "Placed requests sent back to the pool because their replica was "
           "lost, their batch was overdue or its result could not be applied.", (), "dispatcher",
           "requests_requeued"),
    Series(P + "replicas_lost", "counter", "Replicas that stopped sending heartbeats.", (), "dispatcher",
           "replicas_lost"),
    Series(P + "batches_timed_out", "counter", "Batches re-placed because no result came in time.", (),
           "dispatcher", "batches_timed_out"),
    Series(P + "stale_results", "counter", "Results ignored because their batch was no longer current.", (),
           "dispatcher", "stale_results"),
    Series(P + "slice_time_mape", "gauge", "Mean absolute percentage error of slice-time predictions (SCLS).",
           (), "dispatcher", "slice_time_mape"),
    Series(P + "predicted_slice_seconds", "counter", "Sum of predicted slice serving times (SCLS).", (),
           "dispatcher", "predicted_slice_seconds_sum"),
    Series(P + "actual_slice_seconds", "counter", "Sum of measured slice serving times (SCLS).", (), "dispatcher",
           "actual_slice_seconds_sum"),
    Series(P + "replica_expected_completion_seconds", "gauge", "Seconds until the replica is expected to finish "
           "the work placed on it (what max-min placement balances).", ("replica",), "replica",
           "expected_completion_s"),
    Series(P + "replica_busy_seconds", "counter", "Seconds the replica spent running slices.", ("replica",),
           "replica", "busy_seconds"),
    Series(P + "replica_inflight_batches", "gauge", "Batches placed on the replica and not yet answered.",
           ("replica",), "replica", "inflight_batches"),
)

BY_NAME = {s.name: s for s in SERIES}
SNAPSHOT_INTERNAL = frozenset({"time", "replicas", "rows_run", "abs_pct_error_sum", "slices_estimated"})
"""Snapshot fields that are inputs to declared series (or bookkeeping), not series of their own."""

FINISHED_REASONS = {"stop": "stop", "length": "length", "timeout": "abort", "disconnected": "abort",
                    "cancelled": "abort", "error": "error"}
"""Ingress outcome -> vLLM's ``finished_reason`` (its FinishReason strings)."""
ENDPOINTS = ("completions", "chat_completions")


# ---- the dispatcher's histogram, kept as plain numbers so it travels in the snapshot -----------------------

class SnapshotHistogram:
    """A cumulative histogram in a process without a scrape endpoint (the dispatcher): :meth:`snapshot` goes into
    the :class:`~cluster.messages.MetricsSnapshot` and :class:`SnapshotCollector` exposes it as a Prometheus
    histogram."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(list(self.bounds), list(self.counts), self.sum)


def _family(s: Series):
    cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}[s.kind]
    return cls(s.name, s.help, labels=list(s.labels))


class SnapshotCollector:
    """Exposes one dispatcher snapshot as the ``dispatcher`` and ``replica`` series of :data:`SERIES` (only
    ``dispatcher_snapshot_present``, at 0, when there is none)."""

    def __init__(self, snapshot: MetricsSnapshot | None, model_name: str = ""):
        self.snapshot = snapshot
        self.model_name = model_name

    def _label_values(self, s: Series, replica: str | None = None) -> list[str]:
        values = {"model_name": self.model_name, "replica": replica}
        return [str(values[name]) for name in s.labels]

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        for s in SERIES:
            if s.source == "ingress":
                continue
            fam = _family(s)
            if s.name == PREFIX + "dispatcher_snapshot_present":
                fam.add_metric([], 1.0 if snap is not None else 0.0)
            elif snap is None:
                continue
            elif s.name == PREFIX + "scheduler_mode":
                fam.add_metric([snap.mode], 1.0)
            elif s.kind == "histogram":
                if snap.queue_time is None:
                    continue
                self._add_histogram(fam, s, snap.queue_time)
            elif s.source == "dispatcher":
                fam.add_metric(self._label_values(s), snap.value(s.key))
            else:
                for rid, replica in sorted(snap.replicas.items()):
                    fam.add_metric(self._label_values(s, rid), snap.replica_value(replica, s.key))
                if not fam.samples:
                    continue
            yield fam

    def _add_histogram(self, fam: HistogramMetricFamily, s: Series, data: HistogramSnapshot) -> None:
        running, buckets = 0.0, []
        for bound, count in zip(list(data.bounds) + [math.inf], data.counts):
            running += float(count)
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
        fam.add_metric(self._label_values(s), buckets, data.sum)


# ---- the ingress's own series ------------------------------------------------------------------------------

@dataclass
class _Clock:
    """One accepted request's timing, from acceptance to its end (monotonic seconds)."""

    t0: float
    prompt_len: int
    max_tokens: int
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    first_chunk: int = 0


class IngressMetrics:
    """The ingress's series (``source == "ingress"`` in :data:`SERIES`) and the per-request hooks that feed them.

    The ingress calls :meth:`accepted` once a request is durably stored, :meth:`output` for every output event
    the client is sent, and :meth:`ended` when the request is over for any reason.
    """

    def __init__(self, model_name: str = "", max_model_len: int = 2048):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self._m: dict[str, Counter | Gauge | Histogram] = {}
        for s in SERIES:
            if s.source != "ingress":
                continue
            kwargs = {"registry": self.registry, "labelnames": list(s.labels)}
            if s.kind == "histogram":
                kwargs["buckets"] = s.buckets or buckets_1_2_5(max(int(max_model_len), 1))
            self._m[s.name] = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[s.kind](
                s.name, s.help, **kwargs)
        self._clocks: dict[str, _Clock] = {}
        # Children created up front: a dashboard's rate() over a series that appears only at the first error
        # misses that error, and "every documented series exists" holds from the first request on.
        for s in SERIES:
            if s.source == "ingress" and s.labels == ("model_name",):
                self._m[s.name].labels(model_name)
        for reason in sorted(set(FINISHED_REASONS.values())):
            self._v("request_success").labels(model_name, reason)
        for endpoint in ENDPOINTS:
            for klass in ("4xx", "5xx"):
                self.errors.labels(endpoint, klass)
            for outcome in FINISHED_REASONS:
                self.finished.labels(endpoint, outcome)

    def _v(self, name: str):
        """A vLLM-named series by its suffix."""
        return self._m[VLLM_PREFIX + name]

    # Slicefleet's own, used directly by the ingress.
    @property
    def requests(self) -> Counter:
        return self._m[PREFIX + "ingress_requests"]

    @property
    def errors(self) -> Counter:
        return self._m[PREFIX + "ingress_errors"]

    @property
    def finished(self) -> Counter:
        return self._m[PREFIX + "ingress_finished"]

    @property
    def inflight(self) -> Gauge:
        return self._m[PREFIX + "ingress_inflight"]

    @property
    def rejected(self) -> Counter:
        return self._m[PREFIX + "ingress_rejected"]

    @property
    def predicted_output(self) -> Histogram:
        return self._m[PREFIX + "predicted_output_tokens"]

    def observe_response(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if 400 <= status < 500:
            self.errors.labels(endpoint, "4xx").inc()
        elif status >= 500:
            self.errors.labels(endpoint, "5xx").inc()

    # ---- per request ---------------------------------------------------------------------------------------
    def accepted(self, rid: str, prompt_len: int, max_tokens: int, t0: float | None = None,
                 predicted_len: float | None = None) -> None:
        """The request is stored and will run; ``t0``: its arrival (``time.monotonic()``)."""
        self._clocks[rid] = _Clock(time.monotonic() if t0 is None else t0, int(prompt_len), int(max_tokens))
        if predicted_len is not None:
            self.predicted_output.observe(predicted_len)

    def output(self, rid: str, n_tokens: int, now: float | None = None) -> None:
        """``n_tokens`` new output tokens reached this ingress (one output event)."""
        clock = self._clocks.get(rid)
        if clock is None or n_tokens <= 0:
            return
        now = time.monotonic() if now is None else now
        m = self.model_name
        if clock.first is None:
            # The rest of the first chunk was decoded inside the TTFT, at a pace no one can see from here:
            # inter-token figures start with the second chunk.
            clock.first, clock.first_chunk = now, n_tokens
            self._v("time_to_first_token_seconds").labels(m).observe(now - clock.t0)
            self._v("prompt_tokens").labels(m).inc(clock.prompt_len)
        else:
            # A chunk of k tokens stands for k decode steps since the last one: k gaps of 1/k of the wait.
            gap = (now - clock.last) / n_tokens
            for _ in range(n_tokens):
                self._v("inter_token_latency_seconds").labels(m).observe(gap)
                self._v("time_per_output_token_seconds").labels(m).observe(gap)
        clock.last = now
        clock.tokens += n_tokens
        self._v("generation_tokens").labels(m).inc(n_tokens)

    def ended(self, rid: str, outcome: str, completion_tokens: int | None = None,
              now: float | None = None) -> None:
        """The request is over: ``outcome`` is the ingress's (stop, length, timeout, disconnected, cancelled,
        error); ``completion_tokens`` what the client was billed, when it got an answer."""
        clock = self._clocks.pop(rid, None)
        if clock is None:
            return
        now = time.monotonic() if now is None else now
        m = self.model_name
        self._v("request_success").labels(m, FINISHED_REASONS.get(outcome, "error")).inc()
        self._v("e2e_request_latency_seconds").labels(m).observe(now - clock.t0)
        self._v("request_prompt_tokens").labels(m).observe(clock.prompt_len)
        self._v("request_generation_tokens").labels(m).observe(
            clock.tokens if completion_tokens is None else completion_tokens)
        self._v("request_params_max_tokens").labels(m).observe(clock.max_tokens)
        if clock.first is not None and clock.tokens > clock.first_chunk:
            self._v("request_time_per_output_token_seconds").labels(m).observe(
                (clock.last - clock.first) / (clock.tokens - clock.first_chunk))

    def render(self, snapshot: MetricsSnapshot | None) -> bytes:
        """Prometheus text: this ingress's series, then the dispatcher snapshot's."""
        snap_registry = CollectorRegistry(auto_describe=False)
        snap_registry.register(SnapshotCollector(snapshot, self.model_name))
        return generate_latest(self.registry) + generate_latest(snap_registry)
