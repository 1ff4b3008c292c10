"""Soak harness: a live cluster at a steady share of its capacity for a long time, with a worker killed on a
schedule.

It starts ``slicefleet serve`` on loopback (the fault harness's ``Cluster``), measures its capacity for the
request mix (or takes ``--capacity``), then sends Poisson load at ``--load`` times capacity for ``--minutes``.
Every ``--kill-every`` seconds it SIGKILLs the worker replica streaming the most requests in flight, as the
fault harness's worker fault does (it fires only with requests in flight, and records rows taken back and
recovery times). Over time it records every cluster process's RSS, Redis's memory (``used_memory``), its
key count (DBSIZE and by key kind) and its shared streams' lengths, and throughput and latency; it reports
them per ``--kill-every`` segment, with requests accepted, completed and lost (accepted but never completed:
must be 0).

    python -m bench.soak --minutes 30 --load 0.8 --kill-every 300 --out runs/soak     # or: slicefleet soak ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from bench.harness_main import harness_main
from bench import pressure
from bench.faults import fill_resumed, machine, run_faults

log = logging.getLogger("slicefleet.soak")

MAIN_ROLES = ("worker", "ingress", "dispatcher", "redis", "slicefleet serve", "serve proxy", "serve controller",
              "ray gcs", "ray raylet")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=30.0, help="length of the soak")
    p.add_argument("--load", type=float, default=0.8, help="Poisson load, x capacity")
    p.add_argument("--kill-every", type=float, default=300.0,
                   help="seconds between worker kills (the first one this long after the start); 0: none")
    p.add_argument("--redis-every", type=float, default=10.0, help="seconds between samples of Redis's figures")
    p.add_argument("--window", type=float, default=60.0, help="width of the throughput and latency windows, seconds")
    p.add_argument("--trigger-timeout", type=float, default=60.0,
                   help="seconds a kill may wait for requests in flight before it counts as not fired")
    p.add_argument("--restore-timeout", type=float, default=180.0,
                   help="seconds the killed replica has to be replaced before the kill counts as failed")
    pressure.add_common_arguments(p, "runs/soak")
    p.set_defaults(rss_every=5.0)


# ---- accounting -------------------------------------------------------------------------------------------
def role_totals(series: dict[int, dict], lo: float, hi: float) -> dict[str, list[tuple[float, float]]]:
    """Per role, the sum of its processes' RSS (MiB) at each sample time in [lo, hi]: a killed worker's
    successor takes its place in the same line."""
    sums: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for s in series.values():
        for t, mb in zip(s["t"], s["mb"]):
            if lo <= t <= hi:
                sums[s["role"]][t] += mb
    return {name: sorted(points.items()) for name, points in sums.items()}


def growth(points: list[tuple[float, float]]) -> dict:
    """First, last and peak value, and the least-squares slope per hour (a leak shows as a steady slope)."""
    import numpy as np

    if not points:
        return {"first": None, "last": None, "peak": None, "slope_per_h": None}
    t = np.array([p[0] for p in points])
    v = np.array([p[1] for p in points])
    slope = float(np.polyfit(t, v, 1)[0]) * 3600 if len(points) > 2 and np.ptp(t) > 0 else None
    return {"first": float(v[0]), "last": float(v[-1]), "peak": float(v.max()), "slope_per_h": slope}


def at_or_before(points: list, t: float, key=lambda p: p[0]):
    """The last sample taken at or before ``t`` (None if none)."""
    best = None
    for p in points:
        if key(p) <= t:
            best = p
    return best


def segments(start: float, end: float, every: float) -> list[tuple[float, float]]:
    if every <= 0:
        return [(start, end)]
    cuts = [start]
    while cuts[-1] + every < end - 1e-9:
        cuts.append(cuts[-1] + every)
    return list(zip(cuts, cuts[1:] + [end]))


def timeline(outcomes: list, totals: dict, redis: list[dict], kills: list[dict], start: float, end: float,
             every: float, loadavg: list[tuple[float, float]] = ()) -> list[dict]:
    """Per segment: the requests sent in it, the kill in it, memory at its end, and the machine's load average
    (median) during it."""
    rows = []
    for lo, hi in segments(start, end, every):
        redis_at = at_or_before(redis, hi, key=lambda r: r["t"]) or {}
        rss = {}
        for name in MAIN_ROLES:
            point = at_or_before(totals.get(name, []), hi)
            rss[name] = None if point is None else point[1]
        rows.append({"from_s": lo - start, "to_s": hi - start, **pressure.phase_stats(outcomes, lo, hi),
                     "kills": [k for k in kills if k["at"] is not None and lo <= k["at"] < hi],
                     "rss_mb": rss, "load_median": pressure.load_summary(list(loadavg), lo, hi)["median"],
                     "redis_used_memory": redis_at.get("used_memory"),
                     "redis_dbsize": redis_at.get("dbsize"), "redis_keys": redis_at.get("keys", {})})
    return rows


def verdict(result: dict) -> list[str]:
    total = result["total"]
    problems = [f"{total['lost']} accepted requests lost"] if total["lost"] else []
    for k in result["kills"]:
        if not k["fired"]:
            problems.append(f"a worker kill did not fire ({k['error']})")
        elif k["error"]:
            problems.append(f"worker kill at {k['at']:.0f} s: {k['error']}")
    if len(result["kills"]) != len(result["kill_times"]):
        problems.append(f"{len(result['kills'])} of {len(result['kill_times'])} kills ran")
    return problems


# ---- the run ----------------------------------------------------------------------------------------------
async def load_with_kills(cluster, requests, outcomes, t0, kill_times, records, args, bar) -> None:
    tasks = [pressure.open_loop(cluster, requests, outcomes, t0, args.timeout, bar)]
    if kill_times:
        tasks.append(run_faults(cluster, ["worker"] * len(kill_times), outcomes, t0, kill_times, records,
                                args.trigger_timeout, args.restore_timeout, 1))
    await asyncio.gather(*tasks)


def run_soak(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = pressure.request_pool(args)
    result: dict = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "machine": machine()}
    records: list = []
    outcomes: list = []
    with tempfile.TemporaryDirectory(prefix="slicefleet-soak-") as tmp:
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
                rate = args.load * result["capacity"]["req_per_s"]
                (soak,) = pressure.phases([("soak", rate, args.minutes * 60)], start=time.perf_counter() - t0 + 1.0)
                requests = pressure.schedule(pool, [soak], args.seed)
                kill_times = [soak.start + k * args.kill_every for k in range(1, 10**6)
                              if args.kill_every > 0 and k * args.kill_every < soak.end - soak.start]
                bar = None
                if not args.no_progress:
                    from tqdm import tqdm

                    bar = tqdm(total=len(requests), desc="soak", unit="req", mininterval=10)
                asyncio.run(load_with_kills(cluster, requests, outcomes, t0, kill_times, records, args, bar))
                if bar is not None:
                    bar.close()
                result["drained_s"] = time.perf_counter() - t0 - soak.end
                # Memory after the load has drained shows what stays behind (the outputs' TTL keeps keys).
                time.sleep(max(args.redis_every, args.rss_every) + 1)
        finally:
            cluster.stop()
    fill_resumed(records, outcomes)
    series = pressure.rss_series(sampler.rss)
    result.update({"phase": {"start": soak.start, "end": soak.end, "rate": rate}, "kill_times": kill_times,
                   "kills": [asdict(r) for r in records], "rss": {str(p): s for p, s in series.items()},
                   "redis": sampler.redis, "backlog": sampler.backlog, "loadavg": sampler.loadavg,
                   "requests": pressure.compact(outcomes)})
    (out / "results.json").write_text(json.dumps(result))  # the raw figures first, whatever the analysis does
    result["total"] = {**pressure.phase_stats(outcomes, soak.start, soak.end),
                       **pressure.send_lag(outcomes, requests, soak.start, soak.end)}
    result["load_during"] = pressure.load_summary(sampler.loadavg, soak.start, soak.end)
    totals = role_totals(series, soak.start, soak.end + (result["drained_s"] or 0) + 60)
    result["rss_growth"] = {name: growth(points) for name, points in totals.items()}
    result["rss_peaks"] = pressure.peaks(series)
    result["timeline"] = timeline(outcomes, totals, sampler.redis, result["kills"], soak.start, soak.end,
                                  args.kill_every, sampler.loadavg)
    result["windows"] = pressure.windows(outcomes, soak.start, soak.end, args.window, args.window / 2)
    result["problems"] = verdict(result)
    (out / "results.json").write_text(json.dumps(result))
    (out / "results.md").write_text(markdown(result))
    plot(result, out)
    return result


# ---- the report -------------------------------------------------------------------------------------------
def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}".rstrip("0").rstrip(".")


def markdown(result: dict) -> str:
    f, total, st = pressure.fmt, result["total"], result["settings"]
    cap = result["capacity"]["req_per_s"]
    lines = [(f"capacity {cap:.2f} req/s, load {st['load']:g}x = {result['phase']['rate']:.2f} req/s for "
              f"{st['minutes']:g} min, a worker killed every {st['kill_every']:.0f} s"), ""]
    lines += pressure.table(["offered", "accepted", "completed", "lost", "429", "other failures", "e2e p50 / p99 s",
                    "TTFT p50 / p99 s", "send lag p99 / max s"],
                   [[str(total["offered"]), str(total["accepted"]), str(total["completed"]), str(total["lost"]),
                     str(total["refused_429"]), ", ".join(f"{k} {v}" for k, v in total["other_failures"].items()) or "0",
                     f"{f(total['latency_p50'])} / {f(total['latency_p99'])}",
                     f"{f(total['ttft_p50'], 2)} / {f(total['ttft_p99'], 2)}",
                     f"{f(total.get('send_lag_p99'), 2)} / {f(total.get('send_lag_max'), 2)}"]])
    lines.append("")
    roles = [r for r in MAIN_ROLES if any(row["rss_mb"].get(r) is not None for row in result["timeline"])]
    head = ["minutes", "offered", "completed", "lost", "e2e p50 / p99 s", "kill: rows back, resumed / restored s"]
    head += [f"{r} MiB" for r in roles] + ["Redis used_memory MiB", "Redis keys", "load avg"]
    rows = []
    for row in result["timeline"]:
        kill = "; ".join(f"{k['requeued']}, {f(k['resumed_s'])} / {f(k['restored_s'])}" for k in row["kills"]) or "–"
        rows.append([f"{minutes(row['from_s'])}–{minutes(row['to_s'])}", str(row["offered"]), str(row["completed"]),
                     str(row["lost"]), f"{f(row['latency_p50'])} / {f(row['latency_p99'])}", kill]
                    + [f(row["rss_mb"][r], 0) for r in roles]
                    + [f(row["redis_used_memory"] / pressure.MB if row["redis_used_memory"] else None),
                       str(row["redis_dbsize"]), pressure.fmt(row.get("load_median"))])
    lines += pressure.table(head, rows)
    lines += ["", "RSS per role over the soak (sum of its processes, MiB):", ""]
    lines += pressure.table(["role", "first", "last", "peak", "slope MiB/h"],
                   [[name, f(g["first"], 0), f(g["last"], 0), f(g["peak"], 0), f(g["slope_per_h"], 0)]
                    for name, g in sorted(result["rss_growth"].items(), key=lambda kv: -(kv[1]["peak"] or 0))])
    lines += ["", "peak RSS per process:", ""] + pressure.rss_table(result["rss_peaks"])
    lines += [f"\n- {p}" for p in result["problems"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kills = [k["at"] for k in result["kills"] if k["at"] is not None]

    def marks(ax):
        for i, at in enumerate(kills):
            ax.axvline(at, color="k", ls="--", lw=0.8, label="worker SIGKILLed" if i == 0 else None)
        ax.grid(alpha=0.3)

    fig, ax = plt.subplots(figsize=(11, 4.5))
    pressure.plot_rss(ax, {int(k): v for k, v in result["rss"].items()})
    marks(ax)
    ax.set_xlabel("seconds since the harness started")
    ax.set_title("RSS of every process of the cluster (dashed: a worker killed)")
    fig.tight_layout()
    fig.savefig(out / "soak_rss.png", dpi=110)
    plt.close(fig)

    redis = result["redis"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    t = [r["t"] for r in redis]
    a1.plot(t, [r["used_memory"] / pressure.MB for r in redis], label="used_memory")
    a1.plot(t, [r["used_memory_rss"] / pressure.MB for r in redis], label="RSS (INFO)")
    a1.set_ylabel("Redis memory (MiB)")
    marks(a1)
    a1.legend(fontsize=8)
    a2.plot(t, [r["dbsize"] for r in redis], color="k", label="DBSIZE")
    kinds = sorted({k for r in redis for k, v in r["keys"].items() if v > 5})
    for kind in kinds:
        a2.plot(t, [r["keys"].get(kind, 0) for r in redis], label=f"{kind} keys")
    for name in ("incoming", "results"):
        a2.plot(t, [r["streams"][name] for r in redis], ls=":", label=f"{name} stream length")
    a2.set_ylabel("keys / entries")
    a2.set_xlabel("seconds since the harness started")
    marks(a2)
    a2.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "soak_redis.png", dpi=110)
    plt.close(fig)

    w = result["windows"]
    width = result["settings"]["window"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    a1.plot([x["t"] + width / 2 for x in w], [x["completed_per_s"] for x in w],
            label=f"completed/s ({width:.0f} s window)")
    a1.axhline(result["phase"]["rate"], color="0.5", ls=":", label="offered rate")
    a1.set_ylabel("req/s")
    marks(a1)
    a1.legend(fontsize=8)
    pressure.plot_windows(a2, w, width)
    a2.set_ylabel("end-to-end latency (s)")
    a2.set_xlabel("seconds since the harness started (windows by send time, drawn at their centre)")
    marks(a2)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "soak_load.png", dpi=110)
    plt.close(fig)


def run(args) -> int:
    pressure.stop_on_sigterm()
    result = run_soak(args)
    print(markdown(result))
    print(f"results: {Path(args.out) / 'results.json'}, results.md, soak_rss.png, soak_redis.png, soak_load.png")
    return 1 if result["problems"] else 0


def main(argv: list[str] | None = None) -> int:
    return harness_main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
