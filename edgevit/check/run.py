"""Running and judging the cells of ``edgevit check``.

Each cell is exported in its own child process (a converter crash or hang costs its row, as in
``edgevit export``), with parity; then edgevit reads back what a baseline keeps (:func:`cell_record`: parity
errors, accelerator coverage, op counts per type, size, tool versions) and judges the cell's budgets
(:func:`budget_reasons`). :func:`judge` is shared with :func:`edgevit.testing.assert_exports`, which exports
in-process instead.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from edgevit.check.project import Cell, ProjectError
from edgevit.errors import EdgevitError
from edgevit.export.isolated import terminate_running_children

CELL_TIMEOUT_S = 1800.0


@dataclass
class CellResult:
    """A cell's verdict: ``status`` passed / failed (parity or a budget) / error (the export did not finish)."""

    cell: Cell
    status: str
    reasons: list[str] = field(default_factory=list)  # one line each; empty when passed
    record: dict[str, Any] = field(default_factory=dict)  # what the lock file keeps (cell_record)
    artifact: str | None = None
    seconds: float = 0.0
    regressions: list[str] = field(default_factory=list)  # against the baseline (edgevit.check.baseline)
    improvements: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "passed" and not self.regressions

    @property
    def reason(self) -> str:
        """The one-line reason of a failure (the first failed budget, then the regressions)."""
        return "; ".join(self.reasons + self.regressions)

    def to_dict(self) -> dict[str, Any]:
        return {"cell": self.cell.id, "status": self.status, "ok": self.ok, "reasons": self.reasons,
                "regressions": self.regressions, "improvements": self.improvements, "record": self.record,
                "artifact": self.artifact, "seconds": round(self.seconds, 1)}


# --- options of a cell ---------------------------------------------------------------------------------

def cell_options(cell: Cell, work: Path) -> tuple[str, Any]:
    """What the export child builds (the canonical model or reference) and its checked options; an int8 cell
    without calibration data calibrates on seeded inputs (the values set scales, never the placement)."""
    from edgevit.export.options import ExportOptions
    from edgevit.export.quantization import CALIBRATED

    opts = ExportOptions(input_size=cell.input_size, precision=cell.precision, verify=True, latency_runs=0,
                         weights=cell.weights, passes=cell.passes, accelerator=cell.accelerator,
                         input_shape=cell.input_shape, calibration=cell.calibration)
    probe = replace(opts, precision=None, calibration=None)
    _, model, _ = probe.check(cell.model, cell.target)
    opts.input_shape, opts.weights = probe.input_shape, probe.weights
    if cell.precision in CALIBRATED and cell.calibration is None:
        from edgevit.export.quantization.data import seeded_calibration

        work.mkdir(parents=True, exist_ok=True)
        opts.calibration = str(seeded_calibration(model, cell.input_size, opts.input_shape,
                                                  work / "seeded-calibration.npz"))
        opts.calibration_method = "minmax"  # arbitrary values: the ranges that cannot fail on near-constant tensors
    opts.check(model, cell.target, build_reference=False)
    return model, opts


def check_cells(cells: list[Cell], work: Path) -> dict[str, tuple[str, Any]]:
    """Every cell's options, checked before any export runs: a bad model, weights file or pass name is a
    one-line :class:`ProjectError` naming the project file's line and entry."""
    checked = {}
    for cell in cells:
        try:
            checked[cell.id] = cell_options(cell, work / "calibration" / cell.slug)
        except ProjectError:
            raise
        except EdgevitError as exc:
            raise ProjectError(f"{cell.source or 'cell ' + cell.id}: {exc}") from None
    return checked


# --- running --------------------------------------------------------------------------------------------

