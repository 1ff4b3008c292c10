"""Upgrade harness: a KubeRay ``NewCluster`` upgrade on one Redis, simulated on loopback under seeded load.

KubeRay's NewCluster upgrade starts a second Ray cluster with the new spec, switches the API Service to it once
its Serve app is ready, and deletes the old cluster later (docs/deploy.md, Upgrades). Both clusters use the same
Redis and key prefix. Here each cluster is a ``slicefleet serve`` process with its own Ray instance, dispatcher,
worker replicas and ingress (the fault harness's ``Cluster``), both pointed at one Redis that this harness owns.

* ``reference``: the fault harness's fixed, seeded, greedy request set through cluster A alone. Its outputs (the
  client's text, finish and usage, and each request's token ids in Redis) are what the upgrade run must match.
* ``upgrade``: the same set at the same rate against A's ingress. Once ``--upgrade-at`` of the send window has
  passed and requests are in flight (accepted, streaming, still live in Redis), cluster B starts. Its
  dispatcher takes a new epoch: A's dispatcher is fenced (it hands over what it holds and stops; its /health
  says not ready) and B's dispatcher places every live request on the workers that beat in Redis, A's too.
  When B is ready (its own workers beat and its /health is ok: KubeRay waits for the new app to be RUNNING),
  requests not yet sent go to B's ingress (the Service switch). ``--deletion-delay`` later, once some request
  is streaming from one of A's workers, all of cluster A goes at once: every process of it is frozen (SIGSTOP)
  and then SIGKILLed, as a deleted pod vanishes, so its ingress posts no cancel for the streams it serves.

Clients attached to A's ingress then lose their connection: the API has no way to re-attach to a request, so
those requests are checked in Redis. Every accepted request must finish there exactly once, with the same
token ids and finish reason as in the reference (``lost``: accepted and never finished, or finished otherwise
than the reference did, e.g. cancelled), or else be the model's greedy output up to float noise (``near_tie``:
a batch of another size rounds differently, and where two logits lie within that rounding the greedy token
flips; checked by one teacher-forced pass). Any other output is ``duplicated`` (more tokens than the
reference) or ``corrupted``. Every client that kept its connection must have read exactly the reference's text,
finish and usage. The run fails unless the fence and the deletion each caught requests in flight, and unless
every request live at the deletion was finished by one of B's workers.

    python -m bench.upgrade --requests 80 --rate 1 --min-tokens 300 --max-tokens 900 --out runs/upgrade
                                                                           # or: slicefleet upgrade ...

Writes results.json (every figure and outcome), results.md and upgrade.png (each request over time, by the
ingress it went to, with the upgrade's moments) under ``--out``, with both clusters' logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from balancer.types import FinishReason
from bench.harness_main import harness_main
from bench.faults import (Cluster, FaultRecord, FaultRequest, Outcome, _streaming_from, add_request_set_arguments,
                          alive, compare, descendants, drive, machine, request_set, resumed_after, send)
from bench.loadgen import arrivals
from bench.pressure import snapshot_code

log = logging.getLogger("slicefleet.upgrade")

MODEL = "slicefleet-tiny-llama"
FINISHED = (FinishReason.EOS.value, FinishReason.STOP.value, FinishReason.LENGTH.value)
"""Finish reasons, as Redis records them, of a request that ran to its end (not cancelled, timed out, refused)."""


# ---- what happened ----------------------------------------------------------------------------------------
@dataclass
class Upgrade:
    """The upgrade's moments (run-relative seconds) and what each one caught."""

    b_start: float | None = None
    fence: float | None = None
    """When the epoch in Redis moved past A's: B's dispatcher took over and A's is fenced."""
    a_unready: float | None = None
    """When A's /health first said its dispatcher is not ready."""
    a_health: dict = field(default_factory=dict)
    b_ready: float | None = None
    b_workers_at_health: tuple[int, int] | None = None
    """(B's own workers beating, B's replicas) when B's /health first said ok: it must count only its own."""
    switch: float | None = None
    kill: float | None = None
    epochs: tuple[int, int] | None = None
    """(A's epoch, B's epoch)."""
    in_flight_at_start: int = 0
    """Requests accepted, streaming, unfinished at the client and live in Redis when B started."""
    in_flight_at_fence: list[int] = field(default_factory=list)
    """The same when the fence came (indices): the requests whose stream the handover had to keep going."""
    live_at_fence: int = 0
    """Requests Redis held as live when the fence came: those A's dispatcher held (or was about to read)."""
    held_logged: int | None = None
    """What A's dispatcher said it handed over when it noticed it was fenced (None: its log line not found)."""
    fence_log: str = ""
    in_flight_at_kill: list[int] = field(default_factory=list)
    live_at_kill: list[str] = field(default_factory=list)
    """Request ids live in Redis at the deletion."""
    on_a_workers: list[int] = field(default_factory=list)
    """Requests in flight at the deletion whose latest tokens came from one of A's workers."""
    a_replicas: list[str] = field(default_factory=list)
    b_replicas: list[str] = field(default_factory=list)
    killed_processes: int = 0
    handover_s: float | None = None
    """From the fence until every request in flight at the fence had a new token (or its finish)."""
    after_kill_s: float | None = None
    """From the deletion until every request in flight on B's ingress then had a new token (or its finish)."""
    kill_resumed_s: float | None = None
    """From the deletion until every request live in Redis then had a new token there (or had finished): the
    clients cut off with A cannot tell, so Redis is watched."""
    error: str = ""


