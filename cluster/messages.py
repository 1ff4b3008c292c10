"""Everything Slicefleet's processes say to each other through Redis: one dataclass per record or message, and
the only place their fields are named on the wire (the stores in :mod:`cluster.stores` move them, and no other
module reads a field by its name).

What travels where:

- a request's hash holds a :class:`RequestRecord` (written by the ingress, closed by the dispatcher);
- a replica's hash holds its :class:`ReplicaInfo` (written when it registers, ``busy_seconds`` at each beat);
- ``incoming`` and ``cancel`` carry request ids (:func:`request_entry`);
- a replica's work stream carries :class:`BatchOrder` (run these requests for ``steps`` tokens, or extend a
  running row's lease) and :class:`Release` (free what you hold for these requests);
- the results stream carries :class:`SliceReport` (a batch or lease ended: its tokens, its finish, the engine's
  timings and waste) and :class:`Progress` (tokens of rows still running, so clients see them before the slice
  ends). Each carries the dispatcher epoch it answers, so a new dispatcher can tell its own traffic from a dead
  one's;
- a request's output stream carries :class:`OutputEvent` (new tokens, then the finish) for the ingress;
- the metrics key holds the dispatcher's latest :class:`MetricsSnapshot` (admission control, ``/metrics``).
- the slice log holds :class:`SliceTiming` entries (measured slices and forwards, to refit a latency profile).

Each message and record carries ``v`` (:data:`VERSION`), and a message its ``kind`` (output events excepted: the
store's result script writes them field by field, and their three fields have not changed since the first
release). A reader refuses a version
newer than its own, or a kind it does not know, with :class:`UnknownMessage`, instead of guessing at fields; it
ignores fields it does not know (an optional field added without a version bump). Records and the snapshot were
stored without ``v`` before versions were stamped, in the layout of version 1, and are read as such.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

VERSION = 1
"""Bumped when a field changes meaning or a required one is added; readers refuse versions above theirs."""


class UnknownMessage(ValueError):
    """A message this code cannot read: a newer version, or no kind it knows."""


@dataclass
class BatchOrder:
    """Dispatcher -> replica: run ``request_ids`` for at most ``steps`` tokens each (one slice, or one lease of
    continuous slices)."""

    batch_id: str
    epoch: int
    steps: int
    request_ids: list[str]
    continues: bool = False
    """Continuous slices: a new lease for a row the replica is already running (one request id)."""

    kind = "batch"


@dataclass
class Release:
    """Dispatcher -> replica: free what you hold for ``request_ids`` (a running row, or a KV cache kept after
    a slice)."""

    request_ids: list[str]
    epoch: int
    close: dict[str, str] = field(default_factory=dict)
    """Request id -> the lease to report closed (a cancellation of a running row)."""

    kind = "release"


@dataclass
class RowReport:
    """One request's part of a :class:`SliceReport`."""

    id: str
    tokens: list[int]
    """Tokens not yet published by a :class:`Progress` (all of the slice's when none was)."""
    finish: str
    """A ``balancer.types.FinishReason`` value: ``slice_end`` if the request goes on."""
    total: int | None = None
    """Tokens the row produced in this batch or lease, published before or not (None: ``len(tokens)``)."""
    at: int = -1
    """Position of ``tokens[0]`` among the request's generated tokens (-1: right after what Redis holds)."""

    @property
    def new_tokens(self) -> int:
        return len(self.tokens) if self.total is None else self.total


@dataclass
class SliceReport:
    """Replica -> dispatcher: a batch (or a lease) ended. Rows with finish ``aborted`` ran nothing (their
    request was gone from Redis) and only close the dispatcher's bookkeeping."""

    batch_id: str
    epoch: int
    replica_id: str
    outputs: list[RowReport]
    elapsed: float = 0.0
    """Seconds the engine ran the batch (0 for a lease of continuous slices: forwards are logged one by one)."""
    prefill_time: float = 0.0
    decode_step_times: list[float] = field(default_factory=list)
    pad_tokens: int = 0
    invalid_tokens: int = 0
    reprefill_tokens: int = 0
    kv_reused: bool = False
    resumed_rows: int = 0
    n: int = 0
    """Rows the engine ran (0: nothing ran, e.g. every request was gone, or a lease report)."""
    max_input_len: int = 0

    kind = "slice"

    @classmethod
    def closed(cls, batch_id: str, epoch: int, replica_id: str, rids: list[str]) -> "SliceReport":
        """Closes ``rids`` of a batch without running them: gone from Redis, or a cancelled row's lease."""
        return cls(batch_id, epoch, replica_id, [RowReport(rid, [], "aborted") for rid in rids])


