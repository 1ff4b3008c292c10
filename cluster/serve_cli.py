"""``slicefleet serve``: start everything on this machine and serve the OpenAI API until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

log = logging.getLogger("slicefleet.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML config (default: the embedded default, same as configs/local.yaml: local Ray on "
                        "loopback, a private Redis, the small default model, 2 replicas)")
    p.add_argument("--mode", choices=["continuous_slices", "scls", "sls", "ils"], default=None,
                   help="override scheduler.mode (default: the config's)")
    p.add_argument("--replicas", type=int, default=None, help="override replicas.num_replicas")
    p.add_argument("--port", type=int, default=None, help="override api.port (default 8000)")
    p.add_argument("--model", default=None, help="override model.path (a local Hugging Face model directory)")


def overrides(args) -> dict:
    table = {"scheduler.mode": args.mode, "replicas.num_replicas": args.replicas, "api.port": args.port,
             "model.path": args.model}
    return {k: v for k, v in table.items() if v is not None}


def run(args) -> int:
    from cluster.config import load_config
    from cluster.local import LocalCluster

    cfg = load_config(args.config, overrides(args))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cluster = LocalCluster(cfg)
    try:
        cluster.start()
        url = cluster.url
        print(f"\nSlicefleet is serving {cfg.model.name} at {url} ({cfg.scheduler.mode}, "
              f"{cfg.replicas.num_replicas} replicas). Try:\n\n"
              f"  curl {url}/v1/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{cfg.model.name}\", \"prompt\": \"Hello, my name is\", \"max_tokens\": 32}}'\n\n"
              f"Metrics: {url}/metrics   Health: {url}/health   Ctrl-C stops everything.\n", flush=True)
        stop.wait()
    finally:
        log.info("stopping")
        cluster.stop()
    return 0
