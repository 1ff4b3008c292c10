"""The dispatcher and worker loops in one process, against a real Redis server and the real model.

Faster than the Ray end-to-end tests, so the restart and exactly-once paths are checked in detail here.
"""

from __future__ import annotations

import time

import pytest

from cluster.config import SlicefleetConfig
from cluster.dispatcher import DispatchLoop, build_estimators
from cluster.messages import BatchOrder, Progress, RowReport, SliceReport
from cluster.redis_server import EmbeddedRedis
from cluster.messages import ReplicaInfo, RequestRecord
from cluster.stores.admin import AdminStore
from cluster.stores.dispatcher import DispatcherStore
from cluster.stores.worker import WorkerStore
from cluster.worker_replica import SliceWorker


@pytest.fixture
def redis_url():
    with EmbeddedRedis() as srv:
        yield srv.url


@pytest.fixture(scope="module")
def reference():
    import torch
    from transformers import AutoModelForCausalLM

    from worker.make_model import ensure_default_model

    model = AutoModelForCausalLM.from_pretrained(ensure_default_model()).eval()

    def generate(ids: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return out[0, len(ids):].tolist()

    return generate


def start(cfg: SlicefleetConfig, store: AdminStore) -> DispatchLoop:
    """A dispatcher on ``store``'s Redis and key prefix (the test reads and submits through ``store``)."""
    latency, memory = build_estimators(cfg)
    core = DispatchLoop(cfg, latency, memory, DispatcherStore(store.url, store.k.p))
    core.start()
    return core


def wait_until_done(store: AdminStore, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while store.live_ids():
        assert time.monotonic() < deadline, f"still live: {store.live_ids()}"
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["continuous_slices", "scls", "sls", "ils"])
def test_a_dispatcher_restart_mid_load_loses_and_doubles_nothing(redis_url, reference, mode):
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url},
                                           "scheduler": {"mode": mode, "slice_len": 8}})
    store = AdminStore(redis_url)
    first = start(cfg, store)
    workers = [SliceWorker(cfg.model_dump()) for _ in range(2)]
    try:
        prompts = {f"q{i}": [5, 6, 7, 8 + i] for i in range(8)}
        for rid, ids in prompts.items():
            store.submit(RequestRecord(rid, ids, 48, time.time()))
        deadline = time.monotonic() + 60
        while first.scheduler.stats.tokens_generated == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        first.stop()  # the old loop is gone mid-load, as if its process died
        second = start(cfg, store)
        assert second.epoch == first.epoch + 1
        wait_until_done(store)
        for rid, ids in prompts.items():
            assert store.generated(rid) == reference(ids, 48), rid
            assert store.record(rid).finish_reason == "length"
        second.stop()
        timings = store.slice_log()
        if mode in ("ils", "continuous_slices"):  # one record per forward of the continuous batch
            assert timings and all(t.continuous and t.n >= 1 for t in timings)
        else:
            assert timings and all(t.n >= 1 and t.max_input_len >= 4 for t in timings)
            assert sum(len(t.decode_step_times) for t in timings) > 0
    finally:
        for w in workers:
            w._stop.set()


def test_cancelled_while_queued_is_closed_not_run(redis_url):
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url}, "scheduler": {"mode": "scls", "slice_len": 4}})
    store = AdminStore(redis_url)
    core = start(cfg, store)
    try:
        store.submit(RequestRecord("gone", [5, 6, 7], 40, time.time()))
        store.request_cancel("gone")
        deadline = time.monotonic() + 10
        while store.record("gone").status != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.record("gone").finish_reason == "cancelled"
        assert "gone" not in core.scheduler.pool and not core.scheduler.pending
    finally:
        core.stop()


def test_results_of_an_earlier_epoch_are_ignored(redis_url):
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url}})
    store = AdminStore(redis_url)
    core = start(cfg, store)
    try:
        store.submit(RequestRecord("r", [5, 6, 7], 10, time.time()))
        WorkerStore(redis_url).post_result(SliceReport("e0.b0", core.epoch - 1, "ghost", [RowReport("r", [1, 2, 3], "eos")],
                                      elapsed=0.1))
        deadline = time.monotonic() + 10
        while core.counters.stale_results == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert core.counters.stale_results == 1
        assert store.generated("r") == [] and "r" in store.live_ids()
    finally:
        core.stop()


