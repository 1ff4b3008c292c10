"""Slice serving time: fit SCLS's bilinear model from measurements, store it as a profile, refit it online.

Why: the DP batcher and the max-min placement compare *estimated* batch times, so the estimate must track
the real engine. SCLS models a batch of N rows padded to L tokens as

    prefill(N, L) = a·N·L + b·N + c·L + d        decode step(N, l) = e·N·l + f·N + g·l + h

and the closed form of a whole slice lives in :class:`balancer.estimators.BilinearLatencyModel`; this module
only finds the eight numbers.

* :func:`fit_bilinear` — least squares on prefill samples and per-step decode samples. Rows are weighted by
  1/time (relative error), because the scheduler cares about ratios between batches and MAPE is what we
  report; an unweighted fit lets the largest batches drown the small ones. Coefficients are kept
  nonnegative (NNLS) by default: each term is a cost, and a negative one extrapolates to negative times
  outside the grid.
* :class:`Profile` — the versioned JSON written by ``slicefleet profile`` and read by the cluster and the
  simulator, keyed by model, engine and hardware so a profile is never silently used on the wrong setup.
* :class:`OnlineLatencyEstimator` — a ``SliceTimeEstimator`` that refits from the timings replicas report
  (exponentially forgotten), anchored by pseudo-observations from the profile scaled by the observed drift,
  so directions the recent traffic does not excite keep a sensible value.

The profiler itself (running an engine over a grid) is in :mod:`predictor.profiler`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from balancer.estimators import BilinearLatencyModel

log = logging.getLogger(__name__)

PROFILE_FORMAT = "slicefleet.latency-profile"
PROFILE_VERSION = 1
COEFFS = ("a", "b", "c", "d", "e", "f", "g", "h")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DEFAULT_CPU_PROFILE = ARTIFACTS / "latency_cpu_default.json"


# ------------------------------------------------------------------------------------------- features


def prefill_features(n, length) -> np.ndarray:
    """Rows [N·L, N, L, 1] for the prefill half of the model."""
    n, length = (np.asarray(v, dtype=float).reshape(-1) for v in np.broadcast_arrays(n, length))
    return np.stack([n * length, n, length, np.ones_like(n)], axis=1)


def decode_features(n, context) -> np.ndarray:
    """Rows [N·l, N, l, 1] for one decode step at context length l."""
    return prefill_features(n, context)


def slice_features(n, length, steps) -> np.ndarray:
    """Rows of all eight coefficients for whole slices: ``batch_time = slice_features @ [a..h]``."""
    n, length, s = (np.asarray(v, dtype=float).reshape(-1) for v in np.broadcast_arrays(n, length, steps))
    s = np.maximum(s, 0.0)
    ctx = s * length + s * (s - 1.0) / 2.0
    return np.stack([n * length, n, length, np.ones_like(n), n * ctx, n * s, ctx, s], axis=1)


def _solve(x: np.ndarray, y: np.ndarray, w: np.ndarray | None, nonneg: bool) -> np.ndarray:
    """Weighted least squares with columns rescaled to unit norm (the features span ~6 orders of
    magnitude), optionally nonnegative."""
    if w is not None:
        x = x * w[:, None]
        y = y * w
    scale = np.linalg.norm(x, axis=0)
    scale[scale == 0] = 1.0
    xs = x / scale
    if nonneg:
        from scipy.optimize import nnls

        coef, _ = nnls(xs, y, maxiter=50 * xs.shape[1])
    else:
        coef, *_ = np.linalg.lstsq(xs, y, rcond=None)
    return coef / scale


@dataclass
class Samples:
    """Measured timings: prefill (N, L, seconds) and decode steps (N, context length, seconds)."""

    prefill: list[tuple[int, int, float]] = field(default_factory=list)
    decode: list[tuple[int, int, float]] = field(default_factory=list)

    def add_slice(self, n: int, length: int, prefill_time: float, decode_step_times: Sequence[float]) -> None:
        """Record one slice: decode step j ran at context length ``length + j``."""
        self.prefill.append((int(n), int(length), float(prefill_time)))
        self.add_decode(n, length, decode_step_times)

    def add_decode(self, n: int, length: int, decode_step_times: Sequence[float]) -> None:
        """Record a slice's decode steps only: step j ran at context length ``length + j``."""
        for j, t in enumerate(decode_step_times):
            self.decode.append((int(n), int(length) + j, float(t)))

    def as_dict(self) -> dict:
        return {"prefill": [list(r) for r in self.prefill], "decode": [list(r) for r in self.decode]}

    @classmethod
    def from_dict(cls, data: dict) -> "Samples":
        return cls(
            prefill=[(int(a), int(b), float(c)) for a, b, c in data.get("prefill", [])],
            decode=[(int(a), int(b), float(c)) for a, b, c in data.get("decode", [])],
        )


