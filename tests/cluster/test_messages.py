"""The dispatcher <-> replica messages: every kind survives the wire unchanged, and what a reader cannot read is
refused by name instead of half-parsed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.messages import (VERSION, BatchOrder, Progress, ProgressRow, Release, RowReport, SliceReport,
                              UnknownMessage, decode_result, decode_work, encode)

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
progresses = st.builds(Progress, ids, st.lists(st.builds(ProgressRow, ids, ids, epochs, st.integers(0, 10**5), tokens),
                                               max_size=8))


@given(orders | releases)
def test_work_messages_round_trip(msg):
    assert decode_work(encode(msg)) == msg


@given(reports | progresses)
def test_result_messages_round_trip(msg):
    assert decode_result(encode(msg)) == msg


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