@dataclass
class ProgressRow:
    id: str
    batch_id: str
    epoch: int
    at: int
    """Position of ``tokens[0]`` among the request's generated tokens."""
    tokens: list[int]


@dataclass
class Progress:
    """Replica -> dispatcher: tokens of rows still running (streamed every ``engine.stream_every`` steps)."""

    replica_id: str
    outputs: list[ProgressRow]

    kind = "progress"

    @property
    def epoch(self) -> int:
        return max((o.epoch for o in self.outputs), default=0)


@dataclass
class OutputEvent:
    """Dispatcher -> ingress, on a request's output stream: tokens of one slice (or progress report), then the
    finish. Written by the store's result script and by a close outside the result path."""

    tokens: list[int]
    replica: str = ""
    """The replica the tokens came from ("" for a close that ran nothing, e.g. a cancellation)."""
    finish_reason: str | None = None
    """Set on the last event only."""


@dataclass
class SliceTiming:
    """Dispatcher or replica -> the slice log: one measured slice, or one forward of a continuous batch, kept so
    that a latency profile can be refit under the cluster's real conditions
    (``predictor.latency.samples_from_slice_log``)."""

    n: int
    """Rows the forward ran."""
    max_input_len: int
    """The longest row's context at the start: what every row is padded to."""
    prefill_time: float = 0.0
    """Seconds of the prefill (0: none in this entry, e.g. a decode forward of a continuous batch)."""
    decode_step_times: list[float] = field(default_factory=list)
    resumed_rows: int = 0
    """Rows that resumed from a kept KV cache: their prefill was a forward of its own, not part of this one."""
    elapsed: float = 0.0
    replica_id: str = ""
    continuous: bool = False
    """One forward of a continuous batch (continuous slices, ILS), not a whole slice."""

    kind = "timing"


# ---- records -------------------------------------------------------------------------------------------------

