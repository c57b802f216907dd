"""``edgevit check``: conversion-parity gates for a project's CI (docs/ci.md).

- :mod:`.project`: the project file (``edgevit.toml`` or ``[tool.edgevit]``), its cells and budgets;
- :mod:`.run`: each cell exported in its own child process, read back and judged against its budgets;
- :mod:`.baseline`: ``edgevit.lock.json`` and what counts as a regression against it;
- :mod:`.report`: the table, JUnit XML, the markdown summary and ``results.json``.

:func:`check` ties them together for the CLI; :mod:`edgevit.testing` and the pytest plugin reuse the judging.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterable
from typing import Any, Callable

from edgevit.check.baseline import compare, read_lock, write_lock
from edgevit.check.project import Cell, Project, ProjectError, find_project, load_project
from edgevit.check.run import CellResult, check_cells, run_cells

__all__ = ["Cell", "CellResult", "Project", "ProjectError", "check", "find_project", "load_project", "select",
           "extras", "tool_versions"]


def select(project: Project, pattern: str | None) -> list[Cell]:
    """The project's cells whose id contains ``pattern`` (all without one); none matching is a one-line error."""
    cells = [c for c in project.cells if not pattern or pattern in c.id]
    if not cells:
        raise ProjectError(f"no cell of {project.path.name} matches '{pattern}'; cells: "
                           + ", ".join(c.id for c in project.cells))
    return cells


def check(cells: list[Cell], out: Path, jobs: int, baseline: Path | None,
          update_baseline: bool = False, on_result: Callable[[CellResult], None] | None = None) -> list[CellResult]:
    """Run ``cells``; compare with the ``baseline`` lock when it exists (unless updating it), or write it.

    Every cell is checked (models, weights, passes, calibration) before any export starts, and a malformed
    baseline is an error before any export too."""
    lock = read_lock(baseline) if baseline is not None and baseline.exists() else None
    checked = check_cells(cells, out)
    results = run_cells(cells, out, jobs=jobs, checked=checked, on_result=on_result)
    if update_baseline and baseline is not None:
        write_lock(results, baseline, keep=lock)
    elif lock is not None:
        compare(results, lock)
    return results


def tool_versions(records: Iterable[dict[str, Any] | None]) -> dict[str, str]:
    """The tool versions a run's exports recorded (each record's ``versions``; one value per tool, the host's
    platform left out)."""
    merged: dict[str, str] = {}
    for record in records:
        for key, value in ((record or {}).get("versions") or {}).items():
            if key not in ("platform", "machine"):
                merged.setdefault(key, str(value))
    return dict(sorted(merged.items()))


def extras(cells: list[Cell]) -> list[str]:
    """The pip extras ``cells`` need: each target's, and ``hf`` for Hugging Face folders."""
    from edgevit.export.targets import get_target
    from edgevit.references import is_reference

    needed = {get_target(c.target).extra for c in cells}
    if any(is_reference(c.model) and ":" not in c.model for c in cells):
        needed.add("hf")
    return sorted(needed)
