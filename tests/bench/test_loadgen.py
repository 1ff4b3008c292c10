"""The load generator's metric computation, arrivals, request bodies and SSE parsing (no cluster)."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from bench.loadgen import (SLO, BenchRequest, RequestResult, arrivals, live_report, request_body, run_load,
                           serving_metrics, tpot)
from cluster.messages import MetricsSnapshot, ReplicaMetrics


def _res(i, send, ttft, latency, tokens, itl=()):
    return RequestResult(f"r{i}", 10, tokens, send_time=send, success=True, ttft=ttft, latency=latency,
                         output_tokens=tokens, itl=list(itl))


def test_serving_metrics_by_hand():
    rs = [_res(0, 0.0, 1.0, 5.0, 5, [1.0, 1.0, 1.0, 1.0]), _res(1, 1.0, 2.0, 9.0, 8, [1.0] * 7)]
    failed = RequestResult("r2", 10, 4, send_time=0.5, error="HTTP 500")
    m = serving_metrics(rs + [failed], SLO(ttft=1.5))
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["duration"] == pytest.approx(10.0)  # first send 0.0, last finish 1 + 9
    assert m["request_throughput"] == pytest.approx(0.2)
    assert m["output_throughput"] == pytest.approx(1.3)
    assert m["ttft"]["mean"] == pytest.approx(1.5) and m["ttft"]["median"] == pytest.approx(1.5)
    assert tpot(rs[0]) == pytest.approx(1.0) and tpot(rs[1]) == pytest.approx(1.0)
    assert m["itl"]["mean"] == pytest.approx(1.0)
    assert m["e2el"]["p99"] == pytest.approx(5 + 0.99 * 4)
    assert m["good_requests"] == 1 and m["goodput"] == pytest.approx(0.1)
    assert m["length_mismatches"] == 0


def test_slo_each_bound():
    r = _res(0, 0.0, 2.0, 12.0, 11)  # tpot = 1.0
    assert SLO().met(r)
    assert not SLO(ttft=1.0).met(r) and SLO(ttft=2.0).met(r)
    assert not SLO(tpot=0.5).met(r) and SLO(tpot=1.0).met(r)
    assert not SLO(e2el=10).met(r)
    assert not SLO().met(RequestResult("x", 1, 1))  # failed never counts


def test_no_success():
    m = serving_metrics([RequestResult("x", 1, 1, error="boom")])
    assert m["completed"] == 0 and m["request_throughput"] == 0.0


def test_arrivals():
    assert np.all(arrivals(5, None) == 0)
    a = arrivals(20000, 4.0, 1.0, seed=1)
    gaps = np.diff(a)
    assert a[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    bursty = np.diff(arrivals(20000, 4.0, 0.25, seed=1))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)  # gamma shape k: CV 1/sqrt(k)
    assert np.array_equal(arrivals(50, 2.0, seed=3), arrivals(50, 2.0, seed=3))
    with pytest.raises(ValueError):
        arrivals(3, -1.0)


def test_request_bodies():
    req = BenchRequest("a", [1, 2, 3], 3, 40)
    sf = request_body(req, "slicefleet", "m", 1024)
    assert sf["target_len"] == 40 and sf["max_tokens"] == 1024 and sf["stream"] and sf["prompt"] == [1, 2, 3]
    assert request_body(req, "slicefleet", "m", 1024, budget="true")["max_tokens"] == 40
    v = request_body(req, "vllm", "m", 1024)
    assert v["max_tokens"] == 40 and v["ignore_eos"] is True and "target_len" not in v
    assert "target_len" not in request_body(req, "slicefleet", "m", 64, trace=False)
    with pytest.raises(ValueError):
        request_body(req, "tgi", "m", 10)


def test_live_report_from_the_snapshot_delta():
    before = MetricsSnapshot(0.0, 1, "scls", tokens_generated=10, pad_tokens=5, rows_run=2, batches_run=1,
                             slices_run=2, replicas={"a": ReplicaMetrics(busy_seconds=1.0),
                                                     "b": ReplicaMetrics(busy_seconds=2.0)})
    after = MetricsSnapshot(9.0, 1, "scls", tokens_generated=40, pad_tokens=15, invalid_tokens=10, rows_run=8,
                            batches_run=3, slices_run=8, early_returns=1,
                            replicas={"a": ReplicaMetrics(busy_seconds=5.0), "b": ReplicaMetrics(busy_seconds=4.0)})
    d = after.since(before)
    rs = [_res(0, 0.0, 1.0, 4.0, 15), _res(1, 0.0, 1.0, 2.0, 15)]
    rep = live_report("scls", 2, rs, d)
    assert rep.useful_tokens == 30
    assert rep.valid_token_ratio == pytest.approx(30 / (30 + 10 + 10))
    assert rep.decode_valid_ratio == pytest.approx(30 / 40)
    assert rep.mean_batch_size == pytest.approx(3.0)
    assert rep.load_imbalance == pytest.approx(np.std([4, 2]) / 3)
    assert rep.latency_p50 == pytest.approx(3.0) and rep.duration == pytest.approx(4.0)
    plain = live_report("vllm", 2, rs, None)  # a server without the dispatcher's counters
    assert plain.useful_tokens == 30 and plain.valid_token_ratio == pytest.approx(1.0)


def _sse(chunks: list[dict]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_run_load_parses_stream_and_round_robins():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.host, body["target_len"]))
        n = body["target_len"]
        chunks = [{"id": "cmpl-x", "choices": [{"text": "ab"}]}, {"id": "cmpl-x", "choices": [{"text": "cd"}]},
                  {"id": "cmpl-x", "choices": [], "usage": {"completion_tokens": n}}]
        return httpx.Response(200, content=_sse(chunks), headers={"content-type": "text/event-stream"})

    def failing(request):
        return httpx.Response(429, content=b"busy")

    reqs = [BenchRequest(f"r{i}", [1, 2], 2, 5 + i) for i in range(4)]
    results, wall = asyncio.run(run_load(["http://h0", "http://h1"], reqs, [0.0, 0.0, 0.01, 0.02],
                                         progress=False, max_concurrency=2,
                                         transport=httpx.MockTransport(handler)))
    assert [r.output_tokens for r in results] == [5, 6, 7, 8]
    assert all(r.success and len(r.itl) == 1 and r.response_id == "cmpl-x" for r in results)
    assert all(0 <= r.ttft <= r.latency for r in results)
    assert sorted(seen) == [("h0", 5), ("h0", 7), ("h1", 6), ("h1", 8)]
    assert results[3].send_time >= 0.02 and wall >= 0.02
    bad, _ = asyncio.run(run_load(["http://h0"], reqs[:1], [0.0], progress=False,
                                  transport=httpx.MockTransport(failing)))
    assert not bad[0].success and "429" in bad[0].error
