"""What the overload and soak harnesses share: open- and closed-loop load on a live cluster, per-process memory
and Redis sampling, and the accounting (phase figures, sliding latency windows, time back to normal).

The cluster, the request set, one request's ``Outcome`` and the worker kill are the fault harness's
(:mod:`bench.faults`); this module only adds load shapes and measurements on top of them. Every time here is
seconds on one clock, the harness's ``t0`` (``time.perf_counter()`` when the run began).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from bench.faults import (
    Cluster,
    FaultRequest,
    Outcome,
    add_request_set_arguments,
    alive,
    cmdline,
    descendants,
    request_set,
    send,
)

log = logging.getLogger("slicefleet.pressure")

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


# ---- the load ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    name: str
    rate: float
    """Poisson arrival rate, req/s."""
    start: float
    end: float


def phases(specs: list[tuple[str, float, float]], start: float = 0.0) -> list[Phase]:
    """(name, rate, seconds) one after another from ``start``."""
    out, t = [], start
    for name, rate, seconds in specs:
        out.append(Phase(name, rate, t, t + seconds))
        t += seconds
    return out


def schedule(pool: list[FaultRequest], plan: list[Phase], seed: int) -> list[FaultRequest]:
    """Poisson arrivals at each phase's rate within its bounds, prompts and budgets taken from ``pool`` in turn.
    ``index`` is the position in the returned list, ``offset`` the send time on the run's clock."""
    from bench.loadgen import arrivals

    out: list[FaultRequest] = []
    for k, ph in enumerate(plan):
        length = ph.end - ph.start
        n = int(ph.rate * length * 1.5) + 20  # Poisson count stays far below this: cut at the phase's end below
        offsets = arrivals(n, ph.rate, 1.0, seed + 7919 * k) + ph.start
        for o in offsets[offsets < ph.end]:
            out.append(replace(pool[len(out) % len(pool)], index=len(out), offset=float(o)))
    return out


def request_pool(args) -> list[FaultRequest]:
    """The prompts and budgets that every load of a run cycles through (the fault harness's seeded set)."""
    from transformers import AutoTokenizer

    from worker.make_model import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    return request_set(tokenizer, args.pool, args.seed, 1.0, args.min_tokens, args.max_tokens, args.prompts,
                       args.max_prompt_len)


def model_name() -> str:
    from cluster.config import SlicefleetConfig

    return SlicefleetConfig().model.name


class Clients:
    """HTTP clients for many concurrent streams, request ``i`` on client ``i % shards``. httpx's connection pool
    (httpcore 1.0) does work quadratic in its connections each time a request starts or ends: with 500 streams
    open on one client the harness's event loop stalled for seconds and sent its schedule in bursts. Spread over
    ``shards`` clients, every pool stays small."""

    def __init__(self, timeout: float, shards: int = 16):
        self.timeout, self.shards = timeout, shards
        self.clients: list = []

    async def __aenter__(self) -> Clients:  # noqa: PYI034 - the class is not subclassed
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=8)
        self.clients = [httpx.AsyncClient(limits=limits, timeout=self.timeout) for _ in range(self.shards)]
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))

    def __getitem__(self, i: int):
        return self.clients[i % len(self.clients)]


async def open_loop(cluster: Cluster, requests: list[FaultRequest], outcomes: list[Outcome], t0: float,
                    timeout: float, bar=None) -> None:
    """Send each request at its offset whatever happened to the earlier ones (an open loop, as real clients
    are), appending its outcome to ``outcomes`` as it goes out, and wait for every answer."""
    model = model_name()
    async with Clients(timeout) as http:
        tasks = []
        for req in requests:
            await asyncio.sleep(max(0.0, t0 + req.offset - time.perf_counter()))
            out = Outcome(req.index)
            outcomes.append(out)
            tasks.append(asyncio.create_task(_counted(send(http[req.index], cluster.url, model, req, t0, out,
                                                           timeout), bar)))
        await asyncio.gather(*tasks)


async def _counted(coro, bar) -> None:
    await coro
    if bar is not None:
        bar.update(1)


