"""Tables and plots from a ``bench.json`` (written by ``slicefleet bench``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


PEERS = ("vllm", "endpoint")
"""Runs of servers that are not a Slicefleet cluster bench started: no dispatcher counters to read."""

IMBALANCE = "imbalance = std / mean of the replicas' busy seconds over the run (0 = even)"


def _rate(r) -> str:
    return "inf" if r is None else f"{r:g}"


def _load(r) -> str:
    """A rate as words for titles: 'all at once' is no rate."""
    return "all at once" if r is None else f"Poisson {r:g} req/s"


def comparison_table(runs: list[dict]) -> str:
    """One row per run: vLLM-style serving metrics and the papers' metrics, plus the simulator's error."""
    head = ["system", "rate", "ok/failed", "req/s", "useful tok/s", "E2E mean", "E2E p50", "E2E p99",
            "TTFT p50", "TPOT p50", "goodput", "valid ratio", "decode valid", "pad", "invalid", "reprefill",
            "batch", "imbalance", "early ret.", "slices/req", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        s, rep = run["serving"], run["report"]
        peer = run["mode"] in PEERS
        dash = "–"
        lines.append("| " + " | ".join([
            run["label"], _rate(run["rate"]), f"{s['completed']}/{s['failed']}",
            f"{s.get('request_throughput', 0):.3f}", f"{s.get('output_throughput', 0):.0f}",
            f"{s.get('e2el', {}).get('mean', 0):.1f}", f"{s.get('e2el', {}).get('median', 0):.1f}",
            f"{s.get('e2el', {}).get('p99', 0):.1f}", f"{s.get('ttft', {}).get('median', 0):.2f}",
            f"{s.get('tpot', {}).get('median', 0) * 1000:.0f} ms", f"{s.get('goodput', 0):.3f}",
            dash if peer else f"{rep['valid_token_ratio']:.3f}", dash if peer else f"{rep['decode_valid_ratio']:.3f}",
            dash if peer else str(rep["pad_tokens"]), dash if peer else str(rep["invalid_tokens"]),
            dash if peer else str(rep["reprefill_tokens"]), dash if peer else f"{rep['mean_batch_size']:.1f}",
            f"{rep['load_imbalance']:.3f}" if rep.get("load_imbalance") or not peer else dash,
            dash if peer else f"{rep['early_return_ratio']:.2f}", dash if peer else f"{rep['slices_per_request']:.2f}",
            f"{run.get('load_before', 0):.1f}",
        ]) + " |")
    return "\n".join(lines)


def ratio_table(runs: list[dict], base_label: str = "scls") -> str:
    """Every other system against ``base_label`` at each rate (other / base): request throughput, useful tok/s,
    TTFT p50 and E2E p99."""
    lines = [f"| rate | system | req/s (x {base_label}) | tok/s (x {base_label}) | TTFT p50 (x {base_label}) "
             f"| E2E p99 (x {base_label}) |", "|---|---|---|---|---|---|"]
    by = {(r["label"], r["rate"]): r for r in runs}
    for (label, rate), run in by.items():
        base = by.get((base_label, rate))
        if label == base_label or base is None:
            continue
        a, b = base["serving"], run["serving"]
        if not a.get("request_throughput") or not b.get("request_throughput"):
            continue
        lines.append(f"| {_rate(rate)} | {label} | {b['request_throughput'] / a['request_throughput']:.2f} | "
                     f"{b['output_throughput'] / a['output_throughput']:.2f} | "
                     f"{b['ttft']['median'] / a['ttft']['median']:.2f} | {b['e2el']['p99'] / a['e2el']['p99']:.2f} |")
    return "\n".join(lines)


def sim_table(runs: list[dict]) -> str:
    """Live figures beside the simulator's on the same trace, one row per (run, calibration)."""
    lines = ["| system | rate | sim profile | live req/s | sim req/s | err | live tok/s | sim tok/s | err | live p99 "
             "| sim p99 | err | live valid | sim valid | live batch | sim batch |", "|" + "---|" * 16]
    for run in runs:
        live = run["report"]
        for profile, sim in (run.get("sims") or {}).items():
            rep, err = sim["report"], sim["error"]

            def pct(k):
                return "–" if err.get(k) is None else f"{100 * err[k]:+.0f}%"
            lines.append(
                f"| {run['label']} | {_rate(run['rate'])} | {profile} | {live['request_throughput']:.3f} | "
                f"{rep['request_throughput']:.3f} | {pct('request_throughput')} | "
                f"{live['output_token_throughput']:.0f} | {rep['output_token_throughput']:.0f} | "
                f"{pct('output_token_throughput')} | {live['latency_p99']:.1f} | {rep['latency_p99']:.1f} | "
                f"{pct('latency_p99')} | {live['valid_token_ratio']:.3f} | {rep['valid_token_ratio']:.3f} | "
                f"{live['mean_batch_size']:.1f} | {rep['mean_batch_size']:.1f} |")
    return "\n".join(lines)


