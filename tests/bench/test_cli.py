"""``slicefleet bench`` argument parsing, the report's tables and plots (no cluster)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cli, report


def parse(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


def test_registered_and_help():
    from cluster.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "--modes", "scls,sls", "--rates", "inf,0.5", "--requests", "10"])
    assert args.modes == ["scls", "sls"] and args.rates == [None, 0.5] and args.requests == 10
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--modes" in out.stdout and "--vllm" in out.stdout


def test_defaults_and_errors():
    a = parse([])
    assert a.modes == ["continuous_slices", "scls", "sls", "ils"] and a.engines == ["hf"] and a.rates == [None] and a.replicas == 2 and a.budget == "cap"
    assert parse(["--placements", "maxmin,round_robin"]).placements == ["maxmin", "round_robin"]
    for bad in (["--modes", "scls,foo"], ["--engines", "tgi"], ["--rates", "-1"], ["--rates", ","], ["--placements", "random"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_overrides_validate():
    from cluster.config import load_config

    a = parse(["--placements", "round_robin", "--port", "9001", "--max-gen-len", "256"])
    cfg = load_config(None, cli.cluster_overrides(a, "sls", "round_robin"))
    assert cfg.scheduler.mode == "sls" and cfg.scheduler.placement == "round_robin"
    assert cfg.api.port == 9001 and cfg.api.host == "127.0.0.1" and cfg.scheduler.max_gen_len == 256
    assert cfg.predictor.length_model == cli.NO_LENGTH_MODEL


def _run(label, mode, rate, tput, p99):
    rep = {"request_throughput": tput, "output_token_throughput": tput * 100, "latency_mean": p99 / 2,
           "latency_p99": p99, "valid_token_ratio": 0.9, "decode_valid_ratio": 0.95, "pad_tokens": 1,
           "invalid_tokens": 2, "reprefill_tokens": 3, "mean_batch_size": 4.0, "load_imbalance": 0.1,
           "early_return_ratio": 0.5, "slices_per_request": 2.0}
    serving = {"completed": 10, "failed": 0, "request_throughput": tput, "output_throughput": tput * 100,
               "e2el": {"mean": p99 / 2, "median": p99 / 2, "p99": p99}, "ttft": {"median": 1.0},
               "tpot": {"median": 0.01}, "goodput": tput}
    run = {"label": label, "mode": mode, "rate": rate, "serving": serving, "report": rep, "load_before": 1.0,
           "latencies": [1.0, 2.0, p99], "busy_samples": [[0.0, {"a": 0.0, "b": 0.0}], [1.0, {"a": 1.0, "b": 0.8}]]}
    if mode != "vllm":
        sims = {"packaged": dict(rep, request_throughput=tput * 1.1), "in_situ": dict(rep, request_throughput=tput * 0.97)}
        run["sims"] = {k: {"report": v, "error": cli.sim_error(rep, v)} for k, v in sims.items()}
    return run


def test_in_situ_calibration_is_fitted_from_logged_slices_and_saved(tmp_path):
    from balancer.estimators import BilinearLatencyModel
    from predictor.latency import read_profile

    true = BilinearLatencyModel(a=2e-6, b=1e-4, c=3e-6, d=5e-3, e=4e-8, f=2e-5, g=1e-7, h=3e-3)
    log = [{"n": n, "max_input_len": L, "resumed_rows": 0, "prefill_time": true.prefill_time(n, L),
            "decode_step_times": [true.decode_step_time(n, L + j) for j in range(4)]}
           for n in (1, 4, 16) for L in (32, 128, 512)]
    models = cli.calibrations(parse(["--out", str(tmp_path)]), log)
    assert set(models) == {"packaged", "in_situ"}
    assert models["in_situ"].batch_time(8, 256, 64) == pytest.approx(true.batch_time(8, 256, 64), rel=1e-3)
    assert read_profile(tmp_path / "profile_in_situ.json").model == models["in_situ"]
    # too few slices to fit: only the packaged profile
    assert set(cli.calibrations(parse(["--out", str(tmp_path)]), log[:2])) == {"packaged"}


def test_report_tables_and_plots(tmp_path):
    runs = [_run("scls", "scls", None, 2.0, 10.0), _run("sls", "sls", None, 1.0, 30.0),
            _run("vllm", "vllm", None, 4.0, 5.0)]
    assert runs[0]["sims"]["packaged"]["error"]["request_throughput"] == pytest.approx(0.1)
    md = report.markdown({"args": {"requests": 10, "replicas": 2}, "machine": {}, "runs": runs})
    # Each table: the other system over the base, same rate (req/s, tok/s, TTFT p50, E2E p99).
    scls_table = md.split("## Against scls")[1].split("##")[0]
    vllm_table = md.split("## Against vllm")[1].split("##")[0]
    assert "| inf | sls | 0.50 | 0.50 |" in scls_table and scls_table.split("| inf | sls |")[1].split("\n")[0].endswith(
        "| 3.00 |")
    assert "| inf | scls | 0.50 |" in vllm_table
    assert "| scls | inf | packaged | 2.000 | 2.200 | +10% |" in md
    assert "| scls | inf | in_situ | 2.000 | 1.940 | -3% |" in md
    report.write_all({"args": {}, "machine": {}, "runs": runs}, tmp_path)
    for name in ("bench.md", "throughput_p99_vs_rate.png", "latency_cdf.png", "replica_busy.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_resimulate_replays_a_saved_bench_with_both_calibrations(tmp_path):
    """A saved bench.json and its slice log are replayed in the simulator again, without any cluster."""
    import json

    from balancer.estimators import BilinearLatencyModel

    true = BilinearLatencyModel(a=2e-6, b=1e-4, c=3e-6, d=5e-3, e=4e-8, f=2e-5, g=1e-7, h=3e-3)
    log = [{"n": n, "max_input_len": L, "resumed_rows": 0, "prefill_time": true.prefill_time(n, L),
            "decode_step_times": [true.decode_step_time(n, L + j) for j in range(4)]}
           for n in (1, 4, 16) for L in (32, 128, 512)]
    run = _run("scls", "scls", None, 2.0, 10.0)
    run["placement"] = "maxmin"
    del run["sims"]
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(parse(["--requests", "6"])).items()}
    (tmp_path / "bench.json").write_text(json.dumps({"args": args, "machine": {}, "runs": [run]}))
    (tmp_path / "slice_log.json").write_text(json.dumps(log))
    assert cli.resimulate(tmp_path / "bench.json") == 0
    sims = json.loads((tmp_path / "bench.json").read_text())["runs"][0]["sims"]
    assert set(sims) == {"packaged", "in_situ"}
    for sim in sims.values():
        assert sim["report"]["requests"] == 6 and sim["report"]["request_throughput"] > 0
        assert sim["error"]["request_throughput"] == pytest.approx(sim["report"]["request_throughput"] / 2.0 - 1)
    assert "| scls | inf | in_situ |" in (tmp_path / "bench.md").read_text()



def test_captions_name_the_machine_and_the_model_and_rates_read_as_words():
    data = {"machine": {"cpus": 2, "machine": "x86_64", "cpu_model": "Xeon", "gpu": None},
            "args": {"model_label": "tiny (LlamaForCausalLM, 10.5 M params, float32)", "replicas": 2,
                     "requests": 10, "seed": 0}}
    c = report.caption(data)
    assert "2 CPU cores x86_64 (Xeon)" in c and "no GPU" in c and "10.5 M params" in c and "2 replicas" in c
    gpu = report.caption({**data, "machine": {**data["machine"], "gpu": "1x NVIDIA H200"}})
    assert "1x NVIDIA H200" in gpu and "no GPU" not in gpu
    remote = report.caption({**data, "args": {**data["args"], "base_url": "http://h:1", "model_label": "m at h"}})
    assert "m at h" in remote and "load generator on 2 CPU cores" in remote
    # bench.json from before the label was recorded: those runs all used the default model
    assert "10.5 M params" in report.caption({"machine": {}, "args": {}})
    assert report._load(None) == "all at once" and report._load(3.4) == "Poisson 3.4 req/s"
    md = report.markdown({"args": {"slo_ttft": 30.0, "slo_tpot": 0.5}, "machine": {},
                          "runs": [_run("scls", "scls", None, 2.0, 10.0)]})
    assert "imbalance = std / mean" in md and "TTFT <= 30 s, TPOT <= 0.5 s" in md


def test_model_label_reads_the_files():
    from worker.make_model import ensure_default_model

    label = cli.model_label(ensure_default_model(), "float32")
    assert label.endswith("(LlamaForCausalLM, 10.5 M params, float32)")
