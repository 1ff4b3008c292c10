"""The soak harness's accounting on made-up data: memory per role over time, its growth, the per-segment
timeline, the verdict, and the report and plots of a made-up run. The live path (load, kills, sampling) is
the overload harness's and the fault harness's, whose slow tests run it."""

from __future__ import annotations

import pytest

from bench import pressure, soak
from bench.faults import Outcome


def done(sent, lat):
    return Outcome(0, status=200, accepted=True, completed=True, sent=sent, done=sent + lat,
                   chunk_times=[sent + 0.1, sent + lat])


def series():
    # Two workers: 10 dies at t = 20 and 12 replaces it at t = 25; the ingress grows 1 MiB a second.
    samples = [(float(t), 10, "worker", 500 * pressure.MB) for t in range(0, 21, 5)]
    samples += [(float(t), 11, "worker", 600 * pressure.MB) for t in range(0, 41, 5)]
    samples += [(float(t), 12, "worker", 450 * pressure.MB) for t in range(25, 41, 5)]
    samples += [(float(t), 20, "ingress", (500 + t) * pressure.MB) for t in range(0, 41, 5)]
    return pressure.rss_series(samples)


def test_role_totals_sum_the_processes_of_a_role_at_each_sample():
    totals = soak.role_totals(series(), 5.0, 30.0)
    assert totals["worker"] == [(5.0, 1100.0), (10.0, 1100.0), (15.0, 1100.0), (20.0, 1100.0), (25.0, 1050.0),
                                (30.0, 1050.0)]
    assert totals["ingress"][0] == (5.0, 505.0) and totals["ingress"][-1] == (30.0, 530.0)


def test_growth_gives_the_slope_per_hour():
    g = soak.growth(soak.role_totals(series(), 0.0, 40.0)["ingress"])
    assert (g["first"], g["last"], g["peak"]) == (500.0, 540.0, 540.0)
    assert g["slope_per_h"] == pytest.approx(3600.0)  # 1 MiB a second
    flat = soak.growth([(0.0, 7.0), (10.0, 7.0), (20.0, 7.0)])
    assert flat["slope_per_h"] == pytest.approx(0.0, abs=1e-9)
    assert soak.growth([])["peak"] is None


def test_segments_and_the_sample_at_or_before():
    assert soak.segments(10.0, 40.0, 10.0) == [(10.0, 20.0), (20.0, 30.0), (30.0, 40.0)]
    assert soak.segments(10.0, 35.0, 10.0) == [(10.0, 20.0), (20.0, 30.0), (30.0, 35.0)]
    assert soak.segments(10.0, 40.0, 0.0) == [(10.0, 40.0)]
    points = [(0.0, "a"), (5.0, "b"), (10.0, "c")]
    assert soak.at_or_before(points, 7.0) == (5.0, "b") and soak.at_or_before(points, -1.0) is None


def test_timeline_puts_each_kill_and_memory_figure_in_its_segment():
    outcomes = [done(float(t), 1.0) for t in range(40)]
    outcomes[25] = Outcome(25, status=200, accepted=True, sent=25.0, done=30.0, error="ReadError")  # lost
    redis = [{"t": float(t), "used_memory": 1000 * t, "dbsize": t, "keys": {"req": t}} for t in range(0, 41, 10)]
    kills = [{"at": 22.0, "requeued": 3, "resumed_s": 4.0, "restored_s": 6.0}]
    load = [(float(t), 1.0 if t < 20 else 3.0) for t in range(40)]
    rows = soak.timeline(outcomes, soak.role_totals(series(), 0.0, 40.0), redis, kills, 0.0, 40.0, 20.0, load)
    assert [(r["from_s"], r["to_s"]) for r in rows] == [(0.0, 20.0), (20.0, 40.0)]
    assert [r["offered"] for r in rows] == [20, 20] and [r["lost"] for r in rows] == [0, 1]
    assert rows[0]["kills"] == [] and rows[1]["kills"] == kills
    assert rows[0]["rss_mb"]["worker"] == 1100.0 and rows[1]["rss_mb"]["worker"] == 1050.0
    assert rows[0]["rss_mb"]["redis"] is None  # no Redis process in the made-up samples
    assert (rows[1]["redis_used_memory"], rows[1]["redis_dbsize"]) == (40000, 40)
    assert [r["load_median"] for r in rows] == [1.0, 3.0]


def made_up_result(lost: int = 0) -> dict:
    outcomes = [done(float(t), 1.0 + t / 40) for t in range(40)]
    s = series()
    totals = soak.role_totals(s, 0.0, 40.0)
    redis = [{"t": float(t), "used_memory": 2**20 * (2 + t / 10), "used_memory_rss": 2**20 * 9, "dbsize": 10 + t,
              "keys": {"req": t, "gen": t, "out": t, "hb": 2}, "streams": {"incoming": t, "results": 3 * t}}
             for t in range(0, 41, 10)]
    kills = [{"kind": "worker", "fired": True, "at": 22.0, "requeued": 3, "resumed_s": 4.0, "restored_s": 6.0,
              "error": ""}]
    total = pressure.phase_stats(outcomes, 0.0, 40.0)
    total["lost"] = lost
    return {"settings": {"load": 0.8, "minutes": 40 / 60, "kill_every": 20.0, "window": 10.0},
            "capacity": {"req_per_s": 1.25}, "phase": {"start": 0.0, "end": 40.0, "rate": 1.0},
            "kill_times": [20.0], "kills": kills, "rss": {str(k): v for k, v in s.items()}, "redis": redis,
            "total": total, "rss_growth": {k: soak.growth(v) for k, v in totals.items()},
            "rss_peaks": pressure.peaks(s), "timeline": soak.timeline(outcomes, totals, redis, kills, 0.0, 40.0, 20.0),
            "windows": pressure.windows(outcomes, 0.0, 40.0, 10.0, 5.0)}


def test_verdict_fails_a_lost_request_or_a_kill_that_did_not_happen():
    result = made_up_result()
    assert soak.verdict(result) == []
    assert soak.verdict(made_up_result(lost=2)) == ["2 accepted requests lost"]
    result["kills"][0] |= {"fired": False, "at": None, "error": "fewer than 1 requests in flight"}
    assert soak.verdict(result)
    result = made_up_result()
    result["kill_times"] = [20.0, 40.0]  # the second never ran
    assert soak.verdict(result)


def test_report_and_plots_of_a_made_up_run(tmp_path):
    result = made_up_result()
    result["problems"] = soak.verdict(result)
    text = soak.markdown(result)
    assert "| 0–0.3 |" in text and "| 0.3–0.7 |" in text  # segments in minutes
    assert "| 40 | 40 | 40 | 0 |" in text  # offered, accepted, completed, lost
    assert "3, 4.0 / 6.0" in text  # the kill's rows taken back, resumed and restored seconds
    assert "| ingress | 500 | 540 | 540 | 3600 |" in text
    soak.plot(result, tmp_path)
    for name in ("soak_rss.png", "soak_redis.png", "soak_load.png"):
        assert (tmp_path / name).stat().st_size > 10_000
