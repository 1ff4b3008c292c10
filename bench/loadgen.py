"""Async HTTP load generator for OpenAI-compatible completion servers (Slicefleet or vLLM).

Conventions follow vLLM's ``bench serve``:

* requests are ShareGPT samples (:func:`predictor.sharegpt.sample_requests`, vLLM's filter, a seed);
* arrivals: all at t = 0 (``rate=None``), a Poisson process at ``rate`` (``burstiness=1``) or gamma gaps with
  shape ``burstiness`` (the very :func:`cluster.sim.workload.arrival_times` the simulator uses);
* every request streams (``stream: true``), so TTFT is the time to the first non-empty chunk;
* metrics: request and output-token throughput over the benchmark duration, TTFT, TPOT = (E2E - TTFT) /
  (output tokens - 1), ITL = gaps between successive content chunks, E2E latency; mean / median / p99;
  goodput = requests per second that meet every stated SLO.

Trace mode: each request carries its true ShareGPT output length (capped to ``max_gen_len``) and the server is
told to generate exactly that many tokens: Slicefleet's ``target_len`` (budget ``max_tokens`` = the cap, so
the scheduler is not told the length), vLLM's ``ignore_eos`` + ``max_tokens``. So every system generates the
same tokens. Prompts are sent as token ids, so every server sees the same prompt tokens.

The papers' metrics (valid-token ratio, pad/invalid tokens, batch size, imbalance...) come from the
dispatcher's metrics snapshot, as the difference between a snapshot taken before and after the run
(:meth:`cluster.messages.MetricsSnapshot.since`), and are
folded into :class:`cluster.sim.report.RunReport` with :func:`cluster.sim.report.summarize`, so live and
simulated figures share one definition.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from cluster.messages import MetricsSnapshot


@dataclass(frozen=True)
class BenchRequest:
    id: str
    prompt: list[int] | str
    prompt_len: int
    output_len: int
    """Tokens to generate in trace mode (the true ShareGPT length, capped); None-like 0 outside trace mode."""


@dataclass
class RequestResult:
    id: str
    prompt_len: int
    expected_len: int
    send_time: float = 0.0
    """Seconds after the benchmark start when the request was sent."""
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    response_id: str = ""
    retries: int = 0
    """Times the server answered 429 with Retry-After and the request was sent again after waiting; TTFT and
    latency count from the first attempt, so the waiting is in them."""

    @property
    def first_token_time(self) -> float:
        return self.send_time + self.ttft

    @property
    def finish_time(self) -> float:
        return self.send_time + self.latency


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput (vLLM ``--goodput``): a request counts if it meets all set ones."""

    ttft: float | None = None
    tpot: float | None = None
    e2el: float | None = None

    def met(self, r: RequestResult) -> bool:
        if not r.success:
            return False
        if self.ttft is not None and r.ttft > self.ttft:
            return False
        if self.tpot is not None and tpot(r) > self.tpot:
            return False
        if self.e2el is not None and r.latency > self.e2el:
            return False
        return True


def tpot(r: RequestResult) -> float:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


# ---- requests ------------------------------------------------------------------------------------------
def sharegpt_requests(tokenizer, n: int, seed: int, max_gen_len: int, oversample: bool = True) -> list[BenchRequest]:
    """Exactly ``n`` ShareGPT samples (vLLM rules; beyond what passes the filter, drawn again with replacement
    unless ``oversample`` is False), prompts as the model's token ids, outputs capped to ``max_gen_len``."""
    from cluster.sim.workload import sharegpt_sample

    out = []
    for s in sharegpt_sample(tokenizer, n, seed, allow_oversample=oversample)[0]:
        ids = list(tokenizer(s.prompt).input_ids)
        out.append(BenchRequest(s.id, ids, len(ids), min(int(s.output_len), max_gen_len)))
    return out


