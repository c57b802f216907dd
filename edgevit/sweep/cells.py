"""The cells of ``edgevit sweep`` and the work of one cell, wherever it runs (docs/sweep.md).

A cell is one model x target x precision (x accelerator): its export (through the bench's export cache, so
a re-run measures only what changed) with parity, then optionally its latency on the bench devices of its
target. :func:`run_cell` is a plain function of JSON-able arguments returning a JSON-able row, so the local
executor calls it in a thread and the Ray executor in a task on any node; the conversion itself always runs
in a child process with its timeout (``export/isolated.py``), so a crash or a hang costs that cell only.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgevit.check.project import cell_id, cell_slug
from edgevit.errors import EdgevitError

CELL_TIMEOUT_S = 1800.0
#: target -> relative cost of its conversion in cores (a Ray task's num_cpus): TF/LiteRT and coremltools
#: conversions run multi-threaded graph work; int8 adds a calibration run
TARGET_COST = {"onnx": 1, "openvino": 1, "tflite": 2, "coreml": 2}


@dataclass(frozen=True)
class SweepCell:
    model: str
    target: str
    precision: str
    accelerator: str | None = None  # None: the target's default pipeline
    passes: str = "auto"
    input_size: int | None = None
    input_shape: tuple[int, ...] | None = None
    bench: tuple[str, ...] = ()  # devices of this cell's target to measure the artifact on

    @property
    def id(self) -> str:
        return cell_id(self.model, self.target, self.accelerator, self.precision)

    @property
    def slug(self) -> str:
        return cell_slug(self.id)

    @property
    def cost(self) -> int:
        """Cores the cell's conversion uses (the Ray task's ``num_cpus``)."""
        return TARGET_COST.get(self.target, 1) + (1 if self.precision == "int8" else 0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape) if self.input_shape else None
        data["bench"] = list(self.bench)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepCell":
        data = dict(data)
        data["input_shape"] = tuple(data["input_shape"]) if data.get("input_shape") else None
        data["bench"] = tuple(data.get("bench") or ())
        return cls(**data)


@dataclass
class Plan:
    """What a sweep runs: its cells and the settings every cell shares."""

    cells: list[SweepCell]
    cache: Path
    timeout_s: float = CELL_TIMEOUT_S
    bench_runs: int = 20
    extras: dict[str, Any] = field(default_factory=dict)


def plan_cells(models: list[str], targets: list[str], precisions: list[str], accelerators: list[str],
               bench: list[str], passes: str = "auto", input_size: int | None = None,
               input_shape: tuple[int, ...] | None = None) -> list[SweepCell]:
    """The cross product, each cell checked (model, target, precision, accelerator, bench device): a bad name is
    a one-line :class:`EdgevitError` before anything runs. ``accelerators`` (``onnx:nnapi``) add cells on those
    pipelines for their targets; a target none names gets its default pipeline. ``bench`` devices (``onnx:cpu``)
    measure the cells of their target on the default pipeline."""
    from edgevit.devices.table import get_device
    from edgevit.export.targets import get_target, resolve_precision

    by_target: dict[str, list[str]] = {}
    for name in accelerators:
        target, sep, acc = name.partition(":")
        if not sep or target not in targets:
            raise EdgevitError(f"--accelerators: '{name}' is not target:accelerator of one of --targets "
                               f"({', '.join(targets)})")
        by_target.setdefault(target, []).append(get_target(target).accelerator(acc).name)
    bench_by_target: dict[str, list[str]] = {}
    for name in bench:
        if _remote(name) is not None:  # a remote machine: the runtimes of each target it has
            for target in targets:
                bench_by_target.setdefault(target, []).append(name)
            continue
        device = get_device(name)
        if device.target is None or device.target not in targets:
            raise EdgevitError(f"--bench: '{name}' runs none of --targets ({', '.join(targets)})")
        bench_by_target.setdefault(device.target, []).append(device.name)
    cells = []
    for model in models:
        for target in targets:
            tgt = get_target(target)
            for precision in precisions:
                resolved = resolve_precision(tgt, precision)
                for acc in by_target.get(target) or [None]:
                    measured = tuple(bench_by_target.get(target, ())) if acc in (None, tgt.accelerators[0].name) else ()
                    cells.append(SweepCell(model, target, resolved, acc, passes, input_size, input_shape, measured))
    return cells


# --- one cell's work --------------------------------------------------------------------------------------

def run_cell(cell_data: dict[str, Any], cache: str, timeout_s: float = CELL_TIMEOUT_S,
             bench_runs: int = 20, with_bench: bool = True) -> dict[str, Any]:
    """Export (cached) and verify one cell, then (``with_bench``) time it on its bench devices; a JSON-able row.
    Never raises for the cell's own failures (they are its row); an interrupt propagates after the child is
    stopped."""
    cell = SweepCell.from_dict(cell_data)
    started = time.monotonic()
    row: dict[str, Any] = {"cell": cell.id, **cell.to_dict(), "host": platform.node(), "pid": os.getpid()}
    try:
        manifest = _export(cell, Path(cache), timeout_s)
    except EdgevitError as exc:
        return row | {"status": "error", "reason": str(exc), "seconds": round(time.monotonic() - started, 1)}
    row |= _export_fields(manifest) | {"seconds": round(time.monotonic() - started, 1)}
    return add_latency(row, cache, bench_runs) if with_bench else row


def add_latency(row: dict[str, Any], cache: str, bench_runs: int = 20) -> dict[str, Any]:
    """``row`` with the latency of its passed cell on each of its bench devices (a measurement that fails makes
    the cell an error, with the reason)."""
    cell = SweepCell.from_dict({k: row[k] for k in SweepCell.__dataclass_fields__})
    if row["status"] != "passed" or not cell.bench:
        return row
    started = time.monotonic()
    latency = {name: _latency(cell, name, Path(cache), bench_runs) for name in cell.bench}
    row = row | {"latency": latency, "seconds": round(row.get("seconds", 0) + time.monotonic() - started, 1)}
    failed = {n: v["error"] for n, v in latency.items() if "error" in v}
    if failed:
        row |= {"status": "error", "reason": "; ".join(f"bench {n}: {e}" for n, e in failed.items())}
    return row


def _export(cell: SweepCell, cache: Path, timeout_s: float) -> dict[str, Any]:
    """The bench's cached export of ``cell`` (made now in a child process when the cache lacks it)."""
    from edgevit.devices.bench import BenchOptions, export_cached
    from edgevit.export.targets import get_target

    acc = cell.accelerator or get_target(cell.target).accelerators[0].name
    device = _Pipeline(cell.target, acc)  # export_cached reads a device's target and accelerator only
    opts = BenchOptions(models=[cell.model], passes=cell.passes, cache=cache, export_timeout_s=timeout_s,
                        out=cache.parent, detached_exports=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", cell.model) if cell.input_shape else None
    size = cell.input_size or _native_size(cell.model)
    return export_cached(cell.model, size, device, cell.precision, opts, cell.input_shape, name)


@dataclass(frozen=True)
class _Pipeline:
    """Where an export is made for: a target and the accelerator whose pass pipeline runs (what the bench's
    export cache keys on; not every target:accelerator pair is a measurable device)."""

    target: str
    accelerator: str


def _native_size(model: str) -> int:
    from edgevit.references import is_reference
    from edgevit.registry import model_info

    return 0 if is_reference(model) else model_info(model).input_size


def _export_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """A cell's status, reason and figures from its export's manifest (or error row)."""
    from edgevit.check.run import parity_reasons

    status = manifest.get("status")
    if status == "error":
        reason = manifest.get("error", "unknown error")
        if manifest.get("parity_failed"):
            return {"status": "failed", "reason": parity_reasons({"status": "failed",
                                                                   "parity": manifest.get("parity")})[0]}
        return {"status": "timeout" if reason.startswith("timed out") else "error", "reason": reason}
    outputs = (manifest.get("parity") or {}).get("outputs") or []
    worst = max((o["max_abs_err"] for o in outputs if o.get("max_abs_err") is not None), default=None)
    return {"status": "passed" if status in ("passed", "converted-not-verified", "skipped") else "failed",
            "reason": "" if status == "passed" else f"parity {status}", "max_abs_err": worst,
            "size_bytes": (manifest.get("artifact") or {}).get("bytes"), "cached": manifest.get("cached", False),
            "artifact": manifest.get("artifact_path"), "versions": manifest.get("versions", {})}


def _remote(name: str) -> Any:
    """The remote machine ``name`` names (``ssh:...``, ``adb:...`` or a devices-file name), else None (a device
    of this machine's table, or an unknown name: :func:`plan_cells` says which)."""
    from edgevit.devices.inventory import load_devices
    from edgevit.devices.remote import resolve_remote
    from edgevit.devices.table import DEVICES

    if name in DEVICES:
        return None
    named = load_devices()
    if name not in named and not name.startswith(("ssh:", "adb:")):
        return None
    return resolve_remote(name, named)


def _latency(cell: SweepCell, device: str, cache: Path, runs: int) -> dict[str, Any]:
    """The median latency of the cell's cached artifact on ``device`` (the bench protocol, a short run): a device
    of this machine, or a remote machine (its runtime of the cell's target, over the remote protocol)."""
    from edgevit.devices.bench import BenchOptions, run_bench

    opts = BenchOptions(models=[cell.model], device=device, precision=cell.precision, runs=runs,
                        rounds=max(2, runs // 5), passes=cell.passes, input_size=cell.input_size,
                        input_shape=cell.input_shape, cache=cache, out=cache.parent / "bench" / cell.slug,
                        roofline=False)
    try:
        remote = _remote(device)
        if remote is not None:
            opts.device, opts.targets, opts.remotes = "cpu", [cell.target], [remote]
        result = run_bench(opts)
    except EdgevitError as exc:
        return {"error": str(exc)}
    row = next((r for r in result["rows"] if (r["device"] == device if remote is None else
                                               r["device"].startswith(f"{cell.target}:"))), None)
    if row is None or not row.get("summary"):
        return {"error": (row or {}).get("detail") or f"no {cell.target} runtime measured there"}
    return {"median_ms": row["summary"]["median_ms"], "p90_ms": row["summary"].get("p90_ms"), "runtime": row["device"]}
