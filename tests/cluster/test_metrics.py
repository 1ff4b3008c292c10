"""The metrics table (cluster/metrics.py): its names against vLLM's and docs/metrics.md, the per-request timing
hooks with fixed clocks, the snapshot histogram, and a real dispatcher's snapshot (real Redis, real scheduler).

The whole path, one request through a live cluster, is tests/cluster/test_metrics_e2e.py.
"""

from __future__ import annotations

import re
import time
from dataclasses import fields
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.messages import MetricsSnapshot, ReplicaMetrics
from cluster.metrics import (
    BY_NAME,
    INTER_TOKEN_LATENCY_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    SERIES,
    SNAPSHOT_INTERNAL,
    TIME_TO_FIRST_TOKEN_BUCKETS,
    IngressMetrics,
    SnapshotHistogram,
    buckets_1_2_5,
)

REPO = Path(__file__).resolve().parents[2]
VLLM_ALIASES = {"slicefleet:time_per_output_token_seconds": "inter_token_latency_seconds",
                "slicefleet:gpu_cache_usage_perc": "kv_cache_usage_perc"}
"""Older vLLM names kept for old dashboards; the current vLLM source has the name on the right."""


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


class Samples(dict):
    """(sample name, label items in any order) -> value."""

    def __getitem__(self, key):
        return super().__getitem__((key[0], frozenset(key[1])))

    def __contains__(self, key):
        return super().__contains__((key[0], frozenset(key[1])))


def samples(text: str) -> Samples:
    return Samples({(s.name, frozenset(s.labels.items())): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples})


# ---- the table --------------------------------------------------------------------------------------------


def test_series_are_declared_once_with_valid_names():
    names = [s.name for s in SERIES]
    assert len(names) == len(set(names))
    for s in SERIES:
        assert re.fullmatch(r"slicefleet(:|_)[a-z0-9_]+", s.name), s.name
        assert not s.name.endswith("_total"), s.name  # prometheus_client adds it to counters
        assert s.kind in {"counter", "gauge", "histogram"} and s.source in {"ingress", "dispatcher", "replica"}
        assert s.help.endswith("."), s.name
        if s.name.startswith("slicefleet:"):
            assert s.labels[:1] == ("model_name",), s.name  # what vLLM dashboards filter on
        else:
            assert "model_name" not in s.labels, s.name
        if s.source == "replica":
            assert "replica" in s.labels and s.key, s.name
        if s.source == "dispatcher" and s.name != "slicefleet_dispatcher_snapshot_present":
            assert s.key, s.name


def _vllm_file(name: str) -> Path:
    found = sorted((REPO / "runs" / "vllm-venv" / "lib").glob(f"python3*/site-packages/vllm/v1/metrics/{name}"))
    if not found:
        pytest.skip("the vLLM venv (runs/vllm-venv; SLICEFLEET_WITH_VLLM=1 scripts/setup.sh) is not installed")
    return found[0]


def test_vllm_names_types_and_labels_match_vllm():
    """Each slicefleet: series is a vllm: series of the installed vLLM, of the same type, with the same labels
    (vLLM's ``engine`` label is our ``replica`` or nothing)."""
    source = _vllm_file("loggers.py").read_text()
    declared = {}
    for m in re.finditer(r'self\._(counter|gauge|histogram)_cls\(\s*name="vllm:([a-z0-9_]+)"(.*?)\)\n', source, re.S):
        extra = re.search(r'labelnames=labelnames \+ \[([^\]]*)\]', m.group(3))
        declared[m.group(2)] = (m.group(1), tuple(re.findall(r'"(\w+)"', extra.group(1))) if extra else ())
    assert {"prompt_tokens", "time_to_first_token_seconds", "kv_cache_usage_perc"} <= declared.keys(), declared
    for s in SERIES:
        if not s.name.startswith("slicefleet:"):
            continue
        suffix = VLLM_ALIASES.get(s.name, s.name.split(":", 1)[1])
        assert suffix in declared, s.name
        kind, extra = declared[suffix]
        assert kind == s.kind, s.name
        assert tuple(label for label in s.labels if label not in ("model_name", "replica")) == extra, s.name


def _vllm_buckets() -> dict:
    """vllm/v1/metrics/buckets.py run on its own (it imports only the standard library): no vLLM import."""
    namespace: dict = {}
    exec(compile(_vllm_file("buckets.py").read_text(), "buckets.py", "exec"), namespace)
    return namespace