def arrivals(n: int, rate: float | None, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send offsets in seconds: all at 0 when ``rate`` is None/inf, else gamma gaps (Poisson at shape 1)."""
    from cluster.sim.workload import arrival_times

    return arrival_times(n, rate, burstiness, seed)


def request_body(req: BenchRequest, flavor: str, model: str, max_gen_len: int, trace: bool = True,
                 budget: str = "cap", ignore_eos: bool = False) -> dict:
    """The JSON body. Slicefleet in trace mode: ``target_len`` = the trace length and ``max_tokens`` = G
    (``budget="cap"``, the scheduler is not told the length) or the trace length (``"true"``, an oracle).
    ``openai`` (``--base-url``): ``max_tokens`` = the trace length, ``ignore_eos`` only when asked, the body
    ``vllm bench serve`` sends, which every server here accepts."""
    body = {"model": model, "prompt": req.prompt, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0.0}
    if not trace:
        body["max_tokens"] = max_gen_len
    elif flavor == "slicefleet":
        body["max_tokens"] = max_gen_len if budget == "cap" else req.output_len
        body["target_len"] = req.output_len
    elif flavor == "vllm":
        body["max_tokens"] = req.output_len
        body["ignore_eos"] = True
    elif flavor == "openai":  # any endpoint, as vllm bench serve sends ShareGPT: the trace length as max_tokens
        body["max_tokens"] = req.output_len
        if ignore_eos:
            body["ignore_eos"] = True
    else:
        raise ValueError(f"unknown server flavor {flavor!r}")
    return body


# ---- the client ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """How the client answers 429 with Retry-After (a server shedding load): wait, then send the request again.

    The wait is at least what Retry-After asks. It starts there (``min_wait`` at least, so that "retry after
    0 s" cannot spin), doubles with each refusal of the same request up to ``max_backoff``, and gets up to a
    quarter more at random, so that hundreds of refused requests do not all come back in the same second. A
    request is given up (and counted failed) when the next wait would take it past ``budget`` seconds after its
    first attempt. A 429 without Retry-After is a failure, as is any other error status."""

    budget: float = 600.0
    max_backoff: float = 30.0
    min_wait: float = 0.1

    def delay(self, retry_after: float, refusals: int, rng: random.Random) -> float:
        first = max(retry_after, self.min_wait)
        backoff = min(first * 2 ** min(refusals - 1, 30), max(self.max_backoff, first))
        return backoff * rng.uniform(1.0, 1.25)


NO_RETRY = RetryPolicy(budget=0.0)


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


async def _one(client, url: str, body: dict, req: BenchRequest, t0: float, sem: asyncio.Semaphore | None,
               timeout: float, retry: RetryPolicy = NO_RETRY) -> RequestResult:
    res = RequestResult(req.id, req.prompt_len, req.output_len)
    rng = random.Random(req.id)  # the jitter of each request's waits, the same from run to run
    if sem is not None:
        await sem.acquire()
    try:
        start = time.perf_counter()
        res.send_time = start - t0
        while True:
            async with client.stream("POST", url, json=body, timeout=timeout) as resp:
                if resp.status_code == 200:
                    await _read_stream(resp, res, start)
                    return res
                detail = (await resp.aread())[:300]
                after = retry_after_seconds(resp.headers.get("retry-after")) if resp.status_code == 429 else None
            wait = None if after is None else retry.delay(after, res.retries + 1, rng)
            if wait is None or time.perf_counter() + wait - start > retry.budget:
                res.error = f"HTTP {resp.status_code}: {detail!r}" + (f" (after {res.retries} retries)"
                                                                        if res.retries else "")
                return res
            res.retries += 1
            await asyncio.sleep(wait)
    except Exception as exc:  # a failed request is counted, not fatal
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if sem is not None:
            sem.release()
    return res


async def _read_stream(resp, res: RequestResult, start: float) -> None:
    """Fill ``res`` from a 200 answer's server-sent events: tokens, TTFT and the gaps between chunks."""
    last = start
    chunks = 0
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        msg = json.loads(data)
        if "error" in msg:
            res.error = str(msg["error"])[:300]
            return
        res.response_id = msg.get("id", res.response_id)
        usage = msg.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            res.output_tokens = int(usage["completion_tokens"])
        text = "".join(c.get("text", "") for c in msg.get("choices") or [])
        if text:
            now = time.perf_counter()
            if chunks == 0:
                res.ttft = now - start
            else:
                res.itl.append(now - last)
            last = now
            chunks += 1
    res.latency = time.perf_counter() - start
    if chunks == 0:
        res.ttft = res.latency
    res.success = True


async def run_load(urls: Sequence[str], requests: Sequence[BenchRequest], offsets: Sequence[float], *,
                   flavor: str = "slicefleet", model: str = "slicefleet-tiny-llama", max_gen_len: int = 1024,
                   trace: bool = True, budget: str = "cap", max_concurrency: int | None = None, timeout: float = 1800.0,
                   progress: bool = True, desc: str = "bench", ignore_eos: bool = False,
                   headers: dict | None = None, transport=None,
                   retry: RetryPolicy = RetryPolicy()) -> tuple[list[RequestResult], float]:
    """Send ``requests`` at ``offsets`` (seconds) to ``urls`` (round-robin over several base URLs, in
    request order). Returns the results and the wall time from the first send to the last answer.
    ``headers``: sent with every request (an API key). ``transport``: an httpx transport (tests use a mock).
    ``retry``: how a 429 with Retry-After is waited out and sent again (``NO_RETRY``: it fails the request)."""
    import httpx

    if len(offsets) != len(requests):
        raise ValueError("need one offset per request")
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=desc, unit="req")
    async with httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport, headers=headers) as client:
        t0 = time.perf_counter()

        async def launch(i: int, req: BenchRequest) -> RequestResult:
            delay = t0 + float(offsets[i]) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            url = urls[i % len(urls)].rstrip("/") + "/v1/completions"
            body = request_body(req, flavor, model, max_gen_len, trace, budget, ignore_eos)
            r = await _one(client, url, body, req, t0, sem, timeout, retry)
            if bar is not None:
                bar.update(1)
            return r

        results = await asyncio.gather(*(launch(i, r) for i, r in enumerate(requests)))
        wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return list(results), wall


