"""What every role's store shares: the connection, the key names, reads of requests, replicas and the epoch,
posting results and slice timings, and the errors a caller retries on.

Keys (``{p}`` is the configured prefix):
  {p}:req:{id}       hash   the request (:class:`~cluster.messages.RequestRecord`)
  {p}:gen:{id}       list   output token ids so far (appended only by the result script)
  {p}:out:{id}       stream output events for the client (:class:`~cluster.messages.OutputEvent`)
  {p}:live           set    ids of requests not yet finished (what a restarted dispatcher rebuilds from)
  {p}:incoming       stream new request ids, for the dispatcher
  {p}:cancel         stream ids whose clients went away
  {p}:work:{replica} stream batches for one replica (consumer group "worker")
  {p}:results        stream slice results (consumer group "dispatcher")
  {p}:replicas       set    registered replica ids;  {p}:hb:{replica} heartbeat key with a TTL
  {p}:replica:{r}    hash   replica info (:class:`~cluster.messages.ReplicaInfo`)
  {p}:epoch          int    dispatcher incarnation; batches of an older epoch are stale
  {p}:metrics        string the dispatcher's latest :class:`~cluster.messages.MetricsSnapshot`
  {p}:slice_log      list   measured slice timings (the newest :data:`SLICE_LOG_LENGTH`)

Who writes what (so that each fact has one writer): the ingress writes a request's record and announces it on
``incoming`` *before* it acknowledges the client; the dispatcher alone applies results and closes requests;
worker replicas register, beat, read their work stream and post results. An entry of a shared stream is deleted
once its reader acknowledged it, so the streams stay as long as the work in flight.
"""

from __future__ import annotations

import ssl
import time

import redis

from cluster.config import RedisSettings
from cluster.messages import (ReplicaInfo, RequestRecord, ResultMessage, SliceTiming, encode, request_entry,
                              result_entry)
from cluster.redis_server import safe_url

OUTPUT_TTL_SECONDS = 3600
"""How long a finished request's record and output stream stay readable (a client may reconnect)."""
SLICE_LOG_LENGTH = 20_000
"""Slice timings kept in Redis (a few MB at most)."""

STORE_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)
"""What a store call raises while Redis is down or restarting: callers retry on these and fail on anything else."""


def stream_gone(exc: BaseException) -> bool:
    """Whether a stream read failed because the stream (and its consumer group) no longer exists."""
    return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)


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

    def applied(self, batch_id: str) -> str:
        return f"{self.p}:applied:{batch_id}"

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

    @property
    def cpu_slot(self) -> str:
        return f"{self.p}:cpu_slot"


# ---- writes and reads the synchronous and the asynchronous stores both make (a pipeline queues the same
# commands in either; only its execute is awaited) --------------------------------------------------------------

def queue_submit(pipe, k: Keys, rec: RequestRecord) -> None:
    """Durable from here on, in one transaction: the record, the live set and the announcement land together."""
    pipe.hset(k.req(rec.id), mapping=rec.to_hash())
    pipe.sadd(k.live, rec.id)
    pipe.xadd(k.incoming, request_entry(rec.id))


