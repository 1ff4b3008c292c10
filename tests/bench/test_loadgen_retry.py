"""The benchmark client against a server that sheds load: 429 with Retry-After is waited out and sent again."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.loadgen import (NO_RETRY, BenchRequest, RetryPolicy, format_vllm_result, retry_after_seconds, run_load,
                           serving_metrics, vllm_metrics)


def _stream(n: int) -> httpx.Response:
    chunks = [{"id": "cmpl-x", "choices": [{"text": "ab"}]}, {"id": "cmpl-x", "choices": [], "usage":
                                                               {"completion_tokens": n}}]
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


def _requests(n: int) -> list[BenchRequest]:
    return [BenchRequest(f"r{i}", [1, 2, i], 3, 3) for i in range(n)]


def _run(handler, n: int, retry: RetryPolicy):
    return asyncio.run(run_load(["http://h"], _requests(n), [0.0] * n, progress=False, retry=retry,
                                transport=httpx.MockTransport(handler)))


def test_retry_after_as_seconds_or_an_http_date():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(" 0.5 ") == 0.5
    assert retry_after_seconds("-4") == 0.0
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after_seconds(later) <= 30
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("inf") is None


@given(retry_after=st.floats(0, 1000), refusals=st.integers(1, 100), seed=st.integers(0, 2**32))
def test_a_wait_honours_retry_after_and_stays_bounded(retry_after, refusals, seed):
    policy = RetryPolicy(max_backoff=30.0, min_wait=0.1)
    wait = policy.delay(retry_after, refusals, random.Random(seed))
    assert wait >= max(retry_after, policy.min_wait)
    assert wait <= max(retry_after, policy.max_backoff) * 1.25
    if refusals > 1:  # the same jitter draw: a later refusal never waits less
        assert wait >= policy.delay(retry_after, refusals - 1, random.Random(seed))


def test_429_with_retry_after_is_waited_out_and_counted():
    posts: Counter = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        rid = tuple(json.loads(request.content)["prompt"])
        posts[rid] += 1
        if posts[rid] <= 2:  # refused twice, then served
            return httpx.Response(429, content=b'{"error": {"code": "too_many_requests"}}',
                                  headers={"Retry-After": "0"})
        return _stream(3)

    results, _ = _run(handler, 4, RetryPolicy(min_wait=0.02))
    assert all(r.success and r.output_tokens == 3 and r.retries == 2 for r in results)
    assert all(r.ttft >= 0.02 + 0.04 for r in results)  # counted from the first attempt: the waits are in it
    assert sum(posts.values()) == 4 * 3
    m = serving_metrics(results)
    assert m["completed"] == 4 and m["retried_requests"] == 4 and m["retries"] == 8
    v = vllm_metrics(results, 1.0)
    assert v["retries"] == 8
    out = format_vllm_result(v)
    assert "Requests retried after 429:              4" in out and "Retries after 429:                       8" in out


def test_a_request_is_given_up_when_its_retry_budget_runs_out():
    def always_busy(request):
        return httpx.Response(429, content=b"busy", headers={"Retry-After": "0"})

    [r], _ = _run(always_busy, 1, RetryPolicy(budget=0.3, min_wait=0.05))
    assert not r.success and r.error.startswith("HTTP 429") and "retries)" in r.error
    assert 1 <= r.retries <= 6  # 0.05, 0.1, 0.2 ... doubling waits within 0.3 s


@pytest.mark.parametrize("status, headers", [(429, {}), (503, {"Retry-After": "0"}), (400, {"Retry-After": "0"})])
def test_only_a_429_with_retry_after_is_retried(status, headers):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, content=b"no", headers=headers)

    [r], _ = _run(handler, 1, RetryPolicy(min_wait=0.01))
    assert not r.success and r.retries == 0 and len(calls) == 1 and f"HTTP {status}" in r.error


def test_no_retry_fails_at_the_first_429():
    def busy(request):
        return httpx.Response(429, content=b"busy", headers={"Retry-After": "0"})

    [r], _ = _run(busy, 1, NO_RETRY)
    assert not r.success and r.retries == 0
