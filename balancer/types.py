"""Plain data types shared by the scheduler, the simulator, the engines and the cluster.

The balancer only ever sees lengths and times. Token ids, sampling parameters and text live in the
worker and cluster layers, keyed by ``Request.id``.

They are slotted: a simulated million-request run makes millions of them, and a slotted object is built
about three times as fast as one with a ``__dict__``, and is smaller.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    """Why a request stopped producing tokens in a slice (``SLICE_END`` means it is not finished)."""

    EOS = "eos"
    STOP = "stop"
    LENGTH = "length"
    SLICE_END = "slice_end"
    ABORTED = "aborted"

    @property
    def is_final(self) -> bool:
        return self is not _SLICE_END  # a module constant: enum member lookup on the class is slow


_SLICE_END = FinishReason.SLICE_END


class Mode(str, enum.Enum):
    """Scheduling mode of the whole cluster."""

    SCLS = "scls"
    """Slice-level: slices of S tokens, DP batching, max-min placement, offload to the pool."""
    SLS = "sls"
    """Sequence-level: FCFS, fixed-size static batches run to completion (static-batching baseline)."""
    ILS = "ils"
    """Iteration-level: continuous batching on each replica under a concurrency cap."""
    CONTINUOUS_SLICES = "continuous_slices"
    """Slices as the unit of dispatch, accounting and migration, over one continuous batch per replica: a
    request placed on a replica joins its running batch at the next step, leaves the moment it finishes, and
    at each slice boundary either keeps its row (no re-prefill, no gap) or moves where it finishes sooner."""


@dataclass(slots=True)
class Request:
    """What the scheduler knows of one request."""

    id: str
    prompt_len: int
    """Prompt length in the serving model's tokens."""
    max_tokens: int
    """Generation budget, already capped by the configured maximum generation length G."""
    arrival: float
    """Arrival time, seconds (wall clock in the cluster, virtual time in the simulator)."""
    predicted_len: float | None = None
    """Predicted total output length; ``None`` means the scheduler falls back to ``max_tokens``."""
    generated: int = 0
    """Output tokens generated so far (over all slices)."""
    slices: int = 0
    """Slices (or static batches) this request has been part of."""
    priority: int = 0
    """Larger runs earlier among requests of the same ordering key; aging still applies."""
    pool_since: float | None = None
    """When the request last (re)entered the pool; ``None`` until it does."""
    kv_replica: str | None = None
    """The replica that kept this request's KV cache after its last slice, if any: a slice there feeds only
    the new token instead of re-prefilling the whole history."""
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: FinishReason | None = None

    @property
    def input_len(self) -> int:
        """What the next slice must prefill: prompt plus everything generated so far."""
        return self.prompt_len + self.generated

    @property
    def remaining(self) -> int:
        return max(self.max_tokens - self.generated, 0)

    @property
    def predicted_remaining(self) -> float:
        """Predicted tokens still to come, never above the budget that is left and never below 1."""
        total = self.max_tokens if self.predicted_len is None else self.predicted_len
        left = total - self.generated
        cap = self.max_tokens - self.generated
        if cap < 1:
            cap = 1
        return float(cap if left > cap else (left if left > 1.0 else 1.0))

    @property
    def done(self) -> bool:
        return self.finish_reason is not None and self.finish_reason.is_final


@dataclass(slots=True)
class Batch:
    """Requests that run together for ``steps`` decode steps at most."""

    id: str
    requests: list[Request]
    steps: int
    """Decode steps this batch may take: the slice length in SCLS, the whole budget in SLS/ILS."""
    est_time: float = 0.0
    """Estimated serving time, seconds."""
    est_bytes: float = 0.0
    """Estimated peak KV-cache bytes."""
    cheaper_on: dict[str, float] = field(default_factory=dict)
    """Replicas that hold some rows' KV caches, and the batch's (lower) estimated time there."""
    max_input_len: int = field(init=False)
    """The longest row's input when the batch was formed (what every row is padded to)."""

    def __post_init__(self) -> None:
        # Fixed at formation: the rows' input_len grows once the slice's tokens are applied.
        # (input_len spelled out, in a list rather than a generator: a batch is made for every slice)
        self.max_input_len = max([r.prompt_len + r.generated for r in self.requests], default=0)

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def request_ids(self) -> list[str]:
        return [r.id for r in self.requests]


@dataclass(slots=True)
class Assignment:
    """A batch placed on a replica, with the dispatcher's expectation of when it runs."""

    batch: Batch
    replica_id: str
    expected_start: float
    expected_finish: float
    continues: bool = False
    """The replica already runs this request (its previous slice ended there): extend its lease in place,
    nothing to prefill (continuous slices)."""
    moved_from: str | None = None
    """The replica that ran this request's previous slice and must now release it (continuous slices)."""


@dataclass(slots=True)
class RequestOutcome:
    """What one slice did for one request."""

    request_id: str
    new_tokens: int
    finish_reason: FinishReason
    """``SLICE_END`` when the request needs another slice."""


@dataclass(slots=True)
class SliceResult:
    """What a replica reports after running a batch (one slice in SCLS)."""

    batch_id: str
    replica_id: str
    outcomes: list[RequestOutcome]
    elapsed: float
    """Measured serving time of the batch, seconds."""
    prefill_time: float = 0.0
    decode_step_times: list[float] = field(default_factory=list)
    pad_tokens: int = 0
    """Padding positions prefilled (left padding up to the batch's longest input)."""
    invalid_tokens: int = 0
    """Decode positions computed for rows that had already finished."""
    reprefill_tokens: int = 0
    """Previously generated or previously prefilled tokens that this slice prefilled again."""
    kv_reused: bool = False
    """The engine kept this batch's KV cache from an earlier slice instead of prefilling again."""
