"""How long one SCLS scheduling decision takes: DP batching plus max-min placement of a large pool.

A decision = ordering with aging (choose who), the DP batcher (how to group), splitting for idle replicas and
cost-aware max-min placement (where) — exactly ``Scheduler.schedule(now)`` with every replica free. The pool
is ShareGPT-like lengths; times are the median of repeated runs on fresh schedulers.

    python -m bench.decision_time --pool 10000 --replicas 64 --out runs/decision_time
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from balancer.config import SchedulerConfig
from balancer.estimators import BilinearLatencyModel, LinearKVMemory
from balancer.scheduler import Scheduler
from balancer.types import Request

# The packaged CPU profile's coefficients would do as well; these keep the bench free of predictor/.
LATENCY = BilinearLatencyModel(1.8e-4, 0.0, 6.0e-5, 4.2e-3, 2.1e-6, 2.4e-4, 0.0, 6.8e-3)


def make_pool(n: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(4.6, 1.0, n), 4, 1024).astype(int)
    generated = rng.integers(0, 512, n)
    predicted = np.clip(rng.lognormal(5.2, 0.9, n), 4, 1024)
    return [Request(f"r{i}", int(p), 1024, float(i) * 1e-3, predicted_len=float(q), generated=int(g))
            for i, (p, g, q) in enumerate(zip(prompts, generated, predicted))]


def one_decision(pool_size: int, replicas: int, seed: int, cfg: SchedulerConfig,
                 memory: LinearKVMemory) -> tuple[float, int, int]:
    sched = Scheduler(cfg, LATENCY, memory)
    for i in range(replicas):
        sched.add_replica(f"w{i}")
    now = 100.0
    for r in make_pool(pool_size, seed):
        sched.add_request(r, now)
    started = time.perf_counter()
    out = sched.schedule(now)
    elapsed = time.perf_counter() - started
    return elapsed, len(out), sum(a.batch.size for a in out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=int, default=10_000, help="requests waiting in the pool (default 10000)")
    p.add_argument("--replicas", type=int, default=64, help="free replicas (default 64)")
    p.add_argument("--repeats", type=int, default=15, help="decisions timed (default 15)")
    p.add_argument("--queue-depth", type=int, default=2, help="batches each replica may hold (default 2)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--out", default="runs/decision_time", help="folder for JSON and PNG")
    args = p.parse_args(argv)

    cfg = SchedulerConfig(mode="scls", slice_len=64, max_batch_size=args.max_batch_size,
                          queue_depth=args.queue_depth, ordering="sjf")
    memory = LinearKVMemory(bytes_per_token=12288, budget_bytes=2 * 2**30)
    one_decision(min(args.pool, 1000), args.replicas, 0, cfg, memory)  # warm-up (imports, caches)
    runs = [one_decision(args.pool, args.replicas, seed, cfg, memory) for seed in range(args.repeats)]
    times = [t for t, _, _ in runs]
    result = {
        "pool": args.pool, "replicas": args.replicas, "repeats": args.repeats, "queue_depth": args.queue_depth,
        "max_batch_size": args.max_batch_size,
        "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
        "batches_placed": runs[0][1], "requests_placed": runs[0][2], "times_ms": [t * 1e3 for t in times],
    }
    print(f"pool {args.pool}, {args.replicas} replicas: median {result['median_ms']:.1f} ms per decision "
          f"(min {result['min_ms']:.1f}, max {result['max_ms']:.1f}); placed {result['batches_placed']} batches, "
          f"{result['requests_placed']} requests")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decision_time.json").write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [1000, 2500, 5000, 10_000, 20_000]
    med = [statistics.median(one_decision(n, args.replicas, s, cfg, memory)[0] for s in range(5)) * 1e3
           for n in sizes]
    result["scaling"] = dict(zip(map(str, sizes), med))
    (out / "decision_time.json").write_text(json.dumps(result, indent=1))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sizes, med, marker="o")
    ax.set_xlabel("requests in the pool")
    ax.set_ylabel("median decision time (ms)")
    ax.set_title(f"SCLS decision (DP + max-min), {args.replicas} replicas")
    ax.grid(alpha=0.3)
    from bench.cli import machine_facts
    from bench.report import _suptitle, machine_text

    # No model runs here: the pool's lengths are synthetic and the KV model fixed, so the machine is the caption.
    _suptitle(fig, f"{machine_text(machine_facts())}; scheduler only (no model), KV 12,288 B/token, 2 GiB")
    fig.tight_layout()
    fig.savefig(out / "decision_time.png", dpi=120)
    print(f"wrote {out / 'decision_time.json'} and {out / 'decision_time.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