def test_a_batch_delivered_but_never_answered_is_run_when_the_worker_loop_starts(redis_url, reference):
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url}, "scheduler": {"mode": "scls", "slice_len": 4}})
    store = AdminStore(redis_url)
    store.submit(RequestRecord("r", [5, 6, 7], 4, time.time()))
    # A worker that read its batch and died before answering: the entry is delivered, never acknowledged.
    worker_store = WorkerStore(redis_url)
    worker_store.register_replica(ReplicaInfo("w", 0, "hf"), ttl=60)
    DispatcherStore(redis_url).post_batch("w", BatchOrder("e0.b7", 0, 4, ["r"]))
    assert worker_store.read_work("w", block_ms=None)
    worker = SliceWorker(cfg.model_dump(), replica_id="w")  # the same replica, restarted
    try:
        deadline = time.monotonic() + 30
        def results():
            return store.results()

        while not any(isinstance(m, SliceReport) for m in results()) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The first token was streamed at once; the slice's result carries the rest, from that position on.
        [progress, *_] = [m for m in results() if isinstance(m, Progress)]
        [result] = [m for m in results() if isinstance(m, SliceReport)]
        assert progress.outputs[0].at == 0 and len(progress.outputs[0].tokens) == 1
        streamed = [t for m in results() if isinstance(m, Progress) for t in m.outputs[0].tokens]
        assert result.batch_id == "e0.b7" and result.outputs[0].total == 4
        assert streamed + result.outputs[0].tokens == reference([5, 6, 7], 4)
        assert store.work_pending("w") == 0
    finally:
        worker._stop.set()


def test_an_overdue_batch_is_placed_again(redis_url, monkeypatch):
    import cluster.dispatch_core as dispatcher_module

    monkeypatch.setattr(dispatcher_module, "BATCH_TIMEOUT_FACTOR", 0.0)
    monkeypatch.setattr(dispatcher_module, "BATCH_TIMEOUT_SLACK", 0.5)
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url}, "scheduler": {"mode": "scls", "slice_len": 4}})
    store = AdminStore(redis_url)
    # A registered replica that beats but never answers (hung engine).
    WorkerStore(redis_url).register_replica(ReplicaInfo("mute", 0, "hf"), ttl=60)
    core = start(cfg, store)
    try:
        store.submit(RequestRecord("r", [5, 6, 7], 8, time.time()))
        deadline = time.monotonic() + 15
        while core.counters.batches_timed_out == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert core.counters.batches_timed_out >= 1
        assert "r" in core.scheduler.pool or "r" in core.scheduler.running
    finally:
        core.stop()


def test_ils_streams_tokens_while_the_request_runs(redis_url, reference):
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url},
                                           "scheduler": {"mode": "ils", "slice_len": 8}})
    store = AdminStore(redis_url)
    core = start(cfg, store)
    workers = [SliceWorker(cfg.model_dump())]
    try:
        store.submit(RequestRecord("s", [5, 6, 7], 40, time.time()))
        wait_until_done(store)
        events = [event for _, event in store.read_output("s", "0", block_ms=100)]
        # Published every 8 steps while running, then the rest with the finish: nothing lost or doubled.
        assert len(events) >= 4 and events[0].finish_reason is None
        streamed = [t for e in events for t in e.tokens]
        assert streamed == store.generated("s") == reference([5, 6, 7], 40)
        assert core.scheduler.stats.tokens_generated == 40
    finally:
        core.stop()
        for w in workers:
            w._stop.set()


def test_continuous_slices_stream_renew_in_place_and_move_to_a_new_replica(redis_url, reference):
    """Rows keep running across slice ends; a replica that joins mid-load takes rows at their slice ends; every
    token is streamed once, in order, and equals one unsliced generate."""
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url}, "engine": {"stream_every": 2},
                                           "scheduler": {"mode": "continuous_slices", "slice_len": 4,
                                                         "move_margin": 0.0}})
    store = AdminStore(redis_url)
    core = start(cfg, store)
    workers = [SliceWorker(cfg.model_dump())]
    prompts = {f"c{i}": [5 + i, 6, 7, 8 + i] for i in range(6)}
    try:
        for rid, ids in prompts.items():
            store.submit(RequestRecord(rid, ids, 300, time.time(), ignore_eos=True))
        deadline = time.monotonic() + 30
        while not any(store.generated(rid) for rid in prompts) and time.monotonic() < deadline:
            time.sleep(0.02)
        workers.append(SliceWorker(cfg.model_dump()))  # joins while the first one runs everything
        wait_until_done(store)
        assert core.counters.moves >= 1
        replicas_used = set()
        for rid, ids in prompts.items():
            events = [event for _, event in store.read_output(rid, "0", block_ms=100)]
            streamed = [t for e in events for t in e.tokens]
            assert streamed == store.generated(rid) == reference(ids, 300), rid
            assert len(events) > 300 // 4  # streamed every 2 steps, not once per slice
            rec = store.record(rid)
            assert rec.finish_reason == "length" and rec.slices == 300 // 4
            replicas_used |= set(rec.replicas)
        assert len(replicas_used) == 2
    finally:
        core.stop()
        for w in workers:
            w._stop.set()


