"""A worker replica: one engine, pulling batches from its own Redis stream.

Ray Serve owns the replica's life (resources, health checks, restarts); the dispatcher decides what it runs.
The replica registers itself with a heartbeat; a replica that stops beating is presumed dead and its batches
are placed elsewhere. It never writes request state: it posts results, and the dispatcher applies them once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from cluster.config import SlicefleetConfig
from cluster.state import RequestRecord, ReplicaInfo, StateStore

log = logging.getLogger("slicefleet.worker")

HEARTBEAT_TTL = 4.0
HEARTBEAT_EVERY = 1.0


def slice_item(rec: RequestRecord, generated: list[int]):
    """The engine's view of a stored request: its whole history, the budget left, its stop rules."""
    from worker.protocol import SamplingParams, SliceItem

    return SliceItem(
        request_id=rec.id,
        token_ids=list(rec.prompt_ids) + list(generated),
        prompt_len=rec.prompt_len,
        max_new_tokens=rec.max_tokens - len(generated),
        eos_token_ids=() if rec.ignore_eos or rec.target_len is not None else None,
        stop_token_ids=tuple(rec.stop_token_ids),
        sampling=SamplingParams(temperature=rec.temperature, top_p=rec.top_p, seed=rec.seed),
        target_len=None if rec.target_len is None else rec.target_len - len(generated),
    )


def result_message(batch_id: str, epoch: int, replica_id: str, res, n: int, max_input_len: int) -> dict:
    return {
        "batch_id": batch_id,
        "epoch": epoch,
        "replica_id": replica_id,
        "outputs": [{"id": o.request_id, "tokens": list(o.new_token_ids), "finish": o.finish_reason.value}
                    for o in res.outputs],
        "elapsed": res.elapsed,
        "prefill_time": res.prefill_time,
        "decode_step_times": list(res.decode_step_times),
        "pad_tokens": res.pad_tokens,
        "invalid_tokens": res.invalid_tokens,
        "reprefill_tokens": res.reprefill_tokens,
        "kv_reused": res.kv_reused,
        "resumed_rows": sum(o.kv_reused for o in res.outputs),
        "n": n,
        "max_input_len": max_input_len,
    }


def gone_message(batch: dict, replica_id: str, gone: list[str]) -> dict:
    """A result closing the requests of ``batch`` that were gone from Redis (cancelled, expired) when it came
    up: nothing ran for them, and the dispatcher only needs to drop them from its bookkeeping."""
    return {"batch_id": batch["batch_id"], "epoch": batch["epoch"], "replica_id": replica_id, "elapsed": 0.0,
            "outputs": [{"id": rid, "tokens": [], "finish": "aborted"} for rid in gone]}


