"""The figures a run reports, the same for a simulated and a live run."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from operator import itemgetter

import numpy as np


@dataclass
class RunReport:
    mode: str
    replicas: int
    requests: int
    duration: float
    """Seconds from the first arrival to the last completion."""
    request_throughput: float
    output_token_throughput: float
    """Useful output tokens per second."""
    latency_mean: float
    latency_p50: float
    latency_p99: float
    ttft_mean: float
    useful_tokens: int
    pad_tokens: int
    invalid_tokens: int
    reprefill_tokens: int
    valid_token_ratio: float
    """useful / (useful + pad + invalid + re-prefilled): every token position computed that did not yield
    a kept output token counts against it."""
    decode_valid_ratio: float
    """useful / (useful + invalid): the same over decode positions only (padding and re-prefill excluded)."""
    mean_batch_size: float
    load_imbalance: float
    """std / mean of per-replica busy time."""
    early_return_ratio: float
    slices_per_request: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def imbalance(busy: list[float]) -> float:
    arr = np.asarray(busy, dtype=float)
    return float(arr.std() / arr.mean()) if len(arr) and arr.mean() > 0 else 0.0


def schedule_fingerprint(finishes: Iterable[tuple[str, float]]) -> str:
    """sha256 of every request's finish time, by request id, rounded to the microsecond.

    Two runs with the same fingerprint finished every request at the same instant: a change meant to be
    performance only (the simulator, the scheduler's bookkeeping) must leave it as it was. Rounding keeps a
    change of float summation order in the last bits from counting as a different schedule.
    """
    # sorted by id alone (ids are unique): a million tuples sort faster by a key than compared whole
    text = "".join(f"{rid} {t:.6f}\n" for rid, t in sorted(finishes, key=itemgetter(0)))
    return hashlib.sha256(text.encode()).hexdigest()


def summarize(mode: str, replicas: int, arrivals: list[float], finishes: list[float], first_tokens: list[float],
              useful: int, pad: int, invalid: int, reprefill: int, rows: int, batches: int, busy: list[float],
              early_returns: int, slices: int, extra: dict | None = None) -> RunReport:
    n = len(finishes)
    arr = np.asarray(arrivals, dtype=float)
    fin = np.asarray(finishes, dtype=float)
    lat = fin - arr if n else np.zeros(1)
    duration = float(fin.max() - arr.min()) if n else 0.0
    computed = useful + pad + invalid + reprefill
    return RunReport(
        mode=mode,
        replicas=replicas,
        requests=n,
        duration=duration,
        request_throughput=n / duration if duration > 0 else 0.0,
        output_token_throughput=useful / duration if duration > 0 else 0.0,
        latency_mean=float(lat.mean()),
        latency_p50=float(np.percentile(lat, 50)),
        latency_p99=float(np.percentile(lat, 99)),
        ttft_mean=float((np.asarray(first_tokens) - arr).mean()) if n else 0.0,
        useful_tokens=int(useful),
        pad_tokens=int(pad),
        invalid_tokens=int(invalid),
        reprefill_tokens=int(reprefill),
        valid_token_ratio=useful / computed if computed else 0.0,
        decode_valid_ratio=useful / (useful + invalid) if useful + invalid else 0.0,
        mean_batch_size=rows / batches if batches else 0.0,
        load_imbalance=imbalance(busy),
        early_return_ratio=early_returns / n if n else 0.0,
        slices_per_request=slices / n if n else 0.0,
        extra=dict(extra or {}),
    )


COLUMNS = [
    ("mode", "{}"), ("request_throughput", "{:.2f}"), ("output_token_throughput", "{:.0f}"),
    ("latency_mean", "{:.1f}"), ("latency_p50", "{:.1f}"), ("latency_p99", "{:.1f}"),
    ("valid_token_ratio", "{:.3f}"), ("decode_valid_ratio", "{:.3f}"), ("pad_tokens", "{}"),
    ("invalid_tokens", "{}"), ("mean_batch_size", "{:.1f}"), ("load_imbalance", "{:.3f}"),
    ("early_return_ratio", "{:.2f}"), ("slices_per_request", "{:.2f}"),
]


def format_table(reports: list[RunReport]) -> str:
    """A Markdown table, one row per report."""
    head = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(fmt.format(getattr(r, name)) for name, fmt in COLUMNS) + " |" for r in reports]
    return "\n".join([head, rule, *rows])
