"""The scorecard of one run: a terminal table grouped by resource, and a JSON document."""

from __future__ import annotations

from frugalm.measure.metrics import METRICS, RESOURCES, Measurement
from frugalm.store import Run


def format_value(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if float(value).is_integer() and magnitude < 1e15:
        return f"{int(value):,}"
    if magnitude >= 1e6:
        return f"{value:.3e}"
    if magnitude >= 100:
        return f"{value:,.1f}"
    if magnitude >= 0.01:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _spread(m: Measurement) -> str:
    paired = m.protocol.get("paired")
    if paired:  # a task accuracy scored against the reference on the same items
        lo, hi = paired["ci"]
        return f"Δ {paired['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}] vs reference (n={m.n}, paired)"
    if m.spread is None:
        return f"(n={m.n} items)" if m.metric.startswith("acc_") else ""
    return f"± {format_value(m.spread)} (n={m.n})"


def kernel_protocol(measurements: list[Measurement]) -> dict | None:
    """What ran the linear layers, as the measuring child reported it with the run's workload figures."""
    for m in measurements:
        if "kernels" in m.protocol:
            return {
                k: m.protocol[k] for k in ("kernels", "formats", "quantized_engine", "decode_path") if k in m.protocol
            }
    return None


def kernel_line(protocol: dict | None) -> str | None:
    """ "w8a8-dynamic on fbgemm: 14 layers; dense: 1": each quantized format with its kernel, then the float layers."""
    if not protocol:
        return None
    parts = [
        f"{fmt} on {kernel}: {n} layers"
        for fmt, kernels in sorted((protocol.get("formats") or {}).items())
        for kernel, n in sorted(kernels.items())
    ]
    if "formats" not in protocol:  # a run stored before formats were reported
        parts += [f"{kernel}: {n} layers" for kernel, n in sorted(protocol["kernels"].items()) if kernel != "dense"]
    if protocol["kernels"].get("dense"):
        parts.append(f"dense: {protocol['kernels']['dense']}")
    if protocol.get("decode_path", "eager") != "eager":
        parts.append(f"decode {protocol['decode_path']}")
    return "; ".join(parts) or None


def speed_kernel_note(measurements: list[Measurement]) -> dict | None:
    """The run's quantized layers that have no speed kernel on its device (they ran dequantized), or None.

    {"dequantized_layers": 14, "formats": {"w4a16": 14}, "text": "no speed kernel on this device for ..."}:
    its speed figures are then no speedup claim. Read by the terminal scorecard, bench --json and the reports.
    """
    protocol = kernel_protocol(measurements)
    if not protocol:
        return None
    if "formats" in protocol:
        formats = {
            fmt: kernels["dequantize"]
            for fmt, kernels in sorted(protocol["formats"].items())
            if kernels.get("dequantize")
        }
    else:  # stored before formats were reported: the kernel counts alone
        formats = {"quantized": protocol["kernels"]["dequantize"]} if protocol["kernels"].get("dequantize") else {}
    layers = sum(formats.values())
    if not layers:
        return None
    named = ", ".join(f"{fmt}: {n}" for fmt, n in formats.items())
    text = f"no speed kernel on this device for {layers} quantized layer(s) ({named}): they run dequantized, so their speed figures are no speedup claim"
    return {"dequantized_layers": layers, "formats": formats, "text": text}


def format_scorecard(run: Run, measurements: list[Measurement]) -> str:
    env = run.environment
    lines = [
        f"run {run.id}  {run.benchmark_version}  model {run.model_ref}",
        f"{env.get('device', '?')} · {env.get('cpu', '')}{' · ' + env['gpu'] if env.get('gpu') else ''} · "
        f"torch {env.get('torch', '?')} · transformers {env.get('transformers', '?')} · {run.wall_s or 0:.1f} s",
    ]
    by_resource: dict[str, list[Measurement]] = {r: [] for r in RESOURCES}
    for m in measurements:
        by_resource[METRICS[m.metric].resource].append(m)
    rows = []
    for resource in RESOURCES:
        if not by_resource[resource]:
            continue
        rows.append((resource.upper(), "", "", "", "", ""))
        for m in by_resource[resource]:
            arrow = "↑" if METRICS[m.metric].higher_is_better else "↓"
            rows.append(
                (f"  {m.metric} {arrow}", m.workload or "", format_value(m.value), m.unit, m.method, _spread(m))
            )
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    header = ("metric", "workload", "value", "unit", "method", "spread")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    fmt = lambda r: "  ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()  # noqa: E731
    lines += ["", fmt(header), fmt(tuple("-" * w for w in widths))]
    lines += [fmt(r) for r in rows]
    kernels = kernel_line(kernel_protocol(measurements))
    if kernels:
        lines.append(f"\nkernels: {kernels}")
    note = speed_kernel_note(measurements)
    if note:
        lines.append(f"\n{note['text']}.")
    if any(m.method == "estimated" for m in measurements):
        lines.append(
            "\nestimated: derived from a stated model (profile prices, power model), not a hardware counter; see --json for each protocol."
        )
    return "\n".join(lines)


def scorecard_json(run: Run, measurements: list[Measurement]) -> dict:
    return {
        "run_id": run.id,
        "status": run.status,
        "model": run.model_ref,
        "model_path": run.model_path,
        "benchmark_version": run.benchmark_version,
        "created_at": run.created_at,
        "wall_s": run.wall_s,
        "environment": run.environment,
        "config": run.config,
        "kernels": kernel_protocol(measurements),
        "speed_kernel": speed_kernel_note(measurements),
        "metrics": [
            {
                "metric": m.metric,
                "workload": m.workload,
                "value": m.value,
                "unit": m.unit,
                "method": m.method,
                "higher_is_better": METRICS[m.metric].higher_is_better,
                "resource": METRICS[m.metric].resource,
                "n": m.n,
                "spread": m.spread,
                "protocol": m.protocol,
            }
            for m in measurements
        ],
    }