class SliceWorker:
    """The Ray Serve deployment class (wrapped with ``serve.deployment`` in ``cluster.app``)."""

    def __init__(self, config: dict, replica_id: str | None = None):
        """``replica_id``: resume as this replica (its stream and unacknowledged batches); default a new id."""
        cfg = SlicefleetConfig.model_validate(config)
        self.cfg = cfg
        self.store = StateStore(cfg.redis.url, cfg.redis.key_prefix, cfg.redis.password)
        self.replica_id = replica_id or self._make_id()
        self.continuous = cfg.scheduler.mode == "ils"
        self.engine = self._build_engine(cfg)
        batch_budget, keep_budget = cfg.engine.split_kv_budget(self._kv_budget(cfg))
        if hasattr(self.engine, "set_kv_keep_budget"):
            self.engine.set_kv_keep_budget(keep_budget)
        self._ils_pending: dict[str, tuple[str, int, str, int]] = {}
        self._ils_pad_reported = 0
        self._ils_sent: dict[str, int] = {}  # request id -> tokens already published as progress
        self._ils_steps = 0
        self.busy_seconds = 0.0
        """Seconds spent computing (load-imbalance figures); published with each heartbeat."""
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.store.register_replica(
            ReplicaInfo(self.replica_id, os.getpid(), "continuous" if self.continuous else cfg.engine.backend,
                        socket.gethostname(), time.time(), batch_budget),
            HEARTBEAT_TTL,
        )
        self.store.ensure_group(self.store.k.work(self.replica_id), "worker")
        self._threads = [threading.Thread(target=self._beat, name="heartbeat", daemon=True),
                         threading.Thread(target=self._guarded, name="work", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("replica %s ready (pid %d, %s)", self.replica_id, os.getpid(),
                 "continuous batching" if self.continuous else f"slice engine {cfg.engine.backend}")

    @staticmethod
    def _make_id() -> str:
        try:
            from ray import serve

            tag = serve.get_replica_context().replica_tag
        except Exception:  # outside Ray Serve (tests of the loop itself)
            tag = "worker"
        return f"{tag}-{uuid.uuid4().hex[:6]}"

    @staticmethod
    def _build_engine(cfg: SlicefleetConfig):
        from worker.factory import build_engine

        backend = "continuous" if cfg.scheduler.mode == "ils" else cfg.engine.backend
        return build_engine(
            backend, cfg.model.path, device=cfg.engine.device, dtype=cfg.model.dtype, kv_reuse=cfg.engine.kv_reuse,
            max_concurrency=cfg.scheduler.ils_max_concurrency,
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
    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY):
            try:
                self.store.heartbeat(self.replica_id, HEARTBEAT_TTL, busy_seconds=self.busy_seconds)
            except Exception as exc:  # Redis restarting: keep trying, the TTL covers short gaps
                log.warning("heartbeat failed: %s", exc)

    def _guarded(self) -> None:
        while not self._stop.is_set():
            try:
                self._continuous_loop() if self.continuous else self._slice_loop()
            except Exception as exc:
                import redis

                if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
                    log.warning("Redis unavailable (%s); retrying", exc)
                    time.sleep(0.5)
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
            entries = self.store.read_work(self.replica_id, self.replica_id, block_ms=500, count=8, pending=pending)
            pending = False
            for entry_id, msg in entries:
                if msg["epoch"] < self.store.epoch():
                    self.store.ack_work(self.replica_id, entry_id)  # placed by a dispatcher that is gone
                    continue
                items, gone = self._load(msg["request_ids"])
                if items:
                    res = self.engine.run_slice(items, msg["steps"])
                    self.busy_seconds += res.elapsed
                    longest = max(len(i.token_ids) for i in items)
                    message = result_message(msg["batch_id"], msg["epoch"], self.replica_id, res, len(items),
                                             longest)
                    message["outputs"] += gone_message(msg, self.replica_id, gone)["outputs"]
                else:
                    message = gone_message(msg, self.replica_id, gone)
                self.store.post_result(message)
                self.store.ack_work(self.replica_id, entry_id)

    def _continuous_loop(self) -> None:
        from worker.protocol import EngineSliceResult

        # request id -> (batch id, epoch, entry id, input len, tokens it had before this run); kept on self
        # because the engine's requests outlive a restart of this loop.
        pending = self._ils_pending
        every = max(self.cfg.scheduler.slice_len, 1)
        unacked = True  # as in the slice loop: first re-admit what was delivered but never answered
        while not self._stop.is_set():
            # Never wait for new work while requests are decoding: they join at the next step.
            block = None if self.engine.has_work() else 500
            entries = self.store.read_work(self.replica_id, self.replica_id, block_ms=block, count=64,
                                           pending=unacked)
            unacked = False
            entries = [(e, m) for e, m in entries if all(r not in pending for r in m["request_ids"])]
            for entry_id, msg in entries:
                items, gone = self._load(msg["request_ids"])
                for item in items:
                    pending[item.request_id] = (msg["batch_id"], msg["epoch"], entry_id, len(item.token_ids),
                                                item.generated)
                    self.engine.add(item)
                if gone:  # ILS batches hold one request each
                    self.store.post_result(gone_message(msg, self.replica_id, gone))
                if not items:
                    self.store.ack_work(self.replica_id, entry_id)
            if not self.engine.has_work():
                continue
            started = time.perf_counter()
            finished = self.engine.step()
            elapsed = time.perf_counter() - started
            self.busy_seconds += elapsed
            self._ils_steps += 1
            if self._ils_steps % every == 0:
                self._post_progress(pending)
            for out in finished:
                batch_id, epoch, entry_id, input_len, _ = pending.pop(out.request_id)
                sent = self._ils_sent.pop(out.request_id, 0)
                # Padding the engine computed since the last result, so the cluster's token accounting
                # (valid-token ratio) sees the continuous batch's waste too.
                pad = self.engine.stats.pad_tokens - self._ils_pad_reported
                self._ils_pad_reported = self.engine.stats.pad_tokens
                res = EngineSliceResult([out], elapsed=elapsed, pad_tokens=pad)
                message = result_message(batch_id, epoch, self.replica_id, res, 1, input_len)
                row = message["outputs"][0]
                row["total"], row["tokens"] = len(row["tokens"]), row["tokens"][sent:]  # the rest was streamed
                self.store.post_result(message)
                self.store.ack_work(self.replica_id, entry_id)

    def _post_progress(self, pending: dict) -> None:
        """Publish the tokens each running request produced since the last report, so ILS streams too.

        ``progress_at`` is the absolute position of the first token, which makes the dispatcher's apply
        idempotent even if this batch is run again from the stored history after a failure.
        """
        for row in self.engine.running:
            rid = row.item.request_id
            sent = self._ils_sent.get(rid, 0)
            if row.done or rid not in pending or len(row.new) <= sent:
                continue
            batch_id, epoch, _, _, before = pending[rid]
            self.store.post_result({"batch_id": batch_id, "epoch": epoch, "replica_id": self.replica_id,
                                    "progress_at": before + sent, "elapsed": 0.0,
                                    "outputs": [{"id": rid, "tokens": list(row.new[sent:]), "finish": "slice_end"}]})
            self._ils_sent[rid] = len(row.new)
