"""The dispatcher's store: its three streams (arrivals, cancellations, results), results applied once,
batches posted to replicas, replicas forgotten, the metrics snapshot published.

It applies a batch at most once: a Lua script checks and sets the batch's ``applied`` flag in the same atomic
step as it appends the tokens, so a duplicate result after a reclaim never doubles a token.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from cluster.messages import (MetricsSnapshot, OutputEvent, ReplicaInfo, RequestRecord, UnknownMessage, WorkMessage,
                              encode, output_entry, read_request_entry, read_result_entry, request_entry,
                              work_entry)
from cluster.stores.base import OUTPUT_TTL_SECONDS, Store

log = logging.getLogger(__name__)

METRICS_TTL_SECONDS = 60
"""A snapshot older than this is gone: no dispatcher has published for a minute (readiness fails)."""

# KEYS[1] = applied flag ("" = none: position checks alone make it idempotent), KEYS[2] = live set, then per
# request: req hash, gen list, out stream (3 keys each).
# ARGV[1] = ttl, ARGV[2] = replica id, then per request (5 each): id, json tokens, finish reason ("" = continues),
# at (absolute position of the first token, -1 = append as given), slice end (1: counts as a slice run here).
# Returns 1 = applied, 0 = this batch was applied before, 2 = a gap (tokens before `at` never arrived).
# With `at`, tokens already stored are skipped, so every token is appended and published exactly once, in order.
_APPLY_RESULT = """
if KEYS[1] ~= '' and redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then
  return 0
