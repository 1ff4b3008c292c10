"""The Redis state store: every accepted request lives here from acceptance to completion.

Who writes what (so that each fact has one writer):
- the ingress writes a request's record and announces it on ``incoming`` *before* it acknowledges the client;
- the dispatcher posts batches to each replica's work stream, and it alone applies results: appending the
  new tokens, recording the replica, publishing output events, closing finished requests. It applies a batch
  at most once (a Lua script checks and sets the batch's ``applied`` flag in the same atomic step), so a
  duplicate result after a reclaim never doubles a token;
- worker replicas register with a heartbeat, read their work stream, and post results.

Keys (``{p}`` is the configured prefix):
  {p}:req:{id}       hash   the request: prompt ids, budget, sampling, stop ids, arrival, status, ...
  {p}:gen:{id}       list   output token ids so far (appended only by the result script)
  {p}:out:{id}       stream output events for the client: tokens of one slice, then the finish
  {p}:live           set    ids of requests not yet finished (what a restarted dispatcher rebuilds from)
  {p}:incoming       stream new request ids, for the dispatcher
  {p}:cancel         stream ids whose clients went away
  {p}:work:{replica} stream batches for one replica (consumer group "worker")
  {p}:results        stream slice results (consumer group "dispatcher")
  {p}:replicas       set    registered replica ids;  {p}:hb:{replica} heartbeat key with a TTL
  {p}:replica:{r}    hash   replica info (pid, engine, capacity)
  {p}:epoch          int    dispatcher incarnation; batches of an older epoch are stale
  {p}:metrics        string the dispatcher's latest metrics snapshot (JSON)
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from cluster.config import RedisSettings
from cluster.messages import ResultMessage, UnknownMessage, WorkMessage, decode_result, decode_work, encode
from cluster.redis_server import safe_url

log = logging.getLogger(__name__)

OUTPUT_TTL_SECONDS = 3600
"""How long a finished request's record and output stream stay readable (a client may reconnect)."""


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
    finish_reason: str | None = None
    slices: int = 0
    replicas: list[str] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def to_hash(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, data: dict) -> "RequestRecord":
        decoded = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in data.items()}
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in decoded.items() if k in known})


SLICE_LOG_LENGTH = 20_000
"""Slice timings kept in Redis (a few MB at most)."""


class Keys:
    def __init__(self, prefix: str = "sf"):
        self.p = prefix

    def req(self, rid: str) -> str:
        return f"{self.p}:req:{rid}"

    def gen(self, rid: str) -> str:
        return f"{self.p}:gen:{rid}"

    def out(self, rid: str) -> str:
        return f"{self.p}:out:{rid}"

    def work(self, replica: str) -> str:
        return f"{self.p}:work:{replica}"

    def hb(self, replica: str) -> str:
        return f"{self.p}:hb:{replica}"

    def replica(self, replica: str) -> str:
        return f"{self.p}:replica:{replica}"

    @property
    def live(self) -> str:
        return f"{self.p}:live"

    @property
    def incoming(self) -> str:
        return f"{self.p}:incoming"

    @property
    def cancel(self) -> str:
        return f"{self.p}:cancel"

    @property
    def results(self) -> str:
        return f"{self.p}:results"

    @property
    def replicas(self) -> str:
        return f"{self.p}:replicas"

    @property
    def epoch(self) -> str:
        return f"{self.p}:epoch"

    @property
    def metrics(self) -> str:
        return f"{self.p}:metrics"

    @property
    def slice_log(self) -> str:
        return f"{self.p}:slice_log"

    def applied(self, batch_id: str) -> str:
        return f"{self.p}:applied:{batch_id}"


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


@dataclass
class ReplicaInfo:
    id: str
    pid: int
    engine: str
    node: str = ""
    started: float = 0.0
    kv_budget_bytes: float | None = None
    """What this replica can give to KV cache (free GPU memory after weights x safety, or the CPU budget)."""
    keeps_kv: bool = False
    """Its engine keeps requests' KV caches between slices (so the dispatcher may count on cache holders)."""


STORE_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)
"""What a store call raises while Redis is down or restarting: callers retry on these and fail on anything else."""


def stream_gone(exc: BaseException) -> bool:
    """Whether a stream read failed because the stream (and its consumer group) no longer exists."""
    return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)


