"""Run an engine over a grid of batch sizes × input lengths and fit the slice serving-time model.

Why a separate module: :mod:`predictor.latency` is pure NumPy (the dispatcher and simulator import it);
profiling needs torch and a model. A *runner* is anything that, given (N, L, steps), runs one batch of N
rows of L prompt tokens through a prefill and ``steps`` decode steps and returns the measured prefill time
and per-step decode times. Two runners exist:

* :class:`HFForwardRunner` — plain transformers: model forward with a ``DynamicCache``, greedy next token.
  Works for any causal LM, and optionally wraps the model with DeepSpeed-Inference (``engine="deepspeed"``).
* :class:`EngineRunner` — the project's own worker engine (``worker``'s ``run_slice``), reading the
  ``prefill_time`` and ``decode_step_times`` it reports, so the profile measures exactly what serves.

Timing on a shared CPU is noisy, so every grid point is run ``repeats`` times and the per-point median is
kept, after a warm-up that pays one-off costs (allocator growth, kernel selection).
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from predictor.latency import Profile, Samples, SliceMeasurement, fit_bilinear, mape, slice_mape

log = logging.getLogger(__name__)


class SliceRunner(Protocol):
    def run(self, n: int, length: int, steps: int) -> tuple[float, list[float]]:
        """Run one batch; return (prefill seconds, [seconds of each decode step])."""


@dataclass
class Grid:
    """Which batch shapes to profile, and which to hold out for the accuracy report.

    ``max_tokens`` skips training points whose N·L would exceed it (they cost minutes on CPU and the
    memory bound rarely allows them); held-out points are drawn uniformly (log-uniform in N) inside the
    same box and obey the same bound.
    """

    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32)
    lengths: Sequence[int] = (16, 64, 128, 256, 512, 1024)
    decode_steps: int = 16
    """Decode steps per training point: step j gives a sample at context L + j."""
    heldout_points: int = 12
    heldout_steps: int = 32
    """Slice length of the held-out whole-slice measurements."""
    max_tokens: int = 16384
    repeats: int = 5
    seed: int = 0

    @classmethod
    def quick(cls) -> "Grid":
        return cls(batch_sizes=(1, 4, 16), lengths=(16, 128, 512), decode_steps=8, heldout_points=6,
                   heldout_steps=16, max_tokens=8192, repeats=2)

    def training_points(self) -> list[tuple[int, int]]:
        return [(n, L) for n in self.batch_sizes for L in self.lengths if n * L <= self.max_tokens]

    def heldout(self) -> list[tuple[int, int]]:
        rng = random.Random(self.seed + 1)
        lo_n, hi_n = min(self.batch_sizes), max(self.batch_sizes)
        lo_l, hi_l = min(self.lengths), max(self.lengths)
        train = set(self.training_points())
        out: list[tuple[int, int]] = []
        tries = 0
        while len(out) < self.heldout_points and tries < 10000:
            tries += 1
            n = int(round(math.exp(rng.uniform(math.log(lo_n), math.log(hi_n)))))
            L = int(round(math.exp(rng.uniform(math.log(lo_l), math.log(hi_l)))))
            if n * L <= self.max_tokens and (n, L) not in train and (n, L) not in out:
                out.append((n, L))
        return out


def _median(runs: list[tuple[float, list[float]]]) -> tuple[float, list[float]]:
    """Per-point median over repeated runs: of the prefill time, and of each decode step's time."""
    prefill = statistics.median(r[0] for r in runs)
    k = min(len(r[1]) for r in runs)
    decode = [statistics.median(r[1][j] for r in runs) for j in range(k)]
    return prefill, decode