async def closed_loop(cluster: Cluster, pool: list[FaultRequest], concurrency: int, seconds: float, t0: float,
                      timeout: float) -> list[Outcome]:
    """``concurrency`` clients, each sending its next request as soon as the last one ended, for ``seconds``."""
    model = model_name()
    outcomes: list[Outcome] = []
    end = time.perf_counter() + seconds

    async def one_client(http) -> None:  # one connection pool each: a closed loop's clients are independent
        while time.perf_counter() < end:
            i = len(outcomes)
            out = Outcome(i)
            outcomes.append(out)
            await send(http, cluster.url, model, replace(pool[i % len(pool)], index=i), t0, out, timeout)
            if not out.completed:
                await asyncio.sleep(1.0)  # a refusal answers at once: do not spin on it

    async with Clients(timeout, shards=concurrency) as http:
        await asyncio.gather(*(one_client(http[i]) for i in range(concurrency)))
    return outcomes


def capacity(outcomes: list[Outcome], start: float, end: float, warmup: float = 0.25) -> float:
    """Completions per second in a saturated closed loop over [start, end], leaving out its first ``warmup``
    share (every client starts at once, so the first completions come in a burst or not at all)."""
    lo = start + warmup * (end - start)
    done = sum(1 for o in outcomes if o.completed and o.done is not None and lo <= o.done <= end)
    return done / (end - lo) if end > lo else 0.0


# ---- accounting -------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def latency(o: Outcome) -> float:
    """End to end: sent to the last chunk ([DONE])."""
    return o.done - o.sent


def ttft(o: Outcome) -> float | None:
    return o.chunk_times[0] - o.sent if o.chunk_times else None