# ---- accounting -------------------------------------------------------------------------------------------
def verify(outcomes: list[Outcome], found: dict[int, tuple[str, str | None, list[int], list[str]]],
           reference: dict[int, tuple[str | None, list[int]]] | None,
           greedy: Callable[[int, list[int]], bool] = lambda i, tokens: False,
           budgets: dict[int, int] | None = None) -> dict:
    """Every accepted request as Redis has it (``found``: index -> status, finish reason, token ids, replicas
    that ran its slices) against the reference's finish reason and token ids.

    ``greedy(index, tokens)``: whether every token is the model's greedy choice after the ones before it, up to
    float noise. An output that differs from the reference but passes counts as ``near_tie``, not corrupted:
    batches of other sizes round differently, and where two logits lie within that rounding the greedy token
    flips (seen here: 8.6e-6 apart at token 332 of 462, in a request the upgrade never touched).

    ``reference`` None (no reference run): the greedy check is the oracle, and a request that did not end at
    EOS must hold exactly its budget (``budgets``: index -> max_tokens)."""
    lost, duplicated, corrupted, near_tie = [], [], [], []
    for o in outcomes:
        if not o.accepted:
            continue
        status, reason, tokens, _ = found.get(o.index, ("missing", None, [], []))
        if reference is None:
            ref_reason, ref_tokens = None, None
            budget = budgets[o.index]
        else:
            ref_reason, ref_tokens = reference[o.index]
            budget = len(ref_tokens)
        if status != "done" or reason not in FINISHED:
            lost.append(o.index)
        elif reference is None:
            if greedy(o.index, tokens) and (reason == FinishReason.EOS.value or len(tokens) == budget):
                continue
            (duplicated if len(tokens) > budget else corrupted).append(o.index)
        elif (reason, tokens) == (ref_reason, ref_tokens):
            continue
        elif greedy(o.index, tokens):
            near_tie.append(o.index)
        elif len(tokens) > budget:
            duplicated.append(o.index)
        else:
            corrupted.append(o.index)
    accepted = sum(o.accepted for o in outcomes)
    return {"requests": len(outcomes), "accepted": accepted,
            "completed": accepted - len(lost) - len(duplicated) - len(corrupted),
            "identical": accepted - len(lost) - len(duplicated) - len(corrupted) - len(near_tie),
            "lost": len(lost), "duplicated": len(duplicated), "corrupted": len(corrupted), "near_tie": len(near_tie),
            "lost_indices": lost, "duplicated_indices": duplicated, "corrupted_indices": corrupted,
            "near_tie_indices": near_tie}


