"""``slicefleet simulate``: the live dispatch core on a simulated cluster, ShareGPT requests, virtual time,
optional faults."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from balancer.types import Mode

MODES = tuple(m.value for m in Mode)

log = logging.getLogger(__name__)

PREDICTORS = ("oracle", "constant", "trained")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="scls",
                   help="continuous_slices, scls, sls or ils; a comma-separated list runs each on the same sample "
                        "(default: scls)")
    p.add_argument("--replicas", type=int, default=8, help="simulated replicas (default: 8)")
    p.add_argument("--requests", type=int, default=2000,
                   help="ShareGPT requests to replay, exactly: above the requests that pass vLLM's filter "
                        "(15,578 of ShareGPT with the default tokenizer, fewer with --sample heldout) the rest are "
                        "drawn again with replacement, as vLLM's benchmark oversamples (default: 2000)")
    p.add_argument("--no-oversample", action="store_true",
                   help="refuse --requests above what passes the filter instead of oversampling (default: off)")
    p.add_argument("--rate", type=float, default=None,
                   help="arrivals per second (default: all requests at t = 0)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling and arrival seed (default: 0)")
    p.add_argument("--slice-len", type=int, default=64, help="S, tokens per slice (default: 64)")
    p.add_argument("--max-gen-len", type=int, default=1024, help="G, largest generation budget (default: 1024)")
    p.add_argument("--max-batch-size", type=int, default=32, help="SCLS batch-size cap (default: 32)")
    p.add_argument("--sls-batch-size", type=int, default=8, help="SLS static batch size (default: 8)")
    p.add_argument("--max-running", type=int, default=64,
                   help="continuous slices: most requests a replica decodes at once (default: 64)")
    p.add_argument("--ils-concurrency", type=int, default=16, help="ILS requests per replica (default: 16)")
    p.add_argument("--ordering", default="sjf", choices=["fcfs", "sjf", "hrrn"], help="SCLS/ILS ordering")
    p.add_argument("--placement", default="maxmin", choices=["maxmin", "round_robin", "least_work"],
                   help="which replica a batch goes to")
    p.add_argument("--predictor", default="oracle", choices=PREDICTORS,
                   help="length predictor: the true lengths, the sample median, or the trained model")
    p.add_argument("--profile", default=None,
                   help="latency profile JSON from 'slicefleet profile' (default: the packaged CPU profile)")
    p.add_argument("--model", default=None,
                   help="model directory whose tokenizer counts tokens and whose config sizes the KV cache "
                        "(default: the small default model, built if missing)")
    p.add_argument("--kv-budget-gib", type=float, default=2.0, help="KV-cache budget per replica (default: 2)")
    p.add_argument("--sample", choices=["auto", "all", "heldout"], default="auto",
                   help="ShareGPT records to sample from: all, or only the conversations the packaged length "
                        "predictor never saw (auto: heldout with --predictor trained, else all)")
    p.add_argument("--dispatch-interval", type=float, default=0.05,
                   help="seconds between scheduling rounds, as the live dispatcher's loop (default 0.05)")
    p.add_argument("--kill", action="append", default=[], metavar="REPLICA@SECONDS",
                   help="kill a replica at a virtual time, e.g. sim-3@120 (repeatable): it stops reporting, is "
                        "presumed lost when its heartbeat would expire, and what it ran continues elsewhere")
    p.add_argument("--cancel-fraction", type=float, default=0.0,
                   help="cancel this seeded fraction of the requests, --cancel-after seconds after each arrives, "
                        "as clients that go away (default: 0)")
    p.add_argument("--cancel-after", type=float, default=1.0,
                   help="seconds after arrival at which --cancel-fraction cancels (default: 1)")
    p.add_argument("--json", dest="json_out", default=None,
                   help="write the reports to this JSON file (default: print the table only)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")


def predicted_lengths(kind: str, sample, pairs) -> list[float]:
    from cluster.sim.workload import constant_predictor, oracle_predictor

    if kind == "oracle":
        return oracle_predictor(pairs)
    if kind == "constant":
        outputs = sorted(o for _, o in pairs)
        return constant_predictor(outputs[len(outputs) // 2])(pairs)
    from predictor.length import load_length_predictor

    model = load_length_predictor()
    return list(model.predict([s.prompt for s in sample], [s.prompt_len for s in sample]))


def parse_faults(args, workload) -> list:
    """The ``--kill`` and ``--cancel-fraction`` faults, as :class:`cluster.sim.simulator.SimFault`."""
    import random

    from cluster.sim.simulator import SimFault

    faults = []
    for spec in args.kill:
        replica, sep, at = spec.rpartition("@")
        malformed = f"--kill {spec!r}: expected REPLICA@SECONDS, e.g. sim-3@120"
        if not sep:
            raise SystemExit(malformed)
        try:
            faults.append(SimFault(float(at), "kill", replica))
        except ValueError:
            raise SystemExit(malformed) from None
        if replica not in {f"sim-{i}" for i in range(args.replicas)}:
            raise SystemExit(f"--kill {spec!r}: no replica {replica!r}; the simulated replicas are sim-0 .. "
                             f"sim-{args.replicas - 1}")
    if not 0.0 <= args.cancel_fraction <= 1.0:
        raise SystemExit(f"--cancel-fraction must be in [0, 1], got {args.cancel_fraction}")
    if args.cancel_fraction:
        rng = random.Random(args.seed)
        chosen = rng.sample(workload, round(args.cancel_fraction * len(workload)))
        faults += [SimFault(r.arrival + args.cancel_after, "cancel", r.id) for r in chosen]
    return faults


def run(args) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from balancer.config import SchedulerConfig
    from cluster.sim.report import format_table
    from cluster.sim.simulator import simulate
    from cluster.sim.workload import arrival_times, build_workload, sharegpt_sample
    from predictor.latency import load_profile
    from predictor.memory import memory_estimator
    from worker.make_model import ensure_default_model

    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}: choose from {', '.join(MODES)}")
    model_dir = Path(args.model) if args.model else ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    latency = load_profile(args.profile)
    memory = memory_estimator(AutoConfig.from_pretrained(model_dir), budget_bytes=args.kv_budget_gib * 2**30)

    heldout = args.sample == "heldout" or (args.sample == "auto" and args.predictor == "trained")
    if heldout:
        from predictor.sharegpt import heldout_conversations

        log.info("sampling from the length predictor's held-out conversations only")
    sample, drawn_again = sharegpt_sample(tokenizer, args.requests, args.seed,
                                          heldout_conversations() if heldout else None,
                                          allow_oversample=not args.no_oversample)
    pairs = [(s.prompt_len, s.output_len) for s in sample]
    predicted = predicted_lengths(args.predictor, sample, pairs)
    workload = build_workload(pairs, arrival_times(len(pairs), args.rate, args.burstiness, args.seed),
                              predicted, ids=[s.id for s in sample])
    faults = parse_faults(args, workload)
    reports = []
    for mode in modes:
        cfg = SchedulerConfig(
            mode=mode, slice_len=args.slice_len, max_gen_len=args.max_gen_len,
            max_batch_size=args.max_batch_size, sls_batch_size=args.sls_batch_size,
            ils_max_concurrency=args.ils_concurrency, max_running=args.max_running, ordering=args.ordering,
            placement=args.placement,
        )
        report, _ = simulate(cfg, latency, memory, workload, args.replicas, progress=args.progress,
                             dispatch_interval=args.dispatch_interval, faults=faults)
        if faults:
            log.info("%s: faults: %d replicas lost, %d requests back to the pool, %d cancelled", mode,
                     report.extra["replicas_lost"], report.extra["requests_requeued"], report.extra["cancelled"])
        report.extra.update(predictor=args.predictor, rate=args.rate, seed=args.seed,
                            sample="heldout" if heldout else "all",
                            oversampled=drawn_again)
        log.info("%s: %d requests in %.1f virtual s (%.1f s wall), schedule sha256 %s", mode, report.requests,
                 report.duration, report.extra["wall_seconds"], report.extra["schedule_sha256"])
        reports.append(report)
    print(format_table(reports))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "reports": [r.as_dict() for r in reports]}
        out.write_text(json.dumps(payload, indent=1))
        print(f"wrote {out}")
    return 0