@pytest.mark.parametrize("mode", ["continuous_slices", "ils"])
def test_a_cancelled_row_stops_decoding_at_once(redis_url, mode):
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url},
                                           "scheduler": {"mode": mode, "slice_len": 8}})
    store = AdminStore(redis_url)
    core = start(cfg, store)
    worker = SliceWorker(cfg.model_dump())
    try:
        store.submit(RequestRecord("long", [5, 6, 7], 1000, time.time(), ignore_eos=True))
        deadline = time.monotonic() + 30
        while not store.generated("long") and time.monotonic() < deadline:
            time.sleep(0.02)
        store.request_cancel("long")
        deadline = time.monotonic() + 10
        while (worker.engine.has_work() or core.scheduler.pending) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not worker.engine.has_work() and core.scheduler.pending == 0
        assert store.record("long").finish_reason == "cancelled"
        assert len(store.generated("long")) < 1000
    finally:
        core.stop()
        worker._stop.set()


@pytest.mark.parametrize("mode", ["continuous_slices", "scls"])
def test_a_redis_outage_longer_than_the_heartbeat_loses_no_replica(tmp_path, reference, mode):
    """Redis killed mid-load and back after twice the heartbeat TTL (same port, its AOF): every heartbeat key has
    expired, yet the replica is not presumed dead (no work stream deleted, no worker restart) and the
    requests finish exactly as generate() says."""
    import os
    import signal

    from cluster.worker_replica import HEARTBEAT_TTL

    server = EmbeddedRedis(data_dir=tmp_path / "redis").start()
    cfg = SlicefleetConfig.model_validate({"redis": {"url": server.url},
                                           "scheduler": {"mode": mode, "slice_len": 8}})
    store = AdminStore(server.url)
    core = start(cfg, store)
    worker = SliceWorker(cfg.model_dump())
    try:
        prompts = {f"o{i}": [5, 6, 7, 9 + i] for i in range(4)}
        for rid, ids in prompts.items():
            store.submit(RequestRecord(rid, ids, 64, time.time(), ignore_eos=True))
        deadline = time.monotonic() + 60
        while core.scheduler.stats.tokens_generated == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert core.scheduler.stats.tokens_generated > 0, "no progress before the outage"
        assert store.live_ids(), "nothing in flight when Redis went down"
        time.sleep(1.2)  # the AOF is fsynced every second
        os.kill(server.pid, signal.SIGKILL)
        time.sleep(2 * HEARTBEAT_TTL)
        server.restart()
        wait_until_done(store, timeout=180)
        for rid, ids in prompts.items():
            assert store.generated(rid) == reference(ids, 64), rid
        assert core.counters.replicas_lost == 0
        worker.check_health()  # its loops rode the outage out
    finally:
        worker._stop.set()
        core.stop()
        server.stop()


def test_a_forgotten_replica_registers_again(redis_url):
    store, worker = AdminStore(redis_url), WorkerStore(redis_url)
    worker.register_replica(ReplicaInfo("w", 1, "hf", "h", time.time(), 1.0), ttl=5)
    assert worker.heartbeat("w", 5, busy_seconds=1.0) is True
    DispatcherStore(redis_url).forget_replica("w")
    assert worker.heartbeat("w", 5, busy_seconds=2.0) is False
    assert store.replica_info("w") is None  # a beat alone does not recreate half a record


@pytest.mark.parametrize("mode", ["continuous_slices", "scls"])
def test_two_dispatchers_on_one_redis_hand_over_every_request_exactly_once(redis_url, reference, mode):
    """A Helm NewCluster upgrade: the new cluster's dispatcher starts on the same Redis while the old one still
    runs. The old one must notice it is superseded, hand over what it holds and stop; requests sent before,
    during and after the handover all complete once, token for token."""
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url},
                                           "scheduler": {"mode": mode, "slice_len": 8}})
    store = AdminStore(redis_url)
    old = start(cfg, store)
    workers = [SliceWorker(cfg.model_dump()) for _ in range(2)]
    new = None
    try:
        prompts = {f"h{i}": [5, 6, 7, 20 + i] for i in range(12)}
        items = list(prompts.items())
        for rid, ids in items[:6]:
            store.submit(RequestRecord(rid, ids, 40, time.time()))
        deadline = time.monotonic() + 60
        while old.scheduler.stats.tokens_generated == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert old.scheduler.stats.tokens_generated > 0 and store.live_ids(), "no load in flight at the handover"
        new = start(cfg, store)  # the old one is NOT stopped
        for rid, ids in items[6:]:  # arrive while both run: either may read them first
            store.submit(RequestRecord(rid, ids, 40, time.time()))
        deadline = time.monotonic() + 10
        while not old.fenced and time.monotonic() < deadline:
            time.sleep(0.05)
        assert old.fenced and not new.fenced
        assert old.healthy  # alive and idle: a restart would take a newer epoch and fence the new one
        wait_until_done(store, timeout=180)
        for rid, ids in prompts.items():
            assert store.generated(rid) == reference(ids, 40), rid
            assert store.record(rid).finish_reason == "length"
        assert store.metrics_snapshot().epoch == new.epoch  # only the new one publishes
    finally:
        for w in workers:
            w._stop.set()
        old.stop()
        if new is not None:
            new.stop()