def greedy_check(model_dir, prompts: dict[int, list[int]], tolerance: float = 1e-3) -> Callable[[int, list[int]], bool]:
    """``greedy`` for :func:`verify`: one teacher-forced forward pass over prompt + output (batch of one), and
    every output token's logit within ``tolerance`` of the largest. A repeated or skipped slice puts tokens
    there that the model would not choose, far outside float noise."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def greedy(index: int, tokens: list[int]) -> bool:
        prompt = prompts[index]
        if not tokens:
            return True
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        return bool((logits.max(-1).values - chosen).max() <= tolerance)

    return greedy


def client_view(outcomes: list[Outcome], via: list[str | None], reference: list[Outcome] | None,
                kill: float | None, near_tie: frozenset[int] = frozenset(), found: dict | None = None) -> dict:
    """The clients' side: those cut off when A's ingress went, and how the others compare with the reference
    (``near_tie``: requests whose output legitimately differs from it, see :func:`verify`; they are left out).
    Without a reference, a client must have been told as many tokens as Redis holds (``found``)."""
    def cut_off(o: Outcome) -> bool:
        return via[o.index] == "A" and kill is not None and o.done is not None and o.done >= kill

    cut = [o.index for o in outcomes if o.accepted and not o.completed and cut_off(o)]
    # Sent to A as it went: no answer at all, though the ingress may have stored it (B then ran it).
    unanswered = [o.index for o in outcomes if not o.accepted and o.status is None and cut_off(o)]
    refused = [o.index for o in outcomes if not o.accepted and o.index not in unanswered]
    kept = [o for o in outcomes if o.index not in set(cut) and o.index not in near_tie]
    if reference is None:
        summary = compare(kept, kept)
        differing = [o.index for o in kept if o.completed
                     and (o.usage or {}).get("completion_tokens") != len((found or {}).get(o.index, ("", "", []))[2])]
        summary.update(differing=len(differing), duplicated=0, corrupted=len(differing))
    else:
        summary = compare(kept, [reference[o.index] for o in kept])
    return {"via_a": sum(v == "A" for v in via), "via_b": sum(v == "B" for v in via), "cut": len(cut),
            "cut_indices": cut, "unanswered": unanswered, "refused": refused,
            "completed": summary["completed"], "lost": summary["lost"],
            "lost_indices": [o.index for o in kept if o.accepted and not o.completed],
            "differing": summary["differing"], "duplicated": summary["duplicated"], "corrupted": summary["corrupted"],
            "failed": summary["failed"]}


def verdict(redis: dict, clients: dict, up: dict, finished_by_b: dict, reference: dict) -> list[str]:
    """Why this run fails; empty when it passes."""
    problems = []
    if reference["completed"] != reference["requests"]:
        problems.append(f"the reference completed {reference['completed']} of {reference['requests']}")
    if redis["lost"]:
        problems.append(f"{redis['lost']} accepted requests never finished in Redis: {redis['lost_indices'][:10]}")
    if redis["duplicated"] or redis["corrupted"]:
        problems.append(f"outputs in Redis differ from the reference: duplicated {redis['duplicated_indices'][:10]}"
                        f", corrupted {redis['corrupted_indices'][:10]}")
    if clients["lost"]:
        problems.append(f"{clients['lost']} clients still connected got no complete answer: "
                        f"{clients['lost_indices'][:10]}")
    if clients["refused"]:
        problems.append(f"{len(clients['refused'])} requests were not accepted: {clients['refused'][:10]}")
    if clients["differing"]:
        problems.append(f"{clients['differing']} connected clients read something other than the reference")
    if up["error"]:
        problems.append(up["error"])
    if up["fence"] is None:
        problems.append("the epoch never moved past A's: nothing was fenced")
    elif not up["live_at_fence"] or not up["in_flight_at_fence"] or up["held_logged"] == 0:
        problems.append("the fence caught no request in flight")
    if up["fence"] is not None and up["a_unready"] is None:
        problems.append("A's /health never said its dispatcher was not ready")
    beating, replicas = up.get("b_workers_at_health") or (0, 0)
    if beating < replicas:
        problems.append(f"B's /health said ok with only {beating} of its {replicas} workers beating")
    if up["kill"] is None:
        problems.append("cluster A was never deleted")
    elif not up["live_at_kill"] or not up["on_a_workers"]:
        problems.append("A's deletion caught no request streaming from A's workers")
    if finished_by_b["not_by_b"]:
        problems.append(f"requests live at A's deletion finished elsewhere than on B's workers: "
                        f"{finished_by_b['not_by_b'][:10]}")
    return problems


# ---- the clusters -----------------------------------------------------------------------------------------
def delete_cluster(cluster: Cluster) -> int:
    """Every process of the cluster frozen, then killed: a deleted pod's processes get no time to react (an
    ingress that saw its client go would cancel the request). Returns how many processes it killed."""
    pids: list[int] = []
    for _ in range(3):  # a process forked while we walked the tree is caught on the next pass
        new = [p for p in [cluster.proc.pid] + descendants(cluster.proc.pid) if p not in pids and alive(p)]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        pids += new
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.proc.wait(timeout=30)
    return len(pids)


def log_files(pid: int) -> list[Path]:
    """The log files a Ray worker process writes (its stdout/stderr and Serve's replica log)."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith((".log", ".out", ".err")) and os.path.isfile(target):
            out.append(Path(target))
    return sorted(set(out))


FENCE_LINE = re.compile(r"superseded by epoch (\d+).*?(\d+) requests")


def fence_line(files: list[Path]) -> tuple[str, int | None]:
    """The fenced dispatcher's own account: its log line and how many requests it says it handed over."""
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            m = FENCE_LINE.search(line)
            if m:
                return line.strip()[-300:], int(m.group(2))
    return "", None


def health(url: str) -> tuple[int, dict]:
    import httpx

    try:
        resp = httpx.get(url + "/health", timeout=5)
        return resp.status_code, resp.json()
    except Exception as exc:  # noqa: BLE001 - a cluster on its way down
        return 0, {"error": repr(exc)}


def start_ready(cluster: Cluster, timeout: float) -> tuple[int, int]:
    """Start the cluster and wait for its /health to say ok, as KubeRay waits for the new cluster's app.
    Returns (its own workers beating then, its replicas): /health counts only the replicas of its own Ray
    cluster, so the other cluster's, which beat in the same Redis, cannot make it ok early."""
    cluster.start(timeout)
    return len(cluster.worker_pids()), cluster.replicas


# ---- one run ----------------------------------------------------------------------------------------------
async def drive_upgrade(a: Cluster, b: Cluster, requests: list[FaultRequest], args, desc: str):
    import httpx

    outcomes = [Outcome(r.index) for r in requests]
    via: list[str | None] = [None] * len(requests)
    up = Upgrade()
    target = {"name": "A", "url": a.url}
    window = max(r.offset for r in requests)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=desc, unit="req")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:
        t0 = time.perf_counter()

        def now() -> float:
            return time.perf_counter() - t0

        async def one(req: FaultRequest) -> None:
            await asyncio.sleep(max(0.0, t0 + req.offset - time.perf_counter()))
            via[req.index] = target["name"]
            await send(client, target["url"], MODEL, req, t0, outcomes[req.index], args.timeout)
            if bar is not None:
                bar.update(1)

        async def live_in_flight(cluster: Cluster) -> tuple[list[Outcome], set[str]]:
            flying = [o for o in outcomes if o.in_flight()]
            live = set(await asyncio.to_thread(cluster.store.live_ids))
            return [o for o in flying if o.rid in live], live

        async def upgrade() -> None:
            await asyncio.sleep(max(0.0, t0 + args.upgrade_at * window - time.perf_counter()))
            deadline = time.monotonic() + args.trigger_timeout
            while time.monotonic() < deadline:
                hits, live = await live_in_flight(a)
                if len(hits) >= args.min_in_flight:
                    break
                await asyncio.sleep(0.1)
            else:
                up.error = f"fewer than {args.min_in_flight} requests in flight within {args.trigger_timeout:.0f} s"
                return
            a_epoch = await asyncio.to_thread(a.store.epoch)
            up.a_replicas = sorted(await asyncio.to_thread(a.worker_pids))
            up.in_flight_at_start = len(hits)
            up.b_start = now()
            log.info("starting cluster B at %.1f s: %d requests in flight, %d live in Redis", up.b_start, len(hits),
                     len(live))
            starting = asyncio.create_task(asyncio.to_thread(start_ready, b, args.start_timeout))
            while up.fence is None and not starting.done():
                epoch = await asyncio.to_thread(a.store.epoch)
                if epoch > a_epoch:
                    up.fence, up.epochs = now(), (a_epoch, epoch)
                    hits, live = await live_in_flight(a)
                    up.in_flight_at_fence, up.live_at_fence = [o.index for o in hits], len(live)
                    log.info("fenced at %.1f s (epoch %d -> %d): %d requests in flight, %d live in Redis", up.fence,
                             a_epoch, epoch, len(hits), len(live))
                    break
                await asyncio.sleep(0.05)
            a_logs: list[Path] = []
            while up.fence is not None and up.a_unready is None and not starting.done():
                status, body = await asyncio.to_thread(health, a.url)
                if status == 503 and not body.get("dispatcher_ready", True):
                    up.a_unready, up.a_health = now(), body
                    a_logs = await asyncio.to_thread(log_files, a.dispatcher_pid())
                    break
                await asyncio.sleep(0.1)
            up.b_workers_at_health = await starting  # raises if B never came up: the run fails with the reason
            up.b_ready = now()
            if up.a_unready is None:  # B was up before A's health said so: look once more
                status, body = await asyncio.to_thread(health, a.url)
                if status == 503 and not body.get("dispatcher_ready", True):
                    up.a_unready, up.a_health = now(), body
                    a_logs = await asyncio.to_thread(log_files, a.dispatcher_pid())
            target.update(name="B", url=b.url)
            up.switch = now()
            log.info("B ready at %.1f s: new requests go to B (fence at %s s)", up.switch, up.fence)
            await asyncio.sleep(args.deletion_delay)
            a_ids = set(up.a_replicas)
            deadline = time.monotonic() + args.trigger_timeout
            hits, live, on_a = [], set(), []
            while time.monotonic() < deadline:
                hits, live = await live_in_flight(a)
                owners = await asyncio.to_thread(_streaming_from, a, [o.rid for o in hits]) if hits else {}
                on_a = [o.index for o in hits if owners.get(o.rid) in a_ids]
                if on_a:
                    break
                await asyncio.sleep(0.1)
            up.in_flight_at_kill, up.live_at_kill, up.on_a_workers = [o.index for o in hits], sorted(live), on_a
            up.kill = now()
            up.killed_processes = await asyncio.to_thread(delete_cluster, a)
            up.fence_log, up.held_logged = fence_line(a_logs)
            up.kill_resumed_s = await asyncio.to_thread(moving_again, b, up.live_at_kill, up.kill,
                                                        t0, args.trigger_timeout)
            log.info("cluster A deleted at %.1f s (%d processes): %d requests in flight, %d of them on A's workers",
                     up.kill, up.killed_processes, len(hits), len(on_a))

        tasks = [asyncio.create_task(one(r)) for r in requests]
        upgrading = asyncio.create_task(upgrade())
        await asyncio.gather(*tasks)
        await upgrading
        wall = now()
    if bar is not None:
        bar.close()
    if up.fence is not None:
        up.handover_s = resumed_after(FaultRecord("dispatcher", fired=True, at=up.fence,
                                                  in_flight=up.in_flight_at_fence), outcomes,
                                      up.kill if up.kill is not None else float("inf"))
    if up.kill is not None:
        on_b = [i for i in up.in_flight_at_kill if via[i] == "B"]
        up.after_kill_s = resumed_after(FaultRecord("dispatcher", fired=True, at=up.kill, in_flight=on_b), outcomes)
    return outcomes, via, up, wall


