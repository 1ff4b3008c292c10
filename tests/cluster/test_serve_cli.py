"""``slicefleet serve``'s flags and the dispatcher's shared options (``--version``, ``--log-level`` after the
command, every option's default in ``--help``); the served model name through a real ingress (no Ray)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from cluster import serve_cli
from cluster.cli import COMMANDS, DefaultsFormatter, build_parser, version
from cluster.config import load_config

PREFIX = "sv"


def _serve_args(argv):
    args = build_parser().parse_args(["serve", *argv])
    assert args._run is serve_cli.run
    return args


def test_flags_map_onto_the_config(monkeypatch):
    monkeypatch.delenv("SLICEFLEET_API_KEY", raising=False)
    args = _serve_args(["--host", "0.0.0.0", "--port", "9001", "--api-key", "k1", "--api-key", "k2",
                        "--served-model-name", "my-llama", "--dtype", "bfloat16", "--log-level", "debug",
                        "--mode", "ils", "--replicas", "3"])
    assert args.log_level == "DEBUG"
    cfg = load_config(None, serve_cli.overrides(args))
    assert (cfg.api.host, cfg.api.port, cfg.api.api_keys) == ("0.0.0.0", 9001, ["k1", "k2"])
    assert (cfg.model.name, cfg.model.dtype) == ("my-llama", "bfloat16")
    assert (cfg.scheduler.mode, cfg.replicas.num_replicas) == ("ils", 3)


def test_unset_flags_leave_the_config_alone(monkeypatch, tmp_path):
    monkeypatch.delenv("SLICEFLEET_API_KEY", raising=False)
    assert serve_cli.overrides(_serve_args([])) == {}
    cfg = load_config(None, serve_cli.overrides(_serve_args([])))
    assert cfg.api.host == "127.0.0.1" and cfg.api.api_keys == [] and cfg.model.name == "slicefleet-tiny-llama"
    # a config file's values stand unless a flag names them
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: from-yaml, dtype: float16}\napi: {host: 127.0.0.2, api_keys: [y]}\n")
    cfg = load_config(str(path), serve_cli.overrides(_serve_args(["--dtype", "float32"])))
    assert (cfg.model.name, cfg.model.dtype, cfg.api.host, cfg.api.api_keys) == ("from-yaml", "float32",
                                                                                  "127.0.0.2", ["y"])


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLICEFLEET_API_KEY", "from-env")
    assert serve_cli.overrides(_serve_args([]))["api.api_keys"] == ["from-env"]
    assert serve_cli.overrides(_serve_args(["--api-key", "cli"]))["api.api_keys"] == ["cli"]
    with pytest.raises(SystemExit):
        serve_cli.overrides(_serve_args(["--api-key", ""]))


def test_admin_keys_and_scheduling_extensions(monkeypatch):
    monkeypatch.delenv("SLICEFLEET_ADMIN_KEY", raising=False)
    o = serve_cli.overrides(_serve_args([]))
    assert "api.admin_keys" not in o and "api.scheduling_extensions" not in o  # the config decides
    o = serve_cli.overrides(_serve_args(["--admin-key", "a1", "--admin-key", "a2", "--scheduling-extensions"]))
    assert o["api.admin_keys"] == ["a1", "a2"] and o["api.scheduling_extensions"] is True
    monkeypatch.setenv("SLICEFLEET_ADMIN_KEY", "from-env")
    assert serve_cli.overrides(_serve_args([]))["api.admin_keys"] == ["from-env"]
    with pytest.raises(SystemExit):
        serve_cli.overrides(_serve_args(["--admin-key", ""]))


def test_bad_values_are_refused():
    for argv in (["--dtype", "int4"], ["--log-level", "chatty"], ["--port", "x"]):
        with pytest.raises(SystemExit):
            _serve_args(argv)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_binds_quietly(host):
    assert serve_cli.exposure_warning(host, has_keys=False) is None


def test_non_loopback_warns_and_says_whether_anyone_can_use_it():
    open_warning = serve_cli.exposure_warning("0.0.0.0", has_keys=False)
    assert "every interface" in open_warning and "WITHOUT AUTHENTICATION" in open_warning
    assert "--api-key" in open_warning
    keyed = serve_cli.exposure_warning("10.1.2.3", has_keys=True)
    assert "10.1.2.3" in keyed and "WITHOUT" not in keyed
    assert serve_cli.exposure_warning("my-host.example", has_keys=False) is not None  # unresolved: exposed


def test_client_url_never_points_at_a_wildcard():
    assert serve_cli.client_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert serve_cli.client_url("::", 8000) == "http://127.0.0.1:8000"
    assert serve_cli.client_url("::1", 8000) == "http://[::1]:8000"
    assert serve_cli.client_url("10.0.0.5", 80) == "http://10.0.0.5:80"


def test_log_level_before_or_after_the_command():
    p = build_parser()
    assert p.parse_args(["serve"]).log_level == "INFO"
    assert p.parse_args(["--log-level", "warning", "serve"]).log_level == "WARNING"
    assert p.parse_args(["--log-level", "warning", "bench", "--log-level", "error"]).log_level == "ERROR"
    for name in COMMANDS:  # every subcommand takes it
        assert p.parse_args([name, "--log-level", "debug"]).log_level == "DEBUG"


def test_every_option_of_every_command_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    fmt = DefaultsFormatter("slicefleet")
    missing = []
    for name, sub in [("slicefleet", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if "default" not in fmt._get_help_string(action).lower():
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []


@pytest.mark.parametrize("command", ["serve", "simulate", "bench"])
def test_help_explains_unset_defaults(command):
    """The commands users reach for first say what an unset option means rather than '(default: not set)'."""
    out = subprocess.run([sys.executable, "-m", "cluster.cli", command, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "not set" not in out.stdout and "(default: None)" not in out.stdout
    assert out.stdout.count("default") >= out.stdout.count("\n  --") - 1  # -h is the one without


def test_version():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"slicefleet {version()}"
    assert version()[0].isdigit()  # the installed distribution's version, not the fallback


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from tests.cluster.test_ingress_support import fake_backend

    with fake_backend(tmp_path_factory, PREFIX) as b:
        yield b


def test_served_model_name_is_the_id_the_api_answers_to(backend, monkeypatch):
    """--served-model-name reaches the ingress through model.name: /v1/models lists it, requests naming it are
    served, requests naming the default id are refused; --api-key guards both."""
    from cluster.http_app import build_api
    from tests.cluster.test_ingress_support import make_service

    monkeypatch.delenv("SLICEFLEET_API_KEY", raising=False)
    args = _serve_args(["--model", str(backend.model_dir), "--served-model-name", "fleet-llama",
                        "--api-key", "sk-1"])
    cfg = load_config(None, {**serve_cli.overrides(args), "redis.url": backend.url, "redis.key_prefix": PREFIX,
                             "scheduler.max_gen_len": 256, "scheduler.slice_len": 4})
    service = make_service(cfg, backend.tok, backend.model_dir, ready=lambda: True,
                           length_predictor=lambda text, ids: 8.0)
    auth = {"Authorization": "Bearer sk-1"}
    with TestClient(build_api(service)) as c:
        assert c.get("/v1/models").status_code == 401
        assert [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]] == ["fleet-llama"]
        ok = c.post("/v1/completions", headers=auth, json={"model": "fleet-llama", "prompt": "Hi", "max_tokens": 4,
                                                           "temperature": 0})
        assert ok.status_code == 200, ok.text
        assert ok.json()["model"] == "fleet-llama" and ok.json()["usage"]["completion_tokens"] == 4
        wrong = c.post("/v1/completions", headers=auth, json={"model": "slicefleet-tiny-llama", "prompt": "Hi",
                                                              "max_tokens": 4})
        assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"