def refusal_code(o: Outcome) -> str:
    """The error code of a refusal's body (``too_many_requests``: the in-flight limit; ``backlog_exceeded``: the
    predicted backlog); ``unknown`` when the body is not the API's error JSON (or was cut)."""
    import json

    try:
        return str(json.loads(o.error)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "unknown"


def phase_stats(outcomes: list[Outcome], start: float, end: float) -> dict:
    """Figures of the requests sent in [start, end). Refused (429) is not lost: only an accepted request that
    did not complete is."""
    sent = [o for o in outcomes if start <= o.sent < end]
    accepted = [o for o in sent if o.accepted]
    completed = [o for o in accepted if o.completed]
    refused = [o for o in sent if o.status == 429]
    other = Counter(o.kind for o in sent if not o.accepted and o.status != 429)
    lat = [latency(o) for o in completed]
    first = [t for t in map(ttft, completed) if t is not None]
    span = max(end - start, 1e-9)
    return {
        "start": start, "end": end, "offered": len(sent), "offered_rate": len(sent) / span,
        "accepted": len(accepted), "completed": len(completed),
        "lost": len(accepted) - len(completed),
        "refused_429": len(refused), "share_429": len(refused) / len(sent) if sent else 0.0,
        "429_without_retry_after": sum(1 for o in refused if not o.retry_after),
        "retry_after_values": dict(Counter(o.retry_after for o in refused if o.retry_after)),
        "429_reasons": dict(Counter(refusal_code(o) for o in refused)),
        "other_failures": dict(other),
        "goodput": sum(1 for o in completed if o.done < end) / span,
        "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99),
        "latency_max": max(lat, default=None),
        "ttft_p50": percentile(first, 50), "ttft_p99": percentile(first, 99),
    }


def send_lag(outcomes: list[Outcome], requests: list[FaultRequest], start: float, end: float) -> dict:
    """How late the harness sent the requests planned in [start, end): an open loop that falls behind its
    schedule offers its load in bursts, not at the rate asked for (``outcomes[i]`` is ``requests[i]``'s)."""
    lag = [o.sent - r.offset for o, r in zip(outcomes, requests) if start <= r.offset < end]
    return {"send_lag_p99": percentile(lag, 99), "send_lag_max": max(lag, default=None)}


def windows(outcomes: list[Outcome], start: float, end: float, width: float, step: float) -> list[dict]:
    """Sliding windows by send time: for each window [t, t + width) within [start, end), the completed
    requests sent in it and their p50 / p99 end-to-end latency, plus completions per second by finish time."""
    done = sorted((o.sent, latency(o)) for o in outcomes if o.completed)
    finishes = sorted(o.done for o in outcomes if o.completed)
    out, t = [], start
    import bisect

    while t + width <= end + 1e-9:
        lo, hi = bisect.bisect_left(done, (t,)), bisect.bisect_left(done, (t + width,))
        lat = [d for _, d in done[lo:hi]]
        finished = bisect.bisect_left(finishes, t + width) - bisect.bisect_left(finishes, t)
        out.append({"t": t, "n": len(lat), "p50": percentile(lat, 50), "p99": percentile(lat, 99),
                    "completed_per_s": finished / width})
        t += step
    return out


def normal_reference(series: list[dict], start: float, end: float, width: float, q: float,
                     min_n: int) -> tuple[float, float]:
    """What normal latency is for windows of this width: the ``q``-th percentile of the p50s and of the p99s of
    the windows that lie inside [start, end] (the baseline). A window's p99 over a few dozen requests is
    nearly its maximum, and on a shared machine the baseline's own windows spread: held to the phase's p50
    and p99, a tenth of the baseline's own windows looked abnormal here."""
    import numpy as np

    inside = [w for w in series if w["t"] >= start - 1e-9 and w["t"] + width <= end + 1e-9 and w["n"] >= min_n]
    if not inside:
        return math.nan, math.nan
    return float(np.percentile([w["p50"] for w in inside], q)), float(np.percentile([w["p99"] for w in inside], q))


def back_to_normal(series: list[dict], after: float, p50: float, p99: float, factor: float,
                   min_n: int) -> float | None:
    """Seconds from ``after`` until requests see normal latency again: the start of the first window (from
    ``after`` on, with at least ``min_n`` requests) from which every later such window has p50 and p99 within
    ``factor`` times ``p50`` and ``p99`` (the normal reference). None when the last window is still above (not
    back in the run)."""
    seen = [w for w in series if w["t"] >= after - 1e-9 and w["n"] >= min_n]
    back = None
    for w in seen:
        if w["p50"] <= factor * p50 and w["p99"] <= factor * p99:
            back = w["t"] if back is None else back
        else:
            back = None
    return None if back is None else back - after


# ---- processes and memory ---------------------------------------------------------------------------------
# Substrings of a process's command line, first match wins. Ray retitles an actor's process "ray::<actor>"
# (the Serve replica's deployment is in it); native parts are recognised by their executable.
ROLES = (
    ("valkey-server", "redis"), ("redis-server", "redis"),
    ("gcs_server", "ray gcs"), ("/raylet", "ray raylet"),
    ("SliceWorker", "worker"), ("Dispatcher", "dispatcher"), ("Ingress", "ingress"),
    ("ProxyActor", "serve proxy"), ("ServeController", "serve controller"),
    ("cluster.cli serve", "slicefleet serve"),
    ("DashboardAgent", "ray agent"), ("RuntimeEnvAgent", "ray agent"), ("dashboard.py", "ray dashboard"),
    ("log_monitor.py", "ray log monitor"), ("monitor.py", "ray monitor"),
    ("ray::IDLE", "ray idle worker"), ("default_worker.py", "ray idle worker"),
)


def role(command: str) -> str:
    """What a process of the cluster is, from its command line."""
    exe = command.split(" ", 1)[0]
    for needle, name in ROLES:
        if needle in (exe if needle.startswith("/") or needle.endswith("server") else command):
            return name
    return "other"


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def cluster_pids(cluster: Cluster) -> list[int]:
    """``slicefleet serve`` and everything below it (Ray, Serve's actors, the embedded Redis); a Redis the
    harness owns is outside that tree."""
    root = cluster.proc.pid
    pids = [root, *descendants(root)]
    if cluster.own_redis is not None:
        pids.append(cluster.own_redis.pid)
    return [p for p in pids if alive(p)]


def dispatcher_figures(snap) -> list:
    """What each backlog sample keeps of the dispatcher's snapshot: backlog_seconds (what admission compares with
    its bound), pool_depth and running (the requests waiting in the dispatcher's pool and running on the
    replicas), slice_time_mape (how far off its slice-time predictions are, mean absolute share); None each when
    there is no snapshot."""
    if snap is None:
        return [None] * 4
    return [snap.backlog_seconds, snap.pool_depth, snap.running, snap.slice_time_mape]


class Sampler:
    """A thread that reads every cluster process's RSS every ``every`` seconds, the dispatcher's backlog with
    it, and Redis's figures every ``redis_every`` seconds. A failed read is a missed sample, never an error
    (a killed worker's process vanishes between listing and reading)."""

    def __init__(self, cluster: Cluster, t0: float, every: float = 1.0, redis_every: float = 10.0):
        self.cluster, self.t0, self.every, self.redis_every = cluster, t0, every, redis_every
        self.rss: list[tuple[float, int, str, int]] = []
        """(t, pid, role, bytes)"""
        self.backlog: list[list] = []
        """[t, *dispatcher_figures(the dispatcher's snapshot)]"""
        self.redis: list[dict] = []
        self.loadavg: list[tuple[float, float]] = []
        """(t, the machine's 1-minute load average): on a shared machine, what else ran shows here"""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pressure-sampler", daemon=True)

    def _loop(self) -> None:
        next_redis = 0.0
        while not self._stop.is_set():
            t = time.perf_counter() - self.t0
            try:
                for pid in cluster_pids(self.cluster):
                    size = rss_bytes(pid)
                    if size is not None:
                        self.rss.append((t, pid, role(cmdline(pid)), size))
                self.loadavg.append((round(t, 2), os.getloadavg()[0]))
            except Exception as exc:  # noqa: BLE001
                log.debug("rss sample failed: %s", exc)
            try:
                self.backlog.append([round(t, 2), *dispatcher_figures(self.cluster.store.metrics_snapshot())])
            except Exception as exc:  # noqa: BLE001 - Redis restarting
                log.debug("snapshot read failed: %s", exc)
            if t >= next_redis:
                try:
                    self.redis.append({"t": t, **self.cluster.store.figures()})
                except Exception as exc:  # noqa: BLE001
                    log.debug("redis sample failed: %s", exc)
                next_redis = t + self.redis_every
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:  # noqa: PYI034 - the class is not subclassed
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def rss_series(samples: list[tuple[float, int, str, int]]) -> dict[int, dict]:
    """Per process: its role (the last one seen other than an idle Ray worker, which an actor starts as), and
    its RSS over time in MiB."""
    out: dict[int, dict] = {}
    for t, pid, name, size in samples:
        s = out.setdefault(pid, {"role": name, "t": [], "mb": []})
        if name != "ray idle worker":
            s["role"] = name
        s["t"].append(round(t, 2))
        s["mb"].append(round(size / MB, 1))
    return out


def peaks(series: dict[int, dict]) -> list[dict]:
    """Per role: processes seen, the largest peak RSS of one of them, and the peak of their sum at one sample."""
    by_role: dict[str, list[int]] = defaultdict(list)
    for pid, s in series.items():
        by_role[s["role"]].append(pid)
    out = []
    for name, pids in sorted(by_role.items()):
        total: dict[float, float] = defaultdict(float)
        for pid in pids:
            for t, mb in zip(series[pid]["t"], series[pid]["mb"]):
                total[t] += mb
        top = max(pids, key=lambda p: max(series[p]["mb"]))
        out.append({"role": name, "processes": len(pids), "peak_mb": max(series[top]["mb"]), "peak_pid": top,
                    "first_mb": series[top]["mb"][0], "last_mb": series[top]["mb"][-1],
                    "peak_sum_mb": max(total.values())})
    return sorted(out, key=lambda r: -r["peak_sum_mb"])


def load_summary(samples: list[tuple[float, float]], lo: float, hi: float) -> dict:
    """Median and peak of the machine's load average while [lo, hi]."""
    values = [v for t, v in samples if lo <= t <= hi]
    return {"median": percentile(values, 50), "max": max(values, default=None)}


def compact(outcomes: list[Outcome]) -> list[list]:
    """Per request, for results.json: sent, status, accepted, completed, latency, ttft, Retry-After, error."""
    return [[round(o.sent, 3), o.status, o.accepted, o.completed,
             None if not o.completed else round(latency(o), 3),
             None if ttft(o) is None else round(ttft(o), 3), o.retry_after, o.error[:80] if not o.completed else ""]
            for o in outcomes]


# ---- command-line options both harnesses take -------------------------------------------------------------
def add_common_arguments(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--capacity", type=float, default=None,
                   help="the cluster's capacity in req/s for this request mix (default: measure it first with a "
                        "saturated closed loop, --capacity-concurrency clients for --capacity-seconds)")
    p.add_argument("--capacity-seconds", type=float, default=60.0, help="length of the capacity measurement")
    p.add_argument("--capacity-concurrency", type=int, default=64,
                   help="clients of the capacity measurement (enough to fill every replica's batch)")
    p.add_argument("--pool", type=int, default=200, help="distinct requests (prompt, budget) the load cycles through")
    add_request_set_arguments(p)
    p.add_argument("--max-backlog-seconds", type=float, default=None,
                   help="api.max_backlog_seconds of the cluster (default: the config's default)")
    p.add_argument("--max-inflight", type=int, default=None,
                   help="api.max_inflight of the cluster (default: the config's default)")
    p.add_argument("--rss-every", type=float, default=1.0, help="seconds between samples of every process's RSS")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one request may take")
    p.add_argument("--out", default=out, help="directory for results.json, results.md, the plots and the cluster log")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cluster_settings(args) -> dict:
    api = {"max_backlog_seconds": args.max_backlog_seconds, "max_inflight": args.max_inflight}
    return {"api": {k: v for k, v in api.items() if v is not None}}


PACKAGES = ("balancer", "predictor", "worker", "cluster", "bench")


def snapshot_code(dest: Path) -> Path:
    """A copy of the packages as they are now. Serve starts each replacement replica (after a kill) from the
    files on disk, and Ray's workers import from the driver's working directory first: run from this copy, a
    long run cannot mix two versions of the code when the working tree changes under it (a soak here once
    wedged when replicas started after an edit could not read the older dispatcher's messages)."""
    import shutil

    root = Path(__file__).resolve().parent.parent
    for pkg in PACKAGES:
        shutil.copytree(root / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def stop_on_sigterm() -> None:
    """SIGTERM (and SIGINT, which a shell ignores in a background job) unwind the harness like Ctrl-C, so that
    its ``finally`` stops the cluster it started."""
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def start_cluster(args, workdir: Path, out: Path) -> Cluster:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request drowns the harness's own
    cluster = Cluster(workdir, args.mode, args.replicas, args.slice_len, max(args.max_tokens, args.slice_len),
                      False, out / "cluster.log", extra=cluster_settings(args))
    cluster.code_dir = snapshot_code(workdir / "code")
    cluster.start()
    return cluster


def measure_capacity(args, cluster: Cluster, pool: list[FaultRequest], t0: float) -> dict:
    start = time.perf_counter() - t0
    outs = asyncio.run(closed_loop(cluster, pool, args.capacity_concurrency, args.capacity_seconds, t0,
                                   args.timeout))
    end = start + args.capacity_seconds
    found = capacity(outs, start, end)
    log.info("capacity: %.2f req/s (%d clients, %.0f s)", found, args.capacity_concurrency, args.capacity_seconds)
    return {"req_per_s": found, "start": start, "end": end, "sent": len(outs),
            "completed": sum(o.completed for o in outs), "failed": dict(Counter(o.kind for o in outs
                                                                                if not o.completed)),
            "latency_p50": percentile([latency(o) for o in outs if o.completed], 50)}


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |"
                                                                           for r in rows]


def rss_table(peaks: list[dict]) -> list[str]:
    return table(["role", "processes", "peak RSS of one, MiB", "its first / last, MiB", "peak of all of them, MiB"],
                 [[p["role"], str(p["processes"]), f"{p['peak_mb']:.0f}", f"{p['first_mb']:.0f} / {p['last_mb']:.0f}",
                   f"{p['peak_sum_mb']:.0f}"] for p in peaks])


def fmt(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


# ---- plots ------------------------------------------------------------------------------------------------
ROLE_COLORS = {"worker": "tab:blue", "dispatcher": "tab:orange", "ingress": "tab:green", "redis": "tab:red",
               "slicefleet serve": "tab:purple", "serve proxy": "tab:olive", "serve controller": "tab:cyan",
               "ray gcs": "tab:brown", "ray raylet": "tab:pink"}


def plot_rss(ax, series: dict[int, dict]) -> None:
    """One line per process, coloured by role (the minor Ray processes in grey), one legend entry per role."""
    labelled = set()
    for pid, s in sorted(series.items(), key=lambda kv: kv[1]["role"]):
        color = ROLE_COLORS.get(s["role"], "0.6")
        label = s["role"] if s["role"] in ROLE_COLORS else "other Ray processes"
        ax.plot(s["t"], s["mb"], color=color, lw=1, label=None if label in labelled else label)
        labelled.add(label)
    ax.set_ylabel("RSS (MiB)")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.grid(alpha=0.3)


def aof_rewrites(redis: list[dict]) -> list[float]:
    """Times of the Redis samples at which the server had rewritten its append-only file since the last one."""
    out, last = [], None
    for r in redis:
        n = r.get("aof_rewrites")
        if n is not None and last is not None and n > last:
            out.append(r["t"])
        last = n if n is not None else last
    return out


def plot_windows(ax, series: list[dict], width: float) -> None:
    """Sliding p50 / p99 latency, each window drawn at its centre."""
    t = [w["t"] + width / 2 for w in series]
    for key, color in (("p50", "tab:blue"), ("p99", "tab:red")):
        ax.plot(t, [math.nan if w[key] is None else w[key] for w in series], color=color,
                label=f"{key}, {width:.0f} s window")
