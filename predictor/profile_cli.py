"""``slicefleet profile``: time an engine over a grid, fit the slice serving-time model, write the profile.

The packaged CPU profile for the default model was written with

    slicefleet profile --engine hf --out predictor/artifacts/latency_cpu_default.json

(see ``meta.command`` inside the file for the exact command line and ``metrics`` for the held-out MAPE).
Heavy imports (torch, transformers, the worker) stay inside :func:`run` so ``--help`` is instant.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="local model directory (default: the small default Llama, "
                        "built on first use)")
    parser.add_argument("--engine", choices=("hf", "deepspeed"), default="hf", help="backend to profile")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:i]'")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", type=Path, default=None,
                        help="profile file (default: ~/.cache/slicefleet/profiles/<model>-<engine>-<device>.json)")
    parser.add_argument("--quick", action="store_true", help="a small grid (about a minute on CPU)")
    parser.add_argument("--runner", choices=("auto", "engine", "forward"), default="auto",
                        help="'engine': the worker engine's run_slice; 'forward': plain model forwards; "
                        "'auto': the engine when the worker provides one")
    parser.add_argument("--batch-sizes", type=_ints, default=None, help="comma-separated N grid")
    parser.add_argument("--lengths", type=_ints, default=None, help="comma-separated L grid")
    parser.add_argument("--decode-steps", type=int, default=None, help="decode steps per training point")
    parser.add_argument("--repeats", type=int, default=None, help="runs per point (median kept)")
    parser.add_argument("--max-tokens", type=int, default=None, help="skip points with N*L above this")
    parser.add_argument("--heldout", type=int, default=None, help="held-out whole slices for the MAPE report")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on CPU (default: $SLICEFLEET_TORCH_THREADS or 1, as the engines use)")
    parser.add_argument("--seed", type=int, default=0)


def _grid(args):
    from predictor.profiler import Grid

    grid = Grid.quick() if args.quick else Grid()
    overrides = {
        "batch_sizes": args.batch_sizes, "lengths": args.lengths, "decode_steps": args.decode_steps,
        "repeats": args.repeats, "max_tokens": args.max_tokens, "heldout_points": args.heldout,
    }
    for k, v in overrides.items():
        if v is not None:
            setattr(grid, k, v)
    grid.seed = args.seed
    return grid


def make_runner(model_path: str, engine: str, device: str, dtype: str, runner: str = "auto",
                threads: int | None = None):
    """The runner ``slicefleet profile`` uses: the worker's engine if it has one and ``runner`` allows,
    else plain transformers forwards (optionally DeepSpeed-wrapped). Returns (runner, name)."""
    from predictor import profiler

    if runner in ("auto", "engine"):
        try:
            from predictor.engine_runner import worker_engine_runner

            found = worker_engine_runner(model_path, engine, device, dtype, num_threads=threads)
        except ImportError as exc:
            if runner == "engine":
                raise
            log.info("worker engine not available (%s); profiling plain model forwards", exc)
            found = None
        if found is not None:
            return found, "engine"
        if runner == "engine":
            raise RuntimeError("the worker provides no engine to profile")
    model = profiler.load_hf_model(model_path, device=device, dtype=dtype, engine=engine,
                                   kernel_inject=engine == "deepspeed" and str(device).startswith("cuda"))
    return profiler.HFForwardRunner(model, device=device), "forward"


def run(args) -> int:
    import shlex

    import torch

    from predictor import profiler
    from predictor.latency import hardware_key

    if not str(args.device).startswith("cuda"):
        import os

        threads = args.threads or int(os.environ.get("SLICEFLEET_TORCH_THREADS", "1"))
        torch.set_num_threads(threads)
        args.threads = threads
    model_path = args.model
    if model_path is None:
        from worker.make_model import ensure_default_model

        model_path = str(ensure_default_model())
    grid = _grid(args)
    runner, runner_name = make_runner(model_path, args.engine, args.device, args.dtype, args.runner, args.threads)
    key = {**profiler.model_key(model_path, args.dtype), "engine": args.engine,
           "hardware": hardware_key(args.device)}
    meta = {
        "command": "slicefleet profile " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "profile" else None,
        "runner": runner_name,
        "model_path": str(model_path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    prof = profiler.profile(runner, grid, key=key, meta=meta)
    out = args.out
    if out is None:
        out = (Path.home() / ".cache" / "slicefleet" / "profiles"
               / f"{key['model']}-{args.engine}-{key['hardware']['device']}.json")
    prof.save(out)
    m = prof.metrics
    print(f"wrote {out}")
    print("coefficients: " + ", ".join(f"{k}={v:.4g}" for k, v in prof.model.as_dict().items()))
    held = m["slice_mape_heldout"]
    print(f"MAPE train: prefill {m['prefill_mape_train']:.1f}%, decode step {m['decode_step_mape_train']:.1f}%, "
          f"slice {m['slice_mape_train']:.1f}%; held-out whole slice ({m['heldout_points']} points, "
          f"{m['heldout_steps']} steps): {'n/a' if held is None else f'{held:.1f}%'}")
    return 0