def run_cells(cells: list[Cell], out: Path, jobs: int = 1, checked: dict[str, tuple[str, Any]] | None = None,
              on_result: Callable[[CellResult], None] | None = None,
              timeout_s: float = CELL_TIMEOUT_S) -> list[CellResult]:
    """Run ``cells`` (up to ``jobs`` at once), in their order in the result; ``on_result`` sees each as it ends.

    Ctrl-C stops scheduling: the cells not started are dropped, the running children are stopped by their
    own handlers (export's isolation), and the interrupt propagates."""
    checked = checked or check_cells(cells, out)
    results: dict[str, CellResult] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="edgevit-check") as pool:
        pending: dict[Future[CellResult], Cell] = {
            pool.submit(run_cell, cell, out / "cells" / cell.slug, checked[cell.id], timeout_s): cell
            for cell in cells}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    cell = pending.pop(future)
                    results[cell.id] = future.result()
                    if on_result is not None and not _measures_latency(results[cell.id]):
                        on_result(results[cell.id])
        except BaseException:  # Ctrl-C, SIGTERM: no new cell; the running children stopped, their threads return
            for future in pending:
                future.cancel()
            terminate_running_children()
            raise
    # latency after every export, one at a time: a measurement next to a running conversion measures the conversion
    for cell in cells:
        if _measures_latency(results[cell.id]):
            _judge_latency(cell, results[cell.id], out / "bench")
            if on_result is not None:
                on_result(results[cell.id])
    return [results[c.id] for c in cells]


def _measures_latency(result: CellResult) -> bool:
    return result.status != "error" and result.cell.budgets.latency is not None


def run_cell(cell: Cell, out: Path, checked: tuple[str, Any], timeout_s: float = CELL_TIMEOUT_S) -> CellResult:
    """Export ``cell`` in a child process into ``out`` (replaced), then judge it (latency: :func:`run_cells`)."""
    from edgevit.export.isolated import export_in_child

    model, opts = checked
    started = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    manifest = export_in_child(model, cell.target, out, opts, timeout_s)
    result = judge(cell, manifest)
    result.seconds = time.monotonic() - started
    return result


# --- judging --------------------------------------------------------------------------------------------

def judge(cell: Cell, manifest: dict[str, Any]) -> CellResult:
    """The verdict on ``cell`` from its export ``manifest`` (with ``artifact_path``) and the artifact."""
    if manifest.get("status") == "error":
        return CellResult(cell, "error", [f"export failed: {manifest.get('error', 'unknown error')}"])
    artifact = manifest.get("artifact_path")
    try:
        record = cell_record(cell, manifest)
    except EdgevitError as exc:
        return CellResult(cell, "error", [f"could not read the artifact: {exc}"], artifact=artifact)
    reasons = parity_reasons(manifest) + budget_reasons(cell, record)
    return CellResult(cell, "failed" if reasons else "passed", reasons, record, artifact)