def test_latency_buckets_are_vllms():
    namespace = _vllm_buckets()
    assert REQUEST_LATENCY_BUCKETS == namespace["REQUEST_LATENCY_BUCKETS"]
    assert TIME_TO_FIRST_TOKEN_BUCKETS == namespace["TIME_TO_FIRST_TOKEN_BUCKETS"]
    assert INTER_TOKEN_LATENCY_BUCKETS == namespace["INTER_TOKEN_LATENCY_BUCKETS"]
    assert BY_NAME["slicefleet:e2e_request_latency_seconds"].buckets == REQUEST_LATENCY_BUCKETS
    assert BY_NAME["slicefleet:request_queue_time_seconds"].buckets == REQUEST_LATENCY_BUCKETS


def test_request_token_buckets_are_vllms_1_2_5():
    build = _vllm_buckets()["build_1_2_5_buckets"]
    for limit in (1, 4, 100, 2048, 131072):
        assert list(buckets_1_2_5(limit)) == build(limit), limit
    assert buckets_1_2_5(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


def documented_series() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """docs/metrics.md's tables: exported name -> (type, labels, source)."""
    rows = {}
    for line in (REPO / "docs" / "metrics.md").read_text().splitlines():
        m = re.match(r"\| `(slicefleet[:_][a-z0-9_]+)` \|(.*)", line)
        if not m:
            continue
        cells = [c.strip() for c in m.group(2).split("|")]
        if m.group(1).startswith("slicefleet:"):
            cells = cells[1:]  # the vLLM twin column
        kind, labels, source = cells[0], cells[1], cells[2]
        labels = () if labels == "—" else tuple(re.findall(r"`(\w+)`", labels))
        assert m.group(1) not in rows, m.group(1)
        rows[m.group(1)] = (kind, labels, source)
    return rows


def test_docs_table_is_the_declared_table():
    """docs/metrics.md lists exactly the declared series, with their exported names, types, labels and sources."""
    assert documented_series() == {s.exported: (s.kind, s.labels, s.source) for s in SERIES}


# ---- the ingress's per-request hooks -----------------------------------------------------------------------


def test_request_timing_with_fixed_clocks():
    m = IngressMetrics("tiny", max_model_len=512)
    m.accepted("a", prompt_len=7, max_tokens=20, t0=10.0, predicted_len=12.0)
    m.output("a", 0, now=10.25)  # an event without tokens changes nothing
    m.output("a", 3, now=10.5)  # first chunk: TTFT 0.5; its 2 extra tokens were decoded inside the TTFT
    m.output("a", 4, now=11.5)  # 4 tokens in 1 s: 4 gaps of 0.25 s
    m.ended("a", "length", completion_tokens=7, now=12.0)
    v = samples(m.render(None).decode())
    lab = (("model_name", "tiny"),)
    assert v[("slicefleet:time_to_first_token_seconds_sum", lab)] == pytest.approx(0.5)
    assert v[("slicefleet:time_to_first_token_seconds_count", lab)] == 1
    assert v[("slicefleet:inter_token_latency_seconds_count", lab)] == 4
    assert v[("slicefleet:inter_token_latency_seconds_sum", lab)] == 1.0
    assert v[("slicefleet:inter_token_latency_seconds_bucket", lab + (("le", "0.2"),))] == 0
    assert v[("slicefleet:inter_token_latency_seconds_bucket", lab + (("le", "0.3"),))] == 4
    assert v[("slicefleet:time_per_output_token_seconds_sum", lab)] == 1.0
    assert v[("slicefleet:request_time_per_output_token_seconds_sum", lab)] == 0.25
    assert v[("slicefleet:e2e_request_latency_seconds_sum", lab)] == 2.0
    assert v[("slicefleet:prompt_tokens_total", lab)] == 7
    assert v[("slicefleet:generation_tokens_total", lab)] == 7
    assert v[("slicefleet:request_prompt_tokens_sum", lab)] == 7
    assert v[("slicefleet:request_generation_tokens_sum", lab)] == 7
    assert v[("slicefleet:request_params_max_tokens_sum", lab)] == 20
    assert v[("slicefleet:request_params_max_tokens_bucket", lab + (("le", "20.0"),))] == 1
    assert v[("slicefleet:request_params_max_tokens_bucket", lab + (("le", "10.0"),))] == 0
    assert v[("slicefleet:request_success_total", lab + (("finished_reason", "length"),))] == 1
    assert v[("slicefleet:request_success_total", lab + (("finished_reason", "stop"),))] == 0
    assert v[("slicefleet_predicted_output_tokens_sum", ())] == 12.0
    # Buckets of the request-token histograms stop at the context length, as vLLM's.
    assert ("slicefleet:request_prompt_tokens_bucket", lab + (("le", "500.0"),)) in v
    assert ("slicefleet:request_prompt_tokens_bucket", lab + (("le", "1000.0"),)) not in v


def test_a_request_that_ends_before_its_first_token_is_an_abort_with_no_ttft():
    m = IngressMetrics("tiny")
    m.accepted("gone", prompt_len=9, max_tokens=5, t0=0.0)
    m.ended("gone", "disconnected", None, now=2.0)
    m.ended("gone", "error", None, now=3.0)  # a second end of the same request is not counted again
    m.output("never-accepted", 3)  # unknown requests (refused before acceptance) are ignored
    v = samples(m.render(None).decode())
    lab = (("model_name", "tiny"),)
    assert v[("slicefleet:request_success_total", lab + (("finished_reason", "abort"),))] == 1
    assert v[("slicefleet:request_success_total", lab + (("finished_reason", "error"),))] == 0
    assert v[("slicefleet:time_to_first_token_seconds_count", lab)] == 0
    assert v[("slicefleet:prompt_tokens_total", lab)] == 0  # no prefill finished
    assert v[("slicefleet:request_time_per_output_token_seconds_count", lab)] == 0
    assert v[("slicefleet:e2e_request_latency_seconds_sum", lab)] == 2.0
    assert v[("slicefleet:request_generation_tokens_sum", lab)] == 0


def test_error_and_outcome_series_exist_before_the_first_error():
    """A rate() over a series that appears with the first error misses that error: they start at 0."""
    v = samples(IngressMetrics("tiny").render(None).decode())
    assert v[("slicefleet_ingress_errors_total", (("class", "5xx"), ("endpoint", "chat_completions")))] == 0
    assert v[("slicefleet_ingress_finished_total", (("endpoint", "completions"), ("outcome", "timeout")))] == 0


# ---- the dispatcher's side ---------------------------------------------------------------------------------


def test_snapshot_histogram_buckets_are_less_or_equal():
    h = SnapshotHistogram((0.5, 1.0))
    for x in (0.5, 0.7, 1.0, 3.0):
        h.observe(x)
    text = IngressMetrics("m").render(MetricsSnapshot(0.0, 1, "scls", queue_time=h.snapshot())).decode()
    v = samples(text)
    lab = (("model_name", "m"),)
    assert v[("slicefleet:request_queue_time_seconds_bucket", lab + (("le", "0.5"),))] == 1
    assert v[("slicefleet:request_queue_time_seconds_bucket", lab + (("le", "1.0"),))] == 3
    assert v[("slicefleet:request_queue_time_seconds_bucket", lab + (("le", "+Inf"),))] == 4
    assert v[("slicefleet:request_queue_time_seconds_count", lab)] == 4
    assert v[("slicefleet:request_queue_time_seconds_sum", lab)] == pytest.approx(5.2)
    assert families(text)["slicefleet:request_queue_time_seconds"].type == "histogram"


def test_snapshot_series_are_the_declared_ones_only():
    snap = MetricsSnapshot(0.0, 1, "continuous_slices", pool_depth=2, moves=1,
                           replicas={"r1": ReplicaMetrics(busy_seconds=3.5, kv_usage=0.25)})
    text = IngressMetrics("m").render(snap).decode()
    v = samples(text)
    assert v[("slicefleet_pool_depth", ())] == 2
    assert v[("slicefleet:num_requests_waiting", (("model_name", "m"),))] == 2
    assert v[("slicefleet_moves_total", ())] == 1
    assert v[("slicefleet_scheduler_mode", (("mode", "continuous_slices"),))] == 1
    assert v[("slicefleet_replica_busy_seconds_total", (("replica", "r1"),))] == 3.5
    assert v[("slicefleet:kv_cache_usage_perc", (("model_name", "m"), ("replica", "r1")))] == 0.25
    assert v[("slicefleet_dispatcher_snapshot_present", ())] == 1
    assert v[("slicefleet_running_requests", ())] == 0
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert all(n.split("_bucket")[0] in BY_NAME or n.removesuffix("_total") in BY_NAME
               or re.sub(r"_(sum|count|created)$", "", n) in BY_NAME for n in exported), exported
    empty = samples(IngressMetrics().render(None).decode())
    assert empty[("slicefleet_dispatcher_snapshot_present", ())] == 0 and ("slicefleet_pool_depth", ()) not in empty


def test_every_series_names_a_figure_the_snapshot_has():
    """A series' ``key`` is a field of the typed snapshot (a renamed field would otherwise export nothing)."""
    figures = {f.name for f in fields(MetricsSnapshot)}
    per_replica = {f.name for f in fields(ReplicaMetrics)}
    for s in SERIES:
        if s.source == "dispatcher" and s.key:
            assert s.key in figures, s.name
        elif s.source == "replica":
            assert s.key in per_replica, s.name
    assert SNAPSHOT_INTERNAL <= figures
    # every numeric figure is exported by some series, or is one of the documented inputs
    keys = {s.key for s in SERIES if s.key}
    assert figures - SNAPSHOT_INTERNAL <= keys, figures - SNAPSHOT_INTERNAL - keys
    assert per_replica <= keys


@pytest.fixture
def redis_url():
    from cluster.redis_server import EmbeddedRedis

    with EmbeddedRedis() as srv:
        yield srv.url


@pytest.mark.parametrize("mode", ["continuous_slices", "scls"])
def test_a_real_dispatcher_snapshot(redis_url, mode):
    """A DispatchLoop (real scheduler, real Redis; its loop not started, so the test drives it) places
    requests on a replica it was told about: queue time, running, KV reservation and every field declared."""
    from cluster.config import SlicefleetConfig
    from cluster.dispatcher import DispatchLoop, build_estimators
    from cluster.messages import RequestRecord
    from cluster.stores.admin import AdminStore
    from cluster.stores.dispatcher import DispatcherStore

    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url},
                                           "scheduler": {"mode": mode, "slice_len": 8}})
    store, admin = DispatcherStore(redis_url), AdminStore(redis_url)
    latency, memory = build_estimators(cfg)
    core = DispatchLoop(cfg, latency, memory, store)
    now = time.time()
    core.scheduler.add_replica("r0", now)
    rids = [f"q{i}" for i in range(3)]
    for i, rid in enumerate(rids):
        admin.submit(RequestRecord(rid, [5, 6, 7, 8 + i], 32, now - 2.0))
    assert core._admit_live(rids, now) == 3
    core._dispatch(now)
    snap = core.snapshot(now)
    queue = snap.queue_time
    assert sum(queue.counts) == 3 and queue.sum == pytest.approx(6.0)
    core._dispatch(now + 1)  # nothing is placed twice: queue time is observed at the first placement only
    assert sum(core.snapshot(now + 1).queue_time.counts) == 3
    r0 = snap.replicas["r0"]
    assert r0.running_requests == 3 == snap.running
    batches = core.scheduler.replicas["r0"].inflight.values()
    reserved = [b.est_bytes for b in batches]
    expected = sum(reserved) if mode == "continuous_slices" else max(reserved)
    assert r0.kv_usage == pytest.approx(expected / memory.budget_bytes) and 0 < r0.kv_usage < 1
    assert snap.preemptions == 0
    text = IngressMetrics(cfg.model.name).render(snap).decode()
    v = samples(text)
    assert v[("slicefleet:num_requests_running", (("model_name", cfg.model.name), ("replica", "r0")))] == 3
    assert v[("slicefleet:request_queue_time_seconds_count", (("model_name", cfg.model.name),))] == 3
    # Overdue batches send their requests back to the pool: each will be prefilled again, a preemption.
    core.core.expire_overdue(now + 10**6)
    later = core.snapshot(now)
    assert later.requests_requeued == 3 and later.preemptions == 3 and later.batches_timed_out >= 1
    assert later.replicas["r0"].running_requests == 0 and later.replicas["r0"].kv_usage == 0
    assert later.pool_depth == 3
