"""A worker replica: one engine, pulling batches from its own Redis stream.

Ray Serve owns the replica's life (resources, health checks, restarts); the dispatcher decides what it runs.
The replica registers itself with a heartbeat; a replica that stops beating is presumed dead and its batches
are placed elsewhere. It never writes request state: it posts results, and the dispatcher applies them once.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid

from cluster.config import SlicefleetConfig
from cluster.lease_loop import LeaseLoop
from cluster.messages import (BatchOrder, Progress, ProgressRow, Release, ReplicaInfo, RequestRecord, RowReport,
                              SliceReport)
from cluster.ray_session import current_ray_session
from cluster.stores.base import STORE_UNAVAILABLE, stream_gone
from cluster.stores.worker import WorkerStore

log = logging.getLogger("slicefleet.worker")

CONTINUOUS_MODES = ("continuous_slices", "ils")

HEARTBEAT_TTL = 4.0
HEARTBEAT_EVERY = 1.0
EPOCH_CHECK_EVERY = 1.0


def slice_item(rec: RequestRecord, generated: list[int]):
    """The engine's view of a stored request: its whole history, the budget left, its stop rules."""
    from dataclasses import fields

    from worker.protocol import SamplingParams, SliceItem

    return SliceItem(
        request_id=rec.id,
        token_ids=list(rec.prompt_ids) + list(generated),
        prompt_len=rec.prompt_len,
        max_new_tokens=rec.max_tokens - len(generated),
        eos_token_ids=() if rec.ignore_eos or rec.target_len is not None else None,
        stop_token_ids=tuple(rec.stop_token_ids),
        # the record stores every sampling knob under the engine's own field name
        sampling=SamplingParams(**{f.name: getattr(rec, f.name) for f in fields(SamplingParams)}),
        target_len=None if rec.target_len is None else rec.target_len - len(generated),
    )


def slice_report(order: BatchOrder, replica_id: str, res, n: int, max_input_len: int) -> SliceReport:
    return SliceReport(
        order.batch_id, order.epoch, replica_id,
        outputs=[RowReport(o.request_id, list(o.new_token_ids), o.finish_reason.value) for o in res.outputs],
        elapsed=res.elapsed,
        prefill_time=res.prefill_time,
        decode_step_times=list(res.decode_step_times),
        pad_tokens=res.pad_tokens,
        invalid_tokens=res.invalid_tokens,
        reprefill_tokens=res.reprefill_tokens,
        kv_reused=res.kv_reused,
        resumed_rows=sum(o.kv_reused for o in res.outputs),
        n=n,
        max_input_len=max_input_len,
    )


