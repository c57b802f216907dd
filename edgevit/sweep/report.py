"""What ``edgevit sweep`` writes: the table (also streamed a line per cell), ``sweep.json``, ``sweep.csv`` and
``report.md``. A sweep stopped by Ctrl-C writes them too, marked partial."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from edgevit.export.manifest import write_atomic

PASS, FAIL = "✅", "❌"
FIELDS = ["cell", "model", "target", "accelerator", "precision", "status", "reason", "max_abs_err", "size_bytes",
          "cached", "seconds", "latency", "host", "node"]


def mark(row: dict[str, Any]) -> str:
    return PASS if row["status"] == "passed" else FAIL


def figures(row: dict[str, Any]) -> dict[str, str]:
    err, size = row.get("max_abs_err"), row.get("size_bytes")
    latency = row.get("latency") or {}
    return {"max abs err": "-" if err is None else f"{err:.2e}",
            "size MB": "-" if size is None else f"{size / 1e6:.3g}",
            "latency ms": ", ".join(f"{d} {v['median_ms']:.2f}" for d, v in latency.items() if "median_ms" in v) or "-",
            "s": "-" if row.get("seconds") is None else f"{row['seconds']:.0f}" + (" (cached)" if row.get("cached")
                                                                                   else "")}


def line(row: dict[str, Any], done: int, total: int) -> str:
    """The streamed line of a finished cell."""
    reason = f": {row['reason']}" if row.get("reason") and row["status"] != "passed" else ""
    return f"[{done}/{total}] {mark(row)} {row['cell']} {row['status']} ({figures(row)['s']} s){reason}"


def summary(result: dict[str, Any]) -> str:
    rows = result["rows"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    where = f"{result['executor']}" + (f", {result['jobs']} jobs" if result["executor"] == "local" else
                                       f", {len((result.get('cluster') or {}).get('nodes', []))} nodes")
    partial = "PARTIAL (interrupted): " if not result["complete"] else ""
    return f"{partial}{counts.get('passed', 0)}/{len(rows)} cells passed ({detail}) in {result['seconds']:.0f} s ({where})"


def table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="edgevit sweep" + ("" if result["complete"] else " (partial)"))
    for name in ("", "cell", "status", "max abs err", "size MB", "latency ms", "s", "reason"):
        t.add_column(name, overflow="fold")
    for r in result["rows"]:
        f = figures(r)
        t.add_row(mark(r), r["cell"], r["status"], f["max abs err"], f["size MB"], f["latency ms"], f["s"],
                  r.get("reason") or "")
    return t


def markdown(result: dict[str, Any]) -> str:
    lines = ["# edgevit sweep", "", result["created"] + (" — **partial: interrupted**" if not result["complete"]
                                                         else ""), "", summary(result), "",
             "| | cell | status | max abs err | size MB | latency ms | s | reason |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = figures(r)
        reason = (r.get("reason") or "").replace("|", "\\|")
        lines.append(f"| {mark(r)} | `{r['cell']}` | {r['status']} | {f['max abs err']} | {f['size MB']} | "
                     f"{f['latency ms']} | {f['s']} | {reason} |")
    nodes = (result.get("cluster") or {}).get("nodes")
    if nodes:
        lines += ["", "Cluster: " + "; ".join(f"{n['address']} ({n['cpus']:g} CPUs"
                                             + (f", {', '.join(n['resources'])}" if n["resources"] else "") + ")"
                                             for n in nodes)]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), ""]
    return "\n".join(lines)


def write_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in result["rows"]:
        latency = r.get("latency") or {}
        writer.writerow(r | {"latency": ";".join(f"{d}={v.get('median_ms')}" for d, v in latency.items())})
    return buf.getvalue()


def write_all(result: dict[str, Any], out: Path) -> dict[str, Path]:
    return {"json": write_atomic(out / "sweep.json", json.dumps(result, indent=1, default=str) + "\n"),
            "csv": write_atomic(out / "sweep.csv", write_csv(result)),
            "markdown": write_atomic(out / "report.md", markdown(result))}
