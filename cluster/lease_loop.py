"""A replica's continuous batch under the dispatcher's leases (continuous slices, and ILS).

The engine (``worker.protocol.ContinuousEngine``) decodes every admitted request until it finishes; the
dispatcher hands out *leases*: a request may report at most ``steps`` tokens under one batch id. This loop lays
the leases over the engine:
- every ``stream_every`` steps (and at once for a first token) it publishes each row's new tokens as progress,
  under the row's current lease, with the absolute position of the first one, so Redis applies each exactly once;
- when a lease is used up it reports the slice end and the row *keeps decoding*: the dispatcher either renews
  the lease here (the tokens made meanwhile count toward the new lease: no gap, no re-prefill) or releases the
  row because it moves elsewhere (those tokens are dropped and counted as invalid);
- a request that finishes reports at once, or when its next lease arrives if it finished past its lease;
- a row whose lease is neither renewed nor released within ``grace`` seconds (a dispatcher restart, a lost
  message) is dropped: the dispatcher places it again from what Redis holds.

Every report is posted before the bookkeeping moves on, so a Redis failure mid-way repeats a report (harmless:
positions make applies idempotent) and never skips one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from balancer.types import FinishReason
from cluster.messages import (BatchOrder, Progress, ProgressRow, Release, RowReport, SliceReport, SliceTiming,
                              WorkMessage)

log = logging.getLogger("slicefleet.worker")

TIMING_LOG_EVERY = 16
"""Engine steps between two uploads of forward timings to the slice log."""


@dataclass
class Row:
    """One request in the engine's batch, as the dispatcher's leases see it."""

    before: int
    """Tokens the request had in Redis when this replica admitted it (absolute offset of engine tokens)."""
    batch_id: str | None
    """Its current lease; ``None`` while the next one is undecided."""
    epoch: int
    lease_start: int = 0
    """Engine tokens produced when the current lease began."""
    lease_end: int = 0
    """Engine tokens at which the current lease is used up."""
    published: int = 0
    """Engine tokens already posted."""
    final: object | None = None
    """The engine's ``ItemOutput`` once the request finished (held while no lease covers it)."""
    waiting_since: float = 0.0


