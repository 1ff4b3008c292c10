"""Engine throughput on this machine: output tokens/s against batch size x input length, per backend.

Every cell serves the same static workload: N requests of L prompt tokens, each emitting exactly T tokens
(trace mode, so a random-weight model cannot stop early). ``hf`` and ``deepspeed`` run it as one
``run_slice`` to completion; ``continuous`` admits all N at once under a cap of N. Writes
``engine_throughput.json`` and ``engine_throughput.png`` under ``--out`` and prints a table.

    python -m bench.engine_throughput                       # default grid, a few minutes on 2 cores
    python -m bench.engine_throughput --backends hf --batch-sizes 1 8 --input-lens 64
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

DEFAULT_OUT = Path("runs/engine_throughput")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local HF model dir (default: the default model, built if missing)")
    p.add_argument("--backends", nargs="+", default=["hf", "deepspeed", "continuous"],
                   choices=["hf", "deepspeed", "continuous"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--input-lens", nargs="+", type=int, default=[32, 128, 512])
    p.add_argument("--new-tokens", type=int, default=32, help="output tokens per request (exact, trace mode)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell and backend (the fastest is kept)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: $SLICEFLEET_TORCH_THREADS or 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def make_items(n: int, length: int, new_tokens: int, vocab: int, seed: int):
    from worker.protocol import SliceItem

    rng = random.Random(seed)
    return [
        SliceItem(f"b{n}-l{length}-{i}", [rng.randrange(16, vocab) for _ in range(length)], length,
                  max_new_tokens=new_tokens, target_len=new_tokens)
        for i in range(n)
    ]


def run_cell(engine, backend: str, items) -> dict:
    """Serve ``items`` once; return elapsed, prefill and decode timings."""
    if backend == "continuous":
        engine.max_concurrency = len(items)
        engine.reset_stats()
        t0 = time.perf_counter()
        outs = engine.run(items)
        elapsed = time.perf_counter() - t0
        st = engine.stats
        return {"elapsed": elapsed, "prefill_time": st.prefill_time, "decode_steps": st.decode_steps,
                "decode_time": st.decode_time, "out_tokens": sum(len(o.new_token_ids) for o in outs)}
    engine.store.clear()
    res = engine.run_slice(items, None)
    return {"elapsed": res.elapsed, "prefill_time": res.prefill_time, "decode_steps": len(res.decode_step_times),
            "decode_time": sum(res.decode_step_times), "out_tokens": res.new_tokens}


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = sorted({r["input_len"] for r in rows})
    fig, axes = plt.subplots(1, len(lens), figsize=(4.2 * len(lens), 3.6), squeeze=False)
    for ax, length in zip(axes[0], lens):
        for backend in sorted({r["backend"] for r in rows}):
            pts = sorted((r["batch_size"], r["out_tok_s"]) for r in rows
                         if r["backend"] == backend and r["input_len"] == length)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set_title(f"input length {length}")
        ax.set_xlabel("batch size")
        ax.set_xscale("log", base=2)
        ax.set_ylabel("output tokens/s")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend()
    from bench.report import _suptitle

    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    head = f"{'backend':<11}{'batch':>6}{'input':>7}{'out tok/s':>11}{'total tok/s':>13}{'prefill s':>11}{'decode ms/step':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['backend']:<11}{r['batch_size']:>6}{r['input_len']:>7}{r['out_tok_s']:>11.1f}"
                     f"{r['total_tok_s']:>13.1f}{r['prefill_time']:>11.3f}{r['decode_ms_per_step']:>16.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from worker.factory import build_engine
    from worker.hf_engine import set_cpu_threads
    from worker.make_model import ensure_default_model

    import torch

    if args.device == "cpu":
        set_cpu_threads(args.threads)
    model_path = Path(args.model) if args.model else ensure_default_model()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t_all = time.perf_counter()
    engines = {}
    for backend in args.backends:
        t_load = time.perf_counter()
        engines[backend] = build_engine(backend, model_path, device=args.device, dtype=args.dtype,
                                        kv_reuse=False, num_threads=args.threads)
        print(f"[{backend}] loaded in {time.perf_counter() - t_load:.1f} s", flush=True)
    vocab = int(next(iter(engines.values())).model.config.vocab_size)
    for backend, engine in engines.items():
        run_cell(engine, backend, make_items(2, 16, 4, vocab, seed=0))  # warm-up: first calls allocate
    # Cells outer, backends inner, repeats interleaved: machine noise (other processes on the shared
    # cores) then hits every backend alike instead of whichever happened to run during a busy minute.
    for length in args.input_lens:
        for n in args.batch_sizes:
            items = make_items(n, length, args.new_tokens, vocab, seed=n * 7919 + length)
            runs: dict[str, list[dict]] = {b: [] for b in engines}
            for _ in range(max(args.repeats, 1)):
                for backend, engine in engines.items():
                    runs[backend].append(run_cell(engine, backend, items))
            for backend in engines:
                best = min(runs[backend], key=lambda c: c["elapsed"])
                assert best["out_tokens"] == n * args.new_tokens, best
                row = {
                    "backend": backend,
                    "device": args.device,
                    "batch_size": n,
                    "input_len": length,
                    "new_tokens": args.new_tokens,
                    **best,
                    "out_tok_s": best["out_tokens"] / best["elapsed"],
                    "total_tok_s": (best["out_tokens"] + n * length) / best["elapsed"],
                    "decode_ms_per_step": 1e3 * best["decode_time"] / max(best["decode_steps"], 1),
                    "elapsed_all": [round(c["elapsed"], 4) for c in runs[backend]],
                }
                rows.append(row)
                print(f"  {backend:<10} batch {n:>3} input {length:>4}: {row['out_tok_s']:8.1f} out tok/s "
                      f"(best of {len(runs[backend])}: {best['elapsed']:.2f} s)", flush=True)
    rows.sort(key=lambda r: (list(engines).index(r["backend"]), r["input_len"], r["batch_size"]))
    meta = {
        "model": str(model_path),
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "wall_seconds": round(time.perf_counter() - t_all, 1),
    }
    (args.out / "engine_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    from bench.cli import machine_facts, model_label
    from bench.report import machine_text

    title = (f"{machine_text(machine_facts())}; {model_label(model_path, args.dtype)}; {args.device}, "
             f"{meta['torch_threads']} torch thread(s), {args.new_tokens} new tokens per row")
    plot(rows, args.out / "engine_throughput.png", title)
    print(table(rows))
    print(f"wrote {args.out / 'engine_throughput.json'} and {args.out / 'engine_throughput.png'} "
          f"({meta['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
