"""What ``edgevit check`` writes: the terminal table, JUnit XML (one testcase per cell), the markdown summary
(what a CI job summary takes) and ``results.json``."""

from __future__ import annotations

import datetime
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from edgevit.check.run import CellResult
from edgevit.export.manifest import write_atomic

PASS, FAIL = "✅", "❌"


def mark(r: CellResult) -> str:
    return PASS if r.ok else FAIL


def figures(r: CellResult) -> dict[str, str]:
    """The short figures of a cell's row: parity error, coverage, size."""
    rec = r.record
    worst = (rec.get("parity") or {}).get("max_abs_err")
    cov = rec.get("coverage")
    size = rec.get("size_bytes")
    latency = (rec.get("latency") or {}).get("median_ms")
    return {"max abs err": "-" if worst is None else f"{worst:.2e}",
            "coverage": "-" if not cov else f"{cov['partitions']} part., {cov['supported']}/{cov['nodes']}",
            "size MB": "-" if size is None else f"{size / 1e6:.3g}",
            "latency ms": "-" if latency is None else f"{latency:.2f}"}


def why(r: CellResult) -> str:
    """The reason column: what failed or regressed, else the improvements, else empty."""
    if not r.ok:
        return r.reason
    return ("improved: " + "; ".join(r.improvements)) if r.improvements else ""


def table(results: list[CellResult]) -> Any:
    """The rich table the terminal gets."""
    from rich.table import Table

    t = Table(title="edgevit check")
    for name in ("", "cell", "status", "max abs err", "coverage", "size MB", "latency ms", "reason"):
        t.add_column(name, overflow="fold")
    for r in results:
        f = figures(r)
        t.add_row(mark(r), r.cell.id, r.status + (" (regressed)" if r.regressions else ""), f["max abs err"],
                  f["coverage"], f["size MB"], f["latency ms"], why(r))
    return t


def summary_line(results: list[CellResult]) -> str:
    failed = [r for r in results if not r.ok]
    regressed = [r for r in results if r.regressions]
    return (f"{len(results) - len(failed)}/{len(results)} cells passed"
            + (f", {len(regressed)} regressed against the baseline" if regressed else ""))


def markdown(results: list[CellResult], versions: dict[str, str]) -> str:
    """The summary for a CI job page (GitHub's $GITHUB_STEP_SUMMARY takes markdown)."""
    lines = ["## edgevit check", "", summary_line(results), "",
             "| | cell | status | max abs err | coverage | size MB | latency ms | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = figures(r)
        reason = why(r).replace("|", "\\|")
        lines.append(f"| {mark(r)} | `{r.cell.id}` | {r.status} | {f['max abs err']} | {f['coverage']} | "
                     f"{f['size MB']} | {f['latency ms']} | {reason} |")
    lines += ["", "Tools: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())), ""]
    return "\n".join(lines)


def junit(results: list[CellResult]) -> str:
    """JUnit XML: one testsuite, a testcase per cell (classname: the model, name: target/precision); a failed
    or regressed cell is a <failure> whose message is the one-line reason, an export error an <error>."""
    suite = ET.Element("testsuite", name="edgevit check", tests=str(len(results)),
                       failures=str(sum(r.status == "failed" or (r.status == "passed" and bool(r.regressions))
                                        for r in results)),
                       errors=str(sum(r.status == "error" for r in results)),
                       time=f"{sum(r.seconds for r in results):.1f}",
                       timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for r in results:
        name, _, rest = r.cell.id.partition("/")
        case = ET.SubElement(suite, "testcase", classname=name, name=rest, time=f"{r.seconds:.1f}")
        if r.status == "error":
            ET.SubElement(case, "error", message=r.reason).text = r.reason
        elif not r.ok:
            ET.SubElement(case, "failure", message=r.reason).text = "\n".join(r.reasons + r.regressions)
        if r.improvements:
            ET.SubElement(case, "system-out").text = "improved: " + "; ".join(r.improvements)
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True) + "\n"


def results_document(results: list[CellResult], project: Path, baseline: Path | None,
                     versions: dict[str, str]) -> dict[str, Any]:
    return {"schema": 1, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "project": str(project), "baseline": str(baseline) if baseline else None, "versions": versions,
            "summary": summary_line(results), "cells": [r.to_dict() for r in results]}


def write_all(results: list[CellResult], out: Path, project: Path, baseline: Path | None, versions: dict[str, str],
              junit_path: Path | None = None, summary_path: Path | None = None) -> dict[str, Path]:
    """results.json, junit.xml and summary.md (paths overridable); the summary also goes to the CI job page
    when ``$GITHUB_STEP_SUMMARY`` names one."""
    summary = markdown(results, versions)
    paths = {"json": write_atomic(out / "results.json",
                                json.dumps(results_document(results, project, baseline, versions), indent=1,
                                           default=str) + "\n"),
             "junit": write_atomic(junit_path or out / "junit.xml", junit(results)),
             "summary": write_atomic(summary_path or out / "summary.md", summary)}
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a") as fh:
            fh.write(summary + "\n")
    return paths