# ---- metrics -------------------------------------------------------------------------------------------
def _stats(values: Sequence[float], scale: float = 1.0) -> dict:
    arr = np.asarray(values, dtype=float) * scale
    if arr.size == 0:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "p99": float(np.percentile(arr, 99))}


def serving_metrics(results: Sequence[RequestResult], slo: SLO | None = None) -> dict:
    """vLLM ``bench serve`` figures over the successful requests. Duration: first send to last finish."""
    ok = [r for r in results if r.success]
    out: dict = {"completed": len(ok), "failed": len(results) - len(ok), **retry_counts(results)}
    if not ok:
        return out | {"duration": 0.0, "request_throughput": 0.0, "output_throughput": 0.0}
    start = min(r.send_time for r in results)
    duration = max(r.finish_time for r in ok) - start
    tokens = sum(r.output_tokens for r in ok)
    out.update(
        duration=duration,
        total_output_tokens=tokens,
        total_input_tokens=sum(r.prompt_len for r in ok),
        request_throughput=len(ok) / duration if duration > 0 else 0.0,
        output_throughput=tokens / duration if duration > 0 else 0.0,
        total_token_throughput=(tokens + sum(r.prompt_len for r in ok)) / duration if duration > 0 else 0.0,
        ttft=_stats([r.ttft for r in ok]),
        tpot=_stats([tpot(r) for r in ok if r.output_tokens > 1]),
        itl=_stats([g for r in ok for g in r.itl]),
        e2el=_stats([r.latency for r in ok]),
        length_mismatches=sum(1 for r in ok if r.expected_len and r.output_tokens != r.expected_len),
    )
    if slo is not None:
        good = sum(1 for r in ok if slo.met(r))
        out["slo"] = {k: v for k, v in asdict(slo).items() if v is not None}
        out["good_requests"] = good
        out["goodput"] = good / duration if duration > 0 else 0.0
    return out


def retry_counts(results: Sequence[RequestResult]) -> dict:
    """How often the server shed load: requests sent again after a 429 with Retry-After, and the resends."""
    return {"retried_requests": sum(1 for r in results if r.retries), "retries": sum(r.retries for r in results)}


PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
                 "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}


