"""The OpenAPI schema the ingress publishes, fuzzed with schemathesis: every generated request (valid by the
schema, and deliberately invalid) gets an answer below 500, and every error is an OpenAI-shaped body."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from cluster.http_app import build_api  # noqa: E402
from tests.cluster.test_ingress_support import fake_backend, make_config, make_service  # noqa: E402

PREFIX = "fz"
FUZZED = [("/v1/completions", "POST"), ("/v1/chat/completions", "POST"), ("/v1/models", "GET"),
          ("/v1/models/{model_id}", "GET"), ("/version", "GET"), ("/health", "GET")]
SEEN: dict[str, list[int]] = {}


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    with fake_backend(tmp_path_factory, PREFIX) as b:
        cfg = make_config(b.url, b.model_dir, PREFIX, scheduling_extensions=True)
        app = build_api(make_service(cfg, b.tok, b.model_dir, ready=lambda: True))
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    """Prints the status codes each fuzzed operation got (run with -s): the figures the reliability notes quote."""
    yield
    from collections import Counter

    for name, statuses in SEEN.items():
        print(f"{name}: {len(statuses)} cases, statuses {dict(sorted(Counter(statuses).items()))}")


def test_schema_declares_the_request_bodies(schema):
    raw = schema.raw_schema
    for path in ("/v1/completions", "/v1/chat/completions"):
        ref = raw["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        model = raw["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert {"max_tokens", "temperature", "stream", "min_tokens"} <= set(model["properties"])
    assert "messages" in raw["components"]["schemas"]["ChatRequest"]["required"]


CASES = ([(path, method, GenerationMode.POSITIVE) for path, method in FUZZED]
         + [(path, method, GenerationMode.NEGATIVE) for path, method in FUZZED if method == "POST"])


@pytest.mark.parametrize("path,method,mode", CASES, ids=[f"{m} {p} {g.value}" for p, m, g in CASES])
def test_fuzzed_requests_never_get_a_server_error(schema, path, method, mode):
    operation = schema[path][method]
    statuses = SEEN.setdefault(f"{method} {path} {mode.value}", [])

    @settings(max_examples=100 if method == "POST" else 20, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call()
        statuses.append(response.status_code)
        assert response.status_code < 500 or (path == "/health" and response.status_code == 503), response.text
        if response.status_code >= 400 and path != "/health":  # /health's 503 is its status page
            err = response.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]

    run()
    assert statuses  # the operation really was exercised
    if method == "POST" and mode is GenerationMode.POSITIVE:
        assert 200 in statuses  # valid bodies do get served, not only refused
