"""/metrics of a live cluster after one request: real Ray Serve (ingress, dispatcher, a worker replica), a real
Redis server and the real transformers engine, in continuous slices.

Every series docs/metrics.md lists must be exported with its documented type and labels, the serving series
must agree with what the client saw (usage, finish reason), and the Grafana dashboard must query nothing the app
does not export.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.test_e2e_continuous import STREAM_EVERY, start_cluster
from tests.cluster.test_metrics import REPO, documented_series

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "slicefleet-tiny-llama"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory, **{"replicas.num_replicas": 1})
    yield c
    c.stop()


@pytest.fixture(scope="module")
def after_one_request(cluster):
    """(usage the client got, chunks it got, the /metrics text, the dispatcher snapshot) after one streamed
    chat request."""
    from cluster.stores.admin import AdminStore

    store = AdminStore(cluster.cfg.redis.url, cluster.cfg.redis.key_prefix)
    usage, chunks, finish = None, 0, None
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", timeout=300,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "Count the sheep."}],
                            "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            body = json.loads(line[len("data: "):])
            if body.get("usage"):
                usage = body["usage"]
            for choice in body.get("choices", []):
                finish = choice.get("finish_reason") or finish
                chunks += bool(choice.get("delta", {}).get("content"))
    assert usage and usage["completion_tokens"] == MAX_TOKENS and finish == "length", (usage, finish)
    # The dispatcher republishes its snapshot every second: wait for the one that has placed the request.
    deadline = time.monotonic() + 30
    while (store.metrics_snapshot() is None or store.metrics_snapshot().requests_finished < 1) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    text = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    return usage, chunks, text, store.metrics_snapshot()


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(text: str, name: str, **labels) -> float:
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_every_documented_series_is_exported_with_its_type_and_labels(after_one_request):
    _, _, text, _ = after_one_request
    families = _families(text)
    documented = documented_series()
    assert len(documented) >= 40
    missing = []
    for exported, (kind, labels, _source) in documented.items():
        # The parser names a counter family without its _total.
        family = families.get(exported.removesuffix("_total") if kind == "counter" else exported)
        if family is None:
            missing.append(exported)
            continue
        assert family.type == kind, (exported, family.type)
        values = [s for s in family.samples if not s.name.endswith("_created")]
        assert values, f"{exported}: no sample after one request"
        for s in family.samples:
            extra = {"le"} if s.name.endswith("_bucket") else set()
            assert set(s.labels) == set(labels) | extra, (s.name, s.labels, labels)
    assert not missing, missing
    # ... and nothing else: every exported family is documented (prometheus_client's "<family>_created"
    # timestamps aside).
    names = {f.removesuffix("_total") for f in documented} | set(documented)
    exported = {f for f in families if not (f.endswith("_created") and f.removesuffix("_created") in names)}
    assert exported <= names, exported - names


def test_the_serving_series_agree_with_what_the_client_saw(after_one_request, cluster):
    usage, chunks, text, snap = after_one_request
    m = {"model_name": MODEL}
    assert _value(text, "slicefleet:generation_tokens_total", **m) == usage["completion_tokens"]
    assert _value(text, "slicefleet:prompt_tokens_total", **m) == usage["prompt_tokens"]
    assert _value(text, "slicefleet:request_prompt_tokens_sum", **m) == usage["prompt_tokens"]
    assert _value(text, "slicefleet:request_generation_tokens_sum", **m) == usage["completion_tokens"]
    assert _value(text, "slicefleet:request_params_max_tokens_sum", **m) == MAX_TOKENS
    assert _value(text, "slicefleet:request_success_total", finished_reason="length", **m) == 1
    assert _value(text, "slicefleet:request_success_total", finished_reason="abort", **m) == 0
    ttft = _value(text, "slicefleet:time_to_first_token_seconds_sum", **m)
    e2e = _value(text, "slicefleet:e2e_request_latency_seconds_sum", **m)
    assert _value(text, "slicefleet:time_to_first_token_seconds_count", **m) == 1
    assert 0 < ttft < e2e
    # Tokens came in several chunks (every STREAM_EVERY engine steps): each token after the first chunk is
    # one inter-token gap, and their sum is the time from the first chunk to the last.
    assert chunks >= 2
    itl_n = _value(text, "slicefleet:inter_token_latency_seconds_count", **m)
    assert usage["completion_tokens"] - STREAM_EVERY * 2 <= itl_n < usage["completion_tokens"]
    itl = _value(text, "slicefleet:inter_token_latency_seconds_sum", **m)
    assert 0 < itl < e2e - ttft + 1e-6
    tpot = _value(text, "slicefleet:request_time_per_output_token_seconds_sum", **m)
    assert tpot == pytest.approx(itl / itl_n, rel=1e-6)
    # The dispatcher's side: one request queued once, placed on the one replica, finished, nothing preempted.
    assert _value(text, "slicefleet:request_queue_time_seconds_count", **m) == 1
    assert 0 <= _value(text, "slicefleet:request_queue_time_seconds_sum", **m) < ttft
    replicas = sorted(snap.replicas)
    assert len(replicas) == 1
    running = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "slicefleet:num_requests_running"]
    assert [s.labels["replica"] for s in running] == replicas and running[0].value == 0
    assert _value(text, "slicefleet:num_requests_waiting", **m) == 0
    assert _value(text, "slicefleet:kv_cache_usage_perc", replica=replicas[0], **m) == 0
    assert _value(text, "slicefleet:num_preemptions_total", **m) == 0
    assert _value(text, "slicefleet_tokens_generated_total") == usage["completion_tokens"]
    assert _value(text, "slicefleet_scheduler_mode", mode="continuous_slices") == 1
    assert _value(text, "slicefleet_ingress_finished_total", endpoint="chat_completions", outcome="length") == 1


def test_the_live_snapshot_reads_back_as_the_typed_snapshot(after_one_request):
    """What the live dispatcher published decodes as this code's snapshot, with the replica that ran."""
    from cluster.messages import MetricsSnapshot

    usage, _, _, snap = after_one_request
    assert isinstance(snap, MetricsSnapshot) and snap.mode == "continuous_slices"
    assert snap.tokens_generated == usage["completion_tokens"] and len(snap.replicas) == 1


