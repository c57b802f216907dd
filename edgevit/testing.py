"""Conversion-parity assertions for a user's own tests (docs/ci.md).

    from edgevit.testing import assert_exports

    def test_my_model_ships():
        assert_exports(MyModel().eval(), (torch.randn(1, 3, 224, 224),), targets=["onnx", "tflite"],
                       coverage={"onnx:nnapi": {"max_partitions": 1, "min_nodes_percent": 100}})

Each target is exported in this process (:func:`edgevit.api.export_model`, parity included) and judged
like a cell of ``edgevit check`` (:func:`edgevit.check.run.judge`): the export's own parity verdict, then
the budgets. A failure raises :class:`AssertionError` whose message is the one-line reason, e.g.
``mymodel/onnx:nnapi/fp32: onnx:nnapi: 2 partitions > budget 1 (refused: Erf x1)``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgevit.check.project import Budgets, Cell, CoverageBudget
from edgevit.check.run import CellResult, judge


def cells_for(name: str, targets: str | Sequence[str], precision: str | None = None,
              coverage: Mapping[str, Mapping[str, float]] | None = None, max_abs_error: float | None = None,
              max_size_mb: float | None = None, passes: str = "auto") -> list[Cell]:
    """The cells ``assert_exports`` checks: one per target, on the accelerator a ``coverage`` key names for it
    (``"onnx:nnapi"``), else on the target's default pipeline."""
    from edgevit.export.targets import get_target, resolve_precision

    targets = [targets] if isinstance(targets, str) else list(targets)
    by_target: dict[str, tuple[str, CoverageBudget]] = {}
    for key, spec in (coverage or {}).items():
        target, _, acc = key.partition(":")
        if target not in targets or not acc:
            raise ValueError(f"coverage key '{key}': write target:accelerator for one of the targets {targets}")
        unknown = set(spec) - {"max_partitions", "min_nodes_percent"}
        if unknown:
            raise ValueError(f"coverage '{key}': unknown budget(s) {sorted(unknown)} (max_partitions, "
                             "min_nodes_percent)")
        by_target[target] = (get_target(target).accelerator(acc).name,
                             CoverageBudget(spec.get("max_partitions"), spec.get("min_nodes_percent")))
    cells = []
    for target in targets:
        acc, budget = by_target.get(target, (None, None))
        cells.append(Cell(name=name, model=name, target=target, accelerator=acc, passes=passes,
                          precision=resolve_precision(get_target(target), precision),
                          budgets=Budgets(max_abs_error, max_size_mb, budget, None)))
    return cells


def export_cell(model: Any, example_inputs: Any, cell: Cell, out: Path,
                calibration: Iterable[Any] | str | os.PathLike | None = None) -> CellResult:
    """Export ``model`` for ``cell`` in this process and judge it; an export error is the cell's error."""
    from edgevit.api import export_model
    from edgevit.errors import EdgevitError, ParityError

    try:
        result = export_model(model, example_inputs, target=cell.target, out=out, precision=cell.precision,
                              passes=cell.passes, accelerator=cell.accelerator, name=cell.name,
                              calibration=calibration)
    except ParityError as exc:
        result = exc.result
    except EdgevitError as exc:
        return CellResult(cell, "error", [f"export failed: {exc}"])
    return judge(cell, result.manifest | {"artifact_path": str(result.artifact)})


def assert_exports(model: Any, example_inputs: Any = None, targets: str | Sequence[str] = "onnx",
                   precision: str | None = None, coverage: Mapping[str, Mapping[str, float]] | None = None, *,
                   max_abs_error: float | None = None, max_size_mb: float | None = None, passes: str = "auto",
                   name: str | None = None, calibration: Iterable[Any] | str | os.PathLike | None = None,
                   out: str | os.PathLike | None = None) -> list[CellResult]:
    """Export ``model`` (an ``nn.Module``, or a zoo name / reference) to each of ``targets`` and assert that
    parity holds at ``precision``'s bounds and every budget is met; returns the cells' results.

    ``coverage``: ``{"target:accelerator": {"max_partitions": 1, "min_nodes_percent": 100}}``, judged by the
    checkers ``edgevit inspect`` uses (the target is then exported with that accelerator's pipeline).
    ``calibration``: int8's inputs (an iterable of input tensors or tuples, or a folder of images).
    ``out``: keep the artifacts there (default: a temporary folder, removed)."""
    label = name or (model if isinstance(model, str) else type(model).__name__.lower())
    cells = cells_for(label, targets, precision, coverage, max_abs_error, max_size_mb, passes)
    with tempfile.TemporaryDirectory(prefix="edgevit-assert-") as tmp:
        base = Path(out) if out is not None else Path(tmp)
        results = [export_cell(model, example_inputs, cell, base / cell.slug, calibration)
                   for cell in cells]
    failed = [r for r in results if not r.ok]
    if failed:
        raise AssertionError("; ".join(f"{r.cell.id}: {r.reason}" for r in failed))
    return results
