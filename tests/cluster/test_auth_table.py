"""Who may call what: every route x every kind of key, the scheduling extensions x key, and the /metrics
settings, each as a table of the statuses the ingress answers (FastAPI's TestClient, a real Redis, the tiny
model's tokenizer, the ingress tests' fake dispatcher).

Each table is asserted cell by cell against the expected one and written as Markdown, printed (run with -s)
and, when ``$SLICEFLEET_AUTH_TABLE`` names a file, written there: docs/reliability.md quotes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cluster.http_app import build_api
from cluster.messages import ReplicaInfo
from tests.cluster.test_ingress_support import fake_backend, make_config, make_service

PREFIX = "au"
MODEL = "tiny-test"  # make_config's model name
USER, ADMIN, SCRAPER = "sk-user", "sk-admin", "sk-prometheus"
KEYS = {"no key": None, "wrong key": "sk-wrong", "API key": USER, "admin key": ADMIN, "metrics key": SCRAPER}
BODIES = {"/v1/completions": {"prompt": "x", "max_tokens": 2},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}}
ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
          ("GET", f"/v1/models/{MODEL}"), ("GET", "/version"), ("GET", "/openapi.json"), ("GET", "/metrics"),
          ("GET", "/health")]


def _expected(path: str, key: str) -> int:
    if path == "/health":
        return 200  # probes need no key (the fake replicas below are alive)
    if key in ("API key", "admin key") or (key == "metrics key" and path == "/metrics"):
        return 200
    return 401


EXTENSIONS = {"priority": {"priority": 5}, "target_len": {"target_len": 2}, "ignore_eos": {"ignore_eos": True}}


def markdown_table(title: str, rows: dict[str, dict[str, object]]) -> str:
    columns = list(next(iter(rows.values())))
    lines = [f"| {title} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |" for name, row in rows.items()]
    return "\n".join(lines)


TABLES: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    text = "\n\n".join(TABLES) + "\n"
    print("\n" + text)
    if os.environ.get("SLICEFLEET_AUTH_TABLE"):
        Path(os.environ["SLICEFLEET_AUTH_TABLE"]).write_text(text)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with fake_backend(tmp_path_factory, PREFIX) as backend:
        for i in range(2):  # make_config expects two replicas: /health answers 200 only with both alive
            backend.fake.worker.register_replica(ReplicaInfo(f"w{i}", i, "hf"), ttl=600)
        yield backend


def _client(env, **api) -> TestClient:
    cfg = make_config(env.url, env.model_dir, PREFIX, **api)
    return TestClient(build_api(make_service(cfg, env.tok, env.model_dir, ready=lambda: True)))


def _call(client: TestClient, method: str, path: str, key: str | None, body: dict | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.request(method, path, json=body if body is not None else BODIES.get(path), headers=headers)


def test_every_route_by_key(env):
    with _client(env, api_keys=[USER], admin_keys=[ADMIN], metrics_keys=[SCRAPER]) as c:
        responses = {f"{m} {p}": {k: _call(c, m, p, key) for k, key in KEYS.items()} for m, p in ROUTES}
    got = {route: {k: r.status_code for k, r in row.items()} for route, row in responses.items()}
    refusals = [r.json()["error"]["code"] for row in responses.values() for r in row.values() if r.status_code == 401]
    assert set(refusals) == {"invalid_api_key"}
    TABLES.append("Route by key (api.api_keys, api.admin_keys and api.metrics_keys set):\n\n"
                  + markdown_table("route", got))
    want = {f"{m} {p}": {k: _expected(p, k) for k in KEYS} for m, p in ROUTES}
    assert got == want


def test_a_key_must_come_as_a_bearer_token(env):
    with _client(env, api_keys=[USER]) as c:
        for header in (f"Basic {USER}", USER, "Bearer", "Bearer ", f"Bearer {USER}x", f"Bearer {USER[:-1]}"):
            r = c.get("/v1/models", headers={"Authorization": header})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", header
        assert c.get("/v1/models", headers={"Authorization": f"bearer  {USER} "}).status_code == 200


def test_scheduling_extensions_need_an_admin_key_unless_enabled(env):
    got: dict[str, dict[str, object]] = {}
    with _client(env, api_keys=[USER], admin_keys=[ADMIN]) as c:
        for name, extra in EXTENSIONS.items():
            body = {**BODIES["/v1/completions"], **extra}
            row = got.setdefault(name, {})
            for who, key in (("API key", USER), ("admin key", ADMIN)):
                r = _call(c, "POST", "/v1/completions", key, body)
                row[who] = r.status_code
                if r.status_code == 403:
                    err = r.json()["error"]
                    assert (err["param"], err["code"]) == (name, "extension_not_allowed")
    with _client(env, api_keys=[USER], admin_keys=[ADMIN], scheduling_extensions=True) as c:
        for name, extra in EXTENSIONS.items():
            got[name]["API key, scheduling_extensions: true"] = _call(
                c, "POST", "/v1/completions", USER, {**BODIES["/v1/completions"], **extra}).status_code
    TABLES.append("Scheduling extensions on POST /v1/completions:\n\n" + markdown_table("field", got))
    assert got == {name: {"API key": 403, "admin key": 200, "API key, scheduling_extensions: true": 200}
                   for name in EXTENSIONS}


def test_metrics_settings(env):
    got = {}
    settings = {"api_keys only": {"api_keys": [USER]},
                "+ metrics_keys": {"api_keys": [USER], "metrics_keys": [SCRAPER]},
                "+ metrics_public: true": {"api_keys": [USER], "metrics_public": True},
                "no keys at all": {}}
    for name, api in settings.items():
        with _client(env, **api) as c:
            got[name] = {f"/metrics, {k}": _call(c, "GET", "/metrics", key).status_code
                         for k, key in (("no key", None), ("API key", USER), ("metrics key", SCRAPER))}
            got[name]["/version, metrics key"] = _call(c, "GET", "/version", SCRAPER).status_code
    TABLES.append("GET /metrics by setting:\n\n" + markdown_table("api settings", got))
    assert got == {
        "api_keys only": {"/metrics, no key": 401, "/metrics, API key": 200, "/metrics, metrics key": 401,
                          "/version, metrics key": 401},
        "+ metrics_keys": {"/metrics, no key": 401, "/metrics, API key": 200, "/metrics, metrics key": 200,
                           "/version, metrics key": 401},
        "+ metrics_public: true": {"/metrics, no key": 200, "/metrics, API key": 200,
                                   "/metrics, metrics key": 200, "/version, metrics key": 401},
        "no keys at all": {"/metrics, no key": 200, "/metrics, API key": 200, "/metrics, metrics key": 200,
                           "/version, metrics key": 200},
    }
