"""No prompt text and no secret in any process's logs at the default level.

A real local cluster (Ray Serve ingress, dispatcher and worker replica, the private embedded Redis with its random
password, the real default model) with an API key serves a completion, a streamed chat, a request refused for a
bad parameter and one refused for a wrong key, all carrying a distinctive prompt. Then every log file of the Ray
session (Serve's replica, proxy and controller logs, every worker process's stdout and stderr, Ray's own), the
embedded Redis's log, and what the driver logged and printed are searched for the prompt, the keys and the
password.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _log_files(session_dir: Path, redis_dir: Path) -> list[Path]:
    ray_logs = [p for p in (session_dir / "logs").rglob("*") if p.is_file()]
    return ray_logs + sorted(redis_dir.rglob("*.log"))


def test_no_prompt_api_key_or_redis_password_in_any_log(tmp_path, caplog, capfd):
    import ray

    from cluster.config import load_config
    from cluster.local import LocalCluster
    from cluster.redis_server import free_loopback_port

    marker = secrets.token_hex(8)
    prompt = f"Tell me about the marmot {marker} of the high pass"
    api_key, wrong_key = f"sk-hygiene-{secrets.token_hex(12)}", f"sk-wrong-{secrets.token_hex(12)}"
    caplog.set_level(logging.INFO)  # the CLI's default (--log-level INFO); Serve's replicas log at INFO too
    cfg = load_config(None, {"api.port": free_loopback_port(), "api.api_keys": [api_key],
                             "replicas.num_replicas": 1, "scheduler.slice_len": 8, "scheduler.max_gen_len": 32})
    cluster = LocalCluster(cfg, redis_dir=tmp_path / "redis")
    # Serve takes a client's X-Request-Id as its request id and writes it on every access line.
    request_ids = [f"log-hygiene-{secrets.token_hex(4)}-{n}" for n in range(4)]
    try:
        cluster.start(timeout=600)
        password = cluster.redis.password
        session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
        def headers(n: int, key: str = api_key) -> dict:
            return {"Authorization": f"Bearer {key}", "X-Request-Id": request_ids[n]}

        with httpx.Client(base_url=cluster.url, timeout=300) as client:
            done = client.post("/v1/completions", headers=headers(0),
                               json={"model": cfg.model.name, "prompt": prompt, "max_tokens": 12})
            assert done.status_code == 200, done.text
            with client.stream("POST", "/v1/chat/completions", headers=headers(1),
                               json={"model": cfg.model.name, "stream": True, "max_tokens": 12,
                                     "messages": [{"role": "user", "content": prompt}]}) as chat:
                assert chat.status_code == 200
                chunks = [json.loads(line[6:]) for line in chat.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
                assert chunks and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            bad = client.post("/v1/completions", headers=headers(2),
                              json={"model": cfg.model.name, "prompt": prompt, "max_tokens": 12, "temperature": -3})
            assert bad.status_code == 400, bad.text
            refused = client.post("/v1/completions", headers=headers(3, wrong_key),
                                  json={"model": cfg.model.name, "prompt": prompt, "max_tokens": 12})
            assert refused.status_code == 401, refused.text
    finally:
        cluster.stop()  # processes exit and flush their logs before they are read

    files = _log_files(session_dir, tmp_path / "redis")
    texts = {str(p): p.read_bytes().decode("utf-8", errors="replace") for p in files}
    texts["driver log records"] = caplog.text
    out, err = capfd.readouterr()
    texts["driver stdout/stderr"] = out + err
    everything = "\n".join(texts.values())
    # These are the logs that served the requests: Serve's access lines name their request ids.
    assert all(rid in everything for rid in request_ids), "the requests are in no log: wrong files searched?"
    assert any("serve" in name and "Ingress" in name for name in texts), sorted(texts)
    assert any(name.endswith("valkey.log") for name in texts), "the embedded Redis's log was not found"

    secrets_ = {"prompt text": marker, "API key": api_key, "refused API key": wrong_key, "Redis password": password}
    leaks = [f"{what} in {name}" for what, secret in secrets_.items() for name, text in texts.items() if secret in text]
    assert not leaks, leaks