def _pword(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def vllm_metrics(results: Sequence[RequestResult], duration: float, percentiles: Sequence[float] = (99,),
                 slo: SLO | None = None) -> dict:
    """The figures ``vllm bench serve`` saves, under its keys and units (latencies in ms), so a result file from
    either tool reads the same: ``duration`` is the benchmark's wall time (vLLM's benchmark_duration), TPOT
    excludes the first token, ITL is the gap between streamed chunks (a chunk may carry several tokens, as in
    vLLM's client), goodput counts requests meeting every SLO (``request_goodput`` None without SLOs)."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    per = {"ttft": [r.ttft for r in ok], "tpot": [tpot(r) for r in ok if r.output_tokens > 1],
           "itl": [g for r in ok for g in r.itl], "e2el": [r.latency for r in ok]}
    dur = duration if duration > 0 else float("nan")
    slos = {k: v * 1000 for k, v in asdict(slo).items() if v is not None} if slo else {}
    m: dict = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok), **retry_counts(results),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / dur,
        "request_goodput": sum(1 for r in ok if slo.met(r)) / dur if slos else None,
        "output_throughput": out_tokens / dur, "total_token_throughput": (in_tokens + out_tokens) / dur,
        "goodput_slo_ms": slos or None, "percentiles": list(percentiles),
    }
    for name, values in per.items():
        arr = np.asarray(values or [0.0], dtype=float) * 1000  # vLLM reports 0 for a metric with no values
        m[f"mean_{name}_ms"], m[f"median_{name}_ms"] = float(arr.mean()), float(np.median(arr))
        m[f"std_{name}_ms"] = float(arr.std())
        for p in percentiles:
            m[f"p{_pword(p)}_{name}_ms"] = float(np.percentile(arr, p))
    return m


def format_vllm_result(m: dict, metrics: Sequence[str] = PERCENTILE_METRICS, request_rate: float | None = None,
                       max_concurrency: int | None = None, title: str = " Serving Benchmark Result ") -> str:
    """``m`` (from :func:`vllm_metrics`) laid out line by line as ``vllm bench serve`` prints it."""
    lines = ["{s:{c}^{n}}".format(s=title, n=50, c="="),
             "{:<40} {:<10}".format("Successful requests:", m["completed"]),
             "{:<40} {:<10}".format("Failed requests:", m["failed"])]
    if m.get("retries"):  # not in vLLM's block: a server that answered 429 (Retry-After) and was waited out
        lines += ["{:<40} {:<10}".format("Requests retried after 429:", m["retried_requests"]),
                  "{:<40} {:<10}".format("Retries after 429:", m["retries"])]
    if max_concurrency is not None:
        lines.append("{:<40} {:<10}".format("Maximum request concurrency:", max_concurrency))
    if request_rate is not None and not math.isinf(request_rate):
        lines.append("{:<40} {:<10.2f}".format("Request rate configured (RPS):", request_rate))
    lines += ["{:<40} {:<10.2f}".format("Benchmark duration (s):", m["duration"]),
              "{:<40} {:<10}".format("Total input tokens:", m["total_input_tokens"]),
              "{:<40} {:<10}".format("Total generated tokens:", m["total_output_tokens"]),
              "{:<40} {:<10.2f}".format("Request throughput (req/s):", m["request_throughput"])]
    if m.get("request_goodput") is not None:
        lines.append("{:<40} {:<10.2f}".format("Request goodput (req/s):", m["request_goodput"]))
    lines += ["{:<40} {:<10.2f}".format("Output token throughput (tok/s):", m["output_throughput"]),
              "{:<40} {:<10.2f}".format("Total token throughput (tok/s):", m["total_token_throughput"])]
    for name in metrics:
        short, header = METRIC_TITLES[name]
        lines += ["{s:{c}^{n}}".format(s=header, n=50, c="-"),
                  "{:<40} {:<10.2f}".format(f"Mean {short} (ms):", m[f"mean_{name}_ms"]),
                  "{:<40} {:<10.2f}".format(f"Median {short} (ms):", m[f"median_{name}_ms"])]
        for p in m["percentiles"]:
            lines.append("{:<40} {:<10.2f}".format(f"P{_pword(p)} {short} (ms):", m[f"p{_pword(p)}_{name}_ms"]))
    lines.append("=" * 50)
    return "\n".join(lines)


def live_report(mode: str, replicas: int, results: Sequence[RequestResult], delta: MetricsSnapshot | None,
                extra: dict | None = None):
    """A :class:`RunReport` for a live run, with the simulator's definitions (cluster.sim.report.summarize).

    Useful tokens are the client-counted completion tokens; pad / invalid / re-prefill tokens, rows, batches,
    early returns and slices are the dispatcher's counter deltas (``delta``: what accumulated during the run; None
    for a server without them, e.g. vLLM, where they are zero).
    """
    from cluster.sim.report import summarize

    ok = [r for r in results if r.success]
    delta = delta or MetricsSnapshot(time=0.0, epoch=0, mode=mode)
    return summarize(
        mode=mode, replicas=replicas,
        arrivals=[r.send_time for r in ok], finishes=[r.finish_time for r in ok],
        first_tokens=[r.first_token_time for r in ok],
        useful=sum(r.output_tokens for r in ok),
        pad=int(delta.pad_tokens), invalid=int(delta.invalid_tokens), reprefill=int(delta.reprefill_tokens),
        rows=int(delta.rows_run), batches=int(delta.batches_run),
        busy=[r.busy_seconds for r in delta.replicas.values()], early_returns=int(delta.early_returns),
        slices=int(delta.slices_run),
        extra=dict(extra or {}),
    )


def wait_for_snapshot_settle(read: Callable[[], MetricsSnapshot | None], expect_finished: float,
                             timeout: float = 10.0, baseline: MetricsSnapshot | None = None) -> MetricsSnapshot | None:
    """Poll the snapshot until the finished-request counter reaches ``expect_finished`` over ``baseline``
    and the busy seconds stop moving (heartbeats lag by a second or two)."""
    deadline = time.monotonic() + timeout
    last = None
    base = baseline.requests_finished if baseline is not None else 0
    while time.monotonic() < deadline:
        snap = read()
        if snap is not None and snap.requests_finished - base >= expect_finished:
            busy = {rid: r.busy_seconds for rid, r in snap.replicas.items()}
            if last is not None and busy == last:
                return snap
            last = busy
        time.sleep(1.1)
    return read()


def percentile_or_nan(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan
