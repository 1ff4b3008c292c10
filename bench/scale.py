"""The simulator at scale: 8 to 1,000 replicas, arrival rate scaled with the replica count.

Each point replays ``requests_per_replica x replicas`` ShareGPT requests (lengths drawn with replacement from
a vLLM-rules sample, capped to G) arriving as a Poisson process at ``rate_per_replica x replicas``, through
the real Scheduler in virtual time (cluster.sim), with the packaged CPU latency profile. Reports throughput,
p99 and imbalance per mode, and the wall time of every simulation (the largest one is the headline).

    python -m bench.scale --replicas 8,32,128,1000 --requests-per-replica 1000 --modes scls,sls,ils \\
        --out runs/bench/scale
    python -m bench.scale --replicas 1000 --modes scls --profile runs/bench/scale/scls_1000.prof
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("slicefleet.bench.scale")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", default="8,32,128,1000", help="comma-separated replica counts")
    p.add_argument("--requests-per-replica", type=int, default=1000)
    p.add_argument("--rate-per-replica", type=float, default=0.5,
                   help="arrivals per second per replica (default 0.5: near SCLS capacity of one CPU replica)")
    p.add_argument("--modes", default="scls,sls,ils",
                   help="comma-separated modes, each optionally with its own placement: "
                        "continuous_slices,ils:round_robin (default placement: --placement)")
    p.add_argument("--placement", default="maxmin", choices=["maxmin", "round_robin", "least_work"])
    p.add_argument("--max-gen-len", type=int, default=1024)
    p.add_argument("--slice-len", type=int, default=64)
    p.add_argument("--base-sample", type=int, default=5000, help="ShareGPT sample the lengths are drawn from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, default=None,
                   help="skip points with more requests than this (keeps a development run short)")
    p.add_argument("--profile", type=Path, default=None, help="cProfile the largest run into this file")
    p.add_argument("--out", type=Path, default=Path("runs/bench/scale"))
    return p.parse_args(argv)


def length_pairs(n: int, base: int, seed: int, max_gen_len: int) -> list[tuple[int, int]]:
    from transformers import AutoTokenizer

    from predictor.sharegpt import sample_requests
    from worker.make_model import ensure_default_model

    tok = AutoTokenizer.from_pretrained(ensure_default_model())
    sample = sample_requests(tok, base, seed=seed)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sample), size=n).tolist()  # (Python ints: a NumPy index per request is slow)
    lengths = [(s.prompt_len, min(s.output_len, max_gen_len)) for s in sample]
    return [lengths[i] for i in idx]


def run_point(mode: str, replicas: int, pairs, rate: float, args, profile: Path | None = None) -> dict:
    from transformers import AutoConfig

    from balancer.config import SchedulerConfig
    from cluster.sim.simulator import simulate
    from cluster.sim.workload import arrival_times, build_workload
    from predictor.latency import load_profile
    from predictor.memory import memory_estimator
    from worker.make_model import ensure_default_model

    memory = memory_estimator(AutoConfig.from_pretrained(ensure_default_model()), budget_bytes=2.0 * 2**30)
    workload = build_workload(pairs, arrival_times(len(pairs), rate, 1.0, args.seed))
    mode, _, placement = mode.partition(":")
    cfg = SchedulerConfig(mode=mode, slice_len=args.slice_len, max_gen_len=args.max_gen_len,
                          placement=placement or args.placement)
    t0 = time.perf_counter()
    if profile is not None:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        report, _ = simulate(cfg, load_profile(None), memory, workload, replicas)
        prof.disable()
        profile.parent.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(profile))
    else:
        report, _ = simulate(cfg, load_profile(None), memory, workload, replicas)
    wall = time.perf_counter() - t0
    d = report.as_dict()
    return {"mode": f"{mode}:{cfg.placement}", "replicas": replicas, "requests": len(pairs), "rate": rate, "wall_seconds": wall,
            "request_throughput": d["request_throughput"], "output_token_throughput": d["output_token_throughput"],
            "latency_p50": d["latency_p50"], "latency_p99": d["latency_p99"], "load_imbalance": d["load_imbalance"],
            "valid_token_ratio": d["valid_token_ratio"], "mean_batch_size": d["mean_batch_size"],
            "duration": d["duration"], "schedule_sha256": d["extra"]["schedule_sha256"]}


def table(rows: list[dict]) -> str:
    lines = ["| mode | replicas | requests | rate (req/s) | req/s | tok/s | p50 (s) | p99 (s) | imbalance | valid "
             "| batch | wall (s) |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['replicas']} | {r['requests']} | {r['rate']:g} | {r['request_throughput']:.2f} | "
                     f"{r['output_token_throughput']:.0f} | {r['latency_p50']:.1f} | {r['latency_p99']:.1f} | "
                     f"{r['load_imbalance']:.3f} | {r['valid_token_ratio']:.3f} | {r['mean_batch_size']:.1f} | "
                     f"{r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    counts = [int(x) for x in args.replicas.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    largest = max(counts)
    pairs_all = length_pairs(largest * args.requests_per_replica, args.base_sample, args.seed, args.max_gen_len)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for n in counts:
        total = n * args.requests_per_replica
        if args.max_requests and total > args.max_requests:
            log.info("skip %d replicas (%d requests > --max-requests)", n, total)
            continue
        for mode in modes:
            prof = args.profile if (args.profile and n == largest) else None
            row = run_point(mode, n, pairs_all[:total], args.rate_per_replica * n, args, prof)
            log.info("%s x%d: %d requests, %.2f req/s, imbalance %.3f, wall %.1f s, schedule sha256 %s", mode, n,
                     total, row["request_throughput"], row["load_imbalance"], row["wall_seconds"],
                     row["schedule_sha256"])
            rows.append(row)
            (args.out / "scale.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "rows": rows}, indent=1))
    md = table(rows)
    (args.out / "scale.md").write_text(md + "\n")
    print(md)
    for r in rows:  # compare with an earlier run's to show a change left every finish time as it was
        print(f"schedule sha256 {r['mode']} x{r['replicas']}: {r['schedule_sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
