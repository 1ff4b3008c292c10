"""``slicefleet bench``: SCLS against SLS and ILS (and vLLM) on the live cluster, same sample, one table.

Every mode runs back to back on the same ShareGPT sample, the same arrival offsets and the same cluster
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
from pathlib import Path

log = logging.getLogger("slicefleet.bench")

MODES = ("continuous_slices", "scls", "sls", "ils")
CONTINUOUS = ("continuous_slices", "ils")
"""Modes whose replicas run one continuous batch (the only ones a vLLM engine can serve)."""
ENGINES = ("hf", "vllm")
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", type=_csv(MODES), default=list(MODES), help="comma-separated modes (default: all)")
    p.add_argument("--engines", type=_csv(ENGINES), default=["hf"],
                   help="replica engines: 'hf' runs every mode; 'vllm' also runs continuous_slices on vLLM "
                        "replicas (needs the venv of bench/vllm_setup.sh; labelled continuous_slices@vllm) "
                        "(default: hf)")
    p.add_argument("--placements", type=_csv(("maxmin", "round_robin", "least_work")), default=["maxmin"],
                   help="placements to run; each mode runs with the first, SCLS also with the others "
                        "(e.g. maxmin,round_robin for the imbalance comparison; default: maxmin)")
    p.add_argument("--replicas", type=int, default=2, help="worker replicas (default: 2)")
    p.add_argument("--requests", type=int, default=100, help="ShareGPT requests per run (default: 100)")
    p.add_argument("--rates", type=_rates, default=[None],
                   help="comma-separated request rates per second; 'inf' = all at once (default: inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of gaps: 1 = Poisson (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sample and arrival seed (default: 0)")
    p.add_argument("--max-concurrency", type=int, default=None, help="client-side cap on requests in flight")
    p.add_argument("--slice-len", type=int, default=64)
    p.add_argument("--max-gen-len", type=int, default=1024, help="G; trace lengths are capped to it")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--sls-batch-size", type=int, default=8)
    p.add_argument("--ils-concurrency", type=int, default=16)
    p.add_argument("--max-running", type=int, default=64, help="continuous_slices: rows per replica (default: 64)")
    p.add_argument("--stream-every", type=int, default=4, help="engine steps between streamed chunks (default: 4)")
    p.add_argument("--ordering", default="sjf", choices=["fcfs", "sjf", "hrrn"])
    p.add_argument("--budget", default="cap", choices=["cap", "true"],
                   help="max_tokens sent: 'cap' = G (the scheduler does not know lengths; default) or 'true' = "
                        "the trace length (an oracle length predictor, via the budget)")
    p.add_argument("--length-predictor", default="none", choices=["none", "packaged"],
                   help="'none' runs the ingress without a length model (default); 'packaged' uses the "
                        "packaged artefact if there is one")
    p.add_argument("--config", default=None, help="base cluster YAML (default: the embedded local config)")
    p.add_argument("--port", type=int, default=8765, help="API port on 127.0.0.1 (default: 8765)")
    p.add_argument("--slo-ttft", type=float, default=30.0, help="goodput SLO on TTFT, seconds (default: 30)")
    p.add_argument("--slo-tpot", type=float, default=0.5, help="goodput SLO on TPOT, seconds (default: 0.5)")
    p.add_argument("--slo-e2el", type=float, default=None, help="goodput SLO on E2E latency, seconds")
    p.add_argument("--vllm", action="store_true", help="also run the vLLM peer (bench/vllm_peer.py, its venv)")
    p.add_argument("--vllm-eager", action="store_true",
                   help="run Slicefleet's vLLM replicas eagerly (default: compiled, as the vLLM peer servers run)")
    p.add_argument("--vllm-venv", default="runs/vllm-venv", help="venv built by bench/vllm_setup.sh")
    p.add_argument("--no-sim", action="store_true", help="skip the simulated replay of each live run")
    p.add_argument("--wait-load", type=float, default=None,
                   help="before each run, wait until the 1-min load average is below this (recorded either way)")
    p.add_argument("--wait-max", type=float, default=900.0, help="longest wait for --wait-load, s (default: 900)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/latest"), help="output folder")
    p.add_argument("--plots-only", type=Path, default=None, help="redraw plots + table from a bench.json")
    p.add_argument("--resimulate", type=Path, default=None,
                   help="replay a saved bench.json's live runs in the simulator again (uses the slice_log.json "
                        "beside it and that run's arguments), then redraw")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---- helpers -------------------------------------------------------------------------------------------
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
        **({"predictor.length_model": NO_LENGTH_MODEL} if args.length_predictor == "none" else {}),
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
                if snap:
                    busy = {k: v.get("busy_seconds", 0.0) for k, v in (snap.get("replicas") or {}).items()}
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
    from worker.make_model import ensure_default_model

    engine = load_config(args.config).engine
    budget = kv_budget_bytes(engine.device, engine.kv_budget_bytes, engine.memory_safety)
    batch_bytes, keep_bytes = (budget, 0.0) if continuous else engine.split_kv_budget(budget)
    memory = memory_estimator(AutoConfig.from_pretrained(ensure_default_model()), budget_bytes=batch_bytes)
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
    from worker.make_model import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    texts = [r.prompt if isinstance(r.prompt, str) else tokenizer.decode(r.prompt) for r in requests]
    return [float(v) for v in load_length_predictor(None).predict(texts, [r.prompt_len for r in requests])]


def calibrations(args, slice_log: list[dict]) -> dict:
    """Latency models the simulator replays with: the packaged profile (taken on a quiet machine, one engine),
    and one refit from the slices the live runs measured (this machine's load, every replica busy)."""
    from predictor.latency import Profile, fit_bilinear, hardware_key, read_profile, samples_from_slice_log

    models = {"packaged": read_profile(None).model}
    samples = samples_from_slice_log(slice_log)
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

    from bench.loadgen import live_report, run_load, serving_metrics, snapshot_delta, wait_for_snapshot_settle
    from cluster.config import load_config
    from cluster.local import LocalCluster
    from cluster.state import StateStore

    cfg = load_config(args.config, cluster_overrides(args, mode, placement, engine))
    label = mode if placement == args.placements[0] else f"{mode}-{placement}"
    if engine != "hf":
        label = f"{label}@{engine}"
    t_start = time.perf_counter()
    cluster = LocalCluster(cfg).start()
    startup = time.perf_counter() - t_start
    log.info("%s: cluster up in %.0f s at %s", label, startup, cluster.url)
    try:
        store = StateStore(cluster.cfg.redis.url, cluster.cfg.redis.key_prefix, cluster.cfg.redis.password)
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
            delta = snapshot_delta(before, after)
            entry = record(label, mode, placement, rate, requests, results, wall, delta, slo, load,
                           load_average(), startup, sampler.samples, args.replicas)
            entry["engine"] = engine
            results_out.append(entry)
            save(args.out, args, results_out)
            log.info("%s rate=%s: %.2f req/s, %.0f tok/s, p99 %.1f s, failed %d", label, rate,
                     entry["report"]["request_throughput"], entry["report"]["output_token_throughput"],
                     entry["report"]["latency_p99"], entry["serving"]["failed"])
        if engine == "hf":  # the in-situ profile is of the HF engines
            logged = store.slice_log()
            for row in logged:
                row["label"] = label
            slice_log.extend(logged)
    finally:
        cluster.stop()


def record(label, mode, placement, rate, requests, results, wall, delta, slo, load_before, load_after, startup,
           busy_samples, replicas) -> dict:
    from dataclasses import asdict

    from bench.loadgen import live_report, serving_metrics

    serving = serving_metrics(results, slo)
    report = live_report(mode, replicas, results, delta,
                         extra={"placement": placement, "rate": rate, "label": label})
    return {
        "label": label, "mode": mode, "placement": placement, "rate": rate, "requests": len(requests),
        "wall_seconds": wall, "startup_seconds": startup, "load_before": load_before, "load_after": load_after,
        "serving": serving, "report": report.as_dict(), "snapshot_delta": delta,
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
    import platform

    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def workload(args):
    """(model dir, the ShareGPT sample, one arrival schedule per rate): the same for every system in a run."""
    from transformers import AutoTokenizer

    from bench.loadgen import arrivals, sharegpt_requests
    from worker.make_model import ensure_default_model

    model_dir = ensure_default_model()
    requests = sharegpt_requests(AutoTokenizer.from_pretrained(model_dir), args.requests, args.seed,
                                 args.max_gen_len)
    schedules = [(rate, arrivals(len(requests), rate, args.burstiness, args.seed)) for rate in args.rates]
    return model_dir, requests, schedules


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

    from bench.loadgen import SLO

    model_dir, requests, schedules = workload(args)
    slo = SLO(ttft=args.slo_ttft, tpot=args.slo_tpot, e2el=args.slo_e2el)
    runs: list = []
    if args.vllm:
        from bench.vllm_peer import run_peer

        run_peer(args, requests, schedules, slo, runs, model_dir)
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
