"""Bench report writers: JSON (everything), CSV (one row per configuration), a PNG of latency against
MACs per runtime, a markdown report that embeds it, and the terminal table.

All writers take the result document of :func:`edgevit.devices.bench.run_bench` and write atomically
(temporary file, then rename), so an interrupted run never leaves half a report.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CSV_FIELDS = ["host", "model", "device", "precision", "status", "median_ms", "p90_ms", "p99_ms", "min_ms", "mean_ms",
              "std_ms", "runs", "throughput_per_s", "speedup_vs_eager", "speedup_low", "speedup_high",
              "params", "macs", "gmacs_per_s", "roofline_bound_ms", "median_over_bound", "bound_precision", "load_ms", "first_ms",
              "peak_rss_mb", "threads", "runtime_precision", "median_interval_low_ms",
              "median_interval_high_ms", "noisy", "baseline", "detail"]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A result row as the CSV's flat columns (empty where not measured)."""
    summary = row.get("summary") or {}
    speedup = row.get("speedup_vs_eager") or row.get("speedup_vs_baseline") or {}
    roof = row.get("roofline") or {}
    info = row.get("runtime_info") or {}
    rep = row.get("repeatability") or {}
    return {
        "host": row.get("host", "local"), "model": row.get("model"), "device": row.get("device"),
        "precision": row.get("precision"),
        "status": row.get("status"), "median_ms": summary.get("median_ms"), "p90_ms": summary.get("p90_ms"),
        "p99_ms": summary.get("p99_ms"), "min_ms": summary.get("min_ms"), "mean_ms": summary.get("mean_ms"),
        "std_ms": summary.get("std_ms"), "runs": summary.get("runs"), "throughput_per_s": summary.get("throughput_per_s"),
        "speedup_vs_eager": speedup.get("median"), "speedup_low": speedup.get("low"), "speedup_high": speedup.get("high"),
        "params": row.get("params"), "macs": row.get("macs"), "gmacs_per_s": row.get("gmacs_per_s"),
        "roofline_bound_ms": roof.get("bound_ms"), "median_over_bound": roof.get("median_over_bound"),
        "bound_precision": roof.get("precision"),
        "load_ms": row.get("load_ms"), "first_ms": row.get("first_ms"), "peak_rss_mb": row.get("peak_rss_mb"),
        "threads": info.get("threads"), "runtime_precision": info.get("precision"),
        "median_interval_low_ms": rep.get("interval_low_ms"), "median_interval_high_ms": rep.get("interval_high_ms"),
        "noisy": rep.get("noisy"), "baseline": row.get("baseline"), "detail": row.get("detail", ""),
    }


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
    return (["host"] if remote_rows(result) else []) + TABLE_HEADER


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The terminal / markdown table: [host,] model, runtime, median, p90, speed-up, params, MACs, GMAC/s, roofline."""
    out = []
    hosts = remote_rows(result)
    for row in result["rows"]:
        f = flat_row(row)
        status = row.get("status")
        noisy = " (noisy)" if f["noisy"] else ""
        out.append([f["host"]] * hosts + [
            f["model"], f["device"], f"{f['precision']}/{f['runtime_precision'] or '-'}",
            _fmt(f["median_ms"], ".2f") + noisy, _fmt(f["p90_ms"], ".2f"), speedup_text(row),
            _fmt(f["params"] and f["params"] / 1e6, ".2f"), _fmt(f["macs"] and f["macs"] / 1e9, ".2f"),
            _fmt(f["gmacs_per_s"], ".1f"), bound_text(f),
            "ok" if status == "ok" else f"{status}: {row.get('detail', '')}"[:80],
        ])
    return out


TABLE_HEADER = ["model", "runtime", "precision (asked/runtime)", "median ms", "p90 ms", "vs eager [spread]",
                "params M", "GMACs", "GMAC/s", "median / bound", "status"]


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
        lines.append(f"{where}: {m.get('cpu')} ({m.get('cores')} cores, {m.get('system')} {m.get('machine')}, "
                     f"python {m.get('python')}); CPU flags: {flags}" + (f"; {nodes}" if nodes else ""))
    return lines


def gemm_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    hosts = remote_rows(result)
    for g in result.get("gemm", []):
        where = f"{g.get('host', 'local')}: " if hosts else ""
        if g.get("gflops"):
            native = {True: "", False: "; emulated: the CPU flags show no arithmetic units for it",
                      None: "; arithmetic units unknown"}[g.get("native", True)]
            lines.append(f"{where}{g['precision']} GEMM {g['n']}x{g['n']} on {g['threads']} threads ({g['engine']}): "
                         f"{g['gflops']:.1f} GFLOP/s sustained (median), best {g['best_gflops']:.1f}{native}")
        else:
            lines.append(f"{where}{g['precision']} GEMM: {g['status']} {g.get('detail', '')}")
    return lines


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
    if plot is not None:
        lines += [f"![latency against MACs]({plot.name})", ""]
    profiles = [r for r in result["rows"] if r.get("profile")]
    if profiles:
        lines += ["## Top ops by time (per-op profiles)", ""]
        for r in profiles:
            on = f" ({r['host']})" if remote else ""
            lines += [f"**{r['model']} on {r['device']}{on}**", "", "| op | ms / inference | share |", "|---|---|---|"]
            lines += [f"| {p['op']} | {p['ms_per_run']:.3f} | {p['share']:.0%} |" for p in r["profile"][:10]] + [""]
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
