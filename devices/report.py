"""Bench report writers: JSON (everything), CSV (one row per configuration), a PNG of latency against
MACs per runtime, a markdown report that embeds it, and the terminal table.

All writers take the result document of :func:`edgevit.devices.bench.run_bench` and write atomically
(temporary file, then rename), so an interrupted run never leaves half a report.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from edgevit.devices.worker import INTEGER_UNIT_FLAGS, integer_units, integer_units_text, profile_kinds
from edgevit.export.manifest import write_atomic

CSV_FIELDS = ["host", "model", "device", "precision", "status", "median_ms", "p90_ms", "p99_ms", "min_ms", "mean_ms",
              "std_ms", "runs", "throughput_per_s", "speedup_vs_eager", "speedup_low", "speedup_high",
              "speedup_vs_fp32", "speedup_vs_fp32_low", "speedup_vs_fp32_high", "artifact_mb", "float_ops",
              "params", "macs", "gmacs_per_s", "roofline_bound_ms", "median_over_bound", "bound_precision",
              "gemm_kernels_over_bound", "load_ms", "first_ms",
              "peak_rss_mb", "threads", "runtime_precision", "median_interval_low_ms",
              "median_interval_high_ms", "noisy", "baseline", "detail"]


def _atomic_write(path: Path, data: bytes) -> None:
    write_atomic(path, data)


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A result row as the CSV's flat columns (empty where not measured)."""
    summary = row.get("summary") or {}
    speedup = row.get("speedup_vs_eager") or row.get("speedup_vs_baseline") or {}
    roof = row.get("roofline") or {}
    info = row.get("runtime_info") or {}
    rep = row.get("repeatability") or {}
    vs_fp32 = row.get("speedup_vs_fp32") or {}
    quant = row.get("quantization") or {}
    return {
        "host": row.get("host", "local"), "model": row.get("model"), "device": row.get("device"),
        "precision": row.get("precision"),
        "status": row.get("status"), "median_ms": summary.get("median_ms"), "p90_ms": summary.get("p90_ms"),
        "p99_ms": summary.get("p99_ms"), "min_ms": summary.get("min_ms"), "mean_ms": summary.get("mean_ms"),
        "std_ms": summary.get("std_ms"), "runs": summary.get("runs"), "throughput_per_s": summary.get("throughput_per_s"),
        "speedup_vs_eager": speedup.get("median"), "speedup_low": speedup.get("low"), "speedup_high": speedup.get("high"),
        "speedup_vs_fp32": vs_fp32.get("median"), "speedup_vs_fp32_low": vs_fp32.get("low"),
        "speedup_vs_fp32_high": vs_fp32.get("high"),
        "artifact_mb": row["artifact_bytes"] / 1e6 if row.get("artifact_bytes") else None,
        "float_ops": _float_op_count(quant.get("float_ops")),
        "params": row.get("params"), "macs": row.get("macs"), "gmacs_per_s": row.get("gmacs_per_s"),
        "roofline_bound_ms": roof.get("bound_ms"), "median_over_bound": roof.get("median_over_bound"),
        "bound_precision": roof.get("precision"), "gemm_kernels_over_bound": roof.get("gemm_kernels_over_bound"),
        "load_ms": row.get("load_ms"), "first_ms": row.get("first_ms"), "peak_rss_mb": row.get("peak_rss_mb"),
        "threads": info.get("threads"), "runtime_precision": info.get("precision"),
        "median_interval_low_ms": rep.get("interval_low_ms"), "median_interval_high_ms": rep.get("interval_high_ms"),
        "noisy": rep.get("noisy"), "baseline": row.get("baseline"), "detail": row.get("detail", ""),
    }


def _float_op_count(float_ops: Any) -> int | None:
    """The number of compute ops a quantized artifact left in float (the record is a count or {op: count})."""
    if isinstance(float_ops, dict):
        return sum(int(v) for v in float_ops.values())
    return None if float_ops is None else int(float_ops)


def write_json(result: dict[str, Any], path: Path) -> Path:
    _atomic_write(path, (json.dumps(result, indent=2, default=str) + "\n").encode())
    return path


