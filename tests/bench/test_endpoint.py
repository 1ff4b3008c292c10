"""``slicefleet bench --base-url``: a running OpenAI server driven the way ``vllm bench serve`` drives one.

The server is Slicefleet's real ingress behind uvicorn on 127.0.0.1 with the stand-in dispatcher of the
ingress tests (no Ray, no engine): what is checked here is the client side — model discovery, the API key,
the request bodies, the vLLM-named metrics and the result files — not serving speed."""

from __future__ import annotations

import argparse
import json
import threading
from contextlib import contextmanager

import pytest

uvicorn = pytest.importorskip("uvicorn")

from bench import cli  # noqa: E402
from bench.loadgen import SLO, RequestResult, format_vllm_result, vllm_metrics  # noqa: E402

PREFIX = "be"
KEY = "sk-bench"
"""An admin key: only admins may send ignore_eos to Slicefleet (api.admin_keys)."""
USER_KEY = "sk-user"


def parse(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


@contextmanager
def ingress(api: dict | None = None):
    """The real ingress on 127.0.0.1 with the stand-in dispatcher; ``api``: extra api settings. Yields
    (base URL, the fake dispatcher)."""
    from transformers import AutoTokenizer

    from cluster.config import SlicefleetConfig
    from cluster.http_app import build_api
    from cluster.redis_server import EmbeddedRedis, free_loopback_port
    from tests.cluster.test_ingress_support import ANSWER_TEXT, FakeDispatcher, make_service, wait_until
    from worker.make_model import ensure_default_model

    model_dir = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    redis_server = EmbeddedRedis().start()
    fake = FakeDispatcher(redis_server.url, PREFIX, tok(ANSWER_TEXT, add_special_tokens=False)["input_ids"],
                          tok.eos_token_id)
    fake.start()
    cfg = SlicefleetConfig.model_validate({
        "model": {"path": str(model_dir), "name": "bench-target"},
        "redis": {"url": redis_server.url, "key_prefix": PREFIX},
        "scheduler": {"max_gen_len": 64, "slice_len": 4},
        "api": {"api_keys": [USER_KEY], "admin_keys": [KEY], **(api or {})}})
    service = make_service(cfg, tok, model_dir, ready=lambda: True, length_predictor=lambda text, ids: 8.0)
    port = free_loopback_port()
    http = uvicorn.Server(uvicorn.Config(build_api(service), host="127.0.0.1", port=port, log_level="warning",
                                         lifespan="off"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: http.started, 15)
        yield f"http://127.0.0.1:{port}", fake
    finally:
        http.should_exit = True
        thread.join(10)
        fake.stop()
        redis_server.stop()


@pytest.fixture(scope="module")
def server():
    with ingress() as found:
        yield found


def test_base_url_run_prints_vllm_figures_and_saves_vllm_result(server, tmp_path, monkeypatch, capsys):
    url, fake = server
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    seen_before = len(fake.seen)
    args = parse(["--base-url", url + "/v1", "--num-prompts", "6", "--request-rate", "inf", "--max-gen-len", "16",
                  "--ignore-eos", "--goodput", "ttft:60000", "e2el:60000", "--metric-percentiles", "50,99",
                  "--percentile-metrics", "ttft,e2el", "--save-result", "--result-dir", str(tmp_path),
                  "--label", "ingress", "--disable-tqdm"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Successful requests:                     6" in out
    assert "P50 TTFT (ms):" in out and "P99 E2EL (ms):" in out and "Request goodput (req/s):" in out
    assert "TPOT" not in out  # only the metrics asked for

    (result_file,) = tmp_path.glob("ingress-infqps-bench-target-*.json")
    result = json.loads(result_file.read_text())
    _, requests, _ = cli.workload(parse(["--num-prompts", "6", "--max-gen-len", "16"]))
    expected = [r.output_len for r in requests]
    assert result["model_id"] == "bench-target"  # discovered at /v1/models with the key
    assert result["completed"] == 6 and result["failed"] == 0 and result["num_prompts"] == 6
    assert result["total_output_tokens"] == sum(expected)
    assert result["total_input_tokens"] == sum(r.prompt_len for r in requests)
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["output_throughput"] == pytest.approx(sum(expected) / result["duration"])
    for k in ("mean_ttft_ms", "median_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "p99_e2el_ms", "total_token_throughput"):
        assert result[k] > 0
    # the bodies: the trace length as max_tokens, ignore_eos, token-id prompts
    records = [fake.store.record(rid) for rid in fake.seen[seen_before:]]
    assert sorted(r.max_tokens for r in records) == sorted(expected)
    assert all(r.ignore_eos and r.target_len is None for r in records)
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["runs"][0]["mode"] == "endpoint" and bench["args"]["served_model_name"] == "bench-target"
    md = (tmp_path / "bench.md").read_text()
    assert "| ingress | inf | 6/0 |" in md and "bench-target served at" in bench["args"]["model_label"]


def test_ignore_eos_refused_for_a_plain_key_says_what_to_do(server, tmp_path, monkeypatch, capsys):
    url, _ = server
    monkeypatch.setenv("OPENAI_API_KEY", USER_KEY)
    args = parse(["--base-url", url, "--num-prompts", "2", "--max-gen-len", "8", "--ignore-eos", "--disable-tqdm"])
    assert cli.run(args) == 1  # nothing completed
    out = capsys.readouterr().out
    assert "Successful requests:                     0" in out and "extension_not_allowed" in out
    assert "admin keys" in out and "drop --ignore-eos" in out
    # without ignore_eos a plain key is enough
    args = parse(["--base-url", url, "--num-prompts", "2", "--max-gen-len", "8", "--disable-tqdm"])
    assert cli.run(args) == 0


def test_base_url_needs_the_key_the_server_wants(server, monkeypatch):
    url, _ = server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):
        cli.run(parse(["--base-url", url, "--num-prompts", "2", "--disable-tqdm"]))


def test_base_url_refuses_what_does_not_apply_and_bad_urls():
    with pytest.raises(SystemExit, match="does not apply|do not apply"):
        cli.run(parse(["--base-url", "http://127.0.0.1:9", "--vllm"]))
    with pytest.raises(SystemExit, match="http"):
        cli.endpoint_urls("127.0.0.1:8000")
    assert cli.endpoint_urls("http://a:1/v1, http://b:2/") == ["http://a:1", "http://b:2"]


# ---- flag names of vllm bench serve, and the old ones -----------------------------------------------------
def test_vllm_flag_names_and_old_aliases_parse_alike():
    new = parse(["--num-prompts", "7", "--request-rate", "inf,2.5", "--result-dir", "x", "--disable-tqdm"])
    old = parse(["--requests", "7", "--rates", "inf,2.5", "--out", "x", "--no-progress"])
    for key in ("requests", "rates", "out", "no_progress"):
        assert getattr(new, key) == getattr(old, key)
    assert new.rates == [None, 2.5] and new.percentile_metrics == ["ttft", "tpot", "itl", "e2el"]
    assert parse(["--metric-percentiles", "50,90,99.9"]).metric_percentiles == [50, 90, 99.9]
    for bad in (["--goodput", "ttfb:10"], ["--goodput", "ttft"], ["--goodput", "ttft:-1"], ["--goodput", "ttft:x"],
                ["--metric-percentiles", "0"], ["--metric-percentiles", "100"], ["--percentile-metrics", "ttft,foo"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_goodput_in_ms_default_and_old_seconds_flags():
    assert cli.resolve_slo(parse([])) == SLO(ttft=30.0, tpot=0.5)
    a = parse(["--goodput", "ttft:250", "tpot:20", "e2el:9000"])
    assert cli.resolve_slo(a) == SLO(ttft=0.25, tpot=0.02, e2el=9.0)
    assert (a.slo_ttft, a.slo_tpot, a.slo_e2el) == (0.25, 0.02, 9.0)  # what bench.json records
    assert cli.resolve_slo(parse(["--goodput", "e2el:5000"])) == SLO(e2el=5.0)  # only the SLOs given
    assert cli.resolve_slo(parse(["--slo-ttft", "2"])) == SLO(ttft=2.0, tpot=0.5)
    a = parse(["--goodput", "tpot:100"])
    assert cli.resolve_slo(a) == cli.resolve_slo(a)  # idempotent: a second resolve reads the written seconds


def _res(i, send, ttft, latency, tokens, itl=(), prompt=10):
    return RequestResult(f"r{i}", prompt, tokens, send_time=send, success=True, ttft=ttft, latency=latency,
                         output_tokens=tokens, itl=list(itl))


def test_vllm_metrics_by_hand():
    rs = [_res(0, 0.0, 1.0, 5.0, 5, [1.0] * 4), _res(1, 1.0, 2.0, 9.0, 8, [1.0] * 7, prompt=30)]
    failed = RequestResult("r2", 10, 4, send_time=0.5, error="HTTP 500")
    m = vllm_metrics(rs + [failed], duration=12.0, percentiles=(50, 99), slo=SLO(ttft=1.5))
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 40, 13)
    assert m["duration"] == 12.0  # the benchmark's wall time, as vLLM's benchmark_duration
    assert m["request_throughput"] == pytest.approx(2 / 12) and m["output_throughput"] == pytest.approx(13 / 12)
    assert m["total_token_throughput"] == pytest.approx(53 / 12)
    assert m["request_goodput"] == pytest.approx(1 / 12) and m["goodput_slo_ms"] == {"ttft": 1500.0}
    assert m["mean_ttft_ms"] == pytest.approx(1500) and m["median_ttft_ms"] == pytest.approx(1500)
    assert m["std_ttft_ms"] == pytest.approx(500)
    assert m["p99_ttft_ms"] == pytest.approx(1000 + 0.99 * 1000)
    assert m["mean_tpot_ms"] == pytest.approx(1000) and m["mean_itl_ms"] == pytest.approx(1000)
    assert m["p50_e2el_ms"] == pytest.approx(7000)
    assert vllm_metrics(rs, 12.0)["request_goodput"] is None  # no SLOs: no goodput, as vLLM
    text = format_vllm_result(m, ("ttft", "e2el"), request_rate=2.0, max_concurrency=4)
    lines = text.splitlines()
    assert lines[0] == "=" * 12 + " Serving Benchmark Result " + "=" * 12
    assert "Request rate configured (RPS):           2.00      " in lines
    assert "Maximum request concurrency:             4         " in lines
    assert "Total token throughput (tok/s):          4.42      " in lines
    assert "P99 TTFT (ms):                           1990.00   " in lines and "Mean E2EL (ms):" in text
    assert "ITL" not in text


def test_openai_body_is_vllm_bench_serves():
    from bench.loadgen import BenchRequest, request_body

    req = BenchRequest("r", [1, 2, 3], 3, 40)
    body = request_body(req, "openai", "m", 1024)
    assert body["max_tokens"] == 40 and "ignore_eos" not in body and "target_len" not in body
    assert body["prompt"] == [1, 2, 3] and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert request_body(req, "openai", "m", 1024, ignore_eos=True)["ignore_eos"] is True


def test_a_server_at_its_in_flight_limit_is_waited_out_and_every_request_completes(tmp_path, monkeypatch, capsys):
    """All requests at once against api.max_inflight 2: the ingress answers 429 with Retry-After to the rest,
    the client waits and sends them again, and the run completes every request and counts the retries."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with ingress({"max_inflight": 2}) as (url, fake):
        fake.delay = 0.2  # each answer takes a while, so requests overlap at the limit
        args = parse(["--base-url", url, "--num-prompts", "8", "--request-rate", "inf", "--max-gen-len", "16",
                      "--save-result", "--result-dir", str(tmp_path), "--label", "busy", "--disable-tqdm"])
        assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "Successful requests:                     8" in out and "Failed requests:                         0" in out
    assert "Retries after 429:" in out
    (result_file,) = tmp_path.glob("busy-infqps-*.json")
    result = json.loads(result_file.read_text())
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["retried_requests"] >= 6 and result["retries"] >= result["retried_requests"]
    per_request = json.loads((tmp_path / "bench.json").read_text())["runs"][0]["per_request"]
    assert sum(r["retries"] for r in per_request) == result["retries"]
