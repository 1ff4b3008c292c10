"""The OpenAI-compatible REST ingress: validate, tokenize, predict, store durably, then relay the output.

Layers (the first two need no Ray, so they are tested with a plain FastAPI app):

- :class:`IngressService` holds the config, the tokenizer, an :class:`~cluster.ingress_store.AsyncStateStore`,
  an optional length predictor and a readiness callable, and implements every endpoint.
- :func:`build_api` wraps a service in a FastAPI app (routes, OpenAI-style error bodies, request metrics).
- :class:`Ingress` is the Ray Serve deployment: ``Ingress(config: dict, dispatcher=None, workers=None)``; it
  builds the service and hands Serve the app through ``@serve.ingress()``'s late-bound
  ``__serve_build_asgi_app__`` hook (Ray 2.60).

Request flow: validate -> tokenize (chat: the tokenizer's chat template, else the fallback below) -> admission
control (dispatcher's ``backlog_seconds``) -> predicted output length (optional) -> ``submit`` the
:class:`~cluster.state.RequestRecord` (record, live set and ``incoming`` announcement in one transaction; no
response byte is sent before it lands) -> read ``{p}:out:{id}`` with ``XREAD BLOCK`` until an event carries
``finish_reason``. Stop strings are matched on the decoded text here: the text is cut before the first stop
string, the request is cancelled (``{p}:cancel``) and the finish reason is ``stop``. A client that goes away
(stream or not), a Serve-side cancellation and a timeout (504) all cancel the request.

Chat prompts without a chat template (fallback): ``BOS + "".join(f"{role}: {content}\\n\\n") + "assistant:"``.

Defaults: ``model`` may be omitted (the served model); ``max_tokens`` defaults to 16 for completions (as
OpenAI) and to ``min(scheduler.max_gen_len, context - prompt)`` for chat; a default is shrunk to fit the
context, an explicit value that does not fit is a 400. ``temperature`` defaults to the model's generation
config (0, greedy, when it says ``do_sample: false``; else its temperature or 1). ``min_tokens`` means what
it means in vLLM: no EOS, stop token or stop string before that many tokens. ``max_completion_tokens`` wins
over ``max_tokens`` on chat, as in OpenAI. The trace-mode extension ``target_len`` generates exactly that
many tokens; with no ``max_tokens`` the budget becomes the target. Parameters this server cannot honour are
refused with a 400 that names them, never ignored. Error codes: see :mod:`cluster.openai_schema`.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from redis import exceptions as redis_exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cluster.config import SlicefleetConfig
from cluster.ingress_store import AsyncStateStore
from cluster.metrics import IngressMetrics
from cluster.openai_schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    bad_request,
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
from cluster.state import RequestRecord

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
MAX_PRIORITY = 1_000_000
"""Scheduling uses priorities as floats; 10**400 would overflow them."""
MAX_CHARS_PER_TOKEN = 64
"""A text longer than the context times this cannot fit, so it is refused without tokenizing it (seconds of
CPU for megabytes of text, during which other requests wait for the tokenizer)."""
DEFAULT_COMPLETION_MAX_TOKENS = 16
SUBMIT_RETRY_SECONDS = 5.0
"""How long a submit keeps retrying while the state store is unreachable (e.g. restarting)."""
BODY_TIMEOUT_S = 30.0
"""How long a request body may take to arrive (408 beyond): a client trickling a body would otherwise hold its
slot forever. The proxy bounds the head the same way (:mod:`cluster.http_limits`)."""
READY_TIMEOUT_S = 5.0
"""How long /health waits for the readiness callable (the dispatcher's ``ready``)."""
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""Store finish reasons -> OpenAI's. ``cancelled`` and ``error`` become errors (503, 500)."""
ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions", "/v1/models": "models",
          "/health": "health", "/metrics": "metrics"}
CHAT_ROLES = {"system", "user", "assistant", "developer", "tool"}


# ---- text assembly: incremental decoding and stop strings -----------------------------------------------