def fit_bilinear(
    prefill: Iterable[tuple[int, int, float]],
    decode: Iterable[tuple[int, int, float]],
    *,
    relative: bool = True,
    nonneg: bool = True,
) -> BilinearLatencyModel:
    """Fit a, b, c, d on prefill samples and e, f, g, h on decode-step samples.

    ``relative``: weight each row by 1/time, i.e. minimise squared relative error.
    ``nonneg``: constrain every coefficient to ≥ 0 (NNLS).
    """
    pre = np.asarray(list(prefill), dtype=float).reshape(-1, 3)
    dec = np.asarray(list(decode), dtype=float).reshape(-1, 3)
    if len(pre) < 4 or len(dec) < 4:
        raise ValueError(f"need at least 4 prefill and 4 decode samples, got {len(pre)} and {len(dec)}")
    coefs = []
    for data, feats in ((pre, prefill_features), (dec, decode_features)):
        x = feats(data[:, 0], data[:, 1])
        y = data[:, 2]
        w = 1.0 / np.maximum(y, 1e-12) if relative else None
        coefs.extend(_solve(x, y, w, nonneg))
    return BilinearLatencyModel(*map(float, coefs))


def samples_from_slice_log(rows: Iterable) -> Samples:
    """The slice timings a cluster logged (``AdminStore.slice_log``: ``cluster.messages.SliceTiming``, or
    anything with its fields) as profile samples.

    Decode steps count from every slice. A prefill counts only when no row resumed from a kept cache: the
    engine feeds resumed rows in a forward of their own, so such a prefill is not one prefill(N, L).
    """
    samples = Samples()
    for row in rows:
        n, length, steps = row.n, row.max_input_len, row.decode_step_times
        if row.resumed_rows == 0 and row.prefill_time > 0:
            samples.add_slice(n, length, row.prefill_time, steps)
        else:
            samples.add_decode(n, length, steps)
    return samples


def mape(predicted, actual) -> float:
    """Mean absolute percentage error, in percent."""
    p = np.asarray(predicted, dtype=float)
    a = np.asarray(actual, dtype=float)
    return float(np.mean(np.abs(p - a) / np.maximum(np.abs(a), 1e-12)) * 100.0)


# --------------------------------------------------------------------------------------------- profile


@dataclass
class SliceMeasurement:
    """One whole slice timed end to end (prefill + ``steps`` decode steps), for held-out evaluation."""

    n: int
    length: int
    steps: int
    prefill_time: float
    decode_step_times: list[float]

    @property
    def total(self) -> float:
        return self.prefill_time + float(sum(self.decode_step_times))

    def as_dict(self) -> dict:
        return {"n": self.n, "length": self.length, "steps": self.steps,
                "prefill_time": self.prefill_time, "decode_step_times": list(self.decode_step_times)}

    @classmethod
    def from_dict(cls, d: dict) -> "SliceMeasurement":
        return cls(int(d["n"]), int(d["length"]), int(d["steps"]), float(d["prefill_time"]),
                   [float(t) for t in d["decode_step_times"]])


def slice_mape(model: BilinearLatencyModel, measurements: Sequence[SliceMeasurement]) -> float:
    """MAPE of the model's whole-slice time against measured slices."""
    pred = [float(model.batch_time(m.n, m.length, len(m.decode_step_times))) for m in measurements]
    return mape(pred, [m.total for m in measurements])