@pytest.mark.parametrize("mode,kv_reuse,keeps", [("scls", True, True), ("scls", False, False),
                                                  ("continuous_slices", True, False)])
def test_a_replica_reports_whether_it_keeps_kv_and_splits_its_budget_accordingly(redis_url, mode, kv_reuse, keeps):
    budget = 64 * 2**20
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url}, "scheduler": {"mode": mode},
                                           "engine": {"kv_reuse": kv_reuse, "kv_budget_bytes": budget}})
    store = AdminStore(redis_url)
    worker = SliceWorker(cfg.model_dump(), replica_id="w")
    core = start(cfg, store)
    try:
        info = store.replica_info("w")
        assert info.keeps_kv is keeps
        # only an engine that keeps caches gives them a share of the budget
        assert info.kv_budget_bytes == pytest.approx(budget * (1 - cfg.engine.kv_keep_fraction) if keeps else budget)
        deadline = time.monotonic() + 10
        while "w" not in core.scheduler.replicas and time.monotonic() < deadline:
            time.sleep(0.05)
        assert core.scheduler.replicas["w"].keeps_kv is keeps
        assert core.scheduler.config.kv_reuse is kv_reuse  # engine.kv_reuse is the one setting
    finally:
        worker._stop.set()
        core.stop()


def test_an_announcement_read_just_before_a_redis_error_is_not_lost(redis_url, reference, monkeypatch):
    """The round that read a request's announcement fails on Redis before admitting it (the entry was
    delivered, so the stream will not give it again): once Redis answers, the live set brings it back."""
    import redis

    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url}, "scheduler": {"mode": "scls", "slice_len": 8}})
    store = AdminStore(redis_url)
    core = start(cfg, store)
    worker = SliceWorker(cfg.model_dump())
    real_records, failed = core.store.records, []

    def records_failing_once(rids):
        if rids and not failed:
            failed.append(list(rids))
            raise redis.ConnectionError("connection reset (simulated outage)")
        return real_records(rids)

    monkeypatch.setattr(core.store, "records", records_failing_once)
    try:
        store.submit(RequestRecord("a", [5, 6, 7, 8], 24, time.time()))
        wait_until_done(store, timeout=120)
        assert failed == [["a"]]  # the failure really hit this request's admission
        assert store.generated("a") == reference([5, 6, 7, 8], 24)
    finally:
        worker._stop.set()
        core.stop()


def test_a_slice_result_read_just_before_a_redis_error_is_applied_once_redis_answers(redis_url, reference,
                                                                                      monkeypatch):
    """The round that read a result fails before applying it: the entry stays pending, and the dispatcher reads
    its pending entries once Redis answers instead of waiting for the batch's timeout."""
    import redis

    from cluster import dispatch_core as dispatcher_module

    monkeypatch.setattr(dispatcher_module, "BATCH_TIMEOUT_SLACK", 600.0)  # the timeout cannot rescue it
    cfg = SlicefleetConfig.model_validate({"redis": {"url": redis_url}, "scheduler": {"mode": "scls", "slice_len": 8}})
    store = AdminStore(redis_url)
    core = start(cfg, store)
    worker = SliceWorker(cfg.model_dump())
    real_commit, failed = core._commit, []

    def commit_failing_once(cmd):
        if not failed:
            failed.append(cmd.batch_id)
            raise redis.ConnectionError("connection reset (simulated outage)")
        return real_commit(cmd)

    monkeypatch.setattr(core, "_commit", commit_failing_once)
    try:
        store.submit(RequestRecord("b", [5, 6, 7, 9], 24, time.time()))
        t0 = time.monotonic()
        wait_until_done(store, timeout=120)
        assert failed, "no result was hit"
        assert store.generated("b") == reference([5, 6, 7, 9], 24)
        assert core.counters.batches_timed_out == 0  # recovered from the pending entry, not the timeout
        assert time.monotonic() - t0 < 25
    finally:
        worker._stop.set()
        core.stop()