class StateStore:
    """Synchronous access for the dispatcher and the workers (each runs its loop in a thread)."""

    def __init__(self, url: str, prefix: str = "sf", password: str | None = None, **tls):
        """``tls``: redis-py's ``ssl_*`` options for a rediss:// URL. :meth:`connect` takes the password and these
        from the configuration, which is how the cluster's processes open it."""
        self.url = url
        self.r = redis.Redis.from_url(url, password=password, **tls, socket_timeout=30, socket_connect_timeout=5,
                                      health_check_interval=10, retry_on_timeout=True)
        self.k = Keys(prefix)
        self._apply = self.r.register_script(_APPLY_RESULT)

    @classmethod
    def connect(cls, settings: RedisSettings) -> "StateStore":
        """The store ``settings`` (a config's ``redis``) describe: URL, prefix, password and TLS."""
        return cls(settings.url, settings.key_prefix, **settings.connection_kwargs())

    def ping(self) -> bool:
        return bool(self.r.ping())

    def ensure_group(self, stream: str, group: str) -> None:
        try:
            self.r.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ---- requests (ingress side) ---------------------------------------------------------------------
    def submit(self, rec: RequestRecord) -> None:
        """Durable from here on: the record, the live set and the announcement land together."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k.req(rec.id), mapping=rec.to_hash())
        pipe.sadd(self.k.live, rec.id)
        pipe.xadd(self.k.incoming, {"id": rec.id})
        pipe.execute()

    def request_cancel(self, rid: str) -> None:
        self.r.xadd(self.k.cancel, {"id": rid})

    def record(self, rid: str) -> RequestRecord | None:
        data = self.r.hgetall(self.k.req(rid))
        return RequestRecord.from_hash(data) if data else None

    def generated(self, rid: str) -> list[int]:
        return [int(t) for t in self.r.lrange(self.k.gen(rid), 0, -1)]

    def records(self, rids: list[str]) -> list[tuple[RequestRecord | None, list[int]]]:
        """Records and generated tokens of many requests in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for rid in rids:
            pipe.hgetall(self.k.req(rid))
            pipe.lrange(self.k.gen(rid), 0, -1)
        raw = pipe.execute()
        out = []
        for data, gen in zip(raw[0::2], raw[1::2]):
            out.append((RequestRecord.from_hash(data) if data else None, [int(t) for t in gen]))
        return out

    def announce(self, rids: list[str]) -> None:
        """Put already-stored requests on the incoming stream again (a dispatcher handing them over)."""
        if rids:
            pipe = self.r.pipeline(transaction=False)
            for rid in rids:
                pipe.xadd(self.k.incoming, {"id": rid})
            pipe.execute()

    def live_ids(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self.k.live))

    def finish(self, rid: str, reason: str) -> None:
        """Close a request outside the result path (cancelled, or refused after acceptance)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k.req(rid), mapping={"status": json.dumps("done"), "finish_reason": json.dumps(reason)})
        pipe.srem(self.k.live, rid)
        pipe.xadd(self.k.out(rid), {"tokens": "[]", "finish_reason": reason})
        for key in (self.k.req(rid), self.k.gen(rid), self.k.out(rid)):
            pipe.expire(key, OUTPUT_TTL_SECONDS)
        pipe.execute()

    def read_output(self, rid: str, last_id: str = "0", block_ms: int = 1000) -> list[tuple[str, dict]]:
        resp = self.r.xread({self.k.out(rid): last_id}, block=block_ms)
        if not resp:
            return []
        return [(eid.decode(), {k.decode(): v.decode() for k, v in fields.items()}) for eid, fields in resp[0][1]]

    # ---- results (dispatcher side) -------------------------------------------------------------------
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

    # ---- epochs, replicas ----------------------------------------------------------------------------
    def new_epoch(self) -> int:
        return int(self.r.incr(self.k.epoch))

    def epoch(self) -> int:
        return int(self.r.get(self.k.epoch) or 0)

    def register_replica(self, info: ReplicaInfo, ttl: float) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k.replica(info.id), mapping={k: json.dumps(v) for k, v in asdict(info).items()})
        pipe.sadd(self.k.replicas, info.id)
        pipe.set(self.k.hb(info.id), "1", px=int(ttl * 1000))
        pipe.execute()

    def heartbeat(self, replica_id: str, ttl: float, busy_seconds: float | None = None) -> bool:
        """Beat; False when the replica is no longer registered (a dispatcher presumed it dead)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.sismember(self.k.replicas, replica_id)
        pipe.set(self.k.hb(replica_id), "1", px=int(ttl * 1000))
        flags = pipe.execute()
        if flags[0] and busy_seconds is not None:
            # not before the check: an HSET on a forgotten replica would recreate half its record
            self.r.hset(self.k.replica(replica_id), "busy_seconds", json.dumps(busy_seconds))
        return bool(flags[0])

    def busy_seconds(self, replica_ids: list[str]) -> dict[str, float]:
        pipe = self.r.pipeline(transaction=False)
        for rid in replica_ids:
            pipe.hget(self.k.replica(rid), "busy_seconds")
        return {rid: float(json.loads(v)) if v else 0.0 for rid, v in zip(replica_ids, pipe.execute())}

    def replicas_alive(self) -> tuple[list[str], list[str]]:
        """(alive, dead) among registered replicas, by heartbeat."""
        ids = sorted(m.decode() for m in self.r.smembers(self.k.replicas))
        if not ids:
            return [], []
        pipe = self.r.pipeline(transaction=False)
        for rid in ids:
            pipe.exists(self.k.hb(rid))
        flags = pipe.execute()
        return [i for i, f in zip(ids, flags) if f], [i for i, f in zip(ids, flags) if not f]

    def replica_info(self, replica_id: str) -> ReplicaInfo | None:
        data = self.r.hgetall(self.k.replica(replica_id))
        if not data:
            return None
        known = ReplicaInfo.__dataclass_fields__
        return ReplicaInfo(**{k.decode(): json.loads(v) for k, v in data.items() if k.decode() in known})

    def forget_replica(self, replica_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(self.k.replicas, replica_id)
        pipe.delete(self.k.replica(replica_id), self.k.work(replica_id), self.k.hb(replica_id))
        pipe.execute()

    # ---- work streams --------------------------------------------------------------------------------
    def post_batch(self, replica_id: str, message: WorkMessage) -> None:
        self.r.xadd(self.k.work(replica_id), {"batch": encode(message)})

    def post_batches(self, posts: list[tuple[str, WorkMessage]]) -> None:
        """(replica id, message) pairs in one round trip, in order."""
        pipe = self.r.pipeline(transaction=False)
        for replica_id, message in posts:
            pipe.xadd(self.k.work(replica_id), {"batch": encode(message)})
        pipe.execute()

    def read_work(self, replica_id: str, consumer: str, block_ms: int | None, count: int = 1,
                  pending: bool = False) -> list[tuple[str, WorkMessage]]:
        """Next batches for a replica; ``block_ms`` None returns at once (0 would block forever).

        ``pending``: instead, the batches already delivered to this consumer but never acknowledged (its
        loop failed between reading a batch and posting the result, e.g. while Redis restarted). A message
        this code cannot read (a newer dispatcher's) is logged, acknowledged and skipped.
        """
        stream = self.k.work(replica_id)
        resp = self.r.xreadgroup("worker", consumer, {stream: "0" if pending else ">"}, count=count,
                                 block=None if pending else block_ms)
        if not resp:
            return []
        out = []
        for eid, fields in resp[0][1]:
            if not fields:  # a pending entry trimmed from its stream
                continue
            try:
                out.append((eid.decode(), decode_work(fields[b"batch"])))
            except UnknownMessage as exc:
                log.error("work message %s skipped: %s", eid.decode(), exc)
                self.ack_work(replica_id, eid.decode())
        return out

    def ack_work(self, replica_id: str, entry_id: str) -> None:
        self.r.xack(self.k.work(replica_id), "worker", entry_id)

    def take_cpu_slot(self) -> int:
        """0, 1, 2, ... for the replicas that ask in turn (engines pinned to distinct cores)."""
        return self.r.incr(f"{self.k.p}:cpu_slot") - 1

    # ---- the dispatcher's streams: arrivals, cancellations, results --------------------------------------
    DISPATCH_GROUP = "dispatcher"

    def _dispatch_streams(self) -> dict[str, str]:
        return {"incoming": self.k.incoming, "cancel": self.k.cancel, "results": self.k.results}

    def ensure_dispatch_groups(self) -> None:
        for stream in self._dispatch_streams().values():
            self.ensure_group(stream, self.DISPATCH_GROUP)

    def read_dispatch(self, pending: bool = False, block_ms: int = 50) -> list[tuple[str, list[str], list]]:
        """One read of the dispatcher's three streams. For each that brought entries: its name (``incoming``,
        ``cancel`` or ``results``), the entry ids to acknowledge (:meth:`ack_dispatch`) once they are handled,
        and what they carry (request ids; for ``results``, :class:`~cluster.messages.ResultMessage`).

        ``pending``: instead, the entries delivered to the dispatcher but never acknowledged (a round cut short
        by a Redis error). A result this code cannot read is logged and acknowledged with the rest."""
        names = {v: k for k, v in self._dispatch_streams().items()}
        start = "0" if pending else ">"
        resp = self.r.xreadgroup(self.DISPATCH_GROUP, "dispatcher", {s: start for s in names}, count=512,
                                 block=None if pending else block_ms)
        out = []
        for stream, entries in resp or []:
            name = names[stream.decode()]
            ids = [eid.decode() for eid, _ in entries]
            if not ids:
                continue
            payloads = []
            for eid, f in entries:
                if not f:  # a pending entry trimmed from its stream
                    continue
                if name != "results":
                    payloads.append(f[b"id"].decode())
                    continue
                try:
                    payloads.append(decode_result(f[b"result"]))
                except UnknownMessage as exc:
                    log.error("result %s skipped: %s", eid.decode(), exc)
            out.append((name, ids, payloads))
        return out

    def ack_dispatch(self, name: str, ids: list[str]) -> None:
        self.r.xack(self._dispatch_streams()[name], self.DISPATCH_GROUP, *ids)

    def post_result(self, message: ResultMessage) -> None:
        self.r.xadd(self.k.results, {"result": encode(message)})

    def post_results(self, messages: list[ResultMessage]) -> None:
        """Several results in one round trip, in order."""
        pipe = self.r.pipeline(transaction=False)
        for message in messages:
            pipe.xadd(self.k.results, {"result": encode(message)})
        pipe.execute()

    def publish_metrics(self, snapshot: dict) -> None:
        self.r.set(self.k.metrics, json.dumps(snapshot), ex=60)

    def metrics_snapshot(self) -> dict:
        raw = self.r.get(self.k.metrics)
        return json.loads(raw) if raw else {}

    def log_slice(self, *timings: dict, keep: int = SLICE_LOG_LENGTH) -> None:
        """Append measured slice (or forward) timings (the newest ``keep`` are kept): what a profile can be
        refit from under the cluster's real conditions (``predictor.latency.samples_from_slice_log``)."""
        if not timings:
            return
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(self.k.slice_log, *[json.dumps(t) for t in timings])
        pipe.ltrim(self.k.slice_log, -keep, -1)
        pipe.execute()

    def slice_log(self) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.k.slice_log, 0, -1)]