@dataclass
class Profile:
    """A fitted latency model plus what it was fitted on; the unit ``slicefleet profile`` writes.

    ``key`` names the model, engine and hardware; :func:`load_profile` can insist that they match.
    """

    model: BilinearLatencyModel
    key: dict
    samples: Samples = field(default_factory=Samples)
    heldout: list[SliceMeasurement] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "key": self.key,
            "coefficients": self.model.as_dict(),
            "metrics": self.metrics,
            "meta": self.meta,
            "samples": self.samples.as_dict(),
            "heldout": [m.as_dict() for m in self.heldout],
        }

    @classmethod
    def from_json(cls, data: dict) -> "Profile":
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a latency profile (format={data.get('format')!r})")
        version = int(data.get("version", 0))
        if version > PROFILE_VERSION:
            raise ValueError(f"latency profile version {version} is newer than this code ({PROFILE_VERSION})")
        coeffs = data["coefficients"]
        missing = [k for k in COEFFS if k not in coeffs]
        if missing:
            raise ValueError(f"latency profile lacks coefficients {missing}")
        return cls(
            model=BilinearLatencyModel(**{k: float(coeffs[k]) for k in COEFFS}),
            key=dict(data.get("key", {})),
            samples=Samples.from_dict(data.get("samples", {})),
            heldout=[SliceMeasurement.from_dict(d) for d in data.get("heldout", [])],
            metrics=dict(data.get("metrics", {})),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
        return path


def read_profile(path: str | os.PathLike | None = None) -> Profile:
    """The whole profile (model, key, samples, metrics). ``None``: the packaged default CPU profile."""
    path = Path(path) if path is not None else DEFAULT_CPU_PROFILE
    return Profile.from_json(json.loads(path.read_text()))


def load_profile(path: str | os.PathLike | None = None, expect: dict | None = None) -> BilinearLatencyModel:
    """The fitted :class:`BilinearLatencyModel` of a profile file (``None``: the packaged CPU default).

    ``expect``: key fields (e.g. ``{"engine": "hf"}``) that must match the profile's key; a mismatch raises
    ``ValueError`` so a GPU fleet never runs on a CPU profile by accident.
    """
    prof = read_profile(path)
    for k, v in (expect or {}).items():
        if k in prof.key and prof.key[k] != v:
            raise ValueError(f"profile {path}: key {k}={prof.key[k]!r}, expected {v!r}")
    return prof.model


def hardware_key(device: str = "cpu") -> dict:
    """What the timings depend on besides the model and engine: CPU model and threads, or the GPU."""
    import platform

    info = {"device": "cuda" if str(device).startswith("cuda") else "cpu", "machine": platform.machine()}
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    info["cpu"] = cpu
    info["cpus"] = os.cpu_count()
    try:
        import torch

        info["torch"] = torch.__version__.split("+")[0]
        info["threads"] = torch.get_num_threads()
        if info["device"] == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except ImportError:  # pragma: no cover
        pass
    return info


# ---------------------------------------------------------------------------------------------- online


class OnlineLatencyEstimator:
    """A ``SliceTimeEstimator`` that follows the replicas' reported slice timings.

    Each report adds rows to a window: one prefill row and one summed-decode row when the engine reports
    ``prefill_time`` and ``decode_step_times``, else one whole-slice row over all eight coefficients.
    Older rows are forgotten exponentially (``half_life`` reports) and dropped past ``window``. The refit
    (every ``refit_every`` reports) solves relative-error NNLS over the window plus ``prior_weight``
    pseudo-reports drawn from the prior model on its grid and *scaled by the observed drift factor* (the
    forgotten mean of measured / prior-predicted time), so a uniform slowdown moves every coefficient at
    once even when recent traffic only exercises a few batch shapes.
    """

    def __init__(
        self,
        prior: BilinearLatencyModel,
        *,
        half_life: float = 25.0,
        window: int = 256,
        refit_every: int = 1,
        prior_weight: float = 2.0,
        prior_grid: Sequence[tuple[int, int, int]] | None = None,
        nonneg: bool = True,
    ):
        self.prior = prior
        self.model = prior
        self.decay = 0.5 ** (1.0 / half_life) if half_life > 0 else 0.0
        self.refit_every = max(int(refit_every), 1)
        self.prior_weight = float(prior_weight)
        self.nonneg = nonneg
        self._rows: deque[tuple[np.ndarray, float, int]] = deque(maxlen=window)  # (features, y, tick)
        self._tick = 0
        self._log_ratio = 0.0
        self._ratio_weight = 0.0
        grid = prior_grid or [(n, length, s) for n in (1, 4, 16, 32) for length in (32, 256, 1024)
                              for s in (1, 16, 64)]
        self._prior_grid = np.asarray(grid, dtype=float)
        self.reports = 0

    # SliceTimeEstimator
    def batch_time(self, n, max_input_len: int, steps: int):
        return self.model.batch_time(n, max_input_len, steps)

    @property
    def drift(self) -> float:
        """Forgotten geometric mean of measured / prior-predicted slice time (1.0 before any report)."""
        return math.exp(self._log_ratio) if self._ratio_weight > 0 else 1.0

    def observe(
        self,
        n: int,
        max_input_len: int,
        steps: int,
        elapsed: float,
        prefill_time: float | None = None,
        decode_step_times: Sequence[float] | None = None,
        kv_reused: bool = False,
    ) -> None:
        """Fold in one slice: ``steps`` decode steps after a prefill of ``n`` rows at ``max_input_len``.

        ``kv_reused``: the engine resumed every row from a kept KV cache, so its "prefill" was not one; only
        the decode steps are informative (and are used when reported).
        """
        if n <= 0 or elapsed <= 0:
            return
        zeros = np.zeros(4)
        if kv_reused:
            if not decode_step_times or sum(decode_step_times) <= 0:
                return
            self._tick += 1
            steps = len(decode_step_times)
            dsum = float(sum(decode_step_times))
            whole = slice_features(n, max_input_len, steps)[0]
            self._rows.append((np.concatenate([zeros, whole[4:]]), dsum, self._tick))
            prior = np.asarray([getattr(self.prior, k) for k in COEFFS])
            self._update_drift(dsum, float(whole[4:] @ prior[4:]))
            self.reports += 1
            if self.reports % self.refit_every == 0:
                self.refit()
            return
        self._tick += 1
        if prefill_time is not None and decode_step_times and prefill_time > 0:
            steps = len(decode_step_times)
            pre = np.concatenate([prefill_features(n, max_input_len)[0], zeros])
            whole = slice_features(n, max_input_len, steps)[0]
            dec = np.concatenate([zeros, whole[4:]])
            self._rows.append((pre, float(prefill_time), self._tick))
            dsum = float(sum(decode_step_times))
            if dsum > 0:
                self._rows.append((dec, dsum, self._tick))
        else:
            self._rows.append((slice_features(n, max_input_len, steps)[0], float(elapsed), self._tick))
        self._update_drift(elapsed, float(self.prior.batch_time(n, max_input_len, steps)))
        self.reports += 1
        if self.reports % self.refit_every == 0:
            self.refit()

    def _update_drift(self, measured: float, predicted: float) -> None:
        if predicted <= 0 or measured <= 0:
            return
        r = math.log(measured / predicted)
        self._log_ratio = (self.decay * self._ratio_weight * self._log_ratio + r) / (
            self.decay * self._ratio_weight + 1.0
        )
        self._ratio_weight = self.decay * self._ratio_weight + 1.0

    def observe_result(self, result, n: int | None = None, max_input_len: int | None = None,
                       steps: int | None = None) -> None:
        """Fold in a :class:`balancer.types.SliceResult` (batch shape given, or taken from its outcomes)."""
        n = n if n is not None else len(result.outcomes)
        self.observe(
            n, int(max_input_len or 0), int(steps if steps is not None else len(result.decode_step_times)),
            float(result.elapsed), result.prefill_time or None, result.decode_step_times or None,
            kv_reused=bool(getattr(result, "kv_reused", False)),
        )

    def refit(self) -> BilinearLatencyModel:
        if not self._rows:
            return self.model
        x = np.stack([r[0] for r in self._rows])
        y = np.asarray([r[1] for r in self._rows])
        age = self._tick - np.asarray([r[2] for r in self._rows], dtype=float)
        w = np.sqrt(self.decay**age) / np.maximum(y, 1e-12)
        g = self._prior_grid
        px = slice_features(g[:, 0], g[:, 1], g[:, 2])
        py = px @ np.asarray([getattr(self.prior, k) for k in COEFFS]) * self.drift
        pw = np.full(len(py), math.sqrt(self.prior_weight / len(py))) / np.maximum(py, 1e-12)
        coef = _solve(np.vstack([x, px]), np.concatenate([y, py]), np.concatenate([w, pw]), self.nonneg)
        self.model = BilinearLatencyModel(*map(float, coef))
        return self.model