class TextAssembler:
    """Turns output token ids, slice by slice, into text deltas that are safe to send.

    Each ``feed`` decodes every token so far and returns the new suffix, holding back (a) a trailing
    U+FFFD (an incomplete UTF-8 sequence that the next tokens will complete) and (b) a tail that could be
    the start of a stop string. When a stop string appears the text is cut before it, ``stopped`` turns
    True and ``completion_tokens`` counts the tokens up to the one that completed the stop string.

    With ``min_tokens`` (vLLM's rule) a stop string counts only once it ends in the text of a token after
    the first ``min_tokens``.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str] | None = None, min_tokens: int = 0):
        self.decode = decode
        self.stops = [s for s in (stops or []) if s]
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.min_tokens = min_tokens
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._used_tokens: int | None = None
        self._floor: int | None = None if min_tokens > 0 else 0
        """Characters a stop string must end after: the text of the first ``min_tokens`` tokens."""

    @property
    def sent_text(self) -> str:
        return self.text[: self.sent]

    @property
    def completion_tokens(self) -> int:
        return self._used_tokens if self._used_tokens is not None else len(self.ids)

    def feed(self, new_ids: list[int], stop_token_last: bool = False) -> str:
        """``stop_token_last``: the last id is a stop token that ended the request. As in vLLM it counts as a
        completion token but adds no text."""
        if self.stopped:
            return ""
        before = len(self.ids)
        self.ids.extend(int(t) for t in new_ids)
        text = self.decode(self.ids[:-1] if stop_token_last and new_ids else self.ids)
        if self.stops and self._floor is None and len(self.ids) > self.min_tokens:
            self._floor = len(self.decode(self.ids[: self.min_tokens]))
        if self.stops and self._floor is not None:
            edge = max(self.sent, self._floor)
            hits = [(pos, s) for s in self.stops if (pos := text.find(s, max(0, edge - len(s) + 1))) >= 0]
            if hits:
                pos, stop = min(hits)
                end = max(pos, self.sent)  # never retract text already sent
                delta = text[self.sent:end]
                self.text, self.sent, self.stopped = text[:end], end, True
                self._used_tokens = self._tokens_covering(pos + len(stop), before)
                return delta
        self.text = text
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        if self.stops:
            end -= self._partial_stop_suffix(text[:end], self.sent)
        delta = text[self.sent:end]
        self.sent = end
        return delta

    def flush(self) -> str:
        """The generation ended: whatever was held back is final now, except the bytes of a character the
        budget cut in half (a trailing U+FFFD), which vLLM's detokenizer never emits either."""
        if self.stopped:
            return ""
        self.text = self.text[: max(len(self.text.rstrip("\ufffd")), self.sent)]
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    def _partial_stop_suffix(self, text: str, floor: int) -> int:
        for k in range(min(self.max_stop - 1, len(text) - floor), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _tokens_covering(self, n_chars: int, start: int) -> int:
        for k in range(max(start, 1), len(self.ids) + 1):
            if len(self.decode(self.ids[:k])) >= n_chars:
                return k
        return len(self.ids)


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


def load_length_predictor(config: SlicefleetConfig) -> Callable[[str, list[int]], float | None] | None:
    """The optional output-length predictor as ``f(prompt_text, prompt_ids) -> float | None``.

    Uses ``predictor.length.load_length_predictor`` when that module exists. The returned object may offer
    ``predict_one(text, prompt_len)``, ``predict(texts, prompt_lens)`` (batch) or be callable as
    ``obj(text, prompt_len)``. Anything missing or failing: None (the dispatcher falls back).
    """
    try:
        from predictor.length import load_length_predictor as _load  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - optional component
        log.info("no length predictor (%s); predicted_len stays unset", exc)
        return None
    try:
        try:
            model = _load(config.predictor.length_model)
        except TypeError:
            model = _load()
    except FileNotFoundError as exc:
        log.info("no length-predictor artefact (%s); predicted_len stays unset", exc)
        return None
    except Exception as exc:  # noqa: BLE001
        log.warning("length predictor failed to load (%s); predicted_len stays unset", exc)
        return None
    if model is None:
        return None

    def predict(text: str, ids: list[int]) -> float | None:
        if hasattr(model, "predict_one"):
            value = model.predict_one(text, len(ids))
        elif hasattr(model, "predict"):
            value = model.predict([text], [len(ids)])[0]
        else:
            value = model(text, len(ids))
        return float(value)

    return predict


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids of a chat: the tokenizer's chat template, or the documented fallback."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may refuse a message order
            raise bad_request(f"the chat template rejected these messages: {exc}", "messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


# ---- the service -----------------------------------------------------------------------------------------


class _Timeout(Exception):
    pass


class _ClientGone(Exception):
    pass


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
    """Every endpoint of the ingress, independent of Ray.

    ``ready``: an async (or plain) callable returning True when the dispatcher is ready; None means "ready
    when the dispatcher's metrics snapshot is present in Redis" (it republishes it every second, TTL 60 s).
    ``length_predictor``: ``f(prompt_text, prompt_ids) -> float | None`` or None.
    ``snapshot_ttl``: seconds the dispatcher snapshot is cached for admission control.
    """

    def __init__(self, config: SlicefleetConfig, tokenizer, store: AsyncStateStore, *,
                 ready: Callable[[], Awaitable[bool] | bool] | None = None,
                 length_predictor: Callable[[str, list[int]], float | None] | None = None,
                 context_len: int = 2048, vocab_size: int | None = None, default_temperature: float = 0.0,
                 snapshot_ttl: float = 0.5, poll_seconds: float = 5.0):
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
        self.metrics = IngressMetrics(config.model.name, self.context_len)
        self.model_name = config.model.name
        self.created = int(time.time())
        self._api_keys = [k.encode() for k in config.api.api_keys]
        self._admin_keys = [k.encode() for k in config.api.admin_keys]
        self._metrics_keys = [k.encode() for k in config.api.metrics_keys]
        self._inflight = 0
        self._snapshot: tuple[float, dict] = (-math.inf, {})
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingress-tokenizer")
        self._background: set[asyncio.Task] = set()
        self._predictor_failed = False

    @classmethod
    def from_config(cls, config: SlicefleetConfig | dict, *, ready=None, **kwargs) -> "IngressService":
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
        store = AsyncStateStore.connect(cfg.redis, max_connections=cfg.api.max_inflight + 64)
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

    async def snapshot(self) -> dict:
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
                return (bool(snap), None if snap else "no dispatcher metrics snapshot in Redis")
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
            alive, _dead = await self.store.replicas_alive()
        except Exception as exc:  # noqa: BLE001
            body["reason"] = f"redis failed while reading replicas: {type(exc).__name__}: {exc}"
            return 503, body
        body["replicas_alive"] = len(alive)
        reasons = [] if ready else [why or "dispatcher not ready"]
        if len(alive) < expected:
            reasons.append(f"{len(alive)} of {expected} worker replicas alive")
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
            snap = {}
        return self.metrics.render(snap)

    # ---- validation ------------------------------------------------------------------------------------
    def _check_common(self, req, kind: str) -> dict:
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist (this server serves "
                           f"`{self.model_name}`)", "invalid_request_error", "model", "model_not_found")
        if req.n != 1:
            raise bad_request("n must be 1 (one completion per request)", "n")
        if kind != "chat" and req.max_completion_tokens is not None:
            raise bad_request("max_completion_tokens is a chat parameter; /v1/completions takes max_tokens",
                              "max_completion_tokens", "unsupported_parameter")
        sampling = self._sampling_extras(req)
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_parameter")
        temperature = self.default_temperature if req.temperature is None else req.temperature
        if not (0.0 <= temperature <= 2.0) or math.isnan(temperature):
            raise bad_request("temperature must be between 0 and 2", "temperature")
        top_p = 1.0 if req.top_p is None else req.top_p
        if not (0.0 < top_p <= 1.0):
            raise bad_request("top_p must be greater than 0 and at most 1", "top_p")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        if any(s == "" for s in stops):
            raise bad_request("stop strings must not be empty", "stop")
        stops = [self._text(s, "stop") for s in stops]
        stop_ids = list(req.stop_token_ids or [])
        if any(not (0 <= t < self.vocab_size) for t in stop_ids):
            raise bad_request(f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids")
        if req.seed is not None and not (-(2**63) <= req.seed < 2**64):
            raise bad_request("seed out of range", "seed")
        gmax = self.config.scheduler.max_gen_len
        target = req.target_len
        if target is not None and not (1 <= target <= gmax):
            raise bad_request(f"target_len must be between 1 and {gmax}", "target_len")
        max_tokens, param = req.max_tokens, "max_tokens"
        if req.max_completion_tokens is not None:  # OpenAI and vLLM: it wins when both are sent
            max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
        if max_tokens is not None and not (1 <= max_tokens <= gmax):
            raise bad_request(f"{param} must be between 1 and {gmax} (scheduler.max_gen_len), got {max_tokens}",
                              param)
        for name, value in (("target_len", target), ("min_tokens", sampling["min_tokens"] or None)):
            if value is not None and max_tokens is not None and value > max_tokens:
                raise bad_request(f"{name} ({value}) must not exceed {param} ({max_tokens})", name)
        return {"temperature": float(temperature), "top_p": float(top_p), "stops": stops, "stop_ids": stop_ids,
                "target": target, "max_tokens": max_tokens, "max_tokens_param": param, "sampling": sampling}

    @staticmethod
    def _check_extensions(req, allowed: bool) -> None:
        used = [name for name, on in (("priority", req.priority != 0), ("target_len", req.target_len is not None),
                                      ("ignore_eos", req.ignore_eos)) if on]
        if used and not allowed:
            raise ApiError(403, f"{used[0]} is a scheduling extension: it needs an admin key (api.admin_keys) "
                           "or api.scheduling_extensions: true", "permission_error", used[0],
                           "extension_not_allowed")
        if not -MAX_PRIORITY <= req.priority <= MAX_PRIORITY:
            raise bad_request(f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}", "priority")

    def _sampling_extras(self, req) -> dict:
        """vLLM's sampling knobs, checked with vLLM's ranges; absent ones take their neutral value."""
        def number(name: str, neutral: float, ok: Callable[[float], bool], rule: str) -> float:
            value = getattr(req, name)
            if value is None:
                return neutral
            if not math.isfinite(value) or not ok(value):
                raise bad_request(f"{name} must be {rule}, got {value}", name)
            return float(value)

        top_k = 0 if req.top_k is None else req.top_k
        if top_k < -1:
            raise bad_request(f"top_k must be 0 or -1 (disabled) or at least 1, got {top_k}", "top_k")
        min_tokens = 0 if req.min_tokens is None else req.min_tokens
        if not 0 <= min_tokens <= self.config.scheduler.max_gen_len:
            raise bad_request(f"min_tokens must be between 0 and {self.config.scheduler.max_gen_len}, got "
                              f"{min_tokens}", "min_tokens")
        return {
            "top_k": max(top_k, 0),
            "min_p": number("min_p", 0.0, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
            "repetition_penalty": number("repetition_penalty", 1.0, lambda v: v > 0.0, "greater than 0"),
            "presence_penalty": number("presence_penalty", 0.0, lambda v: -2.0 <= v <= 2.0, "in [-2, 2]"),
            "frequency_penalty": number("frequency_penalty", 0.0, lambda v: -2.0 <= v <= 2.0, "in [-2, 2]"),
            "min_tokens": min_tokens,
        }

    def _text(self, text: str, param: str) -> str:
        """``text`` if it is valid Unicode and could fit the context; JSON's ``\\ud800`` escapes give lone
        surrogates, which no tokenizer can encode."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_request(f"{param} is not valid Unicode: a lone surrogate at character {exc.start}",
                              param) from None
        if len(text) > self.context_len * MAX_CHARS_PER_TOKEN:
            raise bad_request(f"This model's maximum context length is {self.context_len} tokens; {param} has "
                              f"{len(text)} characters, more than any {self.context_len} tokens could hold",
                              param, "context_length_exceeded")
        return text

    def _token_ids(self, value, param: str) -> list[int]:
        if not value:
            raise bad_request("prompt must not be empty", param)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in value):
            raise bad_request("a token prompt must be a list of integers", param, "invalid_type")
        if any(not (0 <= t < self.vocab_size) for t in value):
            raise bad_request(f"token ids must be in [0, {self.vocab_size})", param)
        return list(value)

    def _completion_prompt(self, prompt) -> tuple[list[int] | None, str]:
        """(token ids, or None when the text still needs tokenizing; the text)."""
        if prompt is None:
            raise bad_request("prompt is required", "prompt", "missing")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > 1:
                raise bad_request("batched prompts (a list of several prompts) are not supported: send one "
                                  "request per prompt", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("prompt must not be empty", "prompt")
            return None, self._text(prompt, "prompt")
        if isinstance(prompt, list):
            ids = self._token_ids(prompt, "prompt")
            return ids, ""
        raise bad_request("prompt must be a string or a list of token ids", "prompt", "invalid_type")

    def _chat_messages(self, req: ChatRequest) -> list[dict]:
        if not req.messages:
            raise bad_request("messages must not be empty", "messages")
        if req.logprobs or req.top_logprobs:
            raise bad_request("logprobs are not supported", "logprobs", "unsupported_parameter")
        if req.tools:
            raise bad_request("tools are not supported", "tools", "unsupported_parameter")
        # Tool and reasoning controls mean nothing without tools or a reasoning model: refuse them by name.
        for name in ("tool_choice", "parallel_tool_calls", "functions", "function_call", "reasoning_effort"):
            if getattr(req, name) is not None:
                raise bad_request(f"{name} is not supported (this server has no tools and no reasoning model)",
                                  name, "unsupported_parameter")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {type: text} is supported", "response_format",
                              "unsupported_parameter")
        out = []
        for i, m in enumerate(req.messages):
            if m.role not in CHAT_ROLES:
                raise bad_request(f"messages.{i}.role: unknown role {m.role!r}", f"messages.{i}.role")
            if m.name is not None:
                raise bad_request(f"messages.{i}.name is not supported: the chat template has no place for it",
                                  f"messages.{i}.name", "unsupported_parameter")
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text"
                            and isinstance(part.get("text"), str)):
                        raise bad_request(f"messages.{i}.content: only text parts are supported",
                                          f"messages.{i}.content", "unsupported_parameter")
                    parts.append(part["text"])
                content = "".join(parts)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise bad_request(f"messages.{i}.content must be a string or a list of text parts",
                                  f"messages.{i}.content", "invalid_type")
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": self._text(content, f"messages.{i}.content")})
        if not any(m["content"] for m in out):
            raise bad_request("messages must not all be empty", "messages")
        return out

    async def prepare(self, data: Any, kind: str, extensions: bool = True) -> Prepared:
        """Validate and tokenize a request body (a parsed JSON value). Raises :class:`ApiError`.

        ``extensions``: the client may use the scheduling extensions (an admin key, or
        ``api.scheduling_extensions``)."""
        req = parse_request(ChatRequest if kind == "chat" else CompletionRequest, data)
        self._check_extensions(req, extensions)
        c = self._check_common(req, kind)
        loop = asyncio.get_running_loop()
        if kind == "chat":
            messages = self._chat_messages(req)
            ids = await loop.run_in_executor(self._tok_pool, render_chat, self.tokenizer, messages)
            text = "\n".join(m["content"] for m in messages)
        else:
            if req.echo:
                raise bad_request("echo is not supported", "echo", "unsupported_parameter")
            if req.logprobs is not None:
                raise bad_request("logprobs are not supported", "logprobs", "unsupported_parameter")
            if req.best_of not in (None, 1):
                raise bad_request("best_of must be 1", "best_of", "unsupported_parameter")
            if req.suffix:
                raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")
            ids, text = self._completion_prompt(req.prompt)
            if ids is None:
                ids = await loop.run_in_executor(
                    self._tok_pool, lambda: list(self.tokenizer(text, add_special_tokens=True)["input_ids"]))
            else:
                text = await loop.run_in_executor(self._tok_pool, self.tokenizer.decode, ids)
        if not ids:
            raise bad_request("the prompt encodes to no tokens", "messages" if kind == "chat" else "prompt")
        room = self.context_len - len(ids)
        max_tokens = c["max_tokens"]
        if max_tokens is None:  # a default: shrink it to fit
            gmax = self.config.scheduler.max_gen_len
            if c["target"] is not None:
                default = c["target"]
            else:
                default = gmax if kind == "chat" else min(DEFAULT_COMPLETION_MAX_TOKENS, gmax)
            max_tokens = min(default, room)
        if room < 1 or len(ids) + max_tokens > self.context_len:
            raise bad_request(
                f"This model's maximum context length is {self.context_len} tokens; the prompt has {len(ids)} "
                f"tokens and {max_tokens} more were requested", "messages" if kind == "chat" else "prompt",
                "context_length_exceeded")
        if c["target"] is not None and c["target"] > max_tokens:
            raise bad_request(f"target_len ({c['target']}) does not fit: at most {max_tokens} tokens fit after "
                              "this prompt", "target_len", "context_length_exceeded")
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
        backlog = snap.get("backlog_seconds")
        if isinstance(backlog, (int, float)) and not isinstance(backlog, bool) and not math.isfinite(backlog):
            # no live replica: a matter of seconds (a restart), not of load
            raise ApiError(503, "no worker replica is serving right now; retry after 5 s", "server_error", None,
                           "no_replicas", headers={"Retry-After": "5"})
        if isinstance(backlog, (int, float)) and not isinstance(backlog, bool) and backlog > bound:
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
    async def events(self, rid: str, deadline: float) -> AsyncIterator[tuple[list[int], str | None]]:
        """(new token ids, finish reason or None) per output event, until the finishing one."""
        last = "0"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout()
            try:
                entries = await self.store.read_output(rid, last, block_ms=min(remaining, self.poll_seconds) * 1000)
            except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError) as exc:
                # Redis restarting (it keeps the stream in its AOF): keep waiting until the deadline.
                log.warning("reading output of %s failed (%s); retrying", rid, exc)
                await asyncio.sleep(min(0.5, max(remaining, 0.0)))
                continue
            for eid, fields in entries:
                last = eid
                tokens = json.loads(fields.get("tokens") or "[]")
                reason = fields.get("finish_reason") or None
                yield tokens, reason
                if reason:
                    return

    def _decoder(self) -> Callable[[list[int]], str]:
        return partial(self.tokenizer.decode, skip_special_tokens=True)

    def _finished(self, prep: Prepared, outcome: str, completion_tokens: int | None) -> None:
        self.metrics.finished.labels(prep.endpoint, outcome).inc()
        self.metrics.ended(prep.record.id, outcome, completion_tokens)

    async def _consume(self, prep: Prepared, asm: TextAssembler) -> str:
        rid = prep.record.id
        deadline = prep.t0 + self.config.api.request_timeout
        async for tokens, reason in self.events(rid, deadline):
            self.metrics.output(rid, len(tokens))
            asm.feed(tokens, self._ends_on_stop_token(prep, tokens, reason))
            if asm.stopped and reason is None:
                await self._cancel(rid)
                return "stop"
            if reason:
                return "stop" if asm.stopped else reason
        raise _Timeout()  # unreachable: events() returns only after a finish

    @staticmethod
    def _ends_on_stop_token(prep: Prepared, tokens: list[int], reason: str | None) -> bool:
        return reason == "stop" and bool(tokens) and tokens[-1] in prep.record.stop_token_ids

    async def complete(self, prep: Prepared, request: Request | None) -> JSONResponse:
        """Non-streaming: wait for the finish (watching for a client disconnect), then answer."""
        asm = TextAssembler(self._decoder(), prep.record.stop, prep.record.min_tokens)
        rid = prep.record.id
        try:
            reason = await _until_done_or_disconnect(self._consume(prep, asm), request)
        except _Timeout:
            await self._cancel(rid)
            self._finished(prep, "timeout", None)
            raise ApiError(504, f"the request did not finish within {self.config.api.request_timeout:g} s and "
                           "was cancelled", "timeout", None, "request_timeout") from None
        except _ClientGone:
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
        asm.flush()
        self._raise_for_reason(prep, reason)
        self._finished(prep, FINISH_REASONS[reason], asm.completion_tokens)
        build = chat_response if prep.kind == "chat" else completion_response
        body = build(prep.response_id, prep.created, prep.model, asm.sent_text, FINISH_REASONS[reason],
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
        asm = TextAssembler(self._decoder(), prep.record.stop, prep.record.min_tokens)
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

        deadline = prep.t0 + self.config.api.request_timeout
        if chat:
            yield chunk("", role=True)
        reason = None
        try:
            async for tokens, reason in self.events(rid, deadline):
                self.metrics.output(rid, len(tokens))
                delta = asm.feed(tokens, self._ends_on_stop_token(prep, tokens, reason))
                if delta:
                    yield chunk(delta)
                if asm.stopped:
                    if reason is None:
                        await self._cancel(rid)
                    reason = "stop"
                    break
                if reason:
                    break
        except _Timeout:
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
        tail = asm.flush()
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
        if self._inflight >= self.config.api.max_inflight:
            self.metrics.rejected.inc()
            raise ApiError(429, f"the server is at its limit of {self.config.api.max_inflight} requests in flight; "
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


def package_version() -> str:
    """The installed slicefleet's version (what ``GET /version`` answers, as vLLM's does)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slicefleet")
    except PackageNotFoundError:
        return "unknown"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``raw``'s arrays and objects, counted without parsing (strings skipped)."""
    depth = deepest = 0
    for m in _JSON_BRACKETS.finditer(_JSON_STRING.sub(b'""', raw)):
        depth += 1 if m.group() in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


async def read_json(request: Request, max_bytes: int, max_depth: int) -> Any:
    """The body as JSON, refused before parsing when it is not JSON, too large or too deep.

    The checks come first because the parser is the weak point: a body nested a few thousand levels makes
    ``json.loads`` raise RecursionError, and a 50 MB body would be held in memory in full.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        # Browsers send text/plain and form posts cross-origin without a preflight: refusing them keeps a
        # web page from driving the API on behalf of whoever has it open.
        raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                       "invalid_request_error", None, "unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s ({size} bytes came)",
                       "invalid_request_error", None, "request_timeout") from None
    except ClientDisconnect:
        raise ApiError(499, "client closed the request", "client_closed", None, "client_closed") from None
    raw = b"".join(chunks)
    if json_depth(raw) > max_depth:
        raise bad_request(f"the request body nests deeper than {max_depth} levels", None, "invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body exceeds {max_bytes} bytes (api.max_request_bytes)",
                    "invalid_request_error", None, "request_too_large")


async def _until_done_or_disconnect(coro, request: Request | None):
    """Await ``coro``; if the client disconnects first, cancel it and raise :class:`_ClientGone`."""
    main = asyncio.ensure_future(coro)
    if request is None:
        return await main

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({main, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        main.cancel()
        watcher.cancel()
        raise
    if main.done():
        watcher.cancel()
        return main.result()
    main.cancel()
    await asyncio.gather(main, return_exceptions=True)
    raise _ClientGone()


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always watches for the client leaving and always reports the end.

    Starlette's StreamingResponse stops watching for ``http.disconnect`` under ASGI spec 2.4 and may leave the
    body generator suspended; here the generator is closed and ``on_close`` awaited (shielded from the
    cancellation) whatever happens: finished, client gone, or the whole call cancelled (Ray Serve).
    """

    def __init__(self, content, on_close: Callable[[], Awaitable[None]], headers: dict | None = None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the client went away mid-write
                pass

        try:
            async with anyio.create_task_group() as tg:
                async def run(func) -> None:
                    await func()
                    tg.cancel_scope.cancel()

                tg.start_soon(run, stream)
                await run(partial(self.listen_for_disconnect, receive))
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:  # noqa: BLE001
                        pass
                await self._on_close()


# ---- FastAPI app -----------------------------------------------------------------------------------------


class _MetricsMiddleware:
    """Counts every HTTP response by endpoint and status code (pure ASGI, so streams are not buffered)."""

    def __init__(self, app, metrics: IngressMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = ROUTES.get(scope.get("path", ""), "other")
        started = False

        async def send_wrapper(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.observe_response(endpoint, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if not started:
                self.metrics.observe_response(endpoint, 500)
            raise


def request_body_schema(model: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


REFUSED_UNLESS_DEFAULT = ("logit_bias", "echo", "logprobs", "best_of", "suffix", "top_logprobs", "tools",
                          "tool_choice", "parallel_tool_calls", "functions", "function_call", "reasoning_effort",
                          "response_format")
"""Known OpenAI options this server refuses (400 naming them): left out of the published schema."""


def published_constraints(service: "IngressService", chat: bool) -> dict[str, dict]:
    """What the handlers accept, field by field, for the published schema (the handlers check it at run time;
    the models stay loose so that every refusal gets an OpenAI-shaped error naming the parameter)."""
    gmax, vocab = service.config.scheduler.max_gen_len, service.vocab_size
    budget = {"type": "integer", "minimum": 1, "maximum": gmax}
    text = {"type": "string", "minLength": 1}
    out = {
        "model": {"type": "string", "enum": [service.model_name]},
        "n": {"type": "integer", "enum": [1]},
        "max_tokens": budget,
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 2},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "min_tokens": {"type": "integer", "minimum": 0, "maximum": gmax},
        "target_len": budget,
        "priority": {"type": "integer", "minimum": -MAX_PRIORITY, "maximum": MAX_PRIORITY},
        "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1},
        "stop": {"anyOf": [text, {"type": "array", "items": text, "maxItems": MAX_STOP_STRINGS}]},
        "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}},
    }
    if chat:
        out["max_completion_tokens"] = budget
        out["messages"] = {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/ChatMessage"}}
    else:
        out["prompt"] = {"anyOf": [text, {"type": "array", "minItems": 1,
                                          "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}]}
    return out


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema with the request models (and the models they use) under components."""
    if app.openapi_schema is None:
        schema = app.openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionRequest, ChatRequest):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            props = body["properties"]
            for name in REFUSED_UNLESS_DEFAULT + (("max_completion_tokens",) if model is CompletionRequest else ()):
                props.pop(name, None)
            for name, rule in published_constraints(app.state.service, model is ChatRequest).items():
                props[name] = {**rule, "title": props.get(name, {}).get("title", name)}
            if model is CompletionRequest:
                body["required"] = ["prompt"]
            components[model.__name__] = body
        message = components["ChatMessage"]
        message["properties"].pop("name", None)
        message["properties"]["role"] = {"type": "string", "enum": sorted(CHAT_ROLES)}
        part = {"type": "object", "required": ["type", "text"],
                "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
        message["properties"]["content"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}
        message["required"] = ["role", "content"]
    return app.openapi_schema


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


def build_api(service: IngressService) -> FastAPI:
    """The FastAPI app around a service: routes, OpenAI-style errors, request metrics."""
    app = FastAPI(title="Slicefleet", description="OpenAI-compatible LLM serving with slice-level scheduling",
                  version=package_version(), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(str(exc.errors()[:1]), "invalid_request_error", None, "invalid_value"),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error in the ingress")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", None,
                                       "internal_error"), status_code=500)

    # The handlers read the body themselves (size and depth limits before parsing, OpenAI-shaped errors), so
    # FastAPI cannot see the request models: they are put into the schema here.
    @app.post("/v1/completions", openapi_extra=request_body_schema(CompletionRequest))
    async def completions(request: Request):
        return await service.generate(request, "completion")

    @app.post("/v1/chat/completions", openapi_extra=request_body_schema(ChatRequest))
    async def chat_completions(request: Request):
        return await service.generate(request, "chat")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        service.authorize(request)
        return openapi_schema(app)

    @app.get("/v1/models")
    async def models(request: Request):
        service.authorize(request)
        return service.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        service.authorize(request)
        return service.model(model_id)

    @app.get("/version")
    async def version(request: Request):
        service.authorize(request)
        return {"version": package_version()}

    @app.get("/health")
    async def health():
        status, body = await service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST

        service.authorize_metrics(request)
        return Response(await service.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_MetricsMiddleware, metrics=service.metrics)
    return app


# ---- Ray Serve deployment --------------------------------------------------------------------------------

from ray import serve  # noqa: E402  (kept below the Ray-free part on purpose)


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
        self.service = IngressService.from_config(cfg, ready=self._ready if dispatcher is not None else None)

    async def _ready(self) -> bool:
        return bool(await self._dispatcher.ready.remote())

    def __serve_build_asgi_app__(self):
        return build_api(self.service)