def wait_for_redis(url: str, password: str | None = None, timeout: float = 30.0, **tls) -> None:
    """Block until the server answers PING (it may be starting or restarting); ``tls`` as for :class:`StateStore`.

    A wrong password or a certificate this client does not trust fails at once (waiting changes neither); the
    error names the server (password masked) and, where the symptom is ambiguous, the likely cause."""
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, password=password, **tls, socket_connect_timeout=1, socket_timeout=5)
    try:
        while True:
            try:
                client.ping()
                return
            except redis.AuthenticationError as exc:
                raise redis.AuthenticationError(f"Redis at {safe_url(url)} refused the credentials: {exc}") from exc
            except redis.ConnectionError as exc:
                if isinstance(exc.__context__, ssl.SSLCertVerificationError):
                    raise redis.ConnectionError(
                        f"Redis at {safe_url(url)}: {exc} (the server's certificate is not one this client trusts: "
                        "redis.tls_ca_file must be the CA that signed it; redis.tls_check_hostname checks that it "
                        "names the URL's host)") from exc
                if time.monotonic() > deadline:
                    hint = ""
                    if url.startswith("redis://") and _dropped(exc):
                        hint = " (a server that only speaks TLS drops plain connections like this: is its URL rediss://?)"
                    elif isinstance(exc.__context__, ssl.SSLError) and not tls.get("ssl_certfile"):
                        hint = (" (a server that checks client certificates hangs up on a client without one: "
                                "redis.tls_cert_file and redis.tls_key_file)")
                    raise redis.ConnectionError(
                        f"Redis at {safe_url(url)} did not answer within {timeout:g} s: {exc}{hint}") from exc
                time.sleep(0.2)
    finally:
        client.close()


def _dropped(exc: BaseException) -> bool:
    """The server hung up on us (rather than nobody listening)."""
    return isinstance(exc.__context__, (ConnectionResetError, BrokenPipeError)) or "closed by server" in str(exc)