def markdown(data: dict) -> str:
    runs = data["runs"]
    a = data.get("args", {})
    if a.get("base_url"):  # a running server: bench set none of the cluster's settings
        head = (f"# slicefleet bench --base-url {a['base_url']}: {a.get('requests')} ShareGPT requests, "
                f"seed {a.get('seed')}, max_tokens = trace length capped to {a.get('max_gen_len')}, "
                f"ignore_eos {'on' if a.get('ignore_eos') else 'off'}")
    else:
        head = (f"# slicefleet bench: {a.get('requests')} ShareGPT requests, {a.get('replicas')} replicas, "
                f"seed {a.get('seed')}, G={a.get('max_gen_len')}, S={a.get('slice_len')}, budget={a.get('budget')}")
    parts = [head,
             "", f"machine: {data.get('machine')}", "",
             "SLOs for goodput: " + (", ".join(f"{name} <= {a[key]:g} s" for name, key in
                                                (("TTFT", "slo_ttft"), ("TPOT", "slo_tpot"), ("E2E", "slo_e2el"))
                                                if a.get(key) is not None) or "none"), "",
             "## Comparison", "", comparison_table(runs), "",
             f"rate inf: all requests at once. Latencies in s. {IMBALANCE}."]
    for base in ("vllm", "scls", "ils"):
        if any(r["label"] == base for r in runs):
            parts += ["", f"## Against {base} (same rate; other / {base})", "", ratio_table(runs, base)]
    st = sim_table(runs)
    if st.count("\n") > 1:
        parts += ["", "## Simulator (packaged CPU profile) vs live, same trace", "", st]
    return "\n".join(parts) + "\n"


# ---- plots ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine_text(m: dict) -> str:
    """'2 CPU cores x86_64 (<CPU model>), no GPU' from :func:`bench.cli.machine_facts`."""
    cores = f"{m.get('cpus', '?')} CPU cores {m.get('machine', '')}".strip()
    if m.get("cpu_model"):
        cores += f" ({m['cpu_model']})"
    return f"{cores}, {m.get('gpu') or 'no GPU'}"


def caption(data: dict) -> str:
    """Which machine, model and sample a plot comes from (every plot says it)."""
    m, a = data.get("machine") or {}, data.get("args") or {}
    # bench.json files written before the label was recorded all came from the default model.
    model = a.get("model_label") or "default model (random-weight Llama, 10.5 M params, float32)"
    if a.get("base_url"):  # the server may be elsewhere: say which machine was measured from
        return (f"{model}; load generator on {machine_text(m)}; {a.get('requests')} ShareGPT requests, "
                f"seed {a.get('seed')}")
    return (f"{machine_text(m)}; {model}; {a.get('replicas')} replicas; "
            f"{a.get('requests')} ShareGPT requests, seed {a.get('seed')}")


def _suptitle(fig, *lines: str) -> None:
    """The caption, wrapped to the figure's width: a one-panel figure cut the machine and model off."""
    import textwrap

    width = max(40, int(fig.get_figwidth() * 15))  # characters of a 9 pt font per inch, roughly
    text = "\n".join(textwrap.fill(line, width) for line in lines if line)
    if text:
        fig.suptitle(text, fontsize=9)


def plot_vs_rate(runs: list[dict], path: Path, title: str = "") -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    labels = sorted({r["label"] for r in runs}, key=lambda x: (x != "scls", x))
    # Rates are categories: "all at once" is not a rate, so it gets its own tick at the right.
    rates = sorted({r["rate"] for r in runs}, key=lambda x: x if x is not None else float("inf"))
    ticks = [_rate(x) if x is not None else "all at once" for x in rates]
    for label in labels:
        rs = sorted((r for r in runs if r["label"] == label), key=lambda r: rates.index(r["rate"]))
        if not rs:
            continue
        xs = [rates.index(r["rate"]) for r in rs]
        axes[0].plot(xs, [r["serving"].get("request_throughput", 0) for r in rs], "o-", label=label)
        axes[1].plot(xs, [r["serving"].get("output_throughput", 0) for r in rs], "o-", label=label)
        axes[2].plot(xs, [r["serving"].get("e2el", {}).get("p99", 0) for r in rs], "o-", label=label)
    for ax, name in zip(axes, ["request throughput (req/s)", "useful output tok/s", "E2E p99 (s)"]):
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(rates)), ticks)
        ax.set_xlabel("offered load (Poisson req/s, or all at once)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_cdf(runs: list[dict], path: Path, title: str = "") -> None:
    plt = _plt()
    rates = sorted({r["rate"] for r in runs}, key=lambda x: x or 1e9)
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 3.6), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for r in runs:
            if r["rate"] != rate or not r.get("latencies"):
                continue
            lat = np.sort(r["latencies"])
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=r["label"])
        ax.set_title(f"E2E latency CDF, {_load(rate)}", fontsize=10)
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a rate where every request failed has no curve
            ax.legend(fontsize=8)
    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_busy(runs: list[dict], path: Path, title: str = "") -> None:
    """Per-replica cumulative busy seconds over each run (the first rate of each system). Imbalance = standard
    deviation / mean of the replicas' busy seconds over the run."""
    plt = _plt()
    chosen = []
    seen = set()
    for r in runs:
        if r.get("busy_samples") and r["label"] not in seen:
            chosen.append(r)
            seen.add(r["label"])
    if not chosen:
        return
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3.4), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        samples = r["busy_samples"]
        t0 = {rid: b for rid, b in samples[0][1].items()}
        rids = sorted({rid for _, b in samples for rid in b})
        for i, rid in enumerate(rids):
            xs = [t for t, b in samples if rid in b]
            ys = [b[rid] - t0.get(rid, 0.0) for t, b in samples if rid in b]
            ax.plot(xs, ys, label=f"replica {i}")
        ax.set_title(f"{r['label']}, {_load(r['rate'])}: imbalance {r['report']['load_imbalance']:.3f}",
                     fontsize=9)
        ax.set_xlabel("run time (s)")
        ax.set_ylabel("busy seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _suptitle(fig, title, IMBALANCE)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_all(data: dict, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(markdown(data))
    runs = data["runs"]
    if not runs:
        return
    title = caption(data)
    plot_vs_rate(runs, out / "throughput_p99_vs_rate.png", title)
    plot_cdf(runs, out / "latency_cdf.png", title)
    plot_busy(runs, out / "replica_busy.png", title)
