"""Every record and message at the Redis boundary survives the wire unchanged, and what a reader cannot read is
refused by name instead of half-parsed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.messages import (VERSION, BatchOrder, HistogramSnapshot, MetricsSnapshot, OutputEvent, Progress,
                              ProgressRow, Release, ReplicaInfo, ReplicaMetrics, RequestRecord, RowReport,
                              SliceReport, SliceTiming, UnknownMessage, decode_metrics, decode_result,
                              decode_timing, decode_work, encode, read_timing,
                              output_entry, read_output_entry, read_request_entry, read_result_entry,
                              read_work_entry, request_entry, result_entry, work_entry)

ids = st.text(min_size=1, max_size=12)
tokens = st.lists(st.integers(0, 2**31 - 1), max_size=20)
epochs = st.integers(0, 10**6)
finishes = st.sampled_from(["slice_end", "eos", "length", "stop", "aborted"])

orders = st.builds(BatchOrder, ids, epochs, st.integers(1, 4096), st.lists(ids, min_size=1, max_size=8),
                   st.booleans())
releases = st.builds(Release, st.lists(ids, max_size=8), epochs, st.dictionaries(ids, ids, max_size=4))
rows = st.builds(RowReport, ids, tokens, finishes, st.none() | st.integers(0, 4096), st.integers(-1, 10**5))
reports = st.builds(SliceReport, ids, epochs, ids, st.lists(rows, max_size=8),
                    elapsed=st.floats(0, 1e4), prefill_time=st.floats(0, 1e4),
                    decode_step_times=st.lists(st.floats(0, 10), max_size=8), pad_tokens=st.integers(0, 10**6),
                    invalid_tokens=st.integers(0, 10**6), reprefill_tokens=st.integers(0, 10**6),
                    kv_reused=st.booleans(), resumed_rows=st.integers(0, 64), n=st.integers(0, 64),
                    max_input_len=st.integers(0, 10**5))
finite = st.floats(-1e9, 1e9, allow_nan=False)
counts = st.integers(0, 10**9)
records = st.builds(RequestRecord, ids, tokens, st.integers(1, 4096), finite, model=st.text(max_size=8),
                    kind=st.sampled_from(["completion", "chat"]), temperature=st.floats(0, 2), top_p=st.floats(0, 1),
                    seed=st.none() | st.integers(0, 2**32), top_k=st.integers(0, 100), min_tokens=st.integers(0, 64),
                    stop_token_ids=tokens, stop=st.lists(st.text(max_size=6), max_size=3), ignore_eos=st.booleans(),
                    target_len=st.none() | st.integers(0, 4096), predicted_len=st.none() | st.floats(0, 4096),
                    priority=st.integers(-5, 5), status=st.sampled_from(["live", "done"]),
                    finish_reason=st.none() | finishes, slices=st.integers(0, 100), replicas=st.lists(ids, max_size=4))
replica_infos = st.builds(ReplicaInfo, ids, st.integers(1, 2**22), st.sampled_from(["hf", "vllm", "deepspeed"]),
                          node=st.text(max_size=8), started=finite, kv_budget_bytes=st.none() | st.floats(0, 1e12),
                          keeps_kv=st.booleans(), busy_seconds=st.floats(0, 1e6))
replica_metrics = st.builds(ReplicaMetrics, finite, st.floats(0, 1e6), counts, counts, st.floats(0, 4))
histograms = st.integers(0, 6).flatmap(lambda n: st.builds(
    HistogramSnapshot, st.lists(st.floats(0, 1e4), min_size=n, max_size=n).map(sorted),
    st.lists(counts, min_size=n + 1, max_size=n + 1), st.floats(0, 1e9)))
snapshots = st.builds(
    MetricsSnapshot, finite, counts, st.sampled_from(["scls", "sls", "ils", "continuous_slices"]),
    pool_depth=counts, running=counts,
    backlog_seconds=st.floats(0, 1e6) | st.just(float("inf")), batch_size_mean=st.floats(0, 1e3),
    **{name: counts for name in MetricsSnapshot.COUNTERS},
    queue_time=st.none() | histograms, replicas=st.dictionaries(ids, replica_metrics, max_size=4))
outputs = st.builds(OutputEvent, tokens, ids, st.none() | finishes)
progresses = st.builds(Progress, ids, st.lists(st.builds(ProgressRow, ids, ids, epochs, st.integers(0, 10**5), tokens),
                                               max_size=8))
timings = st.builds(SliceTiming, st.integers(1, 64), st.integers(0, 10**5), prefill_time=st.floats(0, 1e3),
                    decode_step_times=st.lists(st.floats(0, 10), max_size=8), resumed_rows=st.integers(0, 64),
                    elapsed=st.floats(0, 1e4), replica_id=ids, continuous=st.booleans())


@given(orders | releases)
def test_work_messages_round_trip(msg):
    assert decode_work(encode(msg)) == msg


@given(reports | progresses)
def test_result_messages_round_trip(msg):
    assert decode_result(encode(msg)) == msg


@given(timings)
def test_slice_timings_round_trip(timing):
    assert decode_timing(encode(timing)) == timing
    assert read_timing(json.loads(encode(timing)) | {"label": "a bench run's own key"}) == timing


def test_slice_timings_logged_before_versions_read_as_version_1():
    """The slice log of a cluster that ran older code holds plain JSON objects, without v or kind."""
    legacy = {"n": 4, "max_input_len": 96, "prefill_time": 0.5, "decode_step_times": [0.01, 0.02],
              "resumed_rows": 1, "elapsed": 0.6, "replica_id": "w0"}
    assert decode_timing(json.dumps(legacy)) == SliceTiming(4, 96, 0.5, [0.01, 0.02], 1, 0.6, "w0")
    with pytest.raises(UnknownMessage, match="version"):
        decode_timing(json.dumps(legacy | {"v": VERSION + 1, "kind": "timing"}))


def test_the_wire_names_version_and_kind():
    wire = json.loads(encode(BatchOrder("e1.b0", 1, 8, ["r"])))
    assert wire == {"v": VERSION, "kind": "batch", "batch_id": "e1.b0", "epoch": 1, "steps": 8,
                    "request_ids": ["r"], "continues": False}


def test_a_progress_answers_the_newest_epoch_among_its_rows():
    msg = Progress("w", [ProgressRow("a", "e1.b0", 1, 0, [5]), ProgressRow("b", "e2.b0", 2, 3, [6])])
    assert msg.epoch == 2


def test_a_row_counts_its_published_tokens_when_told():
    assert RowReport("r", [1, 2], "slice_end").new_tokens == 2
    assert RowReport("r", [2], "slice_end", total=5).new_tokens == 5  # four were streamed as progress


def test_closing_a_batch_runs_nothing():
    msg = SliceReport.closed("e1.b3", 1, "w", ["x", "y"])
    assert [(o.id, o.tokens, o.finish) for o in msg.outputs] == [("x", [], "aborted"), ("y", [], "aborted")]
    assert msg.n == 0


@pytest.mark.parametrize("wire, why", [
    ({"v": VERSION + 1, "kind": "batch"}, "version"),
    ({"kind": "batch", "batch_id": "b", "epoch": 0, "steps": 1, "request_ids": ["r"]}, "version"),
    ({"v": VERSION, "kind": "slice"}, "kind 'slice'"),
    ({"v": VERSION, "batch_id": "b"}, "kind None"),
])
def test_unreadable_work_is_refused_by_name(wire, why):
    with pytest.raises(UnknownMessage, match=why):
        decode_work(json.dumps(wire))


def test_a_result_stream_refuses_work_messages():
    with pytest.raises(UnknownMessage, match="kind 'release'"):
        decode_result(encode(Release(["r"], 1)))


@given(records)
def test_request_records_round_trip(rec):
    assert RequestRecord.from_hash(rec.to_hash()) == rec
    # as a bytes client reads the hash back
    assert RequestRecord.from_hash({k.encode(): v.encode() for k, v in rec.to_hash().items()}) == rec


@given(replica_infos)
def test_replica_infos_round_trip(info):
    assert ReplicaInfo.from_hash(info.to_hash()) == info
    assert ReplicaInfo.busy_in(info.to_hash() | ReplicaInfo.busy_fields(7.5)) == 7.5


@given(snapshots)
def test_metrics_snapshots_round_trip(snap):
    assert decode_metrics(encode(snap)) == snap


@given(orders | releases, reports | progresses, ids, outputs)
def test_stream_entries_round_trip(work, result, rid, event):
    assert read_work_entry(work_entry(work)) == work
    assert read_result_entry(result_entry(result)) == result
    assert read_request_entry(request_entry(rid)) == rid
    assert read_output_entry(output_entry(event)) == event
    # a bytes client's entry reads the same
    assert read_output_entry({k.encode(): v.encode() for k, v in output_entry(event).items()}) == event


def test_records_and_the_snapshot_stored_before_versions_read_as_version_1():
    rec = RequestRecord("r", [1, 2], 8, 1.0, replicas=["w"])
    legacy = {k: v for k, v in rec.to_hash().items() if k != "v"}
    assert RequestRecord.from_hash(legacy) == rec
    snap = MetricsSnapshot(2.0, 3, "scls", pool_depth=4, replicas={"w": ReplicaMetrics(busy_seconds=1.5)})
    wire = json.loads(encode(snap))
    assert decode_metrics(json.dumps({k: v for k, v in wire.items() if k not in ("v", "kind")})) == snap


def test_fields_a_newer_writer_added_are_ignored_and_a_newer_version_is_refused():
    rec = RequestRecord("r", [1], 4, 0.0)
    assert RequestRecord.from_hash(rec.to_hash() | {"added_later": json.dumps(1)}) == rec
    with pytest.raises(UnknownMessage, match="RequestRecord version"):
        RequestRecord.from_hash(rec.to_hash() | {"v": str(VERSION + 1)})
    order = json.loads(encode(BatchOrder("b", 1, 8, ["r"]))) | {"added_later": True}
    assert decode_work(json.dumps(order)) == BatchOrder("b", 1, 8, ["r"])
    snap = json.loads(encode(MetricsSnapshot(1.0, 1, "sls"))) | {"v": VERSION + 1}
    with pytest.raises(UnknownMessage, match="version"):
        decode_metrics(json.dumps(snap))


def test_a_message_missing_a_field_it_needs_is_refused_by_name():
    with pytest.raises(UnknownMessage, match="BatchOrder unreadable"):
        decode_work(json.dumps({"v": VERSION, "kind": "batch", "batch_id": "b"}))
    with pytest.raises(UnknownMessage, match="without 'batch'"):
        read_work_entry({b"result": b"{}"})


def test_a_snapshot_since_another_holds_what_accumulated_between():
    before = MetricsSnapshot(1.0, 1, "scls", tokens_generated=10, pad_tokens=5, rows_run=2, slices_run=2,
                             replicas={"a": ReplicaMetrics(busy_seconds=1.0), "b": ReplicaMetrics(busy_seconds=2.0)})
    after = MetricsSnapshot(9.0, 1, "scls", tokens_generated=40, pad_tokens=15, rows_run=8, slices_run=8,
                            pool_depth=3, slice_time_mape=0.25,
                            replicas={"a": ReplicaMetrics(busy_seconds=5.0, running_requests=2),
                                      "c": ReplicaMetrics(busy_seconds=4.0)})
    d = after.since(before)
    assert (d.tokens_generated, d.pad_tokens, d.rows_run, d.slices_run) == (30, 10, 6, 6)
    assert {rid: r.busy_seconds for rid, r in d.replicas.items()} == {"a": 4.0, "c": 4.0}  # c joined since
    assert d.replicas["a"].running_requests == 2 and d.pool_depth == 3 and d.slice_time_mape == 0.25
    assert after.since(None) is after


def test_the_snapshot_names_its_figures_for_the_metrics_table():
    snap = MetricsSnapshot(1.0, 2, "sls", pool_depth=3)
    assert snap.value("pool_depth") == 3.0 and snap.value("epoch") == 2.0
    assert snap.value("mode") is None and snap.value("no_such_figure") is None