class SliceWorker:
    """The Ray Serve deployment class (wrapped with ``serve.deployment`` in ``cluster.app``)."""

    def __init__(self, config: dict, replica_id: str | None = None):
        """``replica_id``: resume as this replica (its stream and unacknowledged batches); default a new id."""
        cfg = SlicefleetConfig.model_validate(config)
        self.cfg = cfg
        self.store = WorkerStore.connect(cfg.redis)
        self.replica_id = replica_id or self._make_id()
        if cfg.engine.device == "cpu" and cfg.engine.nice and os.nice(0) < cfg.engine.nice:
            os.nice(cfg.engine.nice - os.nice(0))  # the control plane answers first when engines saturate the CPU
        self.continuous = cfg.scheduler.mode in CONTINUOUS_MODES
        self.engine = self._build_engine(cfg, self._cpu_bind(cfg))
        # What the engine really does, not what the config asked: DeepSpeed's injected kernels keep no cache.
        keeps_kv = not self.continuous and bool(getattr(self.engine, "kv_reuse", False))
        if keeps_kv:
            batch_budget, keep_budget = cfg.engine.split_kv_budget(self._kv_budget(cfg))
            self.engine.set_kv_keep_budget(keep_budget)
        else:  # continuous rows keep their KV in the running batch; an engine that keeps nothing needs no share
            batch_budget = self._kv_budget(cfg)
        self.busy_seconds = 0.0
        """Seconds spent computing (load-imbalance figures); published with each heartbeat."""
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.leases = LeaseLoop(self.store, self.engine, self.replica_id, self._load, cfg.engine.stream_every)
        self._replica_info = ReplicaInfo(self.replica_id, os.getpid(), self._backend(cfg), socket.gethostname(),
                                         time.time(), batch_budget, keeps_kv, ray_session=current_ray_session())
        self._forgotten = threading.Event()
        """Set by the heartbeat when a dispatcher presumed this replica dead; the work loop then drops its rows
        (the dispatcher has put them back in the pool)."""
        self._register()
        self._inbox: queue.Queue[dict] = queue.Queue()
        self._threads = [threading.Thread(target=self._beat, name="heartbeat", daemon=True),
                         threading.Thread(target=self._guarded, name="work", daemon=True)]
        if self.continuous:
            self._threads.append(threading.Thread(target=self._read_forever, name="work-reader", daemon=True))
        for t in self._threads:
            t.start()
        log.info("replica %s ready (pid %d, %s)", self.replica_id, os.getpid(),
                 f"{self._backend(cfg)} engine, {cfg.scheduler.mode}")

    @staticmethod
    def _make_id() -> str:
        try:
            from ray import serve

            tag = serve.get_replica_context().replica_tag
        except Exception:  # outside Ray Serve (tests of the loop itself)
            tag = "worker"
        return f"{tag}-{uuid.uuid4().hex[:6]}"

    @staticmethod
    def _backend(cfg: SlicefleetConfig) -> str:
        """The engine behind this replica: a continuous batch in the continuous modes (vLLM's or ours)."""
        if cfg.scheduler.mode in CONTINUOUS_MODES:
            return "vllm" if cfg.engine.backend == "vllm" else "continuous"
        return cfg.engine.backend

    def _cpu_bind(self, cfg: SlicefleetConfig) -> str | None:
        """The core a vLLM CPU engine computes on: ``$SLICEFLEET_VLLM_CPU_BIND``, else the next core in turn
        (a counter in Redis), so replicas on one machine do not oversubscribe its cores."""
        if self._backend(cfg) != "vllm" or cfg.engine.device != "cpu":
            return None
        if os.environ.get("SLICEFLEET_VLLM_CPU_BIND"):
            return os.environ["SLICEFLEET_VLLM_CPU_BIND"]
        slot = self.store.take_cpu_slot() % (os.cpu_count() or 1)
        return str(slot)

    @classmethod
    def _build_engine(cls, cfg: SlicefleetConfig, cpu_bind: str | None = None):
        from worker.factory import build_engine

        rows = cfg.scheduler.ils_max_concurrency if cfg.scheduler.mode == "ils" else cfg.scheduler.max_running
        extra = ({"cpu_bind": cpu_bind, "enforce_eager": cfg.engine.vllm_enforce_eager}
                 if cls._backend(cfg) == "vllm" else {})
        return build_engine(
            cls._backend(cfg), cfg.model.path, device=cfg.engine.device, dtype=cfg.model.dtype,
            kv_reuse=cfg.engine.kv_reuse, max_concurrency=rows, **extra,
            kernel_inject=cfg.engine.kernel_inject if cfg.engine.backend == "deepspeed" else None,
        )

    @staticmethod
    def _kv_budget(cfg: SlicefleetConfig) -> float:
        """Measured after the weights are loaded, so free GPU memory is what the KV cache can really use."""
        from predictor.memory import kv_budget_bytes

        return kv_budget_bytes(cfg.engine.device, cfg.engine.kv_budget_bytes, cfg.engine.memory_safety)

    # ---- Serve hooks ---------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Ray Serve restarts the replica when this raises."""
        if self._error is not None:
            raise RuntimeError(f"work loop failed: {self._error!r}")
        if not all(t.is_alive() for t in self._threads):
            raise RuntimeError("a replica thread stopped")

    def info(self) -> dict:
        return {"replica_id": self.replica_id, "pid": os.getpid()}

    def __del__(self):
        self._stop.set()

    # ---- loops ---------------------------------------------------------------------------------------
    def _register(self) -> None:
        self.store.register_replica(self._replica_info, HEARTBEAT_TTL)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY):
            try:
                if not self.store.heartbeat(self.replica_id, HEARTBEAT_TTL, busy_seconds=self.busy_seconds):
                    log.warning("replica %s was presumed dead (no heartbeat reached Redis in time); its work went "
                                "back to the pool; registering again", self.replica_id)
                    self._forgotten.set()
                    self._register()
            except Exception as exc:  # Redis restarting: keep trying, the TTL covers short gaps
                log.warning("heartbeat failed: %s", exc)

    def _guarded(self) -> None:
        while not self._stop.is_set():
            try:
                self._continuous_loop() if self.continuous else self._slice_loop()
            except Exception as exc:
                if isinstance(exc, STORE_UNAVAILABLE):
                    log.warning("Redis unavailable (%s); retrying", exc)
                    time.sleep(0.5)
                    continue
                if stream_gone(exc):
                    # our work stream was deleted (we were presumed dead): register again rather than restart
                    log.warning("work stream gone (%s); registering again", exc)
                    self._forgotten.set()
                    self._register()
                    continue
                log.exception("work loop failed")
                self._error = exc
                return

    def _load(self, request_ids: list[str]):
        """Slice items for the live requests, and the ids of those that are gone (cancelled, expired)."""
        items, gone = [], []
        for rid, (rec, gen) in zip(request_ids, self.store.records(request_ids)):
            if rec is None or rec.status == "done":
                gone.append(rid)
            else:
                items.append(slice_item(rec, gen))
        return items, gone

    def _slice_loop(self) -> None:
        # Whatever was delivered but not acknowledged before this loop (re)started is run first: the result
        # may never have been posted. Running a batch twice is harmless; the dispatcher applies it once.
        pending = True
        while not self._stop.is_set():
            entries = self.store.read_work(self.replica_id, block_ms=500, count=8, pending=pending)
            pending = False
            for entry_id, msg in entries:
                if msg.epoch < self.store.epoch():
                    self.store.ack_work(self.replica_id, entry_id)  # placed by a dispatcher that is gone
                    continue
                if isinstance(msg, Release):  # a kept KV cache whose request finished, was cancelled or moved away
                    self.engine.drop(msg.request_ids)
                    self.store.ack_work(self.replica_id, entry_id)
                    continue
                items, gone = self._load(msg.request_ids)
                closed = SliceReport.closed(msg.batch_id, msg.epoch, self.replica_id, gone)
                if items:
                    stream = SliceStreamer(self.store, msg, self.replica_id, items, self.cfg.engine.stream_every)
                    res = self.engine.run_slice(items, msg.steps, on_step=stream.on_step)
                    self.busy_seconds += res.elapsed
                    longest = max(len(i.token_ids) for i in items)
                    report = slice_report(msg, self.replica_id, res, len(items), longest)
                    stream.trim(report)
                    report.outputs += closed.outputs
                else:
                    report = closed
                self.store.post_result(report)
                self.store.ack_work(self.replica_id, entry_id)

    def _continuous_loop(self) -> None:
        loop = self.leases
        last_epoch_check = 0.0
        while not self._stop.is_set():
            now = time.time()
            if now - last_epoch_check >= EPOCH_CHECK_EVERY:
                loop.on_epoch(self.store.epoch())
                last_epoch_check = now
            if self._forgotten.is_set():
                self._forgotten.clear()
                loop.drop_all()
            # Messages come from the reader thread, so a decode step never waits on Redis; with nothing to
            # decode, wait for the next message instead.
            try:
                first = [self._inbox.get(timeout=0.2)] if not self.engine.has_work() else []
            except queue.Empty:
                first = []
            loop.handle_all(first + self._drain())
            if self.engine.has_work():
                loop.step()
                self.busy_seconds = loop.busy_seconds
            loop.flush()

    def _drain(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self._inbox.get_nowait())
            except queue.Empty:
                return out

    def _read_forever(self) -> None:
        """Continuous modes: read this replica's work stream into ``_inbox`` (acknowledged once queued: the
        rows' state lives in this process, and a replica that dies loses its rows to the pool anyway)."""
        pending = True  # what was delivered before this loop (re)started but never queued
        while not self._stop.is_set():
            try:
                for entry_id, msg in self.store.read_work(self.replica_id, block_ms=200, count=256,
                                                          pending=pending):
                    self._inbox.put(msg)
                    self.store.ack_work(self.replica_id, entry_id)
                pending = False
            except Exception as exc:  # Redis restarting: the work loop reports it too; keep trying
                # A read whose reply the crash swallowed left its entries delivered but never queued: read
                # them again (placing a row twice only restarts it from what Redis holds).
                log.warning("work stream read failed: %s", exc)
                pending = True
                time.sleep(0.5)


