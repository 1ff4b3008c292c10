"""The ingress behind a real HTTP server (uvicorn on 127.0.0.1): the official ``openai`` client for
completions, chat and streaming, and clients that disconnect (their requests get cancelled)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from cluster.http_app import build_api  # noqa: E402
from cluster.redis_server import free_loopback_port  # noqa: E402
from tests.cluster.test_ingress_support import (  # noqa: E402
    ANSWER_TEXT,
    fake_backend,
    make_config,
    make_service,
    wait_until,
)

PREFIX = "to"
AUTH = {"Authorization": "Bearer sk-test"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with fake_backend(tmp_path_factory, PREFIX) as b:
        cfg = make_config(b.url, b.model_dir, PREFIX, api_keys=["sk-test"])
        service = make_service(cfg, b.tok, b.model_dir, ready=lambda: True)
        port = free_loopback_port()
        server = uvicorn.Server(uvicorn.Config(build_api(service), host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        assert wait_until(lambda: server.started, 15), "uvicorn did not start"
        base = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0, timeout=30)
        yield SimpleNamespace(base=base, client=client, tok=b.tok, fake=b.fake, store=b.store, answer=b.answer)
        client.close()
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive()


@pytest.fixture(autouse=True)
def _reset(srv):
    srv.fake.reset()
    srv.fake.publish()
    yield
    srv.fake.reset()


def _text(srv, n):
    return srv.tok.decode(srv.answer[:n], skip_special_tokens=True)


def _last_incoming(srv) -> str:
    return srv.store.request_ids("incoming")[-1]


def _next_incoming(srv, seen: int) -> str:
    """The id of the first request submitted after ``seen`` entries, waiting for it to arrive (under load the
    ingress may submit it after the client has already given up)."""
    assert wait_until(lambda: srv.store.stream_length("incoming") > seen, 10)
    return srv.store.request_ids("incoming")[seen]


def _cancelled(srv, rid) -> bool:
    return bool(wait_until(lambda: rid in srv.store.request_ids("cancel"), 5))


def test_openai_client_completion(srv):
    resp = srv.client.completions.create(model="tiny-test", prompt="Once upon a time", max_tokens=12,
                                         temperature=0)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == _text(srv, 12)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens == len(srv.tok("Once upon a time")["input_ids"])


def test_openai_client_chat(srv):
    resp = srv.client.chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": "Hello?"}], max_tokens=7, temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == _text(srv, 7)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7


def test_openai_client_streaming_completion(srv):
    stream = srv.client.completions.create(model="tiny-test", prompt="Go", max_tokens=30, stream=True,
                                           stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == _text(srv, 30)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 30


def test_openai_client_streaming_chat_with_stop(srv):
    stream = srv.client.chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": "Tell a story"}], max_tokens=100, stream=True,
        stop=["quick"])
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ANSWER_TEXT[: ANSWER_TEXT.index("quick")]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert _cancelled(srv, _last_incoming(srv))


def test_openai_client_errors(srv):
    with pytest.raises(openai.NotFoundError) as exc:
        srv.client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        srv.client.completions.create(model="tiny-test", prompt="x", max_tokens=100_000)
    assert exc.value.param == "max_tokens"
    bad = openai.OpenAI(base_url=srv.base + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    bad.close()
    srv.fake.publish(backlog_seconds=3000)
    with pytest.raises(openai.RateLimitError) as exc:
        srv.client.completions.create(model="tiny-test", prompt="x", max_tokens=2)
    assert exc.value.response.headers["retry-after"] == "2400"
    assert [m.id for m in srv.client.models.list()] == ["tiny-test"]


def test_non_streaming_client_disconnect_cancels(srv):
    srv.fake.hold = True
    seen = srv.store.stream_length("incoming")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.base + "/v1/completions", json={"prompt": "bye", "max_tokens": 50},
                   headers={"Authorization": "Bearer sk-test"}, timeout=httpx.Timeout(5, read=0.5))
    rid = _next_incoming(srv, seen)
    assert _cancelled(srv, rid)
    assert wait_until(lambda: srv.store.record(rid).finish_reason == "cancelled")


def test_streaming_client_disconnect_cancels(srv):
    srv.fake.delay = 0.2  # 200 tokens in slices of 4 would take ~10 s
    t0 = time.monotonic()
    with httpx.stream("POST", srv.base + "/v1/completions",
                      json={"prompt": "bye", "max_tokens": 200, "stream": True},
                      headers={"Authorization": "Bearer sk-test"}, timeout=10) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text_completion"' in first
    rid = _last_incoming(srv)
    assert _cancelled(srv, rid)
    assert time.monotonic() - t0 < 5
    assert wait_until(lambda: srv.store.record(rid).finish_reason == "cancelled")
    assert len(srv.store.generated(rid)) < 200
    metrics = httpx.get(srv.base + "/metrics", headers=AUTH).text
    assert wait_until(lambda: 'slicefleet_ingress_finished_total{endpoint="completions",outcome="disconnected"}'
                      in httpx.get(srv.base + "/metrics", headers=AUTH).text), metrics
    assert "slicefleet_ingress_inflight 0.0" in httpx.get(srv.base + "/metrics", headers=AUTH).text
