"""``slicefleet bench``: a running OpenAI server measured as ``vllm bench serve`` measures one, or SCLS against
SLS and ILS (and vLLM) on clusters it starts, same sample, one table.

    slicefleet bench --base-url http://127.0.0.1:8000 --num-prompts 100 --request-rate 4 --ignore-eos \
        --goodput ttft:2000 tpot:100 --save-result --result-dir runs/bench/endpoint

With ``--base-url`` nothing is started: the ShareGPT sample (token-id prompts, ``max_tokens`` = the trace
length) goes to that server and vLLM's result block is printed per rate, with vLLM's keys in the saved JSON.
Without it, every mode runs back to back on the same ShareGPT sample, the same arrival offsets and the same cluster
configuration (only ``scheduler.mode`` / ``scheduler.placement`` change); a fresh LocalCluster per mode.
The simulator, calibrated with the packaged latency profile, replays the same trace beside each live run.

    slicefleet bench --modes scls,sls,ils --replicas 2 --requests 100 --rates inf,0.5 --out runs/bench/main
    slicefleet bench --modes scls --placements maxmin,round_robin --requests 100 --rates inf
    slicefleet bench --plots-only runs/bench/main/bench.json     # redraw the plots and the table

Writes ``bench.json`` (everything, per run: vLLM-style serving metrics, the papers' metrics, the simulated
figures and the error), ``bench.md`` (the comparison table) and PNG plots under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger("slicefleet.bench")

MODES = ("continuous_slices", "scls", "sls", "ils")
CONTINUOUS = ("continuous_slices", "ils")
"""Modes whose replicas run one continuous batch (the only ones a vLLM engine can serve)."""
ENGINES = ("hf", "vllm")
GOODPUT_KEYS = ("ttft", "tpot", "e2el")
DEFAULT_GOODPUT_MS = {"ttft": 30_000.0, "tpot": 500.0}
NO_LENGTH_MODEL = "/nonexistent/slicefleet-bench-no-length-model"
"""predictor.length_model for ``--length-predictor none``: a path that does not exist, so the ingress runs
without a length predictor (predicted length = the budget) whatever artefact is packaged."""


def _rates(text: str) -> list[float | None]:
    out: list[float | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("inf", "all", "none"):
            out.append(None)
        else:
            v = float(part)
            if v <= 0:
                raise argparse.ArgumentTypeError(f"rate must be > 0 or 'inf', got {part}")
            out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("need at least one rate")
    return out


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return items
    return parse


def _goodput_item(text: str) -> tuple[str, float]:
    key, sep, value = text.partition(":")
    key = key.strip().lower()
    if not sep or key not in GOODPUT_KEYS:
        raise argparse.ArgumentTypeError(f"goodput SLOs are KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}, "
                                         f"got {text!r}")
    try:
        ms = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"goodput SLO {key}: {value!r} is not a number of milliseconds") from None
    if ms < 0:
        raise argparse.ArgumentTypeError(f"goodput SLO {key} must be >= 0 ms, got {ms:g}")
    return key, ms


def _percentiles(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"percentiles are comma-separated numbers, got {text!r}") from None
    if not out or any(not 0 < p < 100 for p in out):
        raise argparse.ArgumentTypeError(f"percentiles must lie strictly between 0 and 100, got {text!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bench.loadgen import PERCENTILE_METRICS

    # Names follow `vllm bench serve` (the old Slicefleet spellings still parse), so one command line drives
    # either tool and their numbers line up.
    p.add_argument("--base-url", default=None, metavar="URL[,URL...]",
                   help="benchmark the OpenAI-compatible server already running there (a Slicefleet cluster, a "
                        "vLLM server, anything serving /v1/completions with streaming) instead of starting "
                        "clusters; comma-separated URLs get requests round-robin. Prints vllm bench serve's "
                        "result block per rate. An API key comes from $OPENAI_API_KEY, as in vLLM's client. A "
                        "429 with Retry-After (a server shedding load) is waited out and sent again, for up to "
                        "600 s per request, and the retries are counted in the result "
                        "(default: start a local cluster per --modes entry)")
    p.add_argument("--modes", type=_csv(MODES), default=list(MODES), help="comma-separated modes (default: all)")
    p.add_argument("--engines", type=_csv(ENGINES), default=["hf"],
                   help="replica engines: 'hf' runs every mode; 'vllm' also runs continuous_slices on vLLM "
                        "replicas (needs the venv of bench/vllm_setup.sh; labelled continuous_slices@vllm) "
                        "(default: hf)")
    p.add_argument("--placements", type=_csv(("maxmin", "round_robin", "least_work")), default=["maxmin"],
                   help="placements to run; each mode runs with the first, SCLS also with the others "
                        "(e.g. maxmin,round_robin for the imbalance comparison; default: maxmin)")
    p.add_argument("--replicas", type=int, default=2, help="worker replicas (default: 2)")
    p.add_argument("--num-prompts", "--requests", dest="requests", type=int, default=100, metavar="N",
                   help="ShareGPT requests per run, exactly: beyond what passes vLLM's filter the rest are drawn "
                        "again with replacement, as vLLM oversamples (default: 100)")
    p.add_argument("--no-oversample", action="store_true",
                   help="refuse --num-prompts above what passes the filter instead (default: off)")
    p.add_argument("--request-rate", "--rates", dest="rates", type=_rates, default=[None], metavar="RATE[,RATE...]",
                   help="requests per second, comma-separated for one run each; 'inf' = all at once (default: inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of gaps: 1 = Poisson (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sample and arrival seed (default: 0)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="client-side cap on requests in flight (default: no cap)")
    p.add_argument("--model", default=None,
                   help="local model directory: what the clusters and the vLLM peer serve, and whose tokenizer "
                        "turns ShareGPT prompts into the token ids sent (default: the small default model of "
                        "'slicefleet make-model')")
    p.add_argument("--tokenizer", default=None,
                   help="another local directory to take the tokenizer from (default: --model's)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id requests name (default: with --base-url, the first model the server lists "
                        "at /v1/models; else the cluster config's model.name, slicefleet-tiny-llama)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="--base-url: send ignore_eos, so every request generates its whole ShareGPT length on "
                        "every server, as vllm bench serve's flag (default: off; started clusters and the vLLM "
                        "peer always generate exactly the trace length)")
    p.add_argument("--label", default=None,
                   help="--base-url: the run's name in tables and result files (default: endpoint)")
    p.add_argument("--slice-len", type=int, default=64, help="S, tokens per slice (default: 64)")
    p.add_argument("--max-gen-len", type=int, default=1024, help="G; trace lengths are capped to it (default: 1024)")
    p.add_argument("--max-batch-size", type=int, default=32, help="SCLS batch-size cap (default: 32)")
    p.add_argument("--sls-batch-size", type=int, default=8, help="SLS static batch size (default: 8)")
    p.add_argument("--ils-concurrency", type=int, default=16, help="ILS requests per replica (default: 16)")
    p.add_argument("--max-running", type=int, default=64, help="continuous_slices: rows per replica (default: 64)")
    p.add_argument("--stream-every", type=int, default=4, help="engine steps between streamed chunks (default: 4)")
    p.add_argument("--ordering", default="sjf", choices=["fcfs", "sjf", "hrrn"],
                   help="SCLS/ILS queue order (default: sjf)")
    p.add_argument("--budget", default="cap", choices=["cap", "true"],
                   help="max_tokens sent: 'cap' = G (the scheduler does not know lengths; default) or 'true' = "
                        "the trace length (an oracle length predictor, via the budget)")
    p.add_argument("--length-predictor", default="none", choices=["none", "packaged"],
                   help="'none' runs the ingress without a length model (default); 'packaged' uses the "
                        "packaged artefact if there is one")
    p.add_argument("--config", default=None, help="base cluster YAML (default: the embedded local config)")
    p.add_argument("--port", type=int, default=8765, help="API port on 127.0.0.1 (default: 8765)")
    p.add_argument("--goodput", nargs="+", type=_goodput_item, default=None, metavar="KEY:MS",
                   help="service-level objectives for goodput, in milliseconds, as vllm bench serve: any of "
                        "ttft, tpot, e2el; a request is good when it meets every one given "
                        "(default: ttft:30000 tpot:500)")
    p.add_argument("--slo-ttft", type=float, default=None,
                   help="older spelling of --goodput ttft:, in seconds (default: --goodput's)")
    p.add_argument("--slo-tpot", type=float, default=None,
                   help="older spelling of --goodput tpot:, in seconds (default: --goodput's)")
    p.add_argument("--slo-e2el", type=float, default=None,
                   help="older spelling of --goodput e2el:, in seconds (default: --goodput's)")
    p.add_argument("--percentile-metrics", type=_csv(PERCENTILE_METRICS), default=list(PERCENTILE_METRICS),
                   help="metrics whose mean, median and percentiles are printed, comma-separated "
                        "(default: ttft,tpot,itl,e2el; vLLM's default leaves e2el out)")
    p.add_argument("--metric-percentiles", type=_percentiles, default=[99.0],
                   help="percentiles of those metrics, comma-separated, e.g. 50,90,99 (default: 99)")
    p.add_argument("--vllm", action="store_true",
                   help="also run the vLLM peer (bench/vllm_peer.py, its venv) (default: off)")
    p.add_argument("--vllm-eager", action="store_true",
                   help="run Slicefleet's vLLM replicas eagerly (default: compiled, as the vLLM peer servers run)")
    p.add_argument("--vllm-venv", default="runs/vllm-venv", help="venv built by bench/vllm_setup.sh "
                   "(default: runs/vllm-venv)")
    p.add_argument("--no-sim", action="store_true",
                   help="skip the simulated replay of each live run (default: off, every run is replayed)")
    p.add_argument("--wait-load", type=float, default=None,
                   help="before each run, wait until the 1-min load average is below this (recorded either way; "
                        "default: do not wait)")
    p.add_argument("--wait-max", type=float, default=900.0, help="longest wait for --wait-load, s (default: 900)")
    p.add_argument("--result-dir", "--out", dest="out", type=Path, default=Path("runs/bench/latest"), metavar="DIR",
                   help="output folder: bench.json, bench.md and the plots of every run, and the files of "
                        "--save-result (default: runs/bench/latest)")
    p.add_argument("--save-result", action="store_true",
                   help="--base-url: also write each rate's result as vllm bench serve's JSON, and bench.json, "
                        "bench.md and plots, under --result-dir (default: off; runs that start clusters always "
                        "write bench.json)")
    p.add_argument("--result-filename", default=None,
                   help="--save-result: the JSON's name, for a single rate (default: vLLM's "
                        "{label}-{rate}qps-{model}-{YYYYmmdd-HHMMSS}.json)")
    p.add_argument("--plots-only", type=Path, default=None,
                   help="redraw plots + table from a bench.json (default: run a benchmark)")
    p.add_argument("--resimulate", type=Path, default=None,
                   help="replay a saved bench.json's live runs in the simulator again (uses the slice_log.json "
                        "beside it and that run's arguments), then redraw (default: run a benchmark)")
    p.add_argument("--disable-tqdm", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress bars (default: off, bars shown)")


# ---- helpers -------------------------------------------------------------------------------------------
def resolve_slo(args):
    """The goodput SLOs: --goodput (ms) or its default, each overridden by an old --slo-* flag (s). The seconds
    are written back to ``args.slo_*`` so bench.json keeps reading as it did."""
    from bench.loadgen import SLO

    ms = dict(DEFAULT_GOODPUT_MS) if args.goodput is None else dict(args.goodput)
    for key in GOODPUT_KEYS:
        legacy = getattr(args, f"slo_{key}", None)
        if legacy is not None:
            ms[key] = legacy * 1000.0
    seconds = {k: ms[k] / 1000.0 if k in ms else None for k in GOODPUT_KEYS}
    for key, value in seconds.items():
        setattr(args, f"slo_{key}", value)
    return SLO(**seconds)


def model_dir(args) -> Path:
    from worker.make_model import ensure_default_model

    return Path(args.model).expanduser() if args.model else ensure_default_model()


def tokenizer_dir(args) -> Path:
    return Path(args.tokenizer).expanduser() if args.tokenizer else model_dir(args)


def model_label(path: Path, dtype: str | None = None) -> str:
    """'<dir name> (<architecture>, <params> M params, <dtype>)' from the model's files alone: the parameter
    count is summed from the safetensors headers, so nothing is loaded."""
    import struct

    cfg = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    params = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                params += n
    arch = (cfg.get("architectures") or [cfg.get("model_type", "model")])[0]
    size = f", {params / 1e6:.1f} M params" if params else ""
    dtype = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "?"
    return f"{Path(path).name} ({arch}{size}, {dtype})"


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(limit: float | None, max_wait: float = 900.0, poll: float = 30.0) -> float:
    """Wait until the 1-minute load average is below ``limit`` (or ``max_wait`` passes); return the load."""
    load = load_average()
    if limit is None:
        return load
    deadline = time.monotonic() + max_wait
    while load >= limit and time.monotonic() < deadline:
        log.info("load average %.2f >= %.2f: waiting", load, limit)
        time.sleep(poll)
        load = load_average()
    return load


def cluster_overrides(args, mode: str, placement: str, engine: str = "hf") -> dict:
    return {
        "engine.backend": engine, "engine.stream_every": args.stream_every,
        "engine.vllm_enforce_eager": args.vllm_eager,
        "scheduler.max_running": args.max_running,
        "scheduler.mode": mode, "scheduler.placement": placement, "scheduler.slice_len": args.slice_len,
        "scheduler.max_gen_len": args.max_gen_len, "scheduler.max_batch_size": args.max_batch_size,
        "scheduler.sls_batch_size": args.sls_batch_size, "scheduler.ils_max_concurrency": args.ils_concurrency,
        "scheduler.ordering": args.ordering, "replicas.num_replicas": args.replicas, "api.port": args.port,
        "api.host": "127.0.0.1", "api.max_backlog_seconds": 1e9, "api.request_timeout": 3600.0,
        # Every request of a run in flight at once: the comparison is of the schedulers' queues, not admission's
        # (the derived default is 32 for SLS and ILS with 2 replicas, and 429s would reshape the arrivals).
        "api.max_inflight": max(args.requests, 1),
        "api.scheduling_extensions": True,  # trace mode: target_len on every request
        **({"predictor.length_model": NO_LENGTH_MODEL} if args.length_predictor == "none" else {}),
        **({"model.path": str(Path(args.model).expanduser())} if args.model else {}),
        **({"model.name": args.served_model_name} if args.served_model_name else {}),
    }


class SnapshotSampler:
    """Reads the dispatcher's metrics snapshot every ``every`` seconds during a run (busy time over time)."""

    def __init__(self, read, every: float = 1.0):
        self.read, self.every = read, every
        self.samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            try:
                snap = self.read()
                if snap is not None:
                    busy = {rid: r.busy_seconds for rid, r in snap.replicas.items()}
                    self.samples.append((time.perf_counter() - self._t0, busy))
            except Exception as exc:  # noqa: BLE001 - a missed sample is fine
                log.debug("snapshot read failed: %s", exc)
            self._stop.wait(self.every)

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def simulate_same(args, mode: str, placement: str, requests, offsets, latency, predicted, memory,
                  kv_cache_tokens: int):
    """The simulator on the very same trace: same lengths, send offsets, scheduler settings, KV budgets
    (``live_memory``) and predicted lengths as the live run, timed by ``latency``."""
    from balancer.config import SchedulerConfig
    from cluster.sim.simulator import simulate
    from cluster.sim.workload import build_workload

    pairs = [(r.prompt_len, r.output_len) for r in requests]
    workload = build_workload(pairs, offsets, predicted, ids=[r.id for r in requests])
    cfg = SchedulerConfig(mode=mode, slice_len=args.slice_len, max_gen_len=args.max_gen_len,
                          max_batch_size=args.max_batch_size, sls_batch_size=args.sls_batch_size,
                          ils_max_concurrency=args.ils_concurrency, max_running=args.max_running,
                          ordering=args.ordering, placement=placement)
    report, _ = simulate(cfg, latency, memory, workload, args.replicas, kv_cache_tokens=kv_cache_tokens)
    return report