def split_alive(ids: list[str], beating: list) -> tuple[list[str], list[str]]:
    """(alive, dead) among ``ids`` from their heartbeat keys' EXISTS."""
    return [i for i, f in zip(ids, beating) if f], [i for i, f in zip(ids, beating) if not f]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Store:
    """The synchronous connection (the dispatcher and the workers each run their loop in a thread) and what
    every role reads."""

    def __init__(self, url: str, prefix: str = "sf", password: str | None = None, **tls):
        """``tls``: redis-py's ``ssl_*`` options for a rediss:// URL. :meth:`connect` takes the password and these
        from the configuration, which is how the cluster's processes open it."""
        self.url = url
        self._r = redis.Redis.from_url(url, password=password, **tls, socket_timeout=30, socket_connect_timeout=5,
                                       health_check_interval=10, retry_on_timeout=True)
        self.k = Keys(prefix)

    @classmethod
    def connect(cls, settings: RedisSettings):
        """The store ``settings`` (a config's ``redis``) describe: URL, prefix, password and TLS."""
        return cls(settings.url, settings.key_prefix, **settings.connection_kwargs())

    def ping(self) -> bool:
        return bool(self._r.ping())

    def close(self) -> None:
        self._r.close()

    def _ensure_group(self, stream: str, group: str) -> None:
        try:
            self._r.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _ack(self, stream: str, group: str, ids: list[str]) -> None:
        """Acknowledge entries and delete them: once read and handled an entry is of no more use, and a shared
        stream left alone grows for as long as the cluster runs. An entry still pending (read, not yet
        acknowledged) stays, for its reader to read again after a restart."""
        if ids:
            pipe = self._r.pipeline(transaction=True)
            pipe.xack(stream, group, *ids)
            pipe.xdel(stream, *ids)
            pipe.execute()

    # ---- requests --------------------------------------------------------------------------------------
    def record(self, rid: str) -> RequestRecord | None:
        data = self._r.hgetall(self.k.req(rid))
        return RequestRecord.from_hash(data) if data else None

    def generated(self, rid: str) -> list[int]:
        return [int(t) for t in self._r.lrange(self.k.gen(rid), 0, -1)]

    def records(self, rids: list[str]) -> list[tuple[RequestRecord | None, list[int]]]:
        """Records and generated tokens of many requests in one round trip."""
        pipe = self._r.pipeline(transaction=False)
        for rid in rids:
            pipe.hgetall(self.k.req(rid))
            pipe.lrange(self.k.gen(rid), 0, -1)
        raw = pipe.execute()
        return [(RequestRecord.from_hash(data) if data else None, [int(t) for t in gen])
                for data, gen in zip(raw[0::2], raw[1::2])]

    def live_ids(self) -> list[str]:
        return sorted(_text(m) for m in self._r.smembers(self.k.live))

    # ---- epochs, replicas ----------------------------------------------------------------------------
    def epoch(self) -> int:
        return int(self._r.get(self.k.epoch) or 0)

    def replicas_alive(self) -> tuple[list[str], list[str]]:
        """(alive, dead) among registered replicas, by heartbeat."""
        ids = sorted(_text(m) for m in self._r.smembers(self.k.replicas))
        if not ids:
            return [], []
        pipe = self._r.pipeline(transaction=False)
        for rid in ids:
            pipe.exists(self.k.hb(rid))
        return split_alive(ids, pipe.execute())

    def replica_info(self, replica_id: str) -> ReplicaInfo | None:
        data = self._r.hgetall(self.k.replica(replica_id))
        return ReplicaInfo.from_hash(data) if data else None

    # ---- results and timings: the workers post them, and a superseded dispatcher hands one back -----------
    def post_result(self, message: ResultMessage) -> None:
        self._r.xadd(self.k.results, result_entry(message))

    def post_results(self, messages: list[ResultMessage]) -> None:
        """Several results in one round trip, in order."""
        pipe = self._r.pipeline(transaction=False)
        for message in messages:
            pipe.xadd(self.k.results, result_entry(message))
        pipe.execute()

    def log_slice(self, *timings: SliceTiming, keep: int = SLICE_LOG_LENGTH) -> None:
        """Append measured slice (or forward) timings (the newest ``keep`` are kept): what a profile can be
        refit from under the cluster's real conditions (``predictor.latency.samples_from_slice_log``)."""
        if not timings:
            return
        pipe = self._r.pipeline(transaction=False)
        pipe.rpush(self.k.slice_log, *[encode(t) for t in timings])
        pipe.ltrim(self.k.slice_log, -keep, -1)
        pipe.execute()


def wait_for_redis(url: str, password: str | None = None, timeout: float = 30.0, **tls) -> None:
    """Block until the server answers PING (it may be starting or restarting); ``tls`` as for :class:`Store`.

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
