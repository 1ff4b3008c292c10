"""Fault harness: a live cluster under seeded load, with a worker, the dispatcher or Redis killed mid-load.

It starts ``slicefleet serve`` on loopback (the real CLI, the real model, the embedded Redis under the local
cluster's supervision, or with ``--external-redis`` a Redis that this harness owns and restarts itself, as
systemd or a Kubernetes restart policy would), then sends one fixed, seeded, greedy request set several times:

* ``reference``: no fault; every later run is compared with it, request by request;
* ``worker``: the worker replica with the most rows running is SIGKILLed;
* ``dispatcher``: the dispatcher replica is SIGKILLed (Serve starts a new one, which rebuilds from Redis);
* ``redis``: the Redis server is SIGKILLed; the cluster's supervisor (or this harness) restarts it on the same
  port with its append-only file;
* ``all``: the three in sequence in one run, each after the previous one has recovered.

A fault fires only once requests are in flight: accepted (HTTP 200), with tokens already streamed to their
client, not finished, and still in Redis's live set. If that does not happen within ``--trigger-timeout`` the
fault counts as not fired and the run fails; so does a run that loses a request or returns anything other than
the reference's text, finish reason and usage. Per run it reports accepted, completed, failed (by status),
lost, differing outputs (duplicated: longer than the reference; corrupted: otherwise), and per fault how many
requests it hit and two recovery times: ``resumed_s``, until every request in flight at the fault received a new
token or its finish, and ``restored_s``, until the killed part was back (a new replica beating, a new
dispatcher epoch, Redis answering on the same port).

    python -m bench.faults --requests 80 --rate 3 --out runs/faults     # or: slicefleet faults ...
"""

from __future__ import annotations

from bench.harness_main import harness_main
import argparse
import asyncio
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("slicefleet.faults")

SCENARIOS = ("worker", "dispatcher", "redis", "all")
SEQUENCE = ("worker", "dispatcher", "redis")
FIXED_PROMPTS = [
    "Hello there, how are you", "Write a short poem about the sea", "What is the capital of France?",
    "Explain slice-level scheduling in one paragraph", "List three prime numbers",
    "Translate 'good morning' into German", "def fibonacci(n):", "Once upon a time",
]
# What every Slicefleet process wants on this kind of machine (scripts/env.sh), for a harness run on its own.
CHILD_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
    "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184",
}


# ---- the request set --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaultRequest:
    index: int
    prompt: list[int]
    max_tokens: int
    offset: float
    """Seconds after the run's start when it is sent."""