def live_memory(args, continuous: bool = False):
    """The live replicas' KV memory model for batches, and the kept-cache tokens each holds between slices
    (a continuous batch keeps nothing between slices: its whole budget is the batch's)."""
    from transformers import AutoConfig

    from cluster.config import load_config
    from predictor.memory import kv_budget_bytes, memory_estimator

    engine = load_config(args.config).engine
    budget = kv_budget_bytes(engine.device, engine.kv_budget_bytes, engine.memory_safety)
    batch_bytes, keep_bytes = (budget, 0.0) if continuous else engine.split_kv_budget(budget)
    memory = memory_estimator(AutoConfig.from_pretrained(model_dir(args)), budget_bytes=batch_bytes)
    return memory, int(keep_bytes // memory.bytes_per_token)


def predicted_lengths(args, requests) -> list[float] | None:
    """What the live scheduler knew of each request's length: the trace length when it is sent as the budget,
    the packaged predictor's guess when the ingress ran it, else nothing."""
    if args.budget == "true":
        return [float(r.output_len) for r in requests]
    if args.length_predictor != "packaged":
        return None
    from transformers import AutoTokenizer

    from predictor.length import load_length_predictor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(args))
    texts = [r.prompt if isinstance(r.prompt, str) else tokenizer.decode(r.prompt) for r in requests]
    return [float(v) for v in load_length_predictor(None).predict(texts, [r.prompt_len for r in requests])]