def profile(
    runner: SliceRunner,
    grid: Grid | None = None,
    *,
    key: dict | None = None,
    meta: dict | None = None,
    progress: bool = True,
    nonneg: bool = True,
) -> Profile:
    """Measure the grid, fit the bilinear model, measure held-out whole slices and report their MAPE."""
    from tqdm.auto import tqdm

    grid = grid or Grid()
    train_pts = grid.training_points()
    held_pts = grid.heldout()
    if not train_pts:
        raise ValueError("empty profiling grid (check batch_sizes, lengths and max_tokens)")
    # Warm-up: the largest shape first so the allocator has grown before anything is timed.
    big = max(train_pts, key=lambda p: p[0] * p[1])
    runner.run(big[0], big[1], 2)
    runner.run(1, min(grid.lengths), 2)

    jobs = [("train", p) for p in train_pts] + [("heldout", p) for p in held_pts]
    runs: dict[tuple[str, int, int], list[tuple[float, list[float]]]] = {job_key: [] for job_key in
                                                                        ((k, n, L) for k, (n, L) in jobs)}
    # Repeats are whole passes over the grid, each in its own shuffled order: a burst of load from another
    # process on a shared machine then hits different points in different passes, and the per-point
    # median discards it (back-to-back repeats would all land inside the same burst).
    order = [(rep, job) for rep in range(max(grid.repeats, 1))
             for job in random.Random(grid.seed + rep).sample(jobs, len(jobs))]
    t0 = time.perf_counter()
    bar = tqdm(order, desc="profile", unit="run", disable=not progress)
    for rep, (kind, (n, L)) in bar:
        steps = grid.decode_steps if kind == "train" else grid.heldout_steps
        bar.set_postfix_str(f"pass {rep + 1} {kind} N={n} L={L}")
        runs[(kind, n, L)].append(runner.run(n, L, steps))

    samples = Samples()
    train_slices: list[SliceMeasurement] = []
    heldout: list[SliceMeasurement] = []
    for (kind, n, L), results in runs.items():
        pre, dec = _median(results)
        m = SliceMeasurement(n, L, len(dec), pre, dec)
        if kind == "train":
            samples.add_slice(n, L, pre, dec)
            train_slices.append(m)
        else:
            heldout.append(m)
    elapsed = time.perf_counter() - t0

    model = fit_bilinear(samples.prefill, samples.decode, nonneg=nonneg)
    pre = np.asarray(samples.prefill, dtype=float)
    dec = np.asarray(samples.decode, dtype=float)
    metrics = {
        "prefill_mape_train": mape(model.prefill_time(pre[:, 0], pre[:, 1]), pre[:, 2]),
        "decode_step_mape_train": mape(model.decode_step_time(dec[:, 0], dec[:, 1]), dec[:, 2]),
        "slice_mape_train": slice_mape(model, train_slices),
        "slice_mape_heldout": slice_mape(model, heldout) if heldout else None,
        "heldout_points": len(heldout),
        "heldout_steps": grid.heldout_steps,
        "profile_seconds": round(elapsed, 1),
    }
    grid_meta = {
        "batch_sizes": list(grid.batch_sizes), "lengths": list(grid.lengths),
        "decode_steps": grid.decode_steps, "max_tokens": grid.max_tokens, "repeats": grid.repeats,
        "seed": grid.seed,
    }
    return Profile(model=model, key=dict(key or {}), samples=samples, heldout=heldout, metrics=metrics,
                   meta={**(meta or {}), "grid": grid_meta})


# --------------------------------------------------------------------------------------------- runners


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass
class HFForwardRunner:
    """Time a transformers causal LM directly: one forward over (N, L) random token ids with a fresh
    ``DynamicCache`` (the prefill, which also yields the first new token), then ``steps`` one-token forwards.

    Decode step j sees L + j cached tokens, matching ``BilinearLatencyModel``'s Σ_{j<s} decode(N, L + j).
    """

    model: object
    device: str = "cpu"
    vocab_low: int = 16
    seed: int = 0
    _gen: object = field(default=None, repr=False)

    def run(self, n: int, length: int, steps: int) -> tuple[float, list[float]]:
        import torch
        from transformers import DynamicCache

        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        vocab = int(self.model.config.vocab_size)
        ids = torch.randint(self.vocab_low, vocab, (n, length), generator=self._gen).to(self.device)
        cache = DynamicCache(config=self.model.config)
        times: list[float] = []
        with torch.inference_mode():
            _sync(self.device)
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            _sync(self.device)
            prefill = time.perf_counter() - t0
            for _ in range(steps):
                t0 = time.perf_counter()
                out = self.model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
                _sync(self.device)
                times.append(time.perf_counter() - t0)
        return prefill, times


def load_hf_model(path: str, device: str = "cpu", dtype: str = "float32", engine: str = "hf",
                  kernel_inject: bool = False):
    """Load a local model for :class:`HFForwardRunner`; ``engine="deepspeed"`` wraps it with
    ``deepspeed.init_inference`` (kernel injection only on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    if engine == "deepspeed":
        import deepspeed

        model = deepspeed.init_inference(model, dtype=torch_dtype,
                                         replace_with_kernel_inject=bool(kernel_inject)).module
    return model


class EngineRunner:
    """Profile the worker's own engine through ``run_slice``.

    ``make_batch(n, length, steps)`` builds whatever the engine's ``run_slice`` takes for N rows of
    ``length`` prompt tokens and a budget of ``steps`` tokens (rows must not stop early at EOS: use the
    engine's trace/ignore-EOS mode); the result must carry ``prefill_time`` and ``decode_step_times``.
    """

    def __init__(self, engine, make_batch: Callable[[int, int, int], object]):
        self.engine = engine
        self.make_batch = make_batch

    def run(self, n: int, length: int, steps: int) -> tuple[float, list[float]]:
        result = self.engine.run_slice(self.make_batch(n, length, steps))
        return float(result.prefill_time), [float(t) for t in result.decode_step_times]


def model_key(path: str, dtype: str = "float32") -> dict:
    """Identify a model directory by its config (shapes), not by where it happens to live."""
    import hashlib
    import json
    from pathlib import Path

    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    shape_fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
    shapes = {k: cfg.get(k) for k in shape_fields if k in cfg}
    digest = hashlib.sha1(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:12]
    return {"model": f"{shapes.get('model_type', 'model')}-{digest}", "model_shapes": shapes, "dtype": dtype}