def moving_again(cluster: Cluster, rids: list[str], since: float, t0: float, timeout: float) -> float | None:
    """Seconds from ``since`` (run-relative) until each of ``rids`` has more tokens in Redis than it had at the
    first look, or has finished; None if some never did within ``timeout``."""
    records = cluster.store.records(rids)
    before = {rid: len(gen) for rid, (_, gen) in zip(rids, records)}
    pending = set(rids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        waiting = sorted(pending)
        for rid, (rec, gen) in zip(waiting, cluster.store.records(waiting)):
            if rec is None or rec.status == "done" or len(gen) > before[rid]:
                pending.discard(rid)
    return None if pending else time.perf_counter() - t0 - since


def redis_outputs(cluster: Cluster, outcomes: list[Outcome], timeout: float) -> dict[int, tuple]:
    """index -> (status, finish reason, token ids, replicas) in Redis, once every accepted request there has
    finished (or ``timeout`` has passed: what is unfinished then is lost)."""
    by_rid = {o.rid: o.index for o in outcomes if o.accepted and o.rid}
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for rid, (rec, gen) in zip(by_rid, cluster.store.records(list(by_rid))):
            if rec is not None:
                found[by_rid[rid]] = (rec.status, rec.finish_reason, gen, list(rec.replicas))
        if all(v[0] == "done" for v in found.values()) and len(found) == len(by_rid) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def run_upgrade(args) -> dict:
    from transformers import AutoTokenizer

    from cluster.redis_server import EmbeddedRedis
    from worker.make_model import ensure_default_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    requests = request_set(tokenizer, args.requests, args.seed, args.rate, args.min_tokens, args.max_tokens,
                           args.prompts, args.max_prompt_len)
    # The same prompts and budgets; only the send times may differ (a burst makes the reference quick).
    ref_requests = [replace(r, offset=o) for r, o in
                    zip(requests, arrivals(len(requests), args.reference_rate or args.rate, 1.0, args.seed))]
    result: dict = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="slicefleet-upgrade-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis").start()
        clusters = []
        for name in ("a", "b"):
            (Path(tmp) / name).mkdir()
            clusters.append(Cluster(Path(tmp) / name, args.mode, args.replicas, args.slice_len,
                                    max(args.max_tokens, args.slice_len), False, out / f"cluster_{name}.log",
                                    redis_url=redis.url))
        a, b = clusters
        # Serve starts a killed replica's successor from the files on disk: both clusters run from one copy, so an
        # edit in the checkout meanwhile cannot give B other code than A (or a successor other code than its peers).
        code = Path(args.code_dir) if args.code_dir else snapshot_code(Path(tmp) / "code")
        a.code_dir = b.code_dir = code
        try:
            t = time.perf_counter()
            start_ready(a, args.start_timeout)
            result["startup_s"] = time.perf_counter() - t
            a.quiet()
            ref, ref_redis, reference = None, {}, None
            result["reference"] = {"wall_s": 0.0, "requests": len(requests), "completed": len(requests)}
            if not args.no_reference:
                ref, _, ref_wall = asyncio.run(drive(a, MODEL, ref_requests, [], [], args.timeout, 0, 0,
                                                     "reference", progress=not args.no_progress))
                ref_redis = redis_outputs(a, ref, args.timeout)
                reference = {i: (v[1], v[2]) for i, v in ref_redis.items()}
                result["reference"] = {"wall_s": ref_wall, **compare(ref, ref)}
                a.quiet()
            outcomes, via, up, wall = asyncio.run(drive_upgrade(a, b, requests, args, "upgrade"))
            found = redis_outputs(b, outcomes, args.timeout)
            b_ids = set(up.b_replicas or []) | set(b.worker_pids())
            up.b_replicas = sorted(b_ids)
            by_rid = {o.rid: o.index for o in outcomes if o.rid}
            at_kill = [by_rid[r] for r in up.live_at_kill if r in by_rid]
            not_by_b = [i for i in at_kill if i in found and (not found[i][3] or found[i][3][-1] not in b_ids)]
        finally:
            for c in (b, a):
                c.stop()
            redis.stop()
    upd = asdict(up)
    greedy = greedy_check(ensure_default_model(), {r.index: r.prompt for r in requests})
    redis_summary = verify(outcomes, found, reference, greedy, {r.index: r.max_tokens for r in requests})
    clients = client_view(outcomes, via, ref, up.kill, frozenset(redis_summary["near_tie_indices"]), found)
    finished_by_b = {"live_at_kill": len(at_kill), "by_b": len(at_kill) - len(not_by_b), "not_by_b": not_by_b}
    result.update({
        "wall_s": wall, "upgrade": upd, "redis": redis_summary, "clients": clients, "finished_by_b": finished_by_b,
        "problems": verdict(redis_summary, clients, upd, finished_by_b, result["reference"]),
        "outcomes": [asdict(o) | {"via": v, "redis": redis_view(found.get(o.index))} for o, v in zip(outcomes, via)],
        "reference_outcomes": [asdict(o) | {"redis": redis_view(ref_redis.get(o.index))} for o in ref or []],
    })
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    plot(result, out)
    return result


