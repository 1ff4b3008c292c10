"""What the dispatcher and the worker replicas say to each other through Redis streams: one dataclass per
message, and the only place their fields are named on the wire.

Two streams carry them. A replica's work stream carries :class:`BatchOrder` (run these requests for ``steps``
tokens, or extend a running row's lease) and :class:`Release` (free what you hold for these requests). The
results stream carries :class:`SliceReport` (a batch or lease ended: its tokens, its finish, the engine's
timings and waste) and :class:`Progress` (tokens of rows still running, so clients see them before the slice
ends). Each carries the dispatcher epoch it answers, so a new dispatcher can tell its own traffic from a dead
one's.

On the wire each message is one JSON object with ``v`` (:data:`VERSION`) and ``kind``. A reader refuses a
version newer than its own, or a kind it does not know, with :class:`UnknownMessage`, instead of guessing at
fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

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


WorkMessage = BatchOrder | Release
ResultMessage = SliceReport | Progress


def encode(msg: WorkMessage | ResultMessage) -> str:
    return json.dumps({"v": VERSION, "kind": msg.kind, **asdict(msg)})


def _fields(raw: str | bytes, kinds: dict[str, type]) -> tuple[type, dict]:
    data = json.loads(raw)
    version, kind = data.pop("v", None), data.pop("kind", None)
    if not isinstance(version, int) or version > VERSION:
        raise UnknownMessage(f"message version {version!r}: this code reads versions up to {VERSION}")
    if kind not in kinds:
        raise UnknownMessage(f"no message of kind {kind!r} here (expected one of {sorted(kinds)})")
    return kinds[kind], data


def decode_work(raw: str | bytes) -> WorkMessage:
    cls, data = _fields(raw, {"batch": BatchOrder, "release": Release})
    return cls(**data)


def decode_result(raw: str | bytes) -> ResultMessage:
    cls, data = _fields(raw, {"slice": SliceReport, "progress": Progress})
    row = RowReport if cls is SliceReport else ProgressRow
    return cls(**data | {"outputs": [row(**o) for o in data["outputs"]]})