class SliceStreamer:
    """Publishes a static slice's tokens while it runs: a row's first token at once, then every ``every`` steps.

    Each report carries the tokens' absolute position, so Redis applies each exactly once; the slice's final
    result then carries only what was not streamed (``trim``), with ``total`` for the scheduler's counts.
    """

    def __init__(self, store, order: BatchOrder, replica_id: str, items, every: int):
        self.store, self.order, self.replica_id, self.every = store, order, replica_id, max(every, 1)
        self.before = {it.request_id: it.generated for it in items}
        self.sent = dict.fromkeys(self.before, 0)
        self.steps = 0

    def on_step(self, tokens: dict[str, list[int]]) -> None:
        self.steps += 1
        due = [(rid, toks) for rid, toks in tokens.items()
               if len(toks) > self.sent[rid] and (self.sent[rid] == 0 or self.steps % self.every == 0)]
        if not due:
            return
        self.store.post_result(Progress(self.replica_id, [
            ProgressRow(rid, self.order.batch_id, self.order.epoch, self.before[rid] + self.sent[rid],
                        list(toks[self.sent[rid]:])) for rid, toks in due]))
        for rid, toks in due:
            self.sent[rid] = len(toks)

    def trim(self, report: SliceReport) -> None:
        for o in report.outputs:
            sent = self.sent.get(o.id, 0)
            o.total, o.at = len(o.tokens), self.before[o.id] + sent
            o.tokens = o.tokens[sent:]
