"""The FastAPI app around an :class:`~cluster.ingress.IngressService`: routes, OpenAI-style error bodies, the
published OpenAPI schema, request metrics, and the ASGI pieces the service's responses need (a client that
leaves is noticed, streamed or not). No Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.metrics import IngressMetrics
from cluster.openai_schema import ApiError, ChatRequest, CompletionRequest, error_body
from cluster.openai_validation import CHAT_ROLES, MAX_PRIORITY, MAX_STOP_STRINGS

if TYPE_CHECKING:
    from cluster.ingress import IngressService

log = logging.getLogger(__name__)

ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions", "/v1/models": "models",
          "/health": "health", "/metrics": "metrics"}


def package_version() -> str:
    """The installed slicefleet's version (what ``GET /version`` answers, as vLLM's does)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slicefleet")
    except PackageNotFoundError:
        return "unknown"


# ---- ASGI pieces: a client that goes away ------------------------------------------------------------------


class ClientGone(Exception):
    pass


async def until_done_or_disconnect(coro, request: Request | None):
    """Await ``coro``; if the client disconnects first, cancel it and raise :class:`ClientGone`."""
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
    raise ClientGone()


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


def published_constraints(service: IngressService, chat: bool) -> dict[str, dict]:
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