def calibrations(args, slice_log: list[dict]) -> dict:
    """Latency models the simulator replays with: the packaged profile (taken on a quiet machine, one engine),
    and one refit from the slices the live runs measured (this machine's load, every replica busy)."""
    from cluster.messages import read_timing
    from predictor.latency import Profile, fit_bilinear, hardware_key, read_profile, samples_from_slice_log

    models = {"packaged": read_profile(None).model}
    samples = samples_from_slice_log(read_timing(row) for row in slice_log)
    try:
        # Plain least squares, not the profiler's relative error: under contention step times have a heavy
        # tail (a step's mean was 1.25x its median here), and the simulator must reproduce sums of them.
        fitted = fit_bilinear(samples.prefill, samples.decode, relative=False)
    except ValueError as exc:
        log.warning("no in-situ profile from %d logged slices: %s", len(slice_log), exc)
        return models
    Profile(fitted, {"engine": "hf", **hardware_key("cpu")}, samples,
            meta={"source": "slice timings logged by the live bench runs", "slices": len(slice_log)}
            ).save(args.out / "profile_in_situ.json")
    (args.out / "slice_log.json").write_text(json.dumps(slice_log))
    models["in_situ"] = fitted
    return models


def simulate_runs(args, runs: list, requests, schedules, slice_log: list[dict]) -> None:
    """Replay every live Slicefleet run in the simulator, once per calibration, and record the error."""
    models = calibrations(args, slice_log)
    predicted = predicted_lengths(args, requests)
    offsets_of = {rate: offsets for rate, offsets in schedules}
    for entry in runs:
        if entry["mode"] not in MODES or entry.get("engine", "hf") != "hf":
            continue  # the vLLM peer, and vLLM replicas (the profiles are of the HF engines)
        memory, kv_cache_tokens = live_memory(args, entry["mode"] in CONTINUOUS)
        entry["sims"] = {}
        for name, latency in models.items():
            sim = simulate_same(args, entry["mode"], entry["placement"], requests, offsets_of[entry["rate"]],
                                latency, predicted, memory, kv_cache_tokens).as_dict()
            entry["sims"][name] = {"report": sim, "error": sim_error(entry["report"], sim)}


