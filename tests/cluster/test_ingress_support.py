"""Support for the ingress tests (a fake dispatcher, builders, SSE parsing) and unit tests of the Ray-free
pieces: incremental text assembly with stop strings, the ingress store's parity with the admin store, the
dispatcher-snapshot collector.

The fake dispatcher is a stand-in used only by the ingress's own tests: it follows ``{p}:incoming`` and
``{p}:cancel`` (``AdminStore.follow``, outside the dispatcher's consumer group, so their entries stay for the
tests to inspect) and answers through the real ``DispatcherStore.apply_result`` / ``DispatcherStore.finish``.
The real dispatcher is tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.config import SlicefleetConfig
from cluster.ingress import IngressService, model_facts
from cluster.messages import MetricsSnapshot, OutputEvent, ReplicaInfo, ReplicaMetrics, RequestRecord
from cluster.metrics import IngressMetrics
from cluster.output_relay import TextAssembler
from cluster.stores.admin import AdminStore
from cluster.stores.base import STORE_UNAVAILABLE
from cluster.stores.dispatcher import DispatcherStore
from cluster.stores.ingress import IngressStore
from cluster.stores.worker import WorkerStore

ANSWER_TEXT = ("Hello world! Héllo 世界 🙂 The quick brown fox jumps over the lazy dog. "
               "Then it rests under a tree and dreams of 🍕 and 🍣 until the end.")


def ensure_tiny_model(tmp_path_factory) -> Path:
    """The test-sized model, built once per session (shared by the ingress test modules)."""
    from worker.make_model import TEST_SPEC, ensure_model

    return ensure_model(tmp_path_factory.getbasetemp() / "ingress-tiny-llama", TEST_SPEC)


@contextlib.contextmanager
def fake_backend(tmp_path_factory, prefix: str):
    """The tiny model's tokenizer, a real Redis server and a fake dispatcher answering with ANSWER_TEXT."""
    from transformers import AutoTokenizer

    from cluster.redis_server import EmbeddedRedis

    model_dir = ensure_tiny_model(tmp_path_factory)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    server = EmbeddedRedis().start()
    answer = tok(ANSWER_TEXT, add_special_tokens=False)["input_ids"]
    fake = FakeDispatcher(server.url, prefix, answer, tok.eos_token_id)
    fake.start()
    try:
        yield SimpleNamespace(model_dir=model_dir, tok=tok, url=server.url, fake=fake, store=fake.store,
                              answer=answer)
    finally:
        fake.stop()
        server.stop()


def make_config(redis_url: str, model_dir: Path, prefix: str, **api) -> SlicefleetConfig:
    return SlicefleetConfig.model_validate({
        "model": {"path": str(model_dir), "name": "tiny-test"},
        "redis": {"url": redis_url, "key_prefix": prefix},
        "scheduler": {"max_gen_len": 256, "slice_len": 4},
        "replicas": {"num_replicas": 2},
        "api": api,
    })


def make_service(cfg: SlicefleetConfig, tokenizer, model_dir: Path, **kwargs) -> IngressService:
    facts = model_facts(model_dir, tokenizer, cfg.model.max_context)
    store = IngressStore(cfg.redis.url, cfg.redis.key_prefix, cfg.redis.password)
    kwargs.setdefault("snapshot_ttl", 0.0)
    kwargs.setdefault("poll_seconds", 0.5)
    return IngressService(cfg, tokenizer, store, **{**facts, **kwargs})


