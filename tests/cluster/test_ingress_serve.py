"""The ``Ingress`` Ray Serve deployment itself: constructor contract, late-bound FastAPI app, readiness via
the dispatcher handle's ``ready`` method, streaming through Serve's proxy, and a disconnect at the proxy
cancelling the request. The dispatcher is a stub deployment plus the ingress tests' fake dispatcher thread."""

from __future__ import annotations

import time

import httpx
import pytest

from cluster.redis_server import EmbeddedRedis, free_loopback_port
from cluster.messages import ReplicaInfo
from tests.cluster.test_ingress_support import (
    ANSWER_TEXT,
    FakeDispatcher,
    ensure_tiny_model,
    make_config,
    parse_sse,
    wait_until,
)

pytestmark = pytest.mark.slow

KEY = "sk-serve-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve
    from transformers import AutoTokenizer

    from cluster.ingress import Ingress

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process (another test's cluster); not sharing it")
    model_dir = ensure_tiny_model(tmp_path_factory)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    redis_server = EmbeddedRedis().start()
    answer = tok(ANSWER_TEXT, add_special_tokens=False)["input_ids"]
    fake = FakeDispatcher(redis_server.url, "sv", answer, tok.eos_token_id)
    fake.start()
    cfg = make_config(redis_server.url, model_dir, "sv", api_keys=[KEY])
    port = free_loopback_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        @serve.deployment(ray_actor_options={"num_cpus": 0.05})
        class StubDispatcher:
            def __init__(self):
                self._ready = False

            def set_ready(self, value: bool) -> None:
                self._ready = value

            def ready(self) -> bool:
                return self._ready

        app = Ingress.options(ray_actor_options={"num_cpus": 0.1}).bind(cfg.model_dump(), StubDispatcher.bind(),
                                                                         None)
        handle = serve.run(app, name="ingress-test", route_prefix="/")
        dispatcher = serve.get_deployment_handle("StubDispatcher", app_name="ingress-test")
        yield {"base": f"http://127.0.0.1:{port}", "fake": fake, "tok": tok, "answer": answer,
               "dispatcher": dispatcher, "handle": handle}
    finally:
        serve.shutdown()
        ray.shutdown()
        fake.stop()
        redis_server.stop()


def test_health_follows_the_dispatcher_handle(served):
    base, worker = served["base"], served["fake"].worker
    r = httpx.get(base + "/health", timeout=10)  # probes need no key
    assert r.status_code == 503 and r.json()["dispatcher_ready"] is False
    served["dispatcher"].set_ready.remote(True).result()
    # Replicas of another Ray cluster on the same Redis (an upgrade's old cluster) do not make it ready...
    for i in range(2):
        worker.register_replica(ReplicaInfo(f"old{i}", 10 + i, "hf", ray_session="session_of_another_cluster"),
                                ttl=60)
    r = httpx.get(base + "/health", timeout=10)
    assert r.status_code == 503 and r.json()["replicas_alive_other_clusters"] == 2, r.text
    # ...its own do: the Serve ingress knows the Ray session it runs in, which is this process's.
    from cluster.ray_session import current_ray_session

    for i in range(2):
        worker.register_replica(ReplicaInfo(f"w{i}", i, "hf", ray_session=current_ray_session()), ttl=60)
    r = httpx.get(base + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["replicas_alive"] == 2, r.text


def test_completion_and_stream_through_serve(served):
    base, tok, answer = served["base"], served["tok"], served["answer"]
    r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 10}, timeout=30, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tok.decode(answer[:10], skip_special_tokens=True)
    r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 12, "stream": True}, timeout=30,
                   headers=AUTH)
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1])
    assert content == tok.decode(answer[:12], skip_special_tokens=True)
    r = httpx.post(base + "/v1/completions", content=b"{oops", timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_disconnect_at_the_proxy_cancels(served):
    fake = served["fake"]
    fake.delay = 0.3
    t0 = time.monotonic()
    with httpx.stream("POST", served["base"] + "/v1/completions",
                      json={"prompt": "bye", "max_tokens": 200, "stream": True}, timeout=10, headers=AUTH) as s:
        next(line for line in s.iter_lines() if line.startswith("data: "))
    rid = fake.store.request_ids("incoming")[-1]
    assert wait_until(lambda: rid in fake.cancels, 10)
    assert time.monotonic() - t0 < 10
    fake.delay = 0.0


def test_api_key_is_enforced_through_the_serve_proxy(served):
    base = served["base"]
    routes = [("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}), ("GET", "/v1/models", None),
              ("GET", "/version", None), ("GET", "/metrics", None), ("GET", "/openapi.json", None)]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, base + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        r = httpx.request(method, base + path, json=body, headers=AUTH, timeout=30)
        assert r.status_code == 200, (path, r.text)