SIM_COMPARED = ("request_throughput", "output_token_throughput", "latency_mean", "latency_p99",
                "valid_token_ratio", "mean_batch_size")


def sim_error(live: dict, sim: dict) -> dict:
    """Relative error (sim - live) / live for the headline figures."""
    return {k: (sim[k] - live[k]) / live[k] if live.get(k) else None for k in SIM_COMPARED}


# ---- runs ----------------------------------------------------------------------------------------------
def run_live_mode(args, mode: str, placement: str, requests, schedules, slo, results_out: list,
                  slice_log: list, engine: str = "hf") -> None:
    import asyncio

    from bench.loadgen import run_load, wait_for_snapshot_settle
    from cluster.config import load_config
    from cluster.local import LocalCluster
    from cluster.stores.admin import AdminStore

    cfg = load_config(args.config, cluster_overrides(args, mode, placement, engine))
    label = mode if placement == args.placements[0] else f"{mode}-{placement}"
    if engine != "hf":
        label = f"{label}@{engine}"
    t_start = time.perf_counter()
    cluster = LocalCluster(cfg).start()
    startup = time.perf_counter() - t_start
    log.info("%s: cluster up in %.0f s at %s", label, startup, cluster.url)
    try:
        store = AdminStore.connect(cluster.cfg.redis)
        read = store.metrics_snapshot
        for rate, offsets in schedules:
            load = wait_for_quiet(args.wait_load, args.wait_max)
            before = wait_for_snapshot_settle(read, 0, timeout=4)
            with SnapshotSampler(read) as sampler:
                results, wall = asyncio.run(run_load(
                    [cluster.url], requests, offsets, flavor="slicefleet", model=cfg.model.name,
                    max_gen_len=args.max_gen_len, budget=args.budget, max_concurrency=args.max_concurrency,
                    progress=not args.no_progress, desc=f"{label} rate={rate or 'inf'}"))
            ok = sum(r.success for r in results)
            after = wait_for_snapshot_settle(read, ok, timeout=15, baseline=before)
            delta = after.since(before) if after is not None else None
            entry = record(label, mode, placement, rate, requests, results, wall, delta, slo, load,
                           load_average(), startup, sampler.samples, args.replicas)
            entry["engine"] = engine
            results_out.append(entry)
            save(args.out, args, results_out)
            log.info("%s rate=%s: %.2f req/s, %.0f tok/s, p99 %.1f s, failed %d", label, rate,
                     entry["report"]["request_throughput"], entry["report"]["output_token_throughput"],
                     entry["report"]["latency_p99"], entry["serving"]["failed"])
        if engine == "hf":  # the in-situ profile is of the HF engines
            slice_log.extend({**asdict(t), "label": label} for t in store.slice_log())
    finally:
        cluster.stop()