def cell_record(cell: Cell, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a baseline keeps of a cell: parity status and worst errors, coverage on its accelerator, op counts
    per type (and per type on the accelerator), artifact size, tool versions."""
    from edgevit.export.coverage import coverage, op_counts

    artifact = Path(manifest["artifact_path"])
    outputs = (manifest.get("parity") or {}).get("outputs") or []
    record: dict[str, Any] = {
        "status": manifest.get("status"),
        "parity": {"max_abs_err": _worst(outputs, "max_abs_err"), "max_rel_err": _worst(outputs, "max_rel_err"),
                   "peak": _worst(outputs, "peak")},
        "size_bytes": (manifest.get("artifact") or {}).get("bytes"),
        "ops": op_counts(artifact, cell.target, cell.accelerator),
        "versions": manifest.get("versions", {}),
    }
    if cell.accelerator:
        cov = coverage(artifact, cell.target, cell.accelerator)
        record["coverage"] = {"checker": cov.checker, "partitions": cov.partitions, "nodes": cov.nodes,
                              "supported": cov.supported, "percent": round(cov.percent, 2),
                              "unsupported": dict(cov.unsupported), "problems": list(cov.problems),
                              "ops_on_accelerator": dict(cov.supported_ops)}
    return record


def parity_reasons(manifest: dict[str, Any]) -> list[str]:
    """The export's own parity verdict (the precision's bounds), as a reason when it is not a pass."""
    status = manifest.get("status")
    if status == "passed":
        return []
    parity = manifest.get("parity") or {}
    failing = [o for o in parity.get("outputs") or [] if not o.get("passed")]
    if failing:
        o = failing[0]
        err = "not finite" if o.get("max_abs_err") is None else f"{o['max_abs_err']:.3g}"
        peak = f" (peak {o['peak']:.3g})" if o.get("peak") is not None else ""
        cosine = f", cosine {o['cosine']:.6f}" if o.get("cosine") is not None else ""
        where = f" [{parity['detail']}]" if parity.get("detail") else ""
        return [f"parity {status}: {o.get('name', 'output')} max abs error {err}{peak}{cosine}, beyond the "
                f"{parity.get('precision', '')} bounds {_bounds(parity.get('tolerance'))}{where}"]
    return [f"parity {status}: {parity.get('detail') or 'not verified'}"]


def _bounds(tolerance: Any) -> str:
    """``{'max_abs_rel_to_peak': 0.02, 'min_cosine': 0.999}`` as 'max abs 0.02 x peak, cosine >= 0.999'."""
    if not isinstance(tolerance, dict):
        return str(tolerance)
    parts = [f"max abs {tolerance['max_abs_rel_to_peak']:g} x peak" if "max_abs_rel_to_peak" in tolerance else "",
             f"cosine >= {tolerance['min_cosine']:g}" if "min_cosine" in tolerance else ""]
    return "(" + ", ".join(p for p in parts if p) + ")"


def budget_reasons(cell: Cell, record: dict[str, Any]) -> list[str]:
    """Each budget of ``cell`` that ``record`` breaks, one line each."""
    b, reasons = cell.budgets, []
    worst = record["parity"]["max_abs_err"]
    if b.max_abs_error is not None and worst is not None and worst > b.max_abs_error:
        reasons.append(f"parity max abs error {worst:.3g} > budget {b.max_abs_error:.3g}")
    size = record.get("size_bytes")
    if b.max_size_mb is not None and size is not None and size / 1e6 > b.max_size_mb:
        reasons.append(f"artifact {size / 1e6:.1f} MB > budget {b.max_size_mb:g} MB")
    cov = record.get("coverage")
    if b.coverage is not None and cov is not None:
        if b.coverage.max_partitions is not None and cov["partitions"] > b.coverage.max_partitions:
            reasons.append(f"{cell.target}:{cell.accelerator}: {cov['partitions']} partitions > budget "
                           f"{b.coverage.max_partitions}{_refused(cov)}")
        if b.coverage.min_nodes_percent is not None and cov["percent"] < b.coverage.min_nodes_percent:
            reasons.append(f"{cell.target}:{cell.accelerator}: {cov['supported']}/{cov['nodes']} nodes "
                           f"({cov['percent']:g}%) < budget {b.coverage.min_nodes_percent:g}%{_refused(cov)}")
    return reasons + latency_reasons(cell, record)


def latency_reasons(cell: Cell, record: dict[str, Any]) -> list[str]:
    """The latency budget's reason, when ``record`` has a measured median above it."""
    budget, median = cell.budgets.latency, (record.get("latency") or {}).get("median_ms")
    if budget is None or median is None or median <= budget.max_ms:
        return []
    return [f"latency on {budget.device}: median {median:.2f} ms > budget {budget.max_ms:g} ms"]


def _refused(cov: dict[str, Any]) -> str:
    """What the checker refused, for a coverage reason: '(refused: Erf x2, ...)'."""
    items = [f"{op} x{n}" for op, n in cov.get("unsupported", {}).items()] + list(cov.get("problems", []))[:2]
    return f" (refused: {', '.join(items)})" if items else ""


def _worst(outputs: list[dict[str, Any]], key: str) -> float | None:
    values = [o[key] for o in outputs if o.get(key) is not None]
    return max(values) if values else None


def _judge_latency(cell: Cell, result: CellResult, bench_out: Path) -> None:
    """Measure the cell's latency on its budget's device with the bench protocol (its export cache shared by
    every cell), into ``result.record["latency"]``; a measurement that fails is the cell's error."""
    from edgevit.devices.bench import BenchOptions, run_bench

    budget = cell.budgets.latency
    assert budget is not None
    opts = BenchOptions(models=[cell.model], device=budget.device, precision=cell.precision, runs=20, rounds=4,
                        passes=cell.passes, input_size=cell.input_size, input_shape=cell.input_shape,
                        out=bench_out / cell.slug, cache=bench_out / "cache", roofline=False)
    try:
        bench = run_bench(opts, lambda message, level: None)
    except EdgevitError as exc:
        result.status, result.reasons = "error", result.reasons + [f"latency on {budget.device}: {exc}"]
        return
    row = next((r for r in bench["rows"] if r["device"] == budget.device and r.get("summary")), None)
    if row is None:
        result.status, result.reasons = "error", result.reasons + [f"latency on {budget.device}: not measured"]
        return
    result.record["latency"] = {"device": budget.device, "median_ms": row["summary"]["median_ms"],
                                "p90_ms": row["summary"].get("p90_ms")}
    extra = latency_reasons(cell, result.record)
    if extra:
        result.status, result.reasons = "failed", result.reasons + extra