def redis_view(entry: tuple | None) -> dict | None:
    """What results.json keeps of a request in Redis: status, finish, the token ids and who ran its slices."""
    if entry is None:
        return None
    status, reason, tokens, replicas = entry
    return {"status": status, "finish_reason": reason, "tokens": tokens, "replicas": replicas}


# ---- report -----------------------------------------------------------------------------------------------
def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def figures(result: dict) -> list[tuple[str, str]]:
    up, r, c = result["upgrade"], result["redis"], result["clients"]
    return [
        ("requests / accepted", f"{r['requests']} / {r['accepted']}"),
        ("completed in Redis", str(r["completed"])),
        ("  identical to the reference / greedy, past a near-tie", f"{r['identical']} / {r['near_tie']}"),
        ("lost", str(r["lost"])),
        ("duplicated / corrupted", f"{r['duplicated']} / {r['corrupted']}"),
        ("sent to A / to B", f"{c['via_a']} / {c['via_b']}"),
        ("clients cut off with A's ingress (checked in Redis)", str(c["cut"])),
        ("not accepted: A went before its reply / refused", f"{len(c['unanswered'])} / {len(c['refused'])}"),
        ("connected clients identical to the reference", f"{c['completed'] - c['differing']} of {c['completed']}"),
        ("epochs (A -> B)", " -> ".join(map(str, up["epochs"])) if up["epochs"] else "–"),
        ("A held when fenced (live in Redis / its log)",
         f"{up['live_at_fence']} / {'–' if up['held_logged'] is None else up['held_logged']}"),
        ("in flight when B started / at the fence (streaming)",
         f"{up['in_flight_at_start']} / {len(up['in_flight_at_fence'])}"),
        ("B started, fence, A unready, B ready, A deleted (s)",
         ", ".join(_s(up[k]) for k in ("b_start", "fence", "a_unready", "b_ready", "kill"))),
        ("B's own workers beating when its /health first said ok",
         "{} of {}".format(*up["b_workers_at_health"]) if up.get("b_workers_at_health") else "–"),
        ("handover: fence -> every request in flight moving again (s)", _s(up["handover_s"])),
        ("A's deletion: live in Redis / streaming from A's workers",
         f"{len(up['live_at_kill'])} / {len(up['on_a_workers'])}"),
        ("deletion -> every request live then moving again in Redis (s)", _s(up["kill_resumed_s"])),
        ("deletion -> B's clients in flight moving again (s)", _s(up["after_kill_s"])),
        ("live at A's deletion, finished on B's workers",
         f"{result['finished_by_b']['by_b']} of {result['finished_by_b']['live_at_kill']}"),
        ("wall (s): cluster start, reference, upgrade run",
         f"{result['startup_s']:.0f}, {result['reference']['wall_s']:.0f}, {result['wall_s']:.0f}"),
        ("verdict", "pass" if not result["problems"] else "FAIL"),
    ]