def parse_sse(raw: str) -> list:
    """The ``data:`` payloads of an SSE body, JSON-decoded (``[DONE]`` kept as the string)."""
    out = []
    for block in raw.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def wait_until(pred, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()


class FakeDispatcher(threading.Thread):
    """Answers each request with ``answer_ids`` (cycled), ``slice_len`` tokens per output event.

    Knobs (reset by :meth:`reset`): ``delay`` seconds between a request's slices; ``hold`` emits nothing;
    ``final_reason`` overrides the finish reason; ``ready`` is what the readiness callable reports.
    A token equal to ``eos_id`` ends the request with ``eos`` (unless the record says ``ignore_eos``); a
    record with ``target_len`` gets exactly that many tokens and ``eos``; otherwise ``max_tokens`` and
    ``length``. Cancels finish the request with ``cancelled`` through ``DispatcherStore.finish``.

    ``store`` inspects what the ingress wrote; ``dispatch`` and ``worker`` act as the dispatcher and a replica
    would (publish a snapshot, register or forget a replica).
    """

    def __init__(self, url: str, prefix: str, answer_ids: list[int], eos_id: int, slice_len: int = 4):
        super().__init__(daemon=True, name="fake-dispatcher")
        self.store = AdminStore(url, prefix)
        self.dispatch = DispatcherStore(url, prefix)
        self.worker = WorkerStore(url, prefix)
        self.default_answer = list(answer_ids)
        self.eos_id = eos_id
        self.default_slice_len = slice_len
        self.cancels: list[str] = []
        self.seen: list[str] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.answer_ids = list(self.default_answer)
            self.slice_len = self.default_slice_len
            self.delay = 0.0
            self.hold = False
            self.final_reason: str | None = None
            self.ready = True

    def publish(self, **figures) -> None:
        """A dispatcher snapshot with ``figures`` (the rest at their defaults: no backlog, nothing running)."""
        self.dispatch.publish_metrics(MetricsSnapshot(time.time(), 1, "scls", **figures))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def run(self) -> None:
        last = {"incoming": "0", "cancel": "0"}
        active: dict[str, dict] = {}
        while not self._halt.is_set():
            try:
                self._step(last, active)
            except STORE_UNAVAILABLE:
                time.sleep(0.05)  # Redis restarting: the streams come back from its AOF

    def _step(self, last: dict, active: dict) -> None:
        if active and not self.hold:
            # Work to do: poll without blocking (a short BLOCK only ends at the server's next cron
            # tick, ~100 ms) and pace ourselves.
            entries = self.store.follow(last, block_ms=None)
            time.sleep(0.001)
        else:
            entries = self.store.follow(last, block_ms=50)
        for name, rid in entries:
            if name == "incoming":
                self.seen.append(rid)
                active[rid] = {"rec": self.store.record(rid), "pos": 0, "next": 0.0}
            else:
                self.cancels.append(rid)
                if active.pop(rid, None) is not None:
                    self.dispatch.finish(rid, "cancelled")
        now = time.monotonic()
        with self._lock:
            for rid, st in list(active.items()):
                if self.hold or st["next"] > now:
                    continue
                rec: RequestRecord = st["rec"]
                total = min(rec.max_tokens, rec.target_len) if rec.target_len else rec.max_tokens
                tokens, reason = [], ""
                while len(tokens) < self.slice_len and st["pos"] < total:
                    tok = self.answer_ids[st["pos"] % len(self.answer_ids)]
                    tokens.append(tok)
                    st["pos"] += 1
                    if tok == self.eos_id and not rec.ignore_eos and not rec.target_len:
                        reason = "eos"
                        break
                if not reason and st["pos"] >= total:
                    reason = "eos" if rec.target_len and rec.target_len <= rec.max_tokens else "length"
                if reason and self.final_reason:
                    reason = self.final_reason
                self.dispatch.apply_result(uuid.uuid4().hex, "fake-0", [(rid, tokens, reason)])
                st["next"] = now + self.delay
                if reason:
                    del active[rid]


# ---- unit tests of the Ray-free pieces -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ensure_tiny_model(tmp_path_factory)))


def _decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def test_text_assembler_one_token_at_a_time_never_emits_broken_utf8(tokenizer):
    ids = tokenizer(ANSWER_TEXT, add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    asm = TextAssembler(_decode(tokenizer))
    deltas = [asm.feed([t]) for t in ids] + [asm.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == full == asm.sent_text
    # The emoji take several byte-level tokens: some feeds must have held text back.
    assert deltas.count("") > 0
    assert asm.completion_tokens == len(ids)


def test_text_assembler_stop_string_across_feeds(tokenizer):
    ids = tokenizer(ANSWER_TEXT, add_special_tokens=False)["input_ids"]
    asm = TextAssembler(_decode(tokenizer), ["fox jumps", "never"])
    sent = ""
    for t in ids:
        sent += asm.feed([t])
        # Nothing that could still turn into a stop string is ever sent.
        assert "fox" not in sent
        if asm.stopped:
            break
    assert asm.stopped
    assert sent == asm.sent_text == ANSWER_TEXT[: ANSWER_TEXT.index("fox jumps")]
    assert asm.flush() == ""
    # The count covers exactly the tokens up to the one completing the stop string.
    k = asm.completion_tokens
    assert "fox jumps" in tokenizer.decode(ids[:k]) and "fox jumps" not in tokenizer.decode(ids[: k - 1])


def test_text_assembler_partial_stop_prefix_is_released_at_the_end(tokenizer):
    asm = TextAssembler(lambda ids: "".join(chr(i) for i in ids), ["xyz"])
    assert asm.feed([ord("a"), ord("x"), ord("y")]) == "a"  # "xy" might start "xyz"
    assert asm.feed([ord("q")]) == "xyq"
    assert asm.feed([ord("x")]) == ""
    assert asm.flush() == "x"
    assert asm.sent_text == "axyqx" and not asm.stopped


def test_text_assembler_min_tokens_defers_stop_strings_as_vllm():
    """vLLM checks stop strings only for tokens after the first min_tokens; a match must end in them."""
    def chars(text):
        return [ord(c) for c in text]

    asm = TextAssembler(lambda ids: "".join(chr(i) for i in ids), ["ab"], min_tokens=3)
    assert asm.feed(chars("xab")) == "xab"  # within the first 3 tokens: not a stop
    assert asm.feed(chars("cab")) == "c"  # "ab" again, ending in token 6: a stop
    assert asm.stopped and asm.sent_text == "xabc" and asm.completion_tokens == 6
    asm = TextAssembler(lambda ids: "".join(chr(i) for i in ids), ["ab"], min_tokens=2)
    asm.feed(chars("a"))
    asm.feed(chars("bq"))  # "ab" ends in token 2, not after it
    asm.flush()
    assert not asm.stopped and asm.sent_text == "abq"


def test_text_assembler_a_final_stop_token_counts_but_adds_no_text():
    asm = TextAssembler(lambda ids: "".join(chr(i) for i in ids))
    assert asm.feed([ord("a"), ord("b")]) == "ab"
    assert asm.feed([ord("c"), ord("!")], stop_token_last=True) == "c"
    assert asm.flush() == "" and asm.sent_text == "abc" and asm.completion_tokens == 4


def test_text_assembler_drops_a_character_cut_in_half_at_the_end():
    # token 0 stands for the first byte of a two-byte character: decoding stops at U+FFFD
    asm = TextAssembler(lambda got: "abc" + ("\ufffd" if got[-1] == 0 else ""))
    assert asm.feed([5, 6, 0]) == "abc"  # the U+FFFD is held back: the next token may complete it
    assert asm.flush() == "" and asm.sent_text == "abc" and asm.completion_tokens == 3


def test_the_ingress_store_writes_what_the_admin_store_writes_and_reads_what_the_others_write(tmp_path):
    from cluster.redis_server import EmbeddedRedis

    with EmbeddedRedis() as server:
        admin, dispatch = AdminStore(server.url, "parity"), DispatcherStore(server.url, "parity")
        store = IngressStore(server.url, "parity")
        rec = RequestRecord(id="r1", prompt_ids=[0, 5, 6], max_tokens=9, arrival=123.5, model="m", kind="chat",
                            temperature=0.7, top_p=0.9, seed=3, stop=["x"], target_len=4, predicted_len=12.5,
                            priority=2)
        snapshot = MetricsSnapshot(1.0, 2, "scls", pool_depth=4, replicas={"a": ReplicaMetrics(kv_usage=0.5)})

        async def go():
            await store.submit(rec)
            await store.request_cancel("r1")
            dispatch.apply_result("b1", "rep", [("r1", [7, 8], "")])
            dispatch.apply_result("b2", "rep", [("r1", [9], "length")])
            events = await store.read_output("r1", "0", block_ms=10)
            WorkerStore(server.url, "parity").register_replica(ReplicaInfo("a", 1, "hf"), 30)
            alive = await store.replicas_alive()
            dispatch.publish_metrics(snapshot)
            snap = await store.metrics_snapshot()
            await store.close()
            return events, alive, snap

        events, alive, snap = asyncio.run(go())
        admin.submit(RequestRecord("r2", [1], 2, 1.0))
        assert admin.record("r2") == RequestRecord("r2", [1], 2, 1.0)
        got = admin.record("r1")
        assert got.prompt_ids == [0, 5, 6] and got.kind == "chat" and got.target_len == 4 and got.predicted_len == 12.5 and got.priority == 2
        assert got.stop == ["x"] and got.done and got.finish_reason == "length" and got.replicas == ["rep", "rep"]
        assert admin.live_ids() == ["r2"]  # the "length" event closed r1
        assert admin.request_ids("incoming") == ["r1", "r2"] and admin.request_ids("cancel") == ["r1"]
        assert [e for _, e in events] == [OutputEvent([7, 8], "rep"), OutputEvent([9], "rep", "length")]
        assert [e for _, e in admin.read_output("r1", block_ms=None)] == [e for _, e in events]
        assert alive == (["a"], [])
        assert snap == snapshot


def test_the_snapshot_collector_exports_the_declared_figures_and_only_presence_without_a_snapshot():
    snap = MetricsSnapshot(1.0, 1, "scls", pool_depth=2, replicas={"r1": ReplicaMetrics(busy_seconds=3.5)})
    text = IngressMetrics().render(snap).decode()
    assert "slicefleet_pool_depth 2.0" in text
    assert 'slicefleet_replica_busy_seconds_total{replica="r1"} 3.5' in text
    assert "slicefleet:request_queue_time_seconds" not in text  # no histogram in this snapshot
    empty = IngressMetrics().render(None).decode()
    assert "slicefleet_dispatcher_snapshot_present 0.0" in empty and "slicefleet_pool_depth" not in empty


def test_read_output_honours_a_cancellation_the_redis_client_swallowed():
    """redis-py can catch a cancellation that lands inside a blocking XREAD and return normally; the store
    re-raises it, or a request whose client left would keep polling until its deadline."""
    entered: asyncio.Event | None = None

    async def swallowing_xread(streams, block):
        entered.set()
        try:
            await asyncio.sleep(block / 1000)
        except asyncio.CancelledError:
            return []  # what the client library does in the bad case
        return []

    async def go():
        nonlocal entered
        entered = asyncio.Event()
        store = IngressStore("redis://127.0.0.1:1", "swallow")  # never connects: xread is replaced
        store._r.xread = swallowing_xread
        task = asyncio.ensure_future(store.read_output("r1", "0", block_ms=5_000))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(go(), 2))
