"""The simulated cluster drives the real Scheduler; every request must come out exactly once, exactly right."""

from __future__ import annotations

import pytest

from balancer.config import SchedulerConfig
from balancer.estimators import LinearKVMemory
from cluster.sim.report import schedule_fingerprint
from cluster.sim.simulator import SimFault, simulate
from cluster.sim.workload import arrival_times, build_workload, constant_predictor, oracle_predictor, synthetic_lengths
from tests.balancer.helpers import LATENCY

MEMORY = LinearKVMemory(bytes_per_token=1.0, budget_bytes=60_000)


@pytest.mark.parametrize("mode", ["continuous_slices", "scls", "sls", "ils"])
@pytest.mark.parametrize("rate", [None, 50.0])
def test_every_request_finishes_once_with_its_true_length(mode, rate):
    pairs = synthetic_lengths(300, seed=3)
    workload = build_workload(pairs, arrival_times(300, rate, seed=3), oracle_predictor(pairs))
    cfg = SchedulerConfig(mode=mode, slice_len=32, max_gen_len=512, max_batch_size=16)
    report, sim = simulate(cfg, LATENCY, MEMORY, workload, replicas=4)

    assert sim.rejected == []
    ids = [f.request.id for f in sim.finished]
    assert len(ids) == len(set(ids)) == 300
    for f in sim.finished:
        r = f.request
        assert r.generated == min(f.true_len, cfg.max_gen_len)
        assert r.generated <= r.max_tokens
        assert r.finished_at >= r.arrival
    assert report.requests == 300
    assert report.useful_tokens == sum(min(o, 512) for _, o in pairs)
    if mode in ("scls", "continuous_slices"):
        assert report.slices_per_request > 1  # long requests really were cut into slices
    if mode == "sls":
        assert report.slices_per_request == 1 and report.early_return_ratio == 0


def test_scls_beats_static_batching_on_skewed_lengths():
    pairs = synthetic_lengths(600, seed=5)
    workload = build_workload(pairs, arrival_times(600, None), oracle_predictor(pairs))
    results = {}
    for mode in ("scls", "sls"):
        cfg = SchedulerConfig(mode=mode, slice_len=32, max_gen_len=1024, max_batch_size=32, sls_batch_size=8)
        results[mode], _ = simulate(cfg, LATENCY, MEMORY, workload, replicas=4)
    # Static batches compute tokens for rows that have finished; slices return them early.
    assert results["scls"].decode_valid_ratio > results["sls"].decode_valid_ratio
    assert results["scls"].request_throughput > results["sls"].request_throughput


def test_predictor_only_changes_order_not_correctness():
    pairs = synthetic_lengths(200, seed=9)
    cfg = SchedulerConfig(mode="scls", slice_len=32, max_gen_len=512)
    for predicted in (oracle_predictor(pairs), constant_predictor(100)(pairs)):
        workload = build_workload(pairs, arrival_times(200, 20.0, seed=1), predicted)
        report, sim = simulate(cfg, LATENCY, MEMORY, workload, replicas=2)
        assert report.requests == 200
        assert all(f.request.generated == min(f.true_len, 512) for f in sim.finished)


def test_arrivals():
    assert (arrival_times(5, None) == 0).all()
    t = arrival_times(20_000, 10.0, seed=0)
    assert (t[1:] >= t[:-1]).all()
    assert abs((t[-1] / len(t)) - 0.1) < 0.01  # mean gap 1/rate
    with pytest.raises(ValueError):
        arrival_times(3, -1.0)


def test_kv_reuse_removes_most_reprefill_work():
    pairs = synthetic_lengths(300, seed=11)
    workload = build_workload(pairs, arrival_times(300, None), oracle_predictor(pairs))
    reports = {}
    for reuse in (True, False):
        cfg = SchedulerConfig(mode="scls", slice_len=32, max_gen_len=1024, kv_reuse=reuse)
        reports[reuse], _ = simulate(cfg, LATENCY, MEMORY, workload, replicas=4)
    assert reports[True].extra["kv_reused_rows"] > 0 and reports[False].extra["kv_reused_rows"] == 0
    assert reports[True].reprefill_tokens < 0.5 * reports[False].reprefill_tokens
    assert reports[True].useful_tokens == reports[False].useful_tokens


