"""``slicefleet serve``: start everything on this machine and serve the OpenAI API until Ctrl-C.

The flags mirror ``vllm serve`` where they mean the same thing (``--host``, ``--port``, ``--api-key``,
``--served-model-name``, ``--dtype``); each one overrides a field of the config, so a YAML file and the command
line never disagree about what runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import threading

log = logging.getLogger("slicefleet.serve")

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML config (default: the embedded default, same as configs/local.yaml: local Ray on "
                        "loopback, a private Redis, the small default model, 2 replicas)")
    p.add_argument("--mode", choices=["continuous_slices", "scls", "sls", "ils"], default=None,
                   help="override scheduler.mode (default: the config's, continuous_slices in the embedded one)")
    p.add_argument("--replicas", type=int, default=None,
                   help="override replicas.num_replicas (default: the config's, 2 in the embedded one)")
    p.add_argument("--host", default=None,
                   help="override api.host, the address the HTTP API binds, as vllm serve's --host (default: the "
                        "config's, 127.0.0.1 in the embedded one). Anything but loopback exposes the API to the "
                        "network: set --api-key too. Ray's own sockets stay on 127.0.0.1 either way")
    p.add_argument("--port", type=int, default=None, help="override api.port (default: the config's, 8000 in the embedded one)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="override api.api_keys: clients must send 'Authorization: Bearer KEY'; repeat for several "
                        "keys (default: $SLICEFLEET_API_KEY if set, else the config's api.api_keys; none: no "
                        "auth). A key on the command line shows in the process list: prefer the variable or the "
                        "config's ${VAR}")
    p.add_argument("--admin-key", action="append", default=None, metavar="KEY",
                   help="override api.admin_keys: keys that may also send the scheduling extensions priority, "
                        "target_len and ignore_eos; repeat for several (default: $SLICEFLEET_ADMIN_KEY if set, else "
                        "the config's api.admin_keys)")
    p.add_argument("--scheduling-extensions", action="store_true", default=None,
                   help="let every client send priority, target_len and ignore_eos, e.g. for 'slicefleet bench "
                        "--base-url --ignore-eos' (default: off, admin keys only)")
    p.add_argument("--model", default=None,
                   help="override model.path, a local Hugging Face model directory (default: the config's, the "
                        "small default model built by 'slicefleet make-model')")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="override model.name, the model id /v1/models lists and requests must name (default: the "
                        "config's, slicefleet-tiny-llama in the embedded one)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="override model.dtype, weights and KV cache (default: the config's, float32)")


def api_keys(args, flag: str = "api_key", env: str = "SLICEFLEET_API_KEY") -> list[str] | None:
    """The keys from the command line, else from ``$env``, else None (the config decides)."""
    given = getattr(args, flag)
    if given:
        keys = [k for k in given if k]
        if len(keys) != len(given):
            raise SystemExit(f"--{flag.replace('_', '-')} must not be empty")
        return keys
    value = os.environ.get(env)
    return [value] if value else None


def overrides(args) -> dict:
    table = {"scheduler.mode": args.mode, "replicas.num_replicas": args.replicas, "api.host": args.host,
             "api.port": args.port, "api.api_keys": api_keys(args),
             "api.admin_keys": api_keys(args, "admin_key", "SLICEFLEET_ADMIN_KEY"),
             "api.scheduling_extensions": args.scheduling_extensions, "model.path": args.model,
             "model.name": args.served_model_name, "model.dtype": args.dtype}
    return {k: v for k, v in table.items() if v is not None}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only the resolver knows, so treat it as exposed
        return False


def exposure_warning(host: str, has_keys: bool) -> str | None:
    """What to tell the user when the API is reachable beyond this machine (None on loopback).

    It binds anyway, as vLLM does: a user who types --host 0.0.0.0 wants a reachable server, and a fleet
    behind a load balancer needs one."""
    if is_loopback(host):
        return None
    where = "every interface" if host in ("0.0.0.0", "::") else host
    if has_keys:
        return f"the API listens on {where}: reachable from the network; requests need one of the API keys"
    return (f"the API listens on {where} WITHOUT AUTHENTICATION: anyone who can reach this machine can use it. "
            "Set --api-key (or api.api_keys), or serve on 127.0.0.1")


def client_url(host: str, port: int) -> str:
    """A URL a client on this machine can use (a wildcard bind is not an address to connect to)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def run(args) -> int:
    from cluster.config import load_config
    from cluster.local import LocalCluster

    cfg = load_config(args.config, overrides(args))
    warning = exposure_warning(cfg.api.host, bool(cfg.api.api_keys))
    if warning:
        log.warning("%s", warning)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cluster = LocalCluster(cfg)
    try:
        cluster.start()
        url = client_url(cfg.api.host, cfg.api.port)
        auth = " -H 'Authorization: Bearer $KEY'" if cfg.api.api_keys else ""
        print(f"\nSlicefleet is serving {cfg.model.name} at {url} ({cfg.scheduler.mode}, "
              f"{cfg.replicas.num_replicas} replicas, {cfg.model.dtype}). Try:\n\n"
              f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} \\\n"
              f"    -d '{{\"model\": \"{cfg.model.name}\", \"prompt\": \"Hello, my name is\", \"max_tokens\": 32}}'\n\n"
              f"Metrics: {url}/metrics   Health: {url}/health   Ctrl-C stops everything.\n", flush=True)
        if warning:
            print(f"WARNING: {warning}\n", flush=True)
        stop.wait()
    finally:
        log.info("stopping")
        cluster.stop()
    return 0
