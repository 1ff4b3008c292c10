"""The ingress service and its Ray Serve deployment: admission, the durable submit, then the output relay.

The ingress in parts (only this module imports Ray, at its top, for the deployment):

- :mod:`cluster.openai_validation`: request validation and normalisation (OpenAI and vLLM conventions).
- :mod:`cluster.output_relay`: the store's output stream as text deltas, stop strings and finish reasons.
- :mod:`cluster.http_app`: :func:`~cluster.http_app.build_api`, the FastAPI app around a service.
- :class:`IngressService` (here) holds the config, the tokenizer, an
  :class:`~cluster.stores.ingress.IngressStore`, an optional length predictor and a readiness callable, and
  implements every endpoint.
- :class:`Ingress` (here) is the Ray Serve deployment: ``Ingress(config: dict, dispatcher=None,
  workers=None)``; it builds the service and hands Serve the app through ``@serve.ingress()``'s late-bound
  ``__serve_build_asgi_app__`` hook (Ray 2.60).

Request flow: validate -> tokenize (chat: the tokenizer's chat template, else the fallback in
:mod:`cluster.openai_validation`) -> admission control (dispatcher's ``backlog_seconds``) -> predicted output
length (optional) -> ``submit`` the :class:`~cluster.messages.RequestRecord` (record, live set and ``incoming``
announcement in one transaction; no response byte is sent before it lands) -> read ``{p}:out:{id}`` with
``XREAD BLOCK`` until an event carries ``finish_reason``. Stop strings are matched on the decoded text: the
text is cut before the first stop string, the request is cancelled (``{p}:cancel``) and the finish reason is
``stop``. A client that goes away (stream or not), a Serve-side cancellation and a timeout (504) all cancel the
request. Error codes: see :mod:`cluster.openai_schema`.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from cluster.config import SlicefleetConfig
from cluster.http_app import (
    ClientGone,
    SSEResponse,
    build_api,
    until_done_or_disconnect,
)
from cluster.messages import MetricsSnapshot, RequestRecord
from cluster.metrics import IngressMetrics
from cluster.openai_schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    model_card,
    models_response,
    parse_request,
    usage,
    usage_chunk,
)
from cluster.openai_validation import (
    ModelLimits,
    chat_messages,
    check_common,
    check_completion_options,
    check_extensions,
    completion_prompt,
    read_json,
    render_chat,
    token_budget,
)
from cluster.output_relay import (
    FINISH_REASONS,
    RelayTimeout,
    TextAssembler,
    collect,
    detokenizer,
    read_events,
    relay,
    sse,
)
from cluster.ray_session import current_ray_session
from cluster.stores.ingress import IngressStore

log = logging.getLogger(__name__)

SUBMIT_RETRY_SECONDS = 5.0
"""How long a submit keeps retrying while the state store is unreachable (e.g. restarting)."""
READY_TIMEOUT_S = 5.0
"""How long /health waits for the readiness callable (the dispatcher's ``ready``)."""


# ---- model-side helpers ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_facts(model_dir: str | Path, tokenizer, max_context: int | None = None) -> dict:
    """Context length, vocabulary size and default temperature from a model directory."""
    cfg = _read_json(Path(model_dir) / "config.json")
    gen = _read_json(Path(model_dir) / "generation_config.json")
    context = max_context or cfg.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", None)
    if not isinstance(context, int) or context <= 0 or context > 10**8:
        context = 2048
    vocab = cfg.get("vocab_size") or len(tokenizer)
    if gen.get("do_sample") is False:
        temperature = 0.0  # the model asks for greedy decoding
    else:
        temperature = float(gen.get("temperature", 1.0))  # OpenAI's default without a model preference
    return {"context_len": int(context), "vocab_size": int(vocab), "default_temperature": temperature}


class LengthModel(Protocol):
    """What the ingress asks of a length predictor (every ``predictor.length`` predictor offers it)."""

    def predict(self, prompts: Sequence[str], prompt_lens: Sequence[int]) -> Sequence[float]: ...


def load_length_predictor(config: SlicefleetConfig) -> Callable[[str, list[int]], float | None] | None:
    """The optional output-length predictor as ``f(prompt_text, prompt_ids) -> float | None``: the
    :class:`LengthModel` that ``predictor.length.load_length_predictor`` loads from
    ``predictor.length_model``. Anything missing or failing: None (the dispatcher falls back)."""
    try:
        from predictor.length import load_length_predictor as _load  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - optional component
        log.info("no length predictor (%s); predicted_len stays unset", exc)
        return None
    try:
        model: LengthModel | None = _load(config.predictor.length_model)
    except FileNotFoundError as exc:
        log.info("no length-predictor artefact (%s); predicted_len stays unset", exc)
        return None
    except Exception as exc:  # noqa: BLE001
        log.warning("length predictor failed to load (%s); predicted_len stays unset", exc)
        return None
    if model is None:
        return None

    def predict(text: str, ids: list[int]) -> float | None:
        return float(model.predict([text], [len(ids)])[0])

    return predict


# ---- the service -----------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A validated request, ready to be stored."""

    record: RequestRecord
    kind: str  # "completion" | "chat"
    response_id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    prompt_text: str
    continuous_usage: bool = False
    """vLLM's ``stream_options.continuous_usage_stats`` (with ``include_usage``): usage in every chunk."""
    t0: float = field(default_factory=time.monotonic)
    done: bool = False
    """The response has been fully produced (a stream that closes before this cancels the request)."""

    @property
    def endpoint(self) -> str:
        return "chat_completions" if self.kind == "chat" else "completions"


class IngressService:
    """Every endpoint of the ingress; it uses no Ray itself (:class:`Ingress` wraps it for Serve).

    ``ready``: an async (or plain) callable returning True when the dispatcher is ready; None means "ready
    when the dispatcher's metrics snapshot is present in Redis" (it republishes it every second, TTL 60 s).
    ``length_predictor``: ``f(prompt_text, prompt_ids) -> float | None`` or None.
    ``snapshot_ttl``: seconds the dispatcher snapshot is cached for admission control.
    ``ray_session``: the Ray session this ingress runs in; /health counts only the worker replicas registered
    from the same one ("": every replica beating in Redis).
    """

    def __init__(self, config: SlicefleetConfig, tokenizer, store: IngressStore, *,
                 ready: Callable[[], Awaitable[bool] | bool] | None = None,
                 length_predictor: Callable[[str, list[int]], float | None] | None = None,
                 context_len: int = 2048, vocab_size: int | None = None, default_temperature: float = 0.0,
                 snapshot_ttl: float = 0.5, poll_seconds: float = 5.0, ray_session: str = ""):
        self.config = config
        self.tokenizer = tokenizer
        self.store = store
        self.ready = ready
        self.length_predictor = length_predictor
        self.context_len = int(context_len)
        self.vocab_size = int(vocab_size or len(tokenizer))
        self.default_temperature = float(default_temperature)
        self.snapshot_ttl = snapshot_ttl
        self.poll_seconds = poll_seconds
        self.ray_session = ray_session
        self.metrics = IngressMetrics(config.model.name, self.context_len)
        self.model_name = config.model.name
        self.limits = ModelLimits(self.model_name, self.context_len, self.vocab_size,
                                  config.scheduler.max_gen_len, self.default_temperature)
        self.created = int(time.time())
        self._api_keys = [k.encode() for k in config.api.api_keys]
        self._admin_keys = [k.encode() for k in config.api.admin_keys]
        self._metrics_keys = [k.encode() for k in config.api.metrics_keys]
        self._inflight = 0
        self._snapshot: tuple[float, MetricsSnapshot | None] = (-math.inf, None)
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingress-tokenizer")
        self._background: set[asyncio.Task] = set()
        self._predictor_failed = False

    @classmethod
    def from_config(cls, config: SlicefleetConfig | dict, *, ready=None, **kwargs) -> IngressService:
        """Build from config: the model's tokenizer, the Redis store and the optional length predictor."""
        from transformers import AutoTokenizer

        cfg = config if isinstance(config, SlicefleetConfig) else SlicefleetConfig.model_validate(config)
        if not cfg.redis.url:
            raise ValueError("redis.url is not set: the ingress needs the cluster's Redis (slicefleet serve "
                             "starts the embedded one and fills it in)")
        if cfg.model.path:
            model_dir = Path(cfg.model.path).expanduser()
        else:
            from worker.make_model import ensure_default_model

            model_dir = ensure_default_model()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        facts = model_facts(model_dir, tokenizer, cfg.model.max_context)
        store = IngressStore.connect(cfg.redis, max_connections=cfg.inflight_limit + 64)
        kwargs.setdefault("length_predictor", load_length_predictor(cfg))
        return cls(cfg, tokenizer, store, ready=ready, **{**facts, **kwargs})

    # ---- small helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _bearer(request: Request) -> bytes | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return key.strip().encode() if scheme.lower() == "bearer" else None

    @staticmethod
    def _matches(given: bytes | None, keys: list[bytes]) -> bool:
        # every key is compared (no early exit), so timing does not tell which key came close
        return given is not None and bool(sum(hmac.compare_digest(given, k) for k in keys))

    def authorize(self, request: Request, extra_keys: list[bytes] | None = None) -> None:
        """Every route but /health: one of the API or admin keys, when any key is configured."""
        keys = self._api_keys + self._admin_keys + (extra_keys or [])
        if not keys or self._matches(self._bearer(request), keys):
            return
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       "invalid_request_error", None, "invalid_api_key")

    def authorize_metrics(self, request: Request) -> None:
        if not self.config.api.metrics_public:
            self.authorize(request, self._metrics_keys)

    def is_admin(self, request: Request) -> bool:
        return self._matches(self._bearer(request), self._admin_keys)

    def _spawn(self, coro) -> None:
        """Run ``coro`` in the background, keeping a reference (used where the caller is being cancelled)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, rid: str) -> None:
        try:
            await self.store.request_cancel(rid)
        except Exception as exc:  # noqa: BLE001 - best effort; the request still times out in the pool
            log.warning("could not post cancel for %s: %s", rid, exc)

    async def snapshot(self) -> MetricsSnapshot | None:
        at, snap = self._snapshot
        if time.monotonic() - at <= self.snapshot_ttl:
            return snap
        snap = await self.store.metrics_snapshot()
        self._snapshot = (time.monotonic(), snap)
        return snap

    async def _is_ready(self) -> tuple[bool, str | None]:
        try:
            if self.ready is None:
                snap = await self.store.metrics_snapshot()
                return (snap is not None, None if snap else "no dispatcher metrics snapshot in Redis")
            value = self.ready()
            if inspect.isawaitable(value):
                value = await asyncio.wait_for(value, READY_TIMEOUT_S)
            return (bool(value), None if value else "dispatcher not ready")
        except Exception as exc:  # noqa: BLE001
            return False, f"dispatcher readiness check failed: {type(exc).__name__}: {exc}"

    # ---- simple endpoints ------------------------------------------------------------------------------
    async def health(self) -> tuple[int, dict]:
        expected = self.config.replicas.num_replicas
        body: dict[str, Any] = {"status": "unavailable", "redis": False, "dispatcher_ready": False,
                                "replicas_alive": 0, "replicas_expected": expected}
        try:
            await asyncio.wait_for(self.store.ping(), 2.0)
            body["redis"] = True
        except Exception as exc:  # noqa: BLE001
            body["reason"] = f"redis not answering: {type(exc).__name__}: {exc}"
            return 503, body
        ready, why = await self._is_ready()
        body["dispatcher_ready"] = ready
        try:
            alive = await self.store.alive_replicas()
        except Exception as exc:  # noqa: BLE001
            body["reason"] = f"redis failed while reading replicas: {type(exc).__name__}: {exc}"
            return 503, body
        # Another Ray cluster's replicas beat in the same Redis during a NewCluster upgrade, and the dispatcher
        # uses them, but they leave with their cluster: this one is ready once its own replicas beat.
        own = sum(not self.ray_session or r.ray_session == self.ray_session for r in alive)
        others = len(alive) - own
        body["replicas_alive"] = own
        body["replicas_alive_other_clusters"] = others
        reasons = [] if ready else [why or "dispatcher not ready"]
        if own < expected:
            elsewhere = f" ({others} more of another Ray cluster on this Redis)" if others else ""
            reasons.append(f"{own} of {expected} worker replicas alive{elsewhere}")
        if reasons:
            body["reason"] = "; ".join(reasons)
            return 503, body
        body["status"] = "ok"
        return 200, body

    def models(self) -> dict:
        return models_response(self.model_name, self.created, self.context_len)

    def model(self, model_id: str) -> dict:
        if model_id != self.model_name:
            raise ApiError(404, f"The model `{model_id}` does not exist (this server serves `{self.model_name}`)",
                           "invalid_request_error", "model", "model_not_found")
        return model_card(self.model_name, self.created, self.context_len)

    async def metrics_text(self) -> bytes:
        try:
            snap = await self.store.metrics_snapshot()
        except Exception as exc:  # noqa: BLE001 - still expose our own metrics
            log.warning("metrics snapshot unavailable: %s", exc)
            snap = None
        return self.metrics.render(snap)

    # ---- validation, admission, submit ----------------------------------------------------------------
    async def prepare(self, data: Any, kind: str, extensions: bool = True) -> Prepared:
        """Validate and tokenize a request body (a parsed JSON value). Raises :class:`ApiError`.

        ``extensions``: the client may use the scheduling extensions (an admin key, or
        ``api.scheduling_extensions``)."""
        req = parse_request(ChatRequest if kind == "chat" else CompletionRequest, data)
        check_extensions(req, extensions)
        c = check_common(req, kind, self.limits)
        loop = asyncio.get_running_loop()
        if kind == "chat":
            messages = chat_messages(req, self.context_len)
            ids = await loop.run_in_executor(self._tok_pool, render_chat, self.tokenizer, messages)
            text = "\n".join(m["content"] for m in messages)
        else:
            check_completion_options(req)
            ids, text = completion_prompt(req.prompt, self.limits)
            if ids is None:
                ids = await loop.run_in_executor(
                    self._tok_pool, lambda: list(self.tokenizer(text, add_special_tokens=True)["input_ids"]))
            else:
                text = await loop.run_in_executor(self._tok_pool, self.tokenizer.decode, ids)
        max_tokens = token_budget(c, len(ids), kind, self.limits)
        rid = uuid.uuid4().hex
        record = RequestRecord(
            id=rid, prompt_ids=ids, max_tokens=int(max_tokens), arrival=time.time(), model=self.model_name,
            kind=kind, temperature=c["temperature"], top_p=c["top_p"], seed=req.seed,
            stop_token_ids=c["stop_ids"], stop=c["stops"], ignore_eos=bool(req.ignore_eos),
            target_len=c["target"], priority=int(req.priority), **c["sampling"])
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and req.stream_options.continuous_usage_stats
        return Prepared(record=record, kind=kind, response_id=prefix + rid, created=int(time.time()),
                        model=self.model_name, stream=req.stream, include_usage=include_usage, prompt_text=text,
                        continuous_usage=continuous)

    async def admit(self) -> None:
        """Admission control: 429 when the dispatcher's predicted backlog exceeds the bound."""
        bound = self.config.api.max_backlog_seconds
        try:
            snap = await self.snapshot()
        except Exception:  # noqa: BLE001 - the submit below reports a Redis outage properly
            return
        if snap is None:  # no dispatcher yet (readiness says so): nothing to compare with
            return
        backlog = snap.backlog_seconds
        if not math.isfinite(backlog):
            # no live replica: a matter of seconds (a restart), not of load
            raise ApiError(503, "no worker replica is serving right now; retry after 5 s", "server_error", None,
                           "no_replicas", headers={"Retry-After": "5"})
        if backlog > bound:
            over = backlog - bound  # seconds of work above the bound, at one second of work per second
            retry = max(1, min(math.ceil(over), 3600))
            self.metrics.rejected.inc()
            raise ApiError(429, f"the server is overloaded: predicted backlog {backlog:.0f} s exceeds "
                           f"{bound:.0f} s; retry after {retry} s", "rate_limit_error", None, "backlog_exceeded",
                           headers={"Retry-After": str(retry)})

    async def _predict(self, prep: Prepared) -> float | None:
        if self.length_predictor is None or self._predictor_failed:
            return None
        try:
            value = await asyncio.to_thread(self.length_predictor, prep.prompt_text, prep.record.prompt_ids)
        except Exception as exc:  # noqa: BLE001
            log.warning("length predictor failed (%s); predicted_len stays unset from now on", exc)
            self._predictor_failed = True
            return None
        if value is None or not math.isfinite(value) or value < 0:
            return None
        return float(value)

    async def accept(self, prep: Prepared) -> None:
        """Admission, prediction, then the durable write. After this returns the request is the cluster's."""
        await self.admit()
        prep.record.predicted_len = await self._predict(prep)
        # A Redis restart takes well under a second: ride it out before refusing the request.
        deadline = time.monotonic() + SUBMIT_RETRY_SECONDS
        while True:
            try:
                await self.store.submit(prep.record)
                break
            except Exception as exc:  # noqa: BLE001
                if time.monotonic() >= deadline:
                    log.error("submit failed for %s: %s", prep.record.id, exc)
                    raise ApiError(503, "the state store is unavailable; the request was not accepted",
                                   "server_error", None, "store_unavailable") from None
                log.warning("submit of %s failed (%s); retrying", prep.record.id, exc)
                await asyncio.sleep(0.2)
        self.metrics.accepted(prep.record.id, prep.record.prompt_len, prep.record.max_tokens, prep.t0,
                              prep.record.predicted_len)

    # ---- output --------------------------------------------------------------------------------------------
    def _relay(self, prep: Prepared, asm: TextAssembler) -> AsyncIterator[tuple[str, str | None]]:
        rid = prep.record.id
        events = read_events(self.store, rid, prep.t0 + self.config.api.request_timeout, self.poll_seconds)
        return relay(events, asm, prep.record.stop_token_ids, cancel=partial(self._cancel, rid),
                     count=partial(self.metrics.output, rid))

    def _assembler(self, prep: Prepared) -> TextAssembler:
        return TextAssembler(detokenizer(self.tokenizer), prep.record.stop, prep.record.min_tokens)

    def _finished(self, prep: Prepared, outcome: str, completion_tokens: int | None) -> None:
        self.metrics.finished.labels(prep.endpoint, outcome).inc()
        self.metrics.ended(prep.record.id, outcome, completion_tokens)

    async def complete(self, prep: Prepared, request: Request | None) -> JSONResponse:
        """Non-streaming: wait for the finish (watching for a client disconnect), then answer."""
        asm = self._assembler(prep)
        rid = prep.record.id
        try:
            text, reason = await until_done_or_disconnect(collect(self._relay(prep, asm)), request)
        except RelayTimeout:
            await self._cancel(rid)
            self._finished(prep, "timeout", None)
            raise ApiError(504, f"the request did not finish within {self.config.api.request_timeout:g} s and "
                           "was cancelled", "timeout", None, "request_timeout") from None
        except ClientGone:
            self._spawn(self._cancel(rid))
            self._finished(prep, "disconnected", None)
            return JSONResponse(error_body("client closed the request", "client_closed", None, "client_closed"),
                                status_code=499)
        except asyncio.CancelledError:
            # Cancelled by Serve (the client went away at the proxy): free the slot.
            self._spawn(self._cancel(rid))
            self._finished(prep, "disconnected", None)
            raise
        except Exception:
            self._spawn(self._cancel(rid))
            self._finished(prep, "error", None)
            raise
        self._raise_for_reason(prep, reason)
        self._finished(prep, FINISH_REASONS[reason], asm.completion_tokens)
        build = chat_response if prep.kind == "chat" else completion_response
        body = build(prep.response_id, prep.created, prep.model, text, FINISH_REASONS[reason],
                     prep.record.prompt_len, asm.completion_tokens)
        return JSONResponse(body, headers={"X-Request-Id": rid})

    def _raise_for_reason(self, prep: Prepared, reason: str) -> None:
        if reason in FINISH_REASONS:
            return
        if reason == "cancelled":
            self._finished(prep, "cancelled", None)
            raise ApiError(503, "the request was cancelled by the server", "server_error", None,
                           "request_cancelled")
        self._finished(prep, "error", None)
        raise ApiError(500, f"generation failed (finish_reason {reason!r})", "server_error", None,
                       "generation_failed")

    async def stream(self, prep: Prepared) -> AsyncIterator[bytes]:
        """SSE chunks as slices complete; ends with ``data: [DONE]``. Sets ``prep.done`` when finished."""
        asm = self._assembler(prep)
        rid, chat = prep.record.id, prep.kind == "chat"
        with_usage = prep.include_usage

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> bytes:
            so_far = usage(prep.record.prompt_len, asm.completion_tokens) if prep.continuous_usage else None
            if chat:
                delta: dict = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                body = chat_chunk(prep.response_id, prep.created, prep.model, delta, finish, with_usage, so_far)
            else:
                body = completion_chunk(prep.response_id, prep.created, prep.model, text or "", finish, with_usage,
                                        so_far)
            return sse(body)

        if chat:
            yield chunk("", role=True)
        reason, tail = None, ""
        try:
            async for delta, reason in self._relay(prep, asm):
                if reason is None:
                    yield chunk(delta)
                else:
                    tail = delta
        except RelayTimeout:
            prep.done = True
            await self._cancel(rid)
            self._finished(prep, "timeout", None)
            yield sse(error_body(f"the request did not finish within {self.config.api.request_timeout:g} s and "
                                 "was cancelled", "timeout", None, "request_timeout"))
            yield b"data: [DONE]\n\n"
            return
        prep.done = True
        if reason not in FINISH_REASONS:
            try:
                self._raise_for_reason(prep, reason or "error")
            except ApiError as err:
                yield sse(err.body())
                yield b"data: [DONE]\n\n"
                return
        if tail:
            yield chunk(tail)
        finish = FINISH_REASONS[reason]
        yield chunk(None if chat else "", finish)
        if with_usage:
            yield sse(usage_chunk(prep.kind, prep.response_id, prep.created, prep.model, prep.record.prompt_len,
                                  asm.completion_tokens))
        yield b"data: [DONE]\n\n"
        self._finished(prep, finish, asm.completion_tokens)

    async def stream_closed(self, prep: Prepared) -> None:
        """Called when a stream's response ends for any reason: cancel unless it finished."""
        if not prep.done:
            prep.done = True
            self._finished(prep, "disconnected", None)
            self._spawn(self._cancel(prep.record.id))

    async def generate(self, request: Request, kind: str) -> Response:
        """POST /v1/completions and /v1/chat/completions."""
        self.authorize(request)
        data = await read_json(request, self.config.api.max_request_bytes, self.config.api.max_json_depth)
        prep = await self.prepare(data, kind, extensions=self.config.api.scheduling_extensions
                                  or self.is_admin(request))
        if self._inflight >= self.config.inflight_limit:
            self.metrics.rejected.inc()
            raise ApiError(429, f"the server is at its limit of {self.config.inflight_limit} requests in flight; "
                           "retry after 1 s", "rate_limit_error", None, "too_many_requests",
                           headers={"Retry-After": "1"})
        self._inflight += 1
        self.metrics.inflight.inc()
        handed_off = False  # a stream's response decrements the gauge when it closes
        try:
            await self.accept(prep)
            if prep.stream:
                response = SSEResponse(self.stream(prep), on_close=partial(self._stream_closed_dec, prep),
                                       headers={"X-Request-Id": prep.record.id})
                handed_off = True
                return response
            return await self.complete(prep, request)
        finally:
            if not handed_off:
                self._inflight -= 1
                self.metrics.inflight.dec()

    async def _stream_closed_dec(self, prep: Prepared) -> None:
        self._inflight -= 1
        self.metrics.inflight.dec()
        await self.stream_closed(prep)

    async def close(self) -> None:
        self._tok_pool.shutdown(wait=False, cancel_futures=True)
        await self.store.close()


# ---- Ray Serve deployment --------------------------------------------------------------------------------


@serve.deployment(name="Ingress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    """The HTTP entry of the Serve app.

    ``config``: a :class:`SlicefleetConfig` as a dict (``redis.url`` must be set). ``dispatcher``: a handle
    whose ``ready`` method returns bool (awaited by /health); None: ready when the dispatcher's metrics snapshot
    is in Redis. ``workers``: kept so the app graph deploys them; health reads replica liveness from Redis.
    """

    def __init__(self, config: dict, dispatcher=None, workers=None):
        cfg = config if isinstance(config, SlicefleetConfig) else SlicefleetConfig.model_validate(config)
        self._dispatcher = dispatcher
        self._workers = workers
        self.service = IngressService.from_config(cfg, ready=self._ready if dispatcher is not None else None,
                                                  ray_session=current_ray_session())

    async def _ready(self) -> bool:
        return bool(await self._dispatcher.ready.remote())

    def __serve_build_asgi_app__(self):
        return build_api(self.service)