class LeaseLoop:
    """Drives one continuous engine with leases from one replica's work stream (see the module docstring)."""

    def __init__(self, store, engine, replica_id: str, load, stream_every: int = 4, grace: float = 10.0):
        """``load(request_ids)`` -> (slice items, ids gone from Redis), as ``SliceWorker._load``."""
        self.store = store
        self.engine = engine
        self.replica_id = replica_id
        self.load = load
        self.stream_every = max(stream_every, 1)
        self.grace = grace
        self.rows: dict[str, Row] = {}
        self._loaded: dict[str, object] = {}
        """Slice items read ahead by ``handle_all`` (None: gone from Redis)."""
        self.steps = 0
        self.busy_seconds = 0.0
        self.epoch = 0
        self._pad_reported = 0
        self._invalid_reported = 0
        self._invalid = 0
        """Tokens decoded for rows that then moved away, not yet reported."""

    # ---- messages from the dispatcher ------------------------------------------------------------------
    def handle_all(self, msgs: list[WorkMessage]) -> None:
        """Handle messages in order, reading the records of every admission among them in one round trip."""
        wanted = [rid for m in msgs if isinstance(m, BatchOrder)
                  and (not m.continues or m.request_ids[0] not in self.rows) for rid in m.request_ids]
        if wanted:
            items, gone = self.load(wanted)
            self._loaded = {it.request_id: it for it in items} | {rid: None for rid in gone}
        try:
            for msg in msgs:
                self.handle(msg)
        finally:
            self._loaded = {}

    def handle(self, msg: WorkMessage) -> None:
        if msg.epoch < self.epoch:
            return  # from a dispatcher that is gone: the current one placed (or will place) these again
        if isinstance(msg, Release):
            self._release(msg)
        elif msg.continues:
            self._renew(msg)
        else:
            self._admit(msg)

    def _admit(self, msg: BatchOrder) -> None:
        for rid in msg.request_ids:
            if rid in self.rows:  # placed again (a restarted dispatcher): start over from what Redis holds
                self._drop(rid)
        ids = msg.request_ids
        if all(rid in self._loaded for rid in ids):
            items = [self._loaded[rid] for rid in ids if self._loaded[rid] is not None]
            gone = [rid for rid in ids if self._loaded[rid] is None]
        else:
            items, gone = self.load(ids)
        for item in items:
            self.engine.add(item)
            self.rows[item.request_id] = Row(before=item.generated, batch_id=msg.batch_id, epoch=msg.epoch,
                                             lease_end=msg.steps)
        if gone:
            self._post_closed(msg.batch_id, msg.epoch, gone)

    def _renew(self, msg: BatchOrder) -> None:
        [rid] = msg.request_ids
        row = self.rows.get(rid)
        if row is None:  # dropped meanwhile (grace ran out, or this replica restarted): admit from Redis
            self._admit(msg)
            return
        if row.batch_id is not None:
            log.warning("lease %s for %s ignored: it already holds %s", msg.batch_id, rid, row.batch_id)
            return
        row.batch_id, row.epoch = msg.batch_id, msg.epoch
        row.lease_start, row.lease_end = row.lease_end, row.lease_end + msg.steps

    def _release(self, msg: Release) -> None:
        for rid in msg.request_ids:
            if rid in self.rows:
                self._drop(rid)
            elif hasattr(self.engine, "drop"):
                self.engine.drop([rid])
        for rid, batch_id in msg.close.items():  # a cancellation: close its lease so the dispatcher frees the row
            self._post_closed(batch_id, msg.epoch, [rid])

    def _drop(self, rid: str) -> None:
        row = self.rows.pop(rid)
        tokens = self._tokens(rid, row)
        self._invalid += max(len(tokens) - row.published, 0)
        self.engine.abort(rid)

    def drop_all(self) -> None:
        """Every lease is void (the dispatcher presumed this replica dead and re-placed its rows)."""
        rows = list(self.rows)
        for rid in rows:
            self._drop(rid)
        if rows:
            log.info("dropped %d rows whose leases were voided", len(rows))

    def on_epoch(self, epoch: int) -> None:
        """A newer dispatcher took over: its predecessor's leases are void, and it places every request again."""
        if epoch > self.epoch:
            stale = [rid for rid, row in self.rows.items() if row.epoch < epoch]
            for rid in stale:
                self._drop(rid)
            if stale:
                log.info("epoch %d: dropped %d rows of the previous dispatcher", epoch, len(stale))
            self.epoch = epoch

    # ---- engine steps ----------------------------------------------------------------------------------
    def step(self) -> None:
        t0 = time.perf_counter()
        finished = self.engine.step()
        self.busy_seconds += time.perf_counter() - t0
        self.steps += 1
        if self.steps % TIMING_LOG_EVERY == 0:
            self._log_forwards()
        for out in finished:
            row = self.rows.get(out.request_id)
            if row is not None:
                row.final = out

    def flush(self, now: float | None = None) -> None:
        """Post what is due: finished requests, used-up leases, and progress every ``stream_every`` steps.

        Everything due is posted in one round trip; the bookkeeping moves on only once it is posted."""
        now = time.time() if now is None else now
        produced = self.engine.produced()
        messages, after = [], []
        progress = []
        for rid, row in list(self.rows.items()):
            tokens = row.final.new_token_ids if row.final is not None else produced.get(rid, [])
            if row.batch_id is None:
                if now - row.waiting_since > self.grace:
                    log.warning("%s: no lease after its slice ended (%.0f s); dropped", rid, self.grace)
                    self._drop(rid)
                continue
            if row.final is not None and len(tokens) <= row.lease_end:
                messages.append(self._report(rid, row, tokens, row.final.finish_reason.value))
                after.append(lambda rid=rid: self.rows.pop(rid, None))
            elif len(tokens) >= row.lease_end:
                messages.append(self._report(rid, row, tokens[:row.lease_end], FinishReason.SLICE_END.value))
                after.append(lambda row=row: self._lease_used_up(row, now))
            elif len(tokens) > row.published and (row.published == 0 or self.steps % self.stream_every == 0):
                progress.append(ProgressRow(rid, row.batch_id, row.epoch, row.before + row.published,
                                            list(tokens[row.published:])))
        if progress:
            messages.append(Progress(self.replica_id, progress))
        if not messages:
            return
        self.store.post_results(messages)
        for apply in after:
            apply()
        for o in progress:
            self.rows[o.id].published += len(o.tokens)

    @staticmethod
    def _lease_used_up(row: Row, now: float) -> None:
        row.published, row.batch_id, row.waiting_since = row.lease_end, None, now

    def _log_forwards(self) -> None:
        """Each forward's timing into the cluster's slice log, as one-step slices (a prefill: a slice of 0 steps)."""
        stats = getattr(self.engine, "stats", None)
        forwards = getattr(stats, "forwards", None)
        if not forwards:
            return
        taken, stats.forwards = forwards, []
        self.store.log_slice(*[
            SliceTiming(n, width, prefill_time=dt if prefill else 0.0, decode_step_times=[] if prefill else [dt],
                        replica_id=self.replica_id, continuous=True)
            for n, width, dt, prefill in taken])

    def _tokens(self, rid: str, row: Row) -> list[int]:
        if row.final is not None:
            return row.final.new_token_ids
        return self.engine.produced().get(rid, [])

    def _report(self, rid: str, row: Row, tokens: list[int], finish: str) -> SliceReport:
        """A lease's closing report: its last tokens, its finish, and the engine's waste not yet reported (so the
        cluster's valid-token ratio sees it; counted once per flush, on the first report)."""
        stats = getattr(self.engine, "stats", None)
        pad, invalid = getattr(stats, "pad_tokens", 0), getattr(stats, "invalid_tokens", 0)
        message = SliceReport(
            row.batch_id, row.epoch, self.replica_id,
            outputs=[RowReport(rid, list(tokens[row.published:]), finish, total=len(tokens) - row.lease_start,
                               at=row.before + row.published)],
            pad_tokens=pad - self._pad_reported,
            invalid_tokens=self._invalid + invalid - self._invalid_reported,
        )
        self._pad_reported, self._invalid_reported, self._invalid = pad, invalid, 0
        return message

    def _post_closed(self, batch_id: str, epoch: int, rids: list[str]) -> None:
        self.store.post_result(SliceReport.closed(batch_id, epoch, self.replica_id, rids))