def write_csv(result: dict[str, Any], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in result["rows"]:
        writer.writerow({k: ("" if v is None else v) for k, v in flat_row(row).items()})
    _atomic_write(path, buf.getvalue().encode())
    return path


def write_plot(result: dict[str, Any], path: Path) -> Path | None:
    """Median latency against MACs, one series per device, log-log; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    by_device: dict[str, list[tuple[float, float, str]]] = {}
    remote = remote_rows(result)
    measured = [h for h in result.get("hosts", []) if h.get("status") == "ok"]
    for row in result["rows"]:
        if row.get("summary") and row.get("macs"):
            series = f"{row.get('host', 'local')} {row['device']}" if remote else row["device"]
            by_device.setdefault(series, []).append((row["macs"] / 1e9, row["summary"]["median_ms"], row["model"]))
    for device, points in sorted(by_device.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=device)
        for x, y, name in points:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    gemm = next((g for g in result.get("gemm", []) if g.get("gflops") and g["precision"] == "fp32"), None)
    if gemm and by_device and len(measured) <= 1:  # one machine, one bound
        xs = sorted({p[0] for pts in by_device.values() for p in pts})
        ax.plot(xs, [2 * x / gemm["gflops"] * 1e3 for x in xs], "k--", linewidth=1,
                label=f"fp32 GEMM bound ({gemm['gflops']:.0f} GFLOP/s)")
    ax.set_xlabel("GMACs per inference")
    ax.set_ylabel("median latency (ms)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    machine = measured[0]["machine"] if len(measured) == 1 else result["machine"]
    title = f"{machine.get('cpu', '')} ({machine.get('cores')} cores)" if len(measured) <= 1 else "several machines"
    ax.set_title(f"edgevit bench: {title}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())
    return path


def _fmt(value: Any, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def speedup_text(row: dict[str, Any]) -> str:
    """The speed-up cell: vs PyTorch eager, or vs the run's fastest runtime where eager was not measured."""
    s = row.get("speedup_vs_eager")
    if s:
        return f"{s['median']:.2f}x [{s['low']:.2f}-{s['high']:.2f}]"
    s = row.get("speedup_vs_baseline")
    if s:
        return f"{s['median']:.2f}x [{s['low']:.2f}-{s['high']:.2f}] vs {row['baseline']}"
    if row.get("summary") and row.get("baseline") == row.get("device"):
        return "1.00x (baseline)"
    return "-"


def bound_text(f: dict[str, Any]) -> str:
    """median / bound, naming the bound's precision when it is not the one asked for (the runtime
    computed in another precision, e.g. OpenVINO answering a bf16 request in f32)."""
    if f["median_over_bound"] is None:
        return "-"
    other = f["bound_precision"] and f["bound_precision"] != f["precision"]
    return f"{f['median_over_bound']:.2f}x" + (f" ({f['bound_precision']})" if other else "")


def remote_rows(result: dict[str, Any]) -> bool:
    """True when some row was measured on another machine (the tables then name each row's host)."""
    return any(r.get("host", "local") != "local" for r in result["rows"])


def table_header(result: dict[str, Any]) -> list[str]:
    header = (["host"] if remote_rows(result) else []) + TABLE_HEADER
    return header[:-1] + (["vs fp32 (same runtime)"] if _several_precisions(result) else []) + header[-1:]


def _several_precisions(result: dict[str, Any]) -> bool:
    return len({r.get("precision") for r in result["rows"]}) > 1


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The terminal / markdown table: [host,] model, runtime, median, p90, speed-up, params, MACs, GMAC/s, roofline."""
    out = []
    hosts = remote_rows(result)
    several = _several_precisions(result)
    for row in result["rows"]:
        f = flat_row(row)
        status = row.get("status")
        noisy = " (noisy)" if f["noisy"] else ""
        out.append([f["host"]] * hosts + [
            f["model"], f["device"], f"{f['precision']}/{f['runtime_precision'] or '-'}",
            _fmt(f["median_ms"], ".2f") + noisy, _fmt(f["p90_ms"], ".2f"), speedup_text(row),
            _fmt(f["params"] and f["params"] / 1e6, ".2f"), _fmt(f["macs"] and f["macs"] / 1e9, ".2f"),
            _fmt(f["gmacs_per_s"], ".1f"), bound_text(f), _fmt(f["artifact_mb"], ".1f"), _fmt(f["peak_rss_mb"], ".0f"),
            *([vs_fp32_text(row)] if several else []),
            "ok" if status == "ok" else f"{status}: {row.get('detail', '')}"[:80],
        ])
    return out


def vs_fp32_text(row: dict[str, Any]) -> str:
    s = row.get("speedup_vs_fp32")
    if s:
        return f"{s['median']:.2f}x [{s['low']:.2f}-{s['high']:.2f}]"
    return "1.00x" if row.get("precision") == "fp32" and row.get("summary") else "-"


TABLE_HEADER = ["model", "runtime", "precision (asked/runtime)", "median ms", "p90 ms", "vs eager [spread]",
                "params M", "GMACs", "GMAC/s", "median / bound", "size MB", "peak RSS MB", "status"]


def machine_lines(result: dict[str, Any]) -> list[str]:
    """One line per measuring machine: CPU, cores, the CPU flags that decide kernels, NPU/GPU nodes."""
    lines = []
    for h in result.get("hosts", []):
        if h.get("status") != "ok":
            lines.append(f"{h['name']}: not measured: {h.get('reason', '')}")
            continue
        m = h["machine"]
        flags = " ".join(m.get("cpu_flags") or []) or "none of those edgevit looks for"
        nodes = "; ".join(f"{k}: {' '.join(v)}" for k, v in (m.get("accelerator_nodes") or {}).items())
        where = ("this machine" if h["address"] == "local"
                 else h["name"] if h["name"] == h["address"] else f"{h['name']} ({h['address']})")
        units = integer_units_text(m.get("cpu_flags"))
        lines.append(f"{where}: {m.get('cpu')} ({m.get('cores')} cores, {m.get('system')} {m.get('machine')}, "
                     f"python {m.get('python')}); CPU flags: {flags}; integer dot-product units: {units}"
                     + (f"; {nodes}" if nodes else ""))
    return lines


def gemm_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    hosts = remote_rows(result)
    for g in result.get("gemm", []):
        where = f"{g.get('host', 'local')}: " if hosts else ""
        if g.get("gflops"):
            native = {True: "", False: "; emulated: the CPU flags show no arithmetic units for it",
                      None: "; arithmetic units unknown"}[g.get("native", True)]
            unit = "GOP/s" if g["precision"] == "int8" else "GFLOP/s"
            lines.append(f"{where}{g['precision']} GEMM {g['n']}x{g['n']} on {g['threads']} threads ({g['engine']}): "
                         f"{g['gflops']:.1f} {unit} sustained (median), best {g['best_gflops']:.1f}{native}")
        else:
            lines.append(f"{where}{g['precision']} GEMM: {g['status']} {g.get('detail', '')}")
    return lines


def _host_flags(result: dict[str, Any], host: str) -> list[str] | None:
    for h in result.get("hosts", []):
        if h.get("name") == host and h.get("status") == "ok":
            return h["machine"].get("cpu_flags")
    return None


def finding_lines(result: dict[str, Any]) -> list[str]:
    """Plain statements about the run: each quantized row slower than its runtime's fp32 row, and why where
    the flags, the artifact or the profile can tell."""
    lines = []
    hosts = remote_rows(result)
    for row in result["rows"]:
        s = row.get("speedup_vs_fp32")
        if not s or not clearly_slower(s):
            continue
        where = f" on {row.get('host')}" if hosts else ""
        lines.append(f"{row['precision']} slower than fp32 here: {row['model']} on {row['device']}{where} "
                     f"{s['median']:.2f}x [{s['low']:.2f}-{s['high']:.2f}]; "
                     f"why: {'; '.join(slower_reasons(row, _host_flags(result, row.get('host', 'local'))))}")
    return lines


#: a quantized row is called slower than fp32 when every round says so, or its median ratio is below this
SLOWER_BELOW = 0.95


def clearly_slower(ratio: dict[str, float]) -> bool:
    """Slower than fp32 beyond the run's noise: a median ratio < 1 with every round < 1, or < SLOWER_BELOW."""
    return ratio["median"] < 1.0 and (ratio["high"] < 1.0 or ratio["median"] < SLOWER_BELOW)


def slower_reasons(row: dict[str, Any], flags: list[str] | None) -> list[str]:
    """What the CPU flags, the artifact's quantization record and the profile say about a slow quantized row."""
    reasons = []
    precision = row.get("precision")
    computed = (row.get("runtime_info") or {}).get("compute_precision") or ""
    if precision == "int8" and flags is not None and not integer_units(flags):
        reasons.append("this CPU has no integer dot-product units (" + "/".join(INTEGER_UNIT_FLAGS) + "): int8 "
                       "matmuls run on 16-bit multiply-adds")
    if precision == "int8" and computed and computed not in ("int8", "unknown"):
        reasons.append(f"the runtime ran the matmuls in {computed}")
    if precision in ("w8", "w4") and computed != "int8":
        reasons.append("weight-only: weights are expanded to float at run time and "
                       + ("some matmuls run in float (mixed)" if computed == "mixed" else "the matmuls run in float")
                       + "; the gain is size, not arithmetic")
    floating = _float_op_count((row.get("quantization") or {}).get("float_ops"))
    if precision == "int8" and floating:
        reasons.append(f"{floating} compute op(s) left in float, with quantize/dequantize conversions around them")
    reasons += _backend_reasons(row)
    kinds = profile_shares(row.get("profile") or [])
    if kinds:
        reasons.append("profile: " + ", ".join(f"{share:.0%} {kind}" for kind, share in kinds.items()))
    return reasons or ["nothing in the CPU flags, the artifact or the profile explains it (re-run with --profile)"]


def _backend_reasons(row: dict[str, Any]) -> list[str]:
    """What the row's backend knows about its runtime's quantized kernels (its devices module's
    ``slower_reasons(row)``, where it has one)."""
    from edgevit.devices.table import DEVICES
    from edgevit.export.backends import get_backend

    device = DEVICES.get(row.get("device", ""))
    if device is None or device.target is None:
        return []
    explain = getattr(get_backend(device.target).module("devices"), "slower_reasons", None)
    return list(explain(row)) if explain else []


def gemm_kernels_line(roof: dict[str, Any]) -> str:
    """What the model's own matmul/conv kernels cost against the GEMM bound (``bench._roofline``)."""
    return (f"Matmul/conv kernels: {roof['gemm_kernels_ms']:.2f} ms of the median, {roof['gemm_kernels_over_bound']:.2f}x "
            f"the {roof['precision']} bound ({roof['bound_ms']:.2f} ms): no rewrite of the other ops brings "
            f"median / bound below that on this runtime.")


def profile_shares(profile: list[dict[str, Any]]) -> dict[str, float]:
    """Share of the profiled time per op kind (int8 compute, float compute, Q/DQ conversion) when the
    runtime's profile classifies its ops (onnxruntime, OpenVINO); {} otherwise (eager, LiteRT)."""
    if not any(p.get("kind") for p in profile):
        return {}
    totals = profile_kinds(profile)
    whole = sum(totals.values())
    return {k: v / whole for k, v in totals.items()} if whole else {}


def write_markdown(result: dict[str, Any], path: Path, plot: Path | None) -> Path:
    m, v = result["machine"], result["versions"]
    remote = remote_rows(result)
    lines = [
        "# edgevit bench", "",
        f"{result['created']}, exported on {m.get('cpu') or m.get('machine')} ({m.get('cores')} cores, "
        f"{m.get('system')}), load average at start {m.get('load_avg_at_start')}.", "",
        "Measured on:", "", *[f"- {line}" for line in machine_lines(result)], "",
        "Protocol: each configuration in its own process; load, first inference, warm-up, then timed blocks "
        "interleaved between configurations (order alternating each round). "
        + ("Rounds interleave within one machine only: machines are measured one after the other, so "
           "compare ratios within a host, not times across hosts. " if remote else "")
        + "Speed-ups are interleaved median ratios vs PyTorch eager (where eager was not measured: vs the "
        "run's fastest runtime, named in the cell), with the smallest and largest per-round ratio. A configuration "
        "is marked noisy when the medians of its two halves of rounds differ by more than 10 %, or when "
        "the 95 % distribution-free interval of its median round time is wider than 10 % (a re-run may "
        "then land more than 10 % away).", "",
        "## Roofline", "", *[f"- {line}" for line in gemm_lines(result)], "",
        "## Results", "",
        "| " + " | ".join(table_header(result)) + " |", "|" + "---|" * len(table_header(result)),
        *["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(result)], "",
    ]
    findings = finding_lines(result)
    if findings:
        lines += ["## Findings", "", *[f"- {line}" for line in findings], ""]
    if plot is not None:
        lines += [f"![latency against MACs]({plot.name})", ""]
    profiles = [r for r in result["rows"] if r.get("profile")]
    if profiles:
        lines += ["## Top ops by time (per-op profiles)", ""]
        for r in profiles:
            on = f" ({r['host']})" if remote else ""
            kinds = profile_shares(r["profile"])
            split = ("; by kind: " + ", ".join(f"{k} {v:.0%}" for k, v in kinds.items())) if kinds else ""
            lines += [f"**{r['model']} on {r['device']} {r.get('precision', '')}{on}**{split}", "",
                      *([gemm_kernels_line(r["roofline"]), ""] if (r.get("roofline") or {}).get("gemm_kernels_ms")
                        else []),
                      "| op | kind | ms / inference | share |", "|---|---|---|---|"]
            lines += [f"| {p['op']} | {p.get('kind', '-')} | {p['ms_per_run']:.3f} | {p['share']:.0%} |"
                      for p in r["profile"][:10]] + [""]
    lines += ["## Versions", "", "Exported with: " + ", ".join(f"{k} {val}" for k, val in v.items()), ""]
    for h in result.get("hosts", []):
        if h.get("runtimes"):
            lines += [f"Measured on {h['name']} with: " + ", ".join(f"{k} {val}" for k, val in h["runtimes"].items()), ""]
    _atomic_write(path, "\n".join(lines).encode())
    return path


def write_all(result: dict[str, Any], out: Path, json_path: Path | None = None) -> dict[str, Path | None]:
    """bench.json, bench.csv, latency_vs_macs.png and report.md in ``out`` (JSON also at ``json_path``)."""
    paths: dict[str, Path | None] = {"json": write_json(result, out / "bench.json"),
                                     "csv": write_csv(result, out / "bench.csv")}
    if json_path is not None:
        write_json(result, json_path)
        paths["json_copy"] = json_path
    paths["png"] = write_plot(result, out / "latency_vs_macs.png")
    paths["markdown"] = write_markdown(result, out / "report.md", paths["png"])
    return paths
