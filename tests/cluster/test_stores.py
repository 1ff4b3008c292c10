"""The role stores against a real Redis server: the shared streams stay as long as the work in flight (an entry
is deleted once acknowledged), an entry read but never acknowledged survives for a restarted reader, and no
module outside the stores talks to Redis."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from cluster.messages import (BatchOrder, MetricsSnapshot, ReplicaInfo, ReplicaMetrics, RequestRecord, RowReport,
                              SliceReport)
from cluster.redis_server import EmbeddedRedis
from cluster.stores.admin import AdminStore
from cluster.stores.dispatcher import DispatcherStore
from cluster.stores.ingress import IngressStore
from cluster.stores.worker import WorkerStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server():
    with EmbeddedRedis() as srv:
        yield srv


@pytest.fixture
def stores(server, request):
    prefix = re.sub(r"\W", "_", request.node.name)  # a fresh key space per test on the one server
    return (AdminStore(server.url, prefix), DispatcherStore(server.url, prefix), WorkerStore(server.url, prefix))


def drain(dispatcher: DispatcherStore) -> dict[str, list]:
    """Read and acknowledge everything the dispatcher's streams hold, as its loop does."""
    got: dict[str, list] = {"incoming": [], "cancel": [], "results": []}
    while batches := dispatcher.read_dispatch(block_ms=1):
        for name, ids, payloads in batches:
            got[name] += payloads
            dispatcher.ack_dispatch(name, ids)
    return got


def test_acknowledged_entries_leave_the_shared_streams(stores):
    admin, dispatcher, worker = stores
    dispatcher.ensure_dispatch_groups()
    for round_ in range(5):  # the length stays at what is in flight however long the cluster runs
        for i in range(200):
            rid = f"q{round_}.{i}"
            admin.submit(RequestRecord(rid, [5, 6], 4, time.time()))
            admin.request_cancel(rid)
            worker.post_result(SliceReport(f"e1.b{i}", 1, "w", [RowReport(rid, [7], "eos")]))
        got = drain(dispatcher)
        assert len(got["incoming"]) == len(got["cancel"]) == len(got["results"]) == 200
        assert got["incoming"][0] == f"q{round_}.0" and got["results"][-1].outputs[0].id == f"q{round_}.199"
        for name in ("incoming", "cancel", "results"):
            assert admin.stream_length(name) == 0, name
            assert admin.stream_added(name) == 200 * (round_ + 1)
            assert admin.dispatch_pending(name) == 0


def test_an_entry_read_but_never_acknowledged_is_read_again_by_a_restarted_dispatcher(stores, server):
    admin, dispatcher, worker = stores
    dispatcher.ensure_dispatch_groups()
    for rid in ("a", "b", "c"):
        admin.submit(RequestRecord(rid, [5], 4, time.time()))
    [(name, ids, rids)] = dispatcher.read_dispatch(block_ms=1)
    assert (name, rids) == ("incoming", ["a", "b", "c"])
    dispatcher.ack_dispatch(name, ids[:2])  # the round handling "c" died before its acknowledgement
    assert admin.stream_length("incoming") == 1 and admin.dispatch_pending("incoming") == 1
    admin.submit(RequestRecord("d", [5], 4, time.time()))

    restarted = DispatcherStore(server.url, dispatcher.k.p)  # a new process: nothing of the old one's state
    restarted.ensure_dispatch_groups()
    [(_, pending_ids, pending)] = restarted.read_dispatch(pending=True)
    assert pending == ["c"] and pending_ids == ids[2:]
    restarted.ack_dispatch("incoming", pending_ids)
    assert drain(restarted)["incoming"] == ["d"]  # what was never delivered comes next, once
    assert admin.stream_length("incoming") == 0 and admin.dispatch_pending("incoming") == 0
    assert restarted.read_dispatch(pending=True) == []


def test_a_replica_acknowledges_its_batches_away_and_reruns_one_it_never_answered(stores, server):
    admin, dispatcher, worker = stores
    worker.register_replica(ReplicaInfo("w", 1, "hf"), ttl=5)
    dispatcher.post_batches([("w", BatchOrder(f"e1.b{i}", 1, 4, [f"r{i}"])) for i in range(50)])
    for entry_id, msg in worker.read_work("w", block_ms=None, count=100):
        if msg.batch_id != "e1.b49":  # the replica died while running the last one
            worker.ack_work("w", entry_id)
    assert admin.work_pending("w") == 1
    restarted = WorkerStore(server.url, worker.k.p)
    [(entry_id, msg)] = restarted.read_work("w", block_ms=None, count=100, pending=True)
    assert msg == BatchOrder("e1.b49", 1, 4, ["r49"])
    restarted.ack_work("w", entry_id)
    assert admin.work_pending("w") == 0 and restarted.read_work("w", block_ms=None) == []
    assert admin.work_length("w") == 0


def test_heartbeats_reach_the_snapshot_and_the_snapshot_reads_back_typed(stores, server):
    admin, dispatcher, worker = stores
    worker.register_replica(ReplicaInfo("w", 1, "hf", keeps_kv=True, kv_budget_bytes=2.0**30), ttl=5)
    assert worker.heartbeat("w", ttl=5, busy_seconds=12.5)
    assert dispatcher.busy_seconds(["w", "gone"]) == {"w": 12.5, "gone": 0.0}
    assert dispatcher.replica_info("w") == ReplicaInfo("w", 1, "hf", keeps_kv=True, kv_budget_bytes=2.0**30,
                                                      busy_seconds=12.5)
    assert dispatcher.replicas_alive() == (["w"], [])
    assert admin.metrics_snapshot() is None
    snap = MetricsSnapshot(time.time(), 3, "scls", backlog_seconds=float("inf"),
                           replicas={"w": ReplicaMetrics(busy_seconds=12.5, running_requests=2)})
    dispatcher.publish_metrics(snap)
    assert admin.metrics_snapshot() == snap

    async def ingress_view():
        store = IngressStore(server.url, worker.k.p)
        try:
            return await store.metrics_snapshot(), await store.replicas_alive()
        finally:
            await store.close()

    assert asyncio.run(ingress_view()) == (snap, (["w"], []))
    dispatcher.forget_replica("w")
    assert not worker.heartbeat("w", ttl=5, busy_seconds=13.0)  # forgotten: no half record comes back
    assert dispatcher.replica_info("w") is None


def test_no_module_outside_the_stores_talks_to_redis():
    """The stores are the Redis boundary: no other module of the cluster, the workers or the benches imports a
    Redis client or reaches into a store's."""
    offenders = []
    for folder in ("cluster", "worker", "bench", "balancer", "predictor"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("cluster/stores/"):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"^\s*(import redis|from redis\b)|\bstore\._?r\.|\._r\b", line):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
