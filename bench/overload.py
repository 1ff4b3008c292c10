"""Overload harness: a live cluster at several times its capacity, then back at normal load.

It starts ``slicefleet serve`` on loopback (the fault harness's ``Cluster``: the real CLI, model and embedded
Redis), measures the cluster's capacity for the request mix (a saturated closed loop; or takes
``--capacity``), then sends Poisson load in three phases: ``baseline`` at ``--normal`` times capacity,
``overload`` at ``--overload`` times capacity, ``recovery`` at ``--normal`` again. Per phase it reports what
was offered and accepted, the share refused with 429 (and whether every 429 carried Retry-After), other
failures, lost requests (accepted but never completed: must be 0) and the p50 / p99 end-to-end latency and
TTFT of the admitted ones; and how long after the overload ended a sliding window of requests saw their p50
and p99 back within ``--factor`` times normal (what the baseline's windows of the same width stayed under). Every process of the cluster (serve, Ray, Serve's
actors, Redis) has its RSS read about once a second; the report gives each role's peak.

    python -m bench.overload --out runs/overload        # or: slicefleet overload ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from bench.harness_main import harness_main
from bench import pressure
from bench.faults import machine

log = logging.getLogger("slicefleet.overload")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normal", type=float, default=0.5, help="load of the baseline and recovery phases, x capacity")
    p.add_argument("--overload", type=float, default=3.0, help="load of the overload phase, x capacity")
    p.add_argument("--baseline-seconds", type=float, default=60.0, help="length of the baseline phase")
    p.add_argument("--overload-seconds", type=float, default=60.0, help="length of the overload phase")
    p.add_argument("--recovery-seconds", type=float, default=120.0,
                   help="length of the recovery phase: latency must be back to normal within it")
    p.add_argument("--window", type=float, default=10.0,
                   help="width of the sliding latency window (requests by send time), seconds")
    p.add_argument("--factor", type=float, default=1.5,
                   help="back to normal: a window's p50 and p99 within this many times the normal reference")
    p.add_argument("--reference-quantile", type=float, default=90.0,
                   help="the normal reference: this percentile of the p50s and of the p99s of the baseline's windows")
    p.add_argument("--min-window-requests", type=int, default=5,
                   help="windows with fewer completed requests do not count for back to normal")
    p.add_argument("--redis-every", type=float, default=5.0, help="seconds between samples of Redis's figures")
    pressure.add_common_arguments(p, "runs/overload")


def verdict(result: dict) -> list[str]:
    """What the issue asks of overload, as problems; empty when it all holds."""
    ph = {s["name"]: s for s in result["phases"]}
    problems = [f"{s['name']}: {s['lost']} accepted requests lost" for s in result["phases"] if s["lost"]]
    problems += [f"{s['name']}: {s['429_without_retry_after']} answers 429 without Retry-After"
                 for s in result["phases"] if s["429_without_retry_after"]]
    problems += [f"{s['name']}: the harness sent its requests up to {s['send_lag_max']:.1f} s late (p99 "
                 f"{s['send_lag_p99']:.1f} s): the load came in bursts" for s in result["phases"]
                 if (s.get("send_lag_p99") or 0) > 1.0]
    over, base = ph["overload"], ph["baseline"]
    if not over["refused_429"] and (over["latency_p99"] or 0) > result["settings"]["factor"] * (base["latency_p99"] or 0):
        problems.append(f"nothing refused at {result['settings']['overload']:g}x capacity: the excess queued "
                        f"(p99 {over['latency_p99']:.1f} s against {base['latency_p99']:.1f} s at baseline)")
    if result["back_to_normal_s"] is None:
        problems.append(f"latency not back within {result['settings']['factor']:g}x normal before the recovery "
                        f"phase ended ({result['settings']['recovery_seconds']:.0f} s)")
    return problems


def run_overload(args) -> dict:
    from cluster.config import SlicefleetConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = pressure.request_pool(args)
    # The admission bounds the cluster will run with: given, or the config's defaults for this fleet.
    cfg = SlicefleetConfig.model_validate({"replicas": {"num_replicas": args.replicas},
                                           "scheduler": {"mode": args.mode, "slice_len": args.slice_len},
                                           **pressure.cluster_settings(args)})
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    settings["max_backlog_seconds"] = cfg.api.max_backlog_seconds
    settings["max_inflight"] = cfg.inflight_limit
    result: dict = {"settings": settings, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="slicefleet-overload-") as tmp:
        t = time.perf_counter()
        cluster = pressure.start_cluster(args, Path(tmp), out)
        result["startup_s"] = time.perf_counter() - t
        t0 = time.perf_counter()
        try:
            with pressure.Sampler(cluster, t0, args.rss_every, args.redis_every) as sampler:
                if args.capacity is None:
                    result["capacity"] = pressure.measure_capacity(args, cluster, pool, t0)
                    cluster.quiet()
                else:
                    result["capacity"] = {"req_per_s": args.capacity, "given": True}
                cap = result["capacity"]["req_per_s"]
                plan = pressure.phases([("baseline", args.normal * cap, args.baseline_seconds),
                                        ("overload", args.overload * cap, args.overload_seconds),
                                        ("recovery", args.normal * cap, args.recovery_seconds)],
                                       start=time.perf_counter() - t0 + 1.0)
                requests = pressure.schedule(pool, plan, args.seed)
                outcomes: list = []
                bar = None
                if not args.no_progress:
                    from tqdm import tqdm

                    bar = tqdm(total=len(requests), desc="overload", unit="req")
                asyncio.run(pressure.open_loop(cluster, requests, outcomes, t0, args.timeout, bar))
                if bar is not None:
                    bar.close()
                result["drained_s"] = time.perf_counter() - t0 - plan[-1].end
        finally:
            cluster.stop()
    result["phases"] = [{"name": ph.name, "rate": ph.rate, **pressure.phase_stats(outcomes, ph.start, ph.end),
                         **pressure.send_lag(outcomes, requests, ph.start, ph.end)} for ph in plan]
    series = pressure.windows(outcomes, plan[0].start, plan[-1].end, args.window, 1.0)
    result["windows"] = series
    ref = pressure.normal_reference(series, plan[0].start, plan[0].end, args.window, args.reference_quantile,
                                    args.min_window_requests)
    result["normal_reference"] = {"p50": ref[0], "p99": ref[1]}
    result["back_to_normal_s"] = pressure.back_to_normal(series, plan[1].end, *ref, args.factor,
                                                         args.min_window_requests)
    rss = pressure.rss_series(sampler.rss)
    result["rss_peaks"] = pressure.peaks(rss)
    result["rss"] = {str(pid): s for pid, s in rss.items()}
    result["backlog"] = sampler.backlog
    result["backlog_peak_s"] = max((b for _, b, *_ in sampler.backlog if isinstance(b, (int, float))), default=None)
    result["redis"] = sampler.redis
    result["loadavg"] = sampler.loadavg
    result["load_during"] = pressure.load_summary(sampler.loadavg, plan[0].start, plan[-1].end)
    result["requests"] = pressure.compact(outcomes)
    result["problems"] = verdict(result)
    (out / "results.json").write_text(json.dumps(result))
    (out / "results.md").write_text(markdown(result))
    plot(result, out)
    return result


# ---- the report -------------------------------------------------------------------------------------------
PHASE_HEADERS = ["phase", "load", "offered", "offered req/s", "accepted", "429 (share)", "429 w/o Retry-After",
                 "other failures", "lost", "completed", "e2e p50 / p99 s", "TTFT p50 / p99 s",
                 "send lag p99 / max s"]


def phase_rows(result: dict) -> list[list[str]]:
    cap = result["capacity"]["req_per_s"]
    f = pressure.fmt
    return [[s["name"], f"{s['rate'] / cap:.2g}x", str(s["offered"]), f(s["offered_rate"], 2), str(s["accepted"]),
             f"{s['refused_429']} ({100 * s['share_429']:.0f} %)", str(s["429_without_retry_after"]),
             ", ".join(f"{k} {v}" for k, v in sorted(s["other_failures"].items())) or "0", str(s["lost"]),
             str(s["completed"]), f"{f(s['latency_p50'])} / {f(s['latency_p99'])}",
             f"{f(s['ttft_p50'], 2)} / {f(s['ttft_p99'], 2)}",
             f"{f(s.get('send_lag_p99'), 2)} / {f(s.get('send_lag_max'), 2)}"] for s in result["phases"]]


def markdown(result: dict) -> str:
    cap, st = result["capacity"], result["settings"]
    back = result["back_to_normal_s"]
    load = result.get("load_during", {})
    lines = [f"capacity: {cap['req_per_s']:.2f} req/s" + (" (given)" if cap.get("given") else
                                                          f" (measured: {st['capacity_concurrency']} clients, "
                                                          f"{st['capacity_seconds']:.0f} s)"),
             f"admission: api.max_backlog_seconds {st['max_backlog_seconds']:g}, api.max_inflight {st['max_inflight']}",
             (f"machine load average (1 min) during the phases: median {pressure.fmt(load.get('median'))}, "
              f"max {pressure.fmt(load.get('max'))} on {result['machine']['cores']} cores"), ""]
    lines += pressure.table(PHASE_HEADERS, phase_rows(result))
    reasons = ", ".join(f"{s['name']}: " + ", ".join(f"{k} {v}" for k, v in s["429_reasons"].items())
                        for s in result["phases"] if s["429_reasons"]) or "none"
    lines += ["", (f"429s by reason: {reasons}; the dispatcher's predicted backlog peaked at "
                   f"{pressure.fmt(result.get('backlog_peak_s'))} s (429 above {st['max_backlog_seconds']:g} s)")]
    ref = result["normal_reference"]
    lines += ["", "back to normal after the overload: " + (
        f"{back:.0f} s" if back is not None else "not within the recovery phase") + (
        f" (the first {st['window']:.0f} s window from which p50 and p99 stay within {st['factor']:g}x normal: "
        f"{pressure.fmt(ref['p50'], 2)} s and {pressure.fmt(ref['p99'], 2)} s, the {st['reference_quantile']:g}th "
        "percentile of the baseline's windows)"), ""]
    lines += pressure.rss_table(result["rss_peaks"])
    lines += [f"\n- {p}" for p in result["problems"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plan = [pressure.Phase(p["name"], p["rate"], p["start"], p["end"]) for p in result["phases"]]
    reqs = result["requests"]
    sent = np.array([r[0] for r in reqs])
    status = np.array([r[1] or 0 for r in reqs])
    accepted = np.array([bool(r[2]) for r in reqs])

    def shade(ax):
        for ph in plan:
            if ph.name == "overload":
                ax.axvspan(ph.start, ph.end, color="tab:red", alpha=0.08, lw=0)
        ax.grid(alpha=0.3)

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    edges = np.arange(plan[0].start, plan[-1].end + 5, 5.0)
    for mask, label, color in ((np.ones_like(accepted), "offered", "0.4"), (accepted, "accepted", "tab:green"),
                               (status == 429, "answered 429", "tab:red")):
        counts, _ = np.histogram(sent[mask], edges)
        a1.step(edges[:-1], counts / 5.0, where="post", label=label, color=color)
    done = [r[0] + r[4] for r in reqs if r[4] is not None]
    counts, _ = np.histogram(done, edges)
    a1.step(edges[:-1], counts / 5.0, where="post", label="completed (by finish)", color="tab:blue", ls="--")
    a1.set_ylabel("req/s (5 s bins)")
    a1.legend(fontsize=8)
    shade(a1)
    lat = [(r[0], r[4]) for r in reqs if r[4] is not None]
    a2.scatter([x for x, _ in lat], [y for _, y in lat], s=3, color="0.6", label="admitted request (by send time)")
    pressure.plot_windows(a2, result["windows"], result["settings"]["window"])
    factor, ref = result["settings"]["factor"], result["normal_reference"]
    for key, color in (("p50", "tab:blue"), ("p99", "tab:red")):
        if ref[key] == ref[key]:  # not NaN: the baseline had windows
            a2.axhline(factor * ref[key], color=color, ls=":", label=f"{factor:g}x normal {key}")
    if result["back_to_normal_s"] is not None:
        a2.axvline(plan[1].end + result["back_to_normal_s"], color="k", ls="--", label="back to normal")
    for i, t in enumerate(pressure.aof_rewrites(result.get("redis", []))):
        a2.axvline(t, color="tab:purple", ls="-.", lw=0.8, label="Redis AOF rewrite (seen by)" if i == 0 else None)
    a2.set_ylabel("end-to-end latency (s)")
    a2.set_yscale("log")
    a2.legend(fontsize=8)
    shade(a2)
    # Admission's two bounds: requests in flight at the ingress, and the dispatcher's predicted backlog, which
    # is a prediction of the wait that TTFT measures.
    ticks = np.arange(plan[0].start, max([plan[-1].end] + done), 1.0)
    spans = np.array([(r[0], r[0] + r[4]) for r in reqs if r[4] is not None]).reshape(-1, 2)
    flying = [(np.searchsorted(np.sort(spans[:, 0]), t, "right") - np.searchsorted(np.sort(spans[:, 1]), t, "right"))
              for t in ticks]
    a3.plot(ticks, flying, color="tab:green", label="admitted requests in flight (client side)")
    a3.axhline(result["settings"]["max_inflight"], color="tab:green", ls=":", label="api.max_inflight")
    a3.set_ylabel("requests")
    a3.set_xlabel("seconds since the harness started (red: overload phase)")
    a3.legend(fontsize=8, loc="upper left")
    shade(a3)
    b3 = a3.twinx()
    b3.scatter([r[0] for r in reqs if r[5] is not None], [r[5] for r in reqs if r[5] is not None], s=2,
               color="0.7", label="TTFT of an admitted request (by send time)")
    bl = [(t, b) for t, b, *_ in result["backlog"] if isinstance(b, (int, float))]
    b3.plot([t for t, _ in bl], [b for _, b in bl], color="tab:purple",
            label=f"dispatcher's predicted backlog (429 above {result['settings']['max_backlog_seconds']:g} s)")
    b3.set_ylabel("seconds")
    b3.legend(fontsize=8, loc="upper right")
    a3.set_xlim(plan[0].start - 5, max([plan[-1].end] + done) + 5)
    fig.suptitle(f"{result['settings']['overload']:g}x capacity ({result['capacity']['req_per_s']:.2f} req/s) "
                 f"for {result['settings']['overload_seconds']:.0f} s")
    fig.tight_layout()
    fig.savefig(out / "overload_latency.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    pressure.plot_rss(ax, {int(k): v for k, v in result["rss"].items()})
    shade(ax)
    ax.set_xlabel("seconds since the harness started (red: overload phase; before the first phase: capacity)")
    ax.set_title("RSS of every process of the cluster")
    fig.tight_layout()
    fig.savefig(out / "overload_rss.png", dpi=110)
    plt.close(fig)


def run(args) -> int:
    pressure.stop_on_sigterm()
    result = run_overload(args)
    print(markdown(result))
    print(f"results: {Path(args.out) / 'results.json'}, results.md, overload_latency.png, overload_rss.png")
    return 1 if result["problems"] else 0


def main(argv: list[str] | None = None) -> int:
    return harness_main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