def request_set(tokenizer, n: int, seed: int, rate: float | None, min_tokens: int, max_tokens: int,
                source: str = "sharegpt", max_prompt_len: int = 512) -> list[FaultRequest]:
    """``n`` requests, the same for the same arguments: prompts (ShareGPT, vLLM's filter, or a fixed list) as
    token ids, budgets drawn uniformly in [min_tokens, max_tokens], Poisson arrivals at ``rate``."""
    import numpy as np

    from bench.loadgen import arrivals

    if source == "sharegpt":
        from predictor.sharegpt import sample_requests

        sample = sample_requests(tokenizer, n, seed=seed, max_prompt_len=max_prompt_len)
        if len(sample) < n:
            raise SystemExit(f"only {len(sample)} ShareGPT prompts of at most {max_prompt_len} tokens; ask for fewer")
        prompts = [s.prompt for s in sample[:n]]
    else:
        prompts = [FIXED_PROMPTS[i % len(FIXED_PROMPTS)] + "!" * (i // len(FIXED_PROMPTS)) for i in range(n)]
    rng = np.random.default_rng(seed)
    budgets = rng.integers(min_tokens, max_tokens + 1, size=n)
    offsets = arrivals(n, rate, 1.0, seed)
    return [FaultRequest(i, list(tokenizer(p).input_ids), int(b), float(o))
            for i, (p, b, o) in enumerate(zip(prompts, budgets, offsets))]


# ---- one request ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    index: int
    status: int | None = None
    """HTTP status; None when no response came at all."""
    accepted: bool = False
    """HTTP 200: the ingress had stored the request in Redis before answering."""
    completed: bool = False
    """Its stream ended with a finish reason and [DONE], without an error event."""
    rid: str = ""
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: str = ""
    retry_after: str | None = None
    """The Retry-After header of a refusal (what a 429 must carry)."""
    sent: float = 0.0
    done: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    """Run-relative times of chunks that carried text or the finish."""

    def in_flight(self) -> bool:
        return self.accepted and bool(self.chunk_times) and self.done is None

    @property
    def kind(self) -> str:
        """How it ended, for the failed-by-status count."""
        if self.completed:
            return "completed"
        if self.status is None:
            return "no response"
        if self.status != 200:
            return f"HTTP {self.status}"
        return "error after acceptance"


async def send(client, url: str, model: str, req: FaultRequest, t0: float, out: Outcome, timeout: float) -> None:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    out.sent = time.perf_counter() - t0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as resp:
            out.status = resp.status_code
            if resp.status_code != 200:
                out.retry_after = resp.headers.get("retry-after")
                out.error = (await resp.aread()).decode(errors="replace")[:300]
                return
            out.accepted = True
            # Known before any token: a client cut off later can still find its request in Redis. Serve's proxy
            # appends its own X-Request-ID after the app's, so the ingress's comes first.
            out.rid = (resp.headers.get_list("x-request-id") or [""])[0].strip()
            finished = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    out.completed = finished and not out.error
                    break
                msg = json.loads(data)
                if "error" in msg:
                    out.error = json.dumps(msg["error"])[:300]
                    continue
                out.rid = out.rid or str(msg.get("id", "")).split("-", 1)[-1]
                if msg.get("usage"):
                    out.usage = {k: msg["usage"].get(k) for k in ("prompt_tokens", "completion_tokens")}
                for choice in msg.get("choices") or []:
                    text, reason = choice.get("text") or "", choice.get("finish_reason")
                    out.text += text
                    if text or reason:
                        out.chunk_times.append(time.perf_counter() - t0)
                    if reason:
                        out.finish_reason, finished = reason, True
    except Exception as exc:  # counted, never fatal: a dropped connection is exactly what this measures
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        out.done = time.perf_counter() - t0


# ---- the cluster's processes ------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's GCS, raylet and actor workers, the embedded Redis)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Cluster:
    """``slicefleet serve`` in a child process, and what the faults need to find inside it."""

    def __init__(self, workdir: Path, mode: str, replicas: int, slice_len: int, max_gen_len: int,
                 external_redis: bool, log_path: Path, extra: dict | None = None, redis_url: str | None = None):
        from cluster.redis_server import EmbeddedRedis, free_loopback_port

        self.workdir, self.mode, self.replicas = workdir, mode, replicas
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.own_redis = EmbeddedRedis(workdir / "redis").start() if external_redis else None
        cfg = {"api": {"host": "127.0.0.1", "port": self.port},
               "scheduler": {"mode": mode, "slice_len": slice_len, "max_gen_len": max_gen_len},
               "replicas": {"num_replicas": replicas}}
        for section, values in (extra or {}).items():  # further settings, e.g. api.max_backlog_seconds
            cfg.setdefault(section, {}).update(values)
        # ``redis_url``: a Redis someone else owns (the upgrade harness's, shared by two clusters).
        if self.own_redis is not None or redis_url:
            cfg["redis"] = {"url": redis_url or self.own_redis.url}
        self.config_path = workdir / "cluster.yaml"
        import yaml

        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.redis_url: str | None = redis_url or (self.own_redis.url if self.own_redis else None)
        self.prefix = "sf"
        self._store = None
        self.code_dir: Path | None = None
        """Where serve runs (its packages are imported from there first); None: the harness's working directory."""

    def start(self, timeout: float = 600.0) -> None:
        import httpx

        env = {**os.environ, **{k: os.environ.get(k, v) for k, v in CHILD_ENV.items()}}
        self._log = open(self.log_path, "ab")
        # Its own session: Ctrl-C at the harness reaches the cluster once, through stop().
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     cwd=self.code_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slicefleet serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        else:
            raise TimeoutError(f"cluster not healthy after {timeout:.0f} s; see {self.log_path}")
        if self.redis_url is None:
            self.redis_url = f"redis://{self._embedded_redis_auth()}127.0.0.1:{self._embedded_redis_port()}/0"
        from cluster.stores.admin import AdminStore

        self._store = AdminStore(self.redis_url, self.prefix)

    @property
    def store(self):
        return self._store

    def _embedded_redis_port(self) -> int:
        # The server retitles itself "valkey-server 127.0.0.1:PORT"; before it does, its argument is the config.
        args = cmdline(self.redis_pid()).split()
        if args and args[-1].startswith("127.0.0.1:"):
            return int(args[-1].rsplit(":", 1)[1])
        conf = next((a for a in args if a.endswith(".conf")), None)
        for line in Path(conf).read_text().splitlines() if conf else []:
            if line.startswith("port "):
                return int(line.split()[1])
        raise RuntimeError(f"cannot tell the embedded Redis's port from {args!r}")

    def _embedded_redis_auth(self) -> str:
        """``user:password@`` of a private embedded Redis, from the ACL file in its data directory (its working
        directory; readable by the user who started it, which is us); empty when it has none."""
        acl = Path(f"/proc/{self.redis_pid()}/cwd") / "users.acl"
        try:
            lines = acl.read_text().splitlines()
        except OSError:
            return ""
        for line in lines:
            parts = line.split()
            secret = next((p[1:] for p in parts if p.startswith(">")), None)
            if len(parts) > 1 and parts[0] == "user" and parts[1] != "default" and secret:
                return f"{parts[1]}:{secret}@"
        return ""

    # Every PID below comes from this cluster's own process tree, so nothing else on the machine is touched.
    def redis_pid(self) -> int:
        if self.own_redis is not None:
            return self.own_redis.pid
        pids = [p for p in descendants(self.proc.pid)
                if ("valkey-server" in cmdline(p) or "redis-server" in cmdline(p)) and alive(p)]
        if not pids:
            raise RuntimeError("no embedded Redis process below slicefleet serve")
        return pids[0]

    def dispatcher_pid(self) -> int:
        pids = [p for p in descendants(self.proc.pid) if "Dispatcher" in cmdline(p) and alive(p)]
        if len(pids) != 1:
            raise RuntimeError(f"expected one dispatcher process, found {[(p, cmdline(p)) for p in pids]}")
        return pids[0]

    def worker_pids(self) -> dict[str, int]:
        """Live registered replicas -> PID (each registers its own in Redis), within our process tree."""
        mine = set(descendants(self.proc.pid))
        alive_ids, _ = self.store.replicas_alive()
        out = {}
        for rid in alive_ids:
            info = self.store.replica_info(rid)
            if info is not None and info.pid in mine and alive(info.pid):
                out[rid] = info.pid
        return out

    def quiet(self, timeout: float = 300.0) -> None:
        """Wait until every replica is back and beating, nothing is live in Redis and the API is healthy."""
        import httpx

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                workers, live = self.worker_pids(), self.store.live_ids()
                healthy = httpx.get(self.url + "/health", timeout=5).status_code == 200
                if len(workers) == self.replicas and not live and healthy:
                    return
                last = f"{len(workers)}/{self.replicas} replicas, {len(live)} live requests, healthy={healthy}"
            except Exception as exc:  # noqa: BLE001 - Redis may be restarting
                last = repr(exc)
            time.sleep(0.5)
        raise TimeoutError(f"cluster did not settle in {timeout:.0f} s: {last}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # serve's own shutdown: Serve, Ray, then its Redis
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                log.warning("slicefleet serve did not stop in 90 s: killing its process group")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.own_redis is not None:
            self.own_redis.stop()
            self.own_redis = None
        if getattr(self, "_log", None):
            self._log.close()


# ---- faults -----------------------------------------------------------------------------------------------
@dataclass
class FaultRecord:
    kind: str
    fired: bool = False
    at: float | None = None
    """Run-relative second it fired."""
    target: str = ""
    in_flight: list[int] = field(default_factory=list)
    """Requests accepted, with tokens streamed and not finished when it fired (indices in the set)."""
    live_in_redis: int = 0
    """Of those, how many Redis still held as live (accepted and unfinished on the server's side too)."""
    detail: str = ""
    restored_s: float | None = None
    resumed_s: float | None = None
    on_victim: list[int] = field(default_factory=list)
    """Worker faults: the requests in flight whose latest tokens came from the killed replica."""
    requeued: int | None = None
    """Worker faults: rows the dispatcher took back from the dead replica (the kill hit running rows)."""
    error: str = ""


def _streaming_from(cluster: Cluster, rids: list[str]) -> dict[str, str]:
    """Request id -> the replica its latest tokens came from (each output event in Redis names it)."""
    return cluster.store.output_replicas(rids)


def _fire(cluster: Cluster, kind: str, in_flight_rids: list[str]) -> dict:
    """Pick the victim and SIGKILL it. Returns what the fault record needs: the target, how many of the
    requests in flight Redis still held as live, those streaming from the victim (worker), and the state that
    tells when the victim is back."""
    live = set(cluster.store.live_ids())
    fired = {"live_hits": sum(1 for r in in_flight_rids if r in live), "on_victim": []}
    if not fired["live_hits"]:
        # The client has not seen their last chunk yet, but the server has finished them: a fault now would hit
        # nothing, so wait for requests that Redis still holds as live.
        raise _NotYet("the requests in flight had already finished in Redis")
    if kind == "worker":
        # The replica that is streaming the most requests to their clients right now: its death must show.
        pids = cluster.worker_pids()
        # Only requests Redis still holds as live: a finished one may still be streaming its last chunk from the
        # victim, and killing its replica would stop nothing.
        owners = {rid: rep for rid, rep in _streaming_from(cluster, in_flight_rids).items()
                  if rep in pids and rid in live}
        if not owners:
            raise _NotYet("no request live in Redis streams from a live replica")
        victim = Counter(owners.values()).most_common(1)[0][0]
        snap = cluster.store.metrics_snapshot()
        os.kill(pids[victim], signal.SIGKILL)
        fired["killed"] = time.perf_counter()
        on_victim = [rid for rid, rep in owners.items() if rep == victim]
        return fired | {"target": f"{victim} (pid {pids[victim]}, streaming {len(on_victim)} of them)",
                        "on_victim": on_victim,
                        "state": {"gone": victim, "epoch": snap.epoch if snap else None,
                                  "requeued": snap.requests_requeued if snap else 0}}
    if kind == "dispatcher":
        pid, epoch = cluster.dispatcher_pid(), cluster.store.epoch()
        os.kill(pid, signal.SIGKILL)
        fired["killed"] = time.perf_counter()
        return fired | {"target": f"dispatcher (pid {pid}, epoch {epoch})", "state": {"epoch": epoch}}
    if kind == "redis":
        pid = cluster.redis_pid()
        os.kill(pid, signal.SIGKILL)
        fired["killed"] = time.perf_counter()
        if cluster.own_redis is not None:  # we are its supervisor: bring it back at once, same port and data
            time.sleep(0.5)
            cluster.own_redis.restart()
        return fired | {"target": f"redis (pid {pid})", "state": {"pid": pid}}
    raise ValueError(kind)


class _NotYet(Exception):
    pass


def _requeued(cluster: Cluster, state: dict, wait: float = 10.0) -> int | None:
    """Rows the dispatcher put back in the pool since the worker fault, from its published counters (None if a
    new dispatcher, whose counters start again, published meanwhile)."""
    deadline = time.monotonic() + wait
    n = 0
    while time.monotonic() < deadline:
        try:
            snap = cluster.store.metrics_snapshot()
        except Exception:  # noqa: BLE001 - Redis restarting
            snap = None
        if snap and snap.epoch != state["epoch"]:
            return None
        n = snap.requests_requeued - int(state["requeued"] or 0) if snap else 0
        if n > 0:
            return n
        time.sleep(0.5)  # the snapshot is published about once a second
    return n


def _restored(cluster: Cluster, kind: str, state: dict) -> bool:
    try:
        if kind == "worker":
            pids = cluster.worker_pids()
            return len(pids) == cluster.replicas and state["gone"] not in pids
        if kind == "dispatcher":
            return cluster.store.epoch() > state["epoch"]
        if kind == "redis":
            return cluster.redis_pid() != state["pid"] and cluster.store.ping()
    except Exception:  # noqa: BLE001 - Redis down, a process between lives
        return False
    raise ValueError(kind)


async def run_faults(cluster: Cluster, kinds: list[str], outcomes: list[Outcome], t0: float, start_at: list[float],
                     records: list[FaultRecord], trigger_timeout: float, restore_timeout: float,
                     min_in_flight: int = 1) -> None:
    """Fire each fault in turn: not before its start time, only with requests in flight, and each only after
    the previous one's victim is back and requests are moving again (so each fault meets a working cluster)."""
    since = -1.0
    for kind, at in zip(kinds, start_at):
        rec = FaultRecord(kind)
        records.append(rec)
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        deadline = time.monotonic() + trigger_timeout
        state = None
        while time.monotonic() < deadline:
            flying = [o for o in outcomes if o.in_flight() and o.chunk_times[-1] > since]
            if len(flying) >= min_in_flight:
                try:
                    fired = await asyncio.to_thread(_fire, cluster, kind, [o.rid for o in flying])
                except _NotYet as exc:
                    rec.detail = str(exc)
                else:
                    rec.fired, rec.at, rec.target = True, fired["killed"] - t0, fired["target"]
                    rec.in_flight, rec.live_in_redis = [o.index for o in flying], fired["live_hits"]
                    by_rid = {o.rid: o.index for o in flying}
                    rec.on_victim = [by_rid[r] for r in fired["on_victim"]]
                    state = fired["state"]
                    break
            await asyncio.sleep(0.1)
        if not rec.fired:
            rec.error = (f"fewer than {min_in_flight} requests in flight within {trigger_timeout:.0f} s "
                         f"({rec.detail or 'too few streaming'})")
            log.error("%s fault did not fire: %s", kind, rec.error)
            continue
        log.info("%s fault at %.1f s: %s, %d requests in flight (%d live in Redis)", kind, rec.at, rec.target,
                 len(rec.in_flight), rec.live_in_redis)
        deadline = time.monotonic() + restore_timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(_restored, cluster, kind, state):
                rec.restored_s = time.perf_counter() - t0 - rec.at
                break
            await asyncio.sleep(0.1)
        else:
            rec.error = f"not restored within {restore_timeout:.0f} s"
        # The next fault waits until what this one stopped is moving again, so that each stall is its own.
        stopped = [outcomes[i] for i in (rec.on_victim if kind == "worker" else rec.in_flight)]
        while time.monotonic() < deadline and not all(
                not o.in_flight() or any(t > rec.at for t in o.chunk_times) for o in stopped):
            await asyncio.sleep(0.1)
        if kind == "worker":
            rec.requeued = await asyncio.to_thread(_requeued, cluster, state)
        since = time.perf_counter() - t0


# ---- one run ----------------------------------------------------------------------------------------------
async def drive(cluster: Cluster, model: str, requests: list[FaultRequest], kinds: list[str], fault_at: list[float],
                timeout: float, trigger_timeout: float, restore_timeout: float, desc: str,
                progress: bool = True, min_in_flight: int = 1) -> tuple[list[Outcome], list[FaultRecord], float]:
    import httpx

    outcomes = [Outcome(r.index) for r in requests]
    records: list[FaultRecord] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=desc, unit="req")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()

        async def one(req: FaultRequest) -> None:
            await asyncio.sleep(max(0.0, t0 + req.offset - time.perf_counter()))
            await send(client, cluster.url, model, req, t0, outcomes[req.index], timeout)
            if bar is not None:
                bar.update(1)

        tasks = [asyncio.create_task(one(r)) for r in requests]
        if kinds:
            tasks.append(asyncio.create_task(run_faults(cluster, kinds, outcomes, t0, fault_at, records,
                                                        trigger_timeout, restore_timeout, min_in_flight)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    fill_resumed(records, outcomes)
    return outcomes, records, wall


def fill_resumed(records: list[FaultRecord], outcomes: list[Outcome]) -> None:
    """Each fault's resumed time, once the run is over; a stall that runs into the next fault is that one's."""
    for rec, nxt in zip(records, records[1:] + [None]):
        rec.resumed_s = resumed_after(rec, outcomes, nxt.at if nxt is not None and nxt.at is not None else math.inf)


def resumed_after(rec: FaultRecord, outcomes: list[Outcome], until: float = math.inf) -> float | None:
    """Seconds from the fault until every request it stopped was moving again: for a worker, those it was
    streaming (the others never stopped); otherwise every request in flight.

    A request counts as moving again at the end of its longest wait between two chunks after the fault (and
    before ``until``, the next fault): its first chunk after the fault may be one the dead part had already
    published, still on its way to the client."""
    if not rec.fired or not rec.in_flight:
        return None
    waits = []
    for i in rec.on_victim if rec.kind == "worker" else rec.in_flight:
        times = outcomes[i].chunk_times
        after = [t for t in times if rec.at < t < until]
        if not after:
            if any(t >= until for t in times):
                continue  # its stall ran into the next fault, which accounts for it
            if outcomes[i].completed:
                continue  # its last chunk was already out when the fault fired: it never stopped
            return None  # never moved again: lost, and counted as such
        prev = max([t for t in times if t <= rec.at], default=rec.at)
        longest, end = -1.0, after[0]
        for t in after:
            if t - prev > longest:
                longest, end = t - prev, t
            prev = t
        waits.append(end - rec.at)
    return max(waits) if waits else None


def compare(outcomes: list[Outcome], reference: list[Outcome]) -> dict:
    """The run's counts against the fault-free reference of the same set."""
    failed = Counter(o.kind for o in outcomes if not o.completed)
    differing, duplicated = [], []
    for o, ref in zip(outcomes, reference):
        if not (o.completed and ref.completed):
            continue
        if (o.text, o.finish_reason, o.usage) != (ref.text, ref.finish_reason, ref.usage):
            differing.append(o.index)
            if len(o.text) > len(ref.text) or (o.usage or {}).get("completion_tokens", 0) > \
                    (ref.usage or {}).get("completion_tokens", 0):
                duplicated.append(o.index)
    return {
        "requests": len(outcomes),
        "accepted": sum(o.accepted for o in outcomes),
        "completed": sum(o.completed for o in outcomes),
        "failed": dict(failed),
        "lost": sum(1 for o in outcomes if o.accepted and not o.completed),
        "lost_indices": [o.index for o in outcomes if o.accepted and not o.completed],
        "differing": len(differing),
        "duplicated": len(duplicated),
        "corrupted": len(differing) - len(duplicated),
        "differing_indices": differing,
        "reference_incomplete": sum(1 for r in reference if not r.completed),
    }


def verdict(summary: dict, faults: list[dict], kinds: list[str]) -> list[str]:
    """Why this run fails; empty when it passes."""
    problems = []
    if summary["lost"]:
        problems.append(f"{summary['lost']} accepted requests lost: {summary['lost_indices'][:10]}")
    if summary["differing"]:
        problems.append(f"{summary['differing']} outputs differ from the reference: "
                        f"{summary['differing_indices'][:10]}")
    if summary["reference_incomplete"]:
        problems.append(f"the reference itself left {summary['reference_incomplete']} requests incomplete")
    if len(faults) != len(kinds):
        problems.append(f"{len(faults)} of {len(kinds)} faults ran")
    for f in faults:
        if not f["fired"]:
            problems.append(f"{f['kind']}: did not fire ({f['error']})")
        elif not f["in_flight"] or not f["live_in_redis"]:
            problems.append(f"{f['kind']}: hit no request in flight")
        elif f["kind"] == "worker" and not f.get("on_victim"):
            problems.append("worker: the killed replica was streaming none of the requests in flight")
        elif f["kind"] == "worker" and f.get("requeued") == 0:
            problems.append("worker: the dead replica had no rows to take back (it was idle)")
        elif f["error"]:
            problems.append(f"{f['kind']}: {f['error']}")
    return problems


# ---- the command ------------------------------------------------------------------------------------------
def add_request_set_arguments(p: argparse.ArgumentParser, *, min_tokens: int = 16, slice_len: int = 64,
                              slice_len_help: str = "scheduler.slice_len", what: str = "the cluster") -> None:
    """The options every harness shares: which requests it sends (seeded prompts and budgets) and the cluster's
    mode, replicas and slice length. ``what`` names the cluster(s) in the help."""
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, budgets and arrivals")
    p.add_argument("--min-tokens", type=int, default=min_tokens, help="smallest max_tokens of a request")
    p.add_argument("--max-tokens", type=int, default=96, help="largest max_tokens of a request")
    p.add_argument("--prompts", choices=("sharegpt", "fixed"), default="sharegpt",
                   help="ShareGPT prompts (the bench extra) or a fixed list of short prompts")
    p.add_argument("--max-prompt-len", type=int, default=512, help="longest ShareGPT prompt, tokens")
    p.add_argument("--mode", choices=("continuous_slices", "scls", "sls", "ils"), default="continuous_slices",
                   help=f"scheduler.mode of {what}")
    p.add_argument("--replicas", type=int, default=2, help=f"worker replicas of {what}")
    p.add_argument("--slice-len", type=int, default=slice_len, help=slice_len_help)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, run in this order after the reference: {', '.join(SCENARIOS)} "
                        "(all: worker, dispatcher and redis in sequence in one run)")
    p.add_argument("--requests", type=int, default=80, help="requests in the set (every run sends the same set)")
    p.add_argument("--rate", type=float, default=3.0, help="Poisson arrival rate, req/s")
    add_request_set_arguments(p, slice_len=16, slice_len_help="scheduler.slice_len: short, so that a worker is "
                                                              "killed with slices still to run")
    p.add_argument("--external-redis", action="store_true",
                   help="give the cluster a Redis this harness owns and restarts itself after killing it (as a "
                        "supervisor would), instead of the embedded one the local cluster supervises")
    p.add_argument("--fault-at", type=float, default=0.25,
                   help="a single fault waits this share of the send window before it looks for requests in flight; "
                        "'all' spreads its three faults from here on")
    p.add_argument("--min-in-flight", type=int, default=3,
                   help="a fault fires only once this many requests are accepted, streaming and unfinished")
    p.add_argument("--trigger-timeout", type=float, default=60.0,
                   help="seconds a fault may wait for requests in flight before the run fails")
    p.add_argument("--restore-timeout", type=float, default=180.0,
                   help="seconds the killed part has to come back before the run fails")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--out", default="runs/faults", help="directory for results.json, results.md and the cluster log")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def fault_times(kinds: list[str], window: float, start: float) -> list[float]:
    if len(kinds) == 1:
        return [start * window]
    step = (1.0 - start) / (len(kinds) + 1)
    return [(start + i * step) * window for i in range(len(kinds))]


def run_scenarios(args) -> dict:
    from transformers import AutoTokenizer

    from worker.make_model import ensure_default_model

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    requests = request_set(tokenizer, args.requests, args.seed, args.rate, args.min_tokens, args.max_tokens,
                           args.prompts, args.max_prompt_len)
    window = max(r.offset for r in requests)
    result: dict = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                    "machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="slicefleet-faults-") as tmp:
        cluster = Cluster(Path(tmp), args.mode, args.replicas, args.slice_len, max(args.max_tokens, args.slice_len),
                          args.external_redis, out / "cluster.log")
        try:
            t = time.perf_counter()
            cluster.start()
            result["startup_s"] = time.perf_counter() - t
            model = "slicefleet-tiny-llama"
            plan = [("reference", [])] + [(s, list(SEQUENCE) if s == "all" else [s]) for s in scenarios]
            reference = None
            for name, kinds in plan:
                cluster.quiet()
                outcomes, faults, wall = asyncio.run(drive(
                    cluster, model, requests, kinds, fault_times(kinds, window, args.fault_at), args.timeout,
                    args.trigger_timeout, args.restore_timeout, name, progress=not args.no_progress,
                    min_in_flight=args.min_in_flight))
                reference = reference or outcomes
                summary = compare(outcomes, reference)
                fault_dicts = [asdict(f) for f in faults]
                run = {"scenario": name, "wall_s": wall, **summary, "faults": fault_dicts,
                       "problems": verdict(summary, fault_dicts, kinds),
                       "outcomes": [asdict(o) for o in outcomes]}
                result["runs"].append(run)
                log.info("%s: %s", name, "ok" if not run["problems"] else "; ".join(run["problems"]))
        finally:
            cluster.stop()
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    return result


def machine() -> dict:
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def _secs(faults: list[dict], key: str) -> str:
    return " / ".join("–" if f[key] is None else f"{f[key]:.1f}" for f in faults) or "–"


def rows(result: dict) -> list[list[str]]:
    table = []
    for run in result["runs"]:
        faults = run["faults"]
        failed = ", ".join(f"{k} {v}" for k, v in sorted(run["failed"].items())) or "0"
        hit = " + ".join(str(len(f["in_flight"])) + (f" ({len(f['on_victim'])} on it)" if f["kind"] == "worker"
                                                     else "") for f in faults) or "–"

        table.append([run["scenario"], str(run["requests"]), str(run["accepted"]), str(run["completed"]), failed,
                      str(run["lost"]), f"{run['duplicated']} / {run['corrupted']}", hit,
                      " / ".join(str(f["requeued"]) for f in faults if f["kind"] == "worker") or "–",
                      _secs(faults, "resumed_s"),
                      _secs(faults, "restored_s"), f"{run['wall_s']:.0f}", "pass" if not run["problems"] else "FAIL"])
    return table


HEADERS = ["run", "requests", "accepted", "completed", "failed (by status)", "lost", "dup / corrupt",
           "in flight at fault", "worker rows taken back", "resumed s", "restored s", "wall s", "verdict"]


def markdown(result: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(result)]
    for run in result["runs"]:
        for p in run["problems"]:
            lines.append(f"\n- {run['scenario']}: {p}")
    return "\n".join(lines) + "\n"


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="faults against the fault-free reference")
    for h in HEADERS:
        table.add_column(h)
    for r in rows(result):
        table.add_row(*r)
    console = Console(width=max(Console().width, 160))  # the table is wide; a pipe would get 80 columns
    console.print(table)
    for run in result["runs"]:
        for f in run["faults"]:
            at = "never" if f["at"] is None else f"{f['at']:.1f} s"
            console.print(f"[bold]{run['scenario']}[/bold] {f['kind']}: at {at}, {f['target']}; "
                          f"{len(f['in_flight'])} in flight ({f['live_in_redis']} live in Redis)")
        for p in run["problems"]:
            console.print(f"[red]{run['scenario']}: {p}[/red]")


def run(args) -> int:
    result = run_scenarios(args)
    print_table(result)
    print(f"results: {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}")
    return 1 if any(r["problems"] for r in result["runs"]) else 0


def main(argv: list[str] | None = None) -> int:
    return harness_main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