@dataclass
class RequestRecord:
    """A request as stored: everything needed to run its next slice on any replica."""

    id: str
    prompt_ids: list[int]
    max_tokens: int
    arrival: float
    model: str = ""
    kind: str = "completion"
    """'completion' or 'chat' (only the response shape differs)."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    """No EOS or stop token (or stop string) before this many output tokens."""
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    """Stop strings (checked on text by the ingress; the engine stops on ``stop_token_ids``)."""
    ignore_eos: bool = False
    target_len: int | None = None
    """Trace mode: generate exactly this many tokens (benchmarks replaying known lengths)."""
    predicted_len: float | None = None
    priority: int = 0
    status: str = "live"
    """'live' until the dispatcher closes it ('done')."""
    finish_reason: str | None = None
    slices: int = 0
    replicas: list[str] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.status == "done"

    def to_hash(self) -> dict[str, str]:
        """One hash field per field, each JSON (the store's result script updates single fields in place)."""
        return _to_hash(self)

    @classmethod
    def from_hash(cls, data: Mapping) -> "RequestRecord":
        return _from_hash(cls, data)

    @staticmethod
    def closing_fields(reason: str) -> dict[str, str]:
        """The fields that close a request (what the result script sets when a request finishes)."""
        return {"status": json.dumps("done"), "finish_reason": json.dumps(reason)}


@dataclass
class ReplicaInfo:
    """A worker replica as registered: what the dispatcher places against."""

    id: str
    pid: int
    engine: str
    node: str = ""
    started: float = 0.0
    kv_budget_bytes: float | None = None
    """What this replica can give to KV cache (free GPU memory after weights x safety, or the CPU budget)."""
    keeps_kv: bool = False
    """Its engine keeps requests' KV caches between slices (so the dispatcher may count on cache holders)."""
    busy_seconds: float = 0.0
    """Seconds its engine has computed so far (updated with every heartbeat)."""
    ray_session: str = ""
    """The Ray session (one per Ray cluster) it runs in; "" outside Ray. Two clusters share one Redis during an
    upgrade, and each ingress's /health counts only the replicas of its own cluster."""

    def to_hash(self) -> dict[str, str]:
        return _to_hash(self)

    @classmethod
    def from_hash(cls, data: Mapping) -> "ReplicaInfo":
        return _from_hash(cls, data)

    @staticmethod
    def busy_fields(seconds: float) -> dict[str, str]:
        """The one field a heartbeat updates."""
        return {"busy_seconds": json.dumps(seconds)}

    @staticmethod
    def busy_in(data: Mapping) -> float:
        """``busy_seconds`` of a stored replica hash, whole or not (0 before the first beat)."""
        raw = _field(data, "busy_seconds")
        return float(json.loads(raw)) if raw else 0.0


def _to_hash(record) -> dict[str, str]:
    return {"v": str(VERSION), **{k: json.dumps(v) for k, v in asdict(record).items()}}


def _from_hash(cls, data: Mapping):
    decoded = {_text(k): v for k, v in data.items()}
    version = int(decoded.pop("v", 1))
    if version > VERSION:
        raise UnknownMessage(f"{cls.__name__} version {version}: this code reads versions up to {VERSION}")
    return _build(cls, {k: json.loads(v) for k, v in decoded.items()})


# ---- the dispatcher's metrics snapshot -----------------------------------------------------------------------

@dataclass
class HistogramSnapshot:
    """A cumulative histogram as plain numbers: ``counts[i]`` observations fell in ``(bounds[i-1], bounds[i]]``,
    the last one above every bound (+Inf)."""

    bounds: list[float]
    counts: list[int]
    sum: float = 0.0


@dataclass
class ReplicaMetrics:
    """One replica's part of a :class:`MetricsSnapshot`."""

    expected_completion_s: float = 0.0
    """Seconds until it is expected to finish the work placed on it."""
    busy_seconds: float = 0.0
    inflight_batches: int = 0
    running_requests: int = 0
    kv_usage: float = 0.0
    """KV cache the dispatcher reserved there, over its budget (1 = full)."""


@dataclass(slots=True, kw_only=True)
class DispatchCounters:
    """What the dispatch core counts since its epoch began (the scheduler's ``stats`` count batches, rows,
    tokens and finishes). A :class:`MetricsSnapshot` carries them under the same names, so they are declared
    once, here."""

    stale_results: int = 0
    pad_tokens: int = 0
    invalid_tokens: int = 0
    reprefill_tokens: int = 0
    kv_reused_batches: int = 0
    predicted_slice_seconds_sum: float = 0.0
    actual_slice_seconds_sum: float = 0.0
    abs_pct_error_sum: float = 0.0
    slices_estimated: int = 0
    replicas_lost: int = 0
    batches_timed_out: int = 0
    moves: int = 0
    requests_requeued: int = 0


@dataclass
class MetricsSnapshot(DispatchCounters):
    """Dispatcher -> ingress, bench and ``/metrics``: the dispatcher's figures, republished every second.

    Counters count since this dispatcher's epoch started (a restart begins them at 0 again): the core's
    (inherited from :class:`DispatchCounters`, keyword-only) and the scheduler's below."""

    time: float
    epoch: int
    mode: str
    pool_depth: int = 0
    running: int = 0
    backlog_seconds: float = 0.0
    """Predicted seconds until the replicas could start a request arriving now (inf: no replica)."""
    batch_size_mean: float = 0.0
    slice_time_mape: float = 0.0
    # the scheduler's counters
    slices_run: int = 0
    batches_run: int = 0
    rows_run: int = 0
    requests_finished: int = 0
    tokens_generated: int = 0
    early_returns: int = 0
    preemptions: int = 0
    """Moves plus re-queued requests: each will be prefilled again elsewhere."""
    queue_time: HistogramSnapshot | None = None
    """Seconds from arrival to first placement."""
    replicas: dict[str, ReplicaMetrics] = field(default_factory=dict)

    kind = "metrics"

    COUNTERS = ("slices_run", "batches_run", "rows_run", "requests_finished", "tokens_generated", "early_returns",
                "preemptions", *(f.name for f in fields(DispatchCounters)))

    def since(self, before: "MetricsSnapshot | None") -> "MetricsSnapshot":
        """What accumulated between ``before`` and this snapshot: counters and each replica's busy seconds as
        differences (a replica ``before`` did not know counts from 0), every other figure as it is now."""
        if before is None:
            return self
        counters = {name: getattr(self, name) - getattr(before, name) for name in self.COUNTERS}
        replicas = {rid: ReplicaMetrics(**asdict(r) | {"busy_seconds": r.busy_seconds - (
            before.replicas[rid].busy_seconds if rid in before.replicas else 0.0)}) for rid, r in self.replicas.items()}
        return MetricsSnapshot(**{f.name: getattr(self, f.name) for f in fields(self)} | counters
                               | {"replicas": replicas})

    def value(self, name: str) -> float | None:
        """A numeric figure by field name (what the ``/metrics`` series table names); None for one that is not
        a number."""
        return _number(getattr(self, name, None))

    @staticmethod
    def replica_value(replica: ReplicaMetrics, name: str) -> float | None:
        return _number(getattr(replica, name, None))


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


# ---- the wire ------------------------------------------------------------------------------------------------

WorkMessage = BatchOrder | Release
ResultMessage = SliceReport | Progress


def encode(msg: WorkMessage | ResultMessage | MetricsSnapshot | SliceTiming) -> str:
    return json.dumps({"v": VERSION, "kind": msg.kind, **asdict(msg)})


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _build(cls, data: dict):
    """``cls`` from ``data``, ignoring fields it does not know; :class:`UnknownMessage` if one it needs is
    missing."""
    known = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise UnknownMessage(f"{cls.__name__} unreadable: {exc}") from exc


def _fields(raw: str | bytes, kinds: dict[str, type], legacy_kind: str | None = None) -> tuple[type, dict]:
    """The message's class and fields. ``legacy_kind``: what a message without ``v`` or ``kind`` is (one stored
    before versions were stamped, in the layout of version 1); None: such a message is refused."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise UnknownMessage(f"not a message: {type(data).__name__}")
    if legacy_kind is not None and "v" not in data:
        data |= {"v": 1, "kind": legacy_kind}
    version, kind = data.pop("v", None), data.pop("kind", None)
    if not isinstance(version, int) or version > VERSION:
        raise UnknownMessage(f"message version {version!r}: this code reads versions up to {VERSION}")
    if kind not in kinds:
        raise UnknownMessage(f"no message of kind {kind!r} here (expected one of {sorted(kinds)})")
    return kinds[kind], data


def _rows(cls, data: dict, row: type) -> Any:
    outputs = data.get("outputs")
    if not isinstance(outputs, list):
        raise UnknownMessage(f"{cls.__name__} without a list of outputs")
    return _build(cls, data | {"outputs": [_build(row, o) for o in outputs]})


def decode_work(raw: str | bytes) -> WorkMessage:
    cls, data = _fields(raw, {"batch": BatchOrder, "release": Release})
    return _build(cls, data)


def decode_result(raw: str | bytes) -> ResultMessage:
    cls, data = _fields(raw, {"slice": SliceReport, "progress": Progress})
    return _rows(cls, data, RowReport if cls is SliceReport else ProgressRow)


def decode_timing(raw: str | bytes) -> SliceTiming:
    """A slice-log entry; one logged before versions were stamped (a plain JSON object) reads as version 1."""
    cls, data = _fields(raw, {"timing": SliceTiming}, legacy_kind="timing")
    return _build(cls, data)


def read_timing(data: Mapping) -> SliceTiming:
    """A slice-log entry saved as a plain mapping (a bench run's ``slice_log.json``); other keys are ignored."""
    return _build(SliceTiming, dict(data))


def decode_metrics(raw: str | bytes) -> MetricsSnapshot:
    """A snapshot published before versions were stamped has the version-1 layout and reads as such."""
    _, data = _fields(raw, {"metrics": MetricsSnapshot}, legacy_kind="metrics")
    replicas = data.get("replicas") or {}
    queue = data.get("queue_time")
    return _build(MetricsSnapshot, data | {
        "replicas": {rid: _build(ReplicaMetrics, r) for rid, r in replicas.items()},
        "queue_time": _build(HistogramSnapshot, queue) if queue is not None else None})


# Stream entries: the field each stream's entries carry their message in.
_WORK, _RESULT, _REQUEST = "batch", "result", "id"


def work_entry(msg: WorkMessage) -> dict[str, str]:
    return {_WORK: encode(msg)}


def result_entry(msg: ResultMessage) -> dict[str, str]:
    return {_RESULT: encode(msg)}


def request_entry(rid: str) -> dict[str, str]:
    """An entry of ``incoming`` (a new request) or ``cancel`` (its client went away)."""
    return {_REQUEST: rid}


def _field(entry: Mapping, name: str) -> str | None:
    value = entry.get(name, entry.get(name.encode()))
    return None if value is None else _text(value)


def _required(entry: Mapping, name: str) -> str:
    value = _field(entry, name)
    if value is None:
        raise UnknownMessage(f"stream entry without {name!r}: {sorted(_text(k) for k in entry)}")
    return value


def read_work_entry(entry: Mapping) -> WorkMessage:
    return decode_work(_required(entry, _WORK))


def read_result_entry(entry: Mapping) -> ResultMessage:
    return decode_result(_required(entry, _RESULT))


def read_request_entry(entry: Mapping) -> str:
    return _required(entry, _REQUEST)


def output_entry(event: OutputEvent) -> dict[str, str]:
    """An output event as the store's result script writes it (``finish_reason`` only on the last one)."""
    entry = {"tokens": json.dumps(event.tokens), "replica": event.replica}
    return entry | ({"finish_reason": event.finish_reason} if event.finish_reason else {})


def read_output_entry(entry: Mapping) -> OutputEvent:
    return OutputEvent(json.loads(_field(entry, "tokens") or "[]"), _field(entry, "replica") or "",
                       _field(entry, "finish_reason") or None)