end
local status = 1
local n = (#KEYS - 2) / 3
for i = 0, n - 1 do
  local req, gen, out = KEYS[3 + 3*i], KEYS[4 + 3*i], KEYS[5 + 3*i]
  local rid, tokens_json, reason = ARGV[3 + 5*i], ARGV[4 + 5*i], ARGV[5 + 5*i]
  local at, slice_end = tonumber(ARGV[6 + 5*i]), ARGV[7 + 5*i]
  if redis.call('EXISTS', req) == 1 and redis.call('HGET', req, 'status') ~= '"done"' then
    local tokens = cjson.decode(tokens_json)
    local skip = 0
    if at >= 0 then
      local have = redis.call('LLEN', gen)
      if at > have then
        status = 2
        tokens = {}
        reason = ''
        slice_end = '0'
      else
        skip = have - at
      end
    end
    local fresh = {}
    for j = skip + 1, #tokens do
      redis.call('RPUSH', gen, tokens[j])
      fresh[#fresh + 1] = tokens[j]
    end
    local fresh_json = '[]'
    if #fresh > 0 then fresh_json = cjson.encode(fresh) end
    if slice_end == '1' then
      local replicas = cjson.decode(redis.call('HGET', req, 'replicas'))
      table.insert(replicas, ARGV[2])
      redis.call('HSET', req, 'replicas', cjson.encode(replicas),
                 'slices', tostring(tonumber(redis.call('HGET', req, 'slices')) + 1))
    end
    if reason == '' then
      if #fresh > 0 then redis.call('XADD', out, '*', 'tokens', fresh_json, 'replica', ARGV[2]) end
    else
      redis.call('HSET', req, 'status', '"done"', 'finish_reason', cjson.encode(reason))
      redis.call('SREM', KEYS[2], rid)
      redis.call('XADD', out, '*', 'tokens', fresh_json, 'replica', ARGV[2], 'finish_reason', reason)
      redis.call('EXPIRE', req, ARGV[1]); redis.call('EXPIRE', gen, ARGV[1]); redis.call('EXPIRE', out, ARGV[1])
    end
  end
end
return status
"""



class DispatcherStore(Store):
    DISPATCH_GROUP = "dispatcher"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._apply = self._r.register_script(_APPLY_RESULT)

    # ---- epochs --------------------------------------------------------------------------------------
    def new_epoch(self) -> int:
        return int(self._r.incr(self.k.epoch))

    # ---- the dispatcher's streams: arrivals, cancellations, results --------------------------------------
    def _dispatch_streams(self) -> dict[str, str]:
        return {"incoming": self.k.incoming, "cancel": self.k.cancel, "results": self.k.results}

    def ensure_dispatch_groups(self) -> None:
        for stream in self._dispatch_streams().values():
            self._ensure_group(stream, self.DISPATCH_GROUP)

    def read_dispatch(self, pending: bool = False, block_ms: int = 50) -> list[tuple[str, list[str], list]]:
        """One read of the dispatcher's three streams. For each that brought entries: its name (``incoming``,
        ``cancel`` or ``results``), the entry ids to acknowledge (:meth:`ack_dispatch`) once they are handled,
        and what they carry (request ids; for ``results``, :class:`~cluster.messages.ResultMessage`).

        ``pending``: instead, the entries delivered to the dispatcher but never acknowledged (a round cut short
        by a Redis error, or a dispatcher restarted). An entry this code cannot read is logged and acknowledged
        with the rest."""
        names = {v: k for k, v in self._dispatch_streams().items()}
        start = "0" if pending else ">"
        resp = self._r.xreadgroup(self.DISPATCH_GROUP, "dispatcher", {s: start for s in names}, count=512,
                                  block=None if pending else block_ms)
        out = []
        for stream, entries in resp or []:
            name = names[stream.decode()]
            ids = [eid.decode() for eid, _ in entries]
            if not ids:
                continue
            payloads = []
            for eid, fields in entries:
                if not fields:  # a pending entry deleted from its stream (by an older release's trimming)
                    continue
                try:
                    payloads.append(read_result_entry(fields) if name == "results" else read_request_entry(fields))
                except UnknownMessage as exc:
                    log.error("%s entry %s skipped: %s", name, eid.decode(), exc)
            out.append((name, ids, payloads))
        return out

    def ack_dispatch(self, name: str, ids: list[str]) -> None:
        """Acknowledge (and delete) entries of one of the dispatcher's streams once they are handled."""
        self._ack(self._dispatch_streams()[name], self.DISPATCH_GROUP, ids)

    def announce(self, rids: list[str]) -> None:
        """Put already-stored requests on the incoming stream again (a dispatcher handing them over)."""
        if rids:
            pipe = self._r.pipeline(transaction=False)
            for rid in rids:
                pipe.xadd(self.k.incoming, request_entry(rid))
            pipe.execute()

    # ---- requests --------------------------------------------------------------------------------------
    def finish(self, rid: str, reason: str) -> None:
        """Close a request outside the result path (cancelled, or refused after acceptance)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self.k.req(rid), mapping=RequestRecord.closing_fields(reason))
        pipe.srem(self.k.live, rid)
        pipe.xadd(self.k.out(rid), output_entry(OutputEvent([], finish_reason=reason)))
        for key in (self.k.req(rid), self.k.gen(rid), self.k.out(rid)):
            pipe.expire(key, OUTPUT_TTL_SECONDS)
        pipe.execute()

    def apply_result(self, batch_id: str | None, replica_id: str, outcomes: list[tuple],
                     slice_end: bool = True) -> int:
        """Atomically append each request's tokens and publish its output event.

        ``outcomes``: (request id, new token ids, finish reason or "" if it continues[, at]) where ``at`` is
        the absolute position of the first token: tokens Redis already holds are skipped, so a result or
        progress report applied twice appends nothing twice. ``batch_id`` (None for progress) makes the whole
        result once-only. ``slice_end``: the result ends a slice (counted in the record's slices and replicas).
        Returns 1 when applied, 0 when this batch was applied before, 2 when some ``at`` lay past the stored
        tokens (a report went missing: nothing of that request was applied).
        """
        keys = [self.k.applied(batch_id) if batch_id else "", self.k.live]
        args: list[Any] = [OUTPUT_TTL_SECONDS, replica_id]
        for rid, tokens, reason, *at in outcomes:
            keys += [self.k.req(rid), self.k.gen(rid), self.k.out(rid)]
            args += [rid, json.dumps(list(tokens)), reason, at[0] if at else -1, "1" if slice_end else "0"]
        return int(self._apply(keys=keys, args=args))

    # ---- replicas and their work streams ------------------------------------------------------------------
    def post_batch(self, replica_id: str, message: WorkMessage) -> None:
        self._r.xadd(self.k.work(replica_id), work_entry(message))

    def post_batches(self, posts: list[tuple[str, WorkMessage]]) -> None:
        """(replica id, message) pairs in one round trip, in order."""
        pipe = self._r.pipeline(transaction=False)
        for replica_id, message in posts:
            pipe.xadd(self.k.work(replica_id), work_entry(message))
        pipe.execute()

    def forget_replica(self, replica_id: str) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.srem(self.k.replicas, replica_id)
        pipe.delete(self.k.replica(replica_id), self.k.work(replica_id), self.k.hb(replica_id))
        pipe.execute()

    def busy_seconds(self, replica_ids: list[str]) -> dict[str, float]:
        """Seconds each replica's engine has computed, as its last heartbeat reported."""
        pipe = self._r.pipeline(transaction=False)
        for rid in replica_ids:
            pipe.hgetall(self.k.replica(rid))
        return {rid: ReplicaInfo.busy_in(data) for rid, data in zip(replica_ids, pipe.execute())}

    # ---- views ---------------------------------------------------------------------------------------
    def publish_metrics(self, snapshot: MetricsSnapshot) -> None:
        self._r.set(self.k.metrics, encode(snapshot), ex=METRICS_TTL_SECONDS)