def record(label, mode, placement, rate, requests, results, wall, delta, slo, load_before, load_after, startup,
           busy_samples, replicas) -> dict:
    from dataclasses import asdict

    from bench.loadgen import live_report, serving_metrics, vllm_metrics

    serving = serving_metrics(results, slo)
    serving["vllm"] = vllm_metrics(results, wall, (50, 90, 99), slo)
    report = live_report(mode, replicas, results, delta,
                         extra={"placement": placement, "rate": rate, "label": label})
    return {
        "label": label, "mode": mode, "placement": placement, "rate": rate, "requests": len(requests),
        "wall_seconds": wall, "startup_seconds": startup, "load_before": load_before, "load_after": load_after,
        "serving": serving, "report": report.as_dict(), "snapshot_delta": asdict(delta) if delta else None,
        "busy_samples": busy_samples,
        "per_request": [asdict(r) | {"itl": None} for r in results],
        "latencies": sorted(r.latency for r in results if r.success),
        "errors": sorted({r.error for r in results if not r.success})[:5],
    }


def save(out: Path, args, runs: list) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if not k.startswith("_")},
               "machine": machine_facts(), "runs": runs}
    path = out / "bench.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def machine_facts() -> dict:
    """What the plots' captions name: cores, CPU model, memory, GPU (None when there is none)."""
    import platform
    import shutil
    import subprocess

    cpu_model = None
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=20, check=True).stdout.split("\n")
            names = [n.strip() for n in names if n.strip()]
            gpu = f"{len(names)}x {names[0]}" if names else None
        except (OSError, subprocess.SubprocessError):
            pass
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "cpu_model": cpu_model, "gpu": gpu,
            "python": platform.python_version(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def workload(args):
    """(model dir, the ShareGPT sample, one arrival schedule per rate): the same for every system in a run."""
    from transformers import AutoTokenizer

    from bench.loadgen import arrivals, sharegpt_requests

    requests = sharegpt_requests(AutoTokenizer.from_pretrained(tokenizer_dir(args)), args.requests, args.seed,
                                 args.max_gen_len, oversample=not getattr(args, "no_oversample", False))
    schedules = [(rate, arrivals(len(requests), rate, args.burstiness, args.seed)) for rate in args.rates]
    return model_dir(args), requests, schedules


# ---- a server that is already running (--base-url) -------------------------------------------------------
def endpoint_urls(text: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise SystemExit(f"--base-url needs http:// or https:// URLs, got {u!r}")
    if not urls:
        raise SystemExit("--base-url is empty")
    # vLLM's --base-url is the server root; a URL ending in /v1 (the OpenAI client's habit) means the same one.
    return [u.removesuffix("/v1") for u in urls]


def auth_headers() -> dict:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_model(url: str, headers: dict, timeout: float = 30.0) -> str:
    """The first model id the server lists at /v1/models (vllm bench serve does the same without --model)."""
    import httpx

    try:
        resp = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot reach {url}/v1/models: {exc}") from None
    if resp.status_code == 401:
        raise SystemExit(f"{url} wants an API key: set OPENAI_API_KEY")
    if resp.status_code != 200:
        raise SystemExit(f"{url}/v1/models answered HTTP {resp.status_code}: {resp.text[:200]}")
    data = resp.json().get("data") or []
    if not data:
        raise SystemExit(f"{url}/v1/models lists no model: pass --served-model-name")
    return data[0]["id"]


def result_filename(args, label: str, rate: float | None, model_id: str, now) -> str:
    """vllm bench serve's name: {label}-{rate}qps[-concurrency{N}]-{model}-{YYYYmmdd-HHMMSS}.json."""
    if args.result_filename and len(args.rates) == 1:
        return args.result_filename
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    name = f"{label}-{'inf' if rate is None else f'{rate:g}'}qps{conc}-{model_id.split('/')[-1]}-" \
           f"{now.strftime('%Y%m%d-%H%M%S')}.json"
    if args.result_filename:  # several rates: keep the given stem, one file per rate
        name = f"{Path(args.result_filename).stem}-{'inf' if rate is None else f'{rate:g}'}qps.json"
    return name


def run_endpoint(args, slo) -> int:
    """Drive a server that is already running, vllm bench serve's way, and print its result block per rate."""
    import asyncio
    from datetime import datetime

    from bench.loadgen import format_vllm_result, run_load, vllm_metrics

    if args.vllm or args.plots_only or args.resimulate:
        raise SystemExit("--base-url drives a running server: --vllm, --plots-only and --resimulate do not apply")
    urls = endpoint_urls(args.base_url)
    headers = auth_headers()
    name = args.served_model_name or served_model(urls[0], headers)
    label = args.label or "endpoint"
    _, requests, schedules = workload(args)
    args.served_model_name = name
    args.model_label = f"{name} served at {', '.join(urls)} (tokens counted with {tokenizer_dir(args).name})"
    runs: list = []
    for rate, offsets in schedules:
        load = wait_for_quiet(args.wait_load, args.wait_max)
        started = datetime.now()
        results, wall = asyncio.run(run_load(
            urls, requests, offsets, flavor="openai", model=name, max_gen_len=args.max_gen_len,
            max_concurrency=args.max_concurrency, progress=not args.no_progress, ignore_eos=args.ignore_eos,
            headers=headers, desc=f"{label} rate={'inf' if rate is None else rate}"))
        entry = record(label, "endpoint", "-", rate, requests, results, wall, None, slo, load, load_average(), 0.0,
                       [], args.replicas)
        entry["base_url"] = urls
        runs.append(entry)
        # Printed and saved with the percentiles asked for; bench.json keeps 50/90/99 for the tables.
        metrics = vllm_metrics(results, wall, args.metric_percentiles, slo)
        print(format_vllm_result(metrics, args.percentile_metrics, float("inf") if rate is None else rate,
                                 args.max_concurrency))
        if entry["errors"]:
            print(f"{entry['serving']['failed']} requests failed; first errors: {entry['errors']}")
            if any("extension_not_allowed" in e for e in entry["errors"]):
                # Slicefleet lets only admins choose how much a request generates (ignore_eos).
                print("the server refuses ignore_eos for this key: set OPENAI_API_KEY to one of its admin keys "
                      "(api.admin_keys), serve it with api.scheduling_extensions: true, or drop --ignore-eos")
        if args.save_result:
            args.out.mkdir(parents=True, exist_ok=True)
            out = args.out / result_filename(args, label, rate, name, started)
            result = {"date": started.strftime("%Y%m%d-%H%M%S"), "endpoint_type": "openai", "backend": "openai",
                      "label": label, "model_id": name, "tokenizer_id": str(tokenizer_dir(args)),
                      "base_url": ",".join(urls), "num_prompts": len(requests),
                      "request_rate": "inf" if rate is None else rate, "burstiness": args.burstiness,
                      "max_concurrency": args.max_concurrency, "ignore_eos": args.ignore_eos, **metrics}
            out.write_text(json.dumps(result, indent=1))
            print(f"wrote {out}")
    if args.save_result:
        from bench import report as bench_report

        path = save(args.out, args, runs)
        bench_report.write_all(json.loads(path.read_text()), args.out)
        print(f"wrote {path}, bench.md and plots under {args.out}")
    return 0 if all(r["serving"]["completed"] for r in runs) else 1


def resimulate(path: Path) -> int:
    from bench import report as bench_report

    data = json.loads(path.read_text())
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    for k, v in data["args"].items():
        setattr(args, k, Path(v) if k in ("out", "plots_only", "resimulate") and v not in (None, "None") else v)
    args.out = path.parent
    _, requests, schedules = workload(args)
    simulate_runs(args, data["runs"], requests, schedules, json.loads((path.parent / "slice_log.json").read_text()))
    path.write_text(json.dumps(data, indent=1, default=str))
    bench_report.write_all(data, path.parent)
    print((path.parent / "bench.md").read_text())
    return 0


def run(args) -> int:
    from bench import report as bench_report

    logging.getLogger("httpx").setLevel(logging.WARNING)

    if args.plots_only:
        data = json.loads(Path(args.plots_only).read_text())
        out = Path(args.plots_only).parent
        bench_report.write_all(data, out)
        print((out / "bench.md").read_text())
        return 0

    if args.resimulate:
        return resimulate(args.resimulate)

    slo = resolve_slo(args)
    if args.base_url:
        return run_endpoint(args, slo)
    from cluster.config import load_config

    served_dir, requests, schedules = workload(args)
    args.model_label = model_label(served_dir, load_config(args.config).model.dtype)
    runs: list = []
    if args.vllm:
        from bench.vllm_peer import run_peer

        run_peer(args, requests, schedules, slo, runs, served_dir)
    slice_log: list[dict] = []
    for mode in args.modes:
        run_live_mode(args, mode, args.placements[0], requests, schedules, slo, runs, slice_log)
    for engine in args.engines:  # other engines serve the new mode (ILS on them would be the engine alone)
        for mode in [m for m in args.modes if m == "continuous_slices" and engine != "hf"]:
            run_live_mode(args, mode, args.placements[0], requests, schedules, slo, runs, slice_log, engine)
    if "scls" in args.modes:
        for placement in args.placements[1:]:
            run_live_mode(args, "scls", placement, requests, schedules, slo, runs, slice_log)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slice_log.json").write_text(json.dumps(slice_log))
    if not args.no_sim:
        simulate_runs(args, runs, requests, schedules, slice_log)
    path = save(args.out, args, runs)
    data = json.loads(path.read_text())
    bench_report.write_all(data, args.out)
    print((args.out / "bench.md").read_text())
    print(f"wrote {path} and plots under {args.out}")
    return 0