def test_schedule_fingerprint_names_every_finish_time():
    pairs = synthetic_lengths(200, seed=4)
    workload = build_workload(pairs, arrival_times(200, 30.0, seed=4), oracle_predictor(pairs))
    cfg = SchedulerConfig(mode="scls", slice_len=32, max_gen_len=512)
    first, sim = simulate(cfg, LATENCY, MEMORY, workload, replicas=3)
    again, _ = simulate(cfg, LATENCY, MEMORY, workload, replicas=3)
    other, _ = simulate(cfg, LATENCY, MEMORY, workload, replicas=4)
    assert first.extra["schedule_sha256"] == again.extra["schedule_sha256"]
    assert first.extra["schedule_sha256"] != other.extra["schedule_sha256"]
    finishes = [(f.request.id, f.request.finished_at) for f in sim.finished]
    assert schedule_fingerprint(reversed(finishes)) == first.extra["schedule_sha256"]  # order of finishing: no matter
    moved = [(rid, t + (1e-3 if i == 7 else 0.0)) for i, (rid, t) in enumerate(finishes)]
    assert schedule_fingerprint(moved) != first.extra["schedule_sha256"]  # one request a millisecond later
    # a change in the last bits (float summation order) is not a change of schedule
    assert schedule_fingerprint([("r1", 2.0000001)]) == schedule_fingerprint([("r1", 2.00000012)])


def test_arrivals_are_taken_in_time_order_whatever_the_workload_order():
    pairs = synthetic_lengths(300, seed=6)
    workload = build_workload(pairs, arrival_times(300, 40.0, seed=6), oracle_predictor(pairs))
    cfg = SchedulerConfig(mode="scls", slice_len=32, max_gen_len=512)
    in_order, _ = simulate(cfg, LATENCY, MEMORY, workload, replicas=3)
    shuffled, _ = simulate(cfg, LATENCY, MEMORY, workload[::2] + workload[1::2], replicas=3)
    assert shuffled.extra["schedule_sha256"] == in_order.extra["schedule_sha256"]
    assert shuffled.requests == 300


@pytest.mark.parametrize("mode", ["continuous_slices", "scls", "sls", "ils"])
def test_killed_replicas_and_cancellations_lose_nothing(mode):
    """Replica loss and aborts run through the same dispatch core as the live cluster: every request that is
    not cancelled still finishes once with its true length, on the replicas that are left."""
    pairs = synthetic_lengths(300, seed=4)
    workload = build_workload(pairs, arrival_times(300, 50.0, seed=4), oracle_predictor(pairs))
    cancels = [SimFault(r.arrival + 0.5, "cancel", r.id) for r in workload[::20]]
    faults = [SimFault(1.0, "kill", "sim-1"), SimFault(3.0, "kill", "sim-2"), *cancels]
    cfg = SchedulerConfig(mode=mode, slice_len=32, max_gen_len=512, max_batch_size=16)
    report, sim = simulate(cfg, LATENCY, MEMORY, workload, replicas=4, faults=faults)

    assert sim.dead == {"sim-1", "sim-2"} and sim.core.counters.replicas_lost == 2
    assert sim.core.counters.requests_requeued > 0  # the kills hit requests in flight
    finished = [f.request.id for f in sim.finished]
    assert len(finished) == len(set(finished))
    assert sim.cancelled and set(sim.cancelled) <= {f.target for f in cancels}
    assert set(finished).isdisjoint(sim.cancelled) and set(finished) | set(sim.cancelled) == {r.id for r in workload}
    for f in sim.finished:
        assert f.request.generated == min(f.true_len, cfg.max_gen_len)
    assert report.extra["replicas_lost"] == 2 and report.extra["cancelled"] == len(sim.cancelled)


def test_a_fault_must_name_a_replica_that_exists():
    pairs = synthetic_lengths(10, seed=1)
    workload = build_workload(pairs, arrival_times(10, None), oracle_predictor(pairs))
    with pytest.raises(ValueError, match="no such replica"):
        simulate(SchedulerConfig(mode="scls"), LATENCY, MEMORY, workload, replicas=2,
                 faults=[SimFault(1.0, "kill", "sim-7")])
    with pytest.raises(ValueError, match="unknown fault kind"):
        SimFault(1.0, "explode", "sim-0")