def markdown(result: dict) -> str:
    lines = ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in figures(result)]
    if result["upgrade"]["fence_log"]:
        lines.append(f"\nA's dispatcher: `{result['upgrade']['fence_log']}`")
    lines += [f"\n- {p}" for p in result["problems"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    up = result["upgrade"]
    rows = result["outcomes"]
    fig, ax = plt.subplots(figsize=(10, max(4.0, 0.06 * len(rows) + 2)))
    colors = {"A": "tab:blue", "B": "tab:orange"}
    for o in rows:
        if o["done"] is None:
            continue
        color = colors.get(o["via"], "0.5")
        ax.plot([o["sent"], o["done"]], [o["index"]] * 2, color=color, lw=1.2, alpha=0.8)
        if o["chunk_times"]:
            ax.scatter(o["chunk_times"], [o["index"]] * len(o["chunk_times"]), s=1.5, color=color)
        if o["accepted"] and not o["completed"]:
            ax.scatter([o["done"]], [o["index"]], marker="x", color="tab:red", s=18, zorder=3)
    for key, label, style in (("b_start", "B starts", ":"), ("fence", "A fenced (B's epoch)", "--"),
                              ("switch", "traffic to B", "-."), ("kill", "A deleted", "-")):
        if up[key] is not None:
            ax.axvline(up[key], color="k", ls=style, lw=1, label=f"{label} ({up[key]:.1f} s)")
    ax.plot([], [], color=colors["A"], label="sent to A's ingress")
    ax.plot([], [], color=colors["B"], label="sent to B's ingress")
    ax.scatter([], [], marker="x", color="tab:red", label="client cut off with A (finished in Redis)")
    ax.set_xlabel("seconds since the run started (dots: chunks received)")
    ax.set_ylabel("request")
    r = result["redis"]
    ax.set_title(f"NewCluster upgrade on one Redis: {r['accepted']} accepted, {r['completed']} completed "
                 f"({r['identical']} identical), {r['lost']} lost, {r['duplicated']} duplicated")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "upgrade.png", dpi=110)
    plt.close(fig)


# ---- the command ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=80, help="requests in the set (both runs send the same set)")
    p.add_argument("--rate", type=float, default=1.5,
                   help="Poisson arrival rate, req/s: the send window must outlast cluster B's start")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference run: each output in Redis is checked by the greedy check alone (every "
                        "token the model's greedy choice, and the whole budget unless it ended at EOS), and each "
                        "connected client against the token count in Redis")
    p.add_argument("--reference-rate", type=_rate, default=None, metavar="RATE",
                   help="arrival rate of the reference run, req/s, or 'inf' for all at once (default: --rate)")
    add_request_set_arguments(p, min_tokens=32, slice_len=16, what="each cluster")
    p.add_argument("--upgrade-at", type=float, default=0.15,
                   help="cluster B starts once this share of the send window has passed and requests are in flight")
    p.add_argument("--min-in-flight", type=int, default=3,
                   help="B starts only once this many requests are accepted, streaming and live in Redis")
    p.add_argument("--deletion-delay", type=float, default=0.0,
                   help="seconds between the switch to B and A's deletion (KubeRay's clusterDeletionDelaySeconds; "
                        "short here, so that the deletion catches requests on A's workers)")
    p.add_argument("--trigger-timeout", type=float, default=60.0,
                   help="seconds the upgrade and the deletion may wait for requests in flight")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds a cluster may take to start")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--code-dir", default=None,
                   help="run both clusters from the packages in this directory, e.g. an older release's checkout "
                        "(default: a copy of this checkout's packages taken at start)")
    p.add_argument("--out", default="runs/upgrade",
                   help="directory for results.json, results.md, upgrade.png and both clusters' logs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _rate(text: str) -> float:
    if text.strip().lower() in ("inf", "all"):
        return float("inf")
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a rate is > 0 req/s or 'inf', got {text!r}")
    return value


def print_figures(result: dict) -> None:
    width = max(len(k) for k, _ in figures(result))
    for k, v in figures(result):
        print(f"{k:<{width}}  {v}")
    if result["upgrade"]["fence_log"]:
        print(f"A's dispatcher: {result['upgrade']['fence_log']}")
    for p in result["problems"]:
        print(f"FAIL: {p}")


def run(args) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not 0 <= args.upgrade_at < 1:
        raise SystemExit(f"--upgrade-at is a share of the send window, in [0, 1), got {args.upgrade_at}")
    result = run_upgrade(args)
    print_figures(result)
    print(f"results: {Path(args.out) / 'results.json'}, results.md, upgrade.png")
    return 1 if result["problems"] else 0


def main(argv: list[str] | None = None) -> int:
    return harness_main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