def test_the_dashboard_queries_only_what_the_app_exports(after_one_request):
    _, _, text, _ = after_one_request
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    dash = json.loads((REPO / "k8s" / "slicefleet" / "files" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\b([a-z_:][a-z0-9_:]*)\{", e)}
    assert len(queried) >= 30
    assert queried <= exported, sorted(queried - exported)


def test_running_and_kv_usage_follow_the_load(cluster, after_one_request):
    """While requests run, their replica's running count and KV reservation show them (the snapshot is
    republished every second, so the load lasts a few seconds); once they are done both are back to 0."""
    import concurrent.futures as cf

    n = 8

    def one(i: int) -> int:
        r = httpx.post(f"{cluster.url}/v1/completions", timeout=300,
                       json={"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 96, "ignore_eos": True})
        return r.status_code

    def sample() -> tuple[float, float]:
        text = httpx.get(f"{cluster.url}/metrics", timeout=30).text
        kv = running = 0.0
        for f in text_string_to_metric_families(text):
            for s in f.samples:
                if s.name == "slicefleet:kv_cache_usage_perc":
                    kv = max(kv, s.value)
                elif s.name == "slicefleet:num_requests_running":
                    running += s.value
        return kv, running

    # A fast machine can finish one wave of requests between two snapshots, so waves follow each other until
    # the metrics have shown the load (at most a few); every wave must still complete.
    seen_kv = seen_running = 0.0
    waves = 0
    with cf.ThreadPoolExecutor(n) as pool:
        while waves < 6 and not (seen_kv > 0 and seen_running >= 1):
            waves += 1
            futures = [pool.submit(one, i) for i in range(n)]
            while not all(f.done() for f in futures):
                kv, running = sample()
                seen_kv, seen_running = max(seen_kv, kv), max(seen_running, running)
                time.sleep(0.1)
            assert [f.result() for f in futures] == [200] * n
    assert 0 < seen_kv <= 1 and 1 <= seen_running <= n, (seen_kv, seen_running, waves)
    deadline = time.monotonic() + 10
    while sample() != (0.0, 0.0) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sample() == (0.0, 0.0)
