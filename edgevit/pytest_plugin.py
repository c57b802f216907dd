"""edgevit's pytest plugin (registered through the ``pytest11`` entry point ``edgevit``; docs/ci.md).

- fixture ``edgevit_exports``: a session-wide callable with :func:`edgevit.testing.assert_exports`'s
  arguments that exports each cell once per test session (cached by the model's ``name`` and the cell), so
  several tests can assert on the same export;
- ``--edgevit-baseline PATH``: each cell is also compared with that ``edgevit.lock.json`` (a regression fails
  the assertion, with the changed tool versions); ``--edgevit-update-baseline`` writes the file instead at the
  end of the session.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edgevit", "edgevit conversion parity")
    group.addoption("--edgevit-baseline", metavar="PATH", default=None,
                    help="Compare every edgevit_exports cell with this baseline (edgevit.lock.json).")
    group.addoption("--edgevit-update-baseline", action="store_true", default=False,
                    help="Write --edgevit-baseline from this session's cells instead of comparing.")


class Exports:
    """The ``edgevit_exports`` fixture's value: call it like :func:`edgevit.testing.assert_exports`."""

    def __init__(self, work: Path, baseline: Path | None, update: bool) -> None:
        from edgevit.check.baseline import read_lock

        self.work, self.baseline, self.update = work, baseline, update
        self.lock = read_lock(baseline) if baseline is not None and baseline.exists() and not update else None
        self.results: dict[str, Any] = {}  # cell id -> CellResult, in the order first exported

    def __call__(self, model: Any, example_inputs: Any = None, targets: str | Sequence[str] = "onnx",
                 precision: str | None = None, coverage: Mapping[str, Mapping[str, float]] | None = None, *,
                 max_abs_error: float | None = None, max_size_mb: float | None = None, passes: str = "auto",
                 name: str | None = None, calibration: Iterable[Any] | str | os.PathLike | None = None) -> list[Any]:
        from edgevit.check.baseline import compare
        from edgevit.testing import cells_for, export_cell

        label = name or (model if isinstance(model, str) else type(model).__name__.lower())
        results = []
        for cell in cells_for(label, targets, precision, coverage, max_abs_error, max_size_mb, passes):
            if cell.id not in self.results:
                result = export_cell(model, example_inputs, cell, self.work / cell.slug, calibration)
                if self.lock is not None:
                    compare([result], self.lock)
                self.results[cell.id] = result
            results.append(self.results[cell.id])
        failed = [r for r in results if not r.ok]
        if failed:
            raise AssertionError("; ".join(f"{r.cell.id}: {r.reason}" for r in failed))
        return results


@pytest.fixture(scope="session")
def edgevit_exports(request: pytest.FixtureRequest) -> Iterable[Exports]:
    """Export-and-judge once per session per cell (see :class:`Exports`)."""
    option = request.config.getoption("--edgevit-baseline")
    update = request.config.getoption("--edgevit-update-baseline")
    if update and option is None:
        raise pytest.UsageError("--edgevit-update-baseline needs --edgevit-baseline PATH")
    if update and hasattr(request.config, "workerinput"):  # an xdist worker: each would write its own part
        raise pytest.UsageError("--edgevit-update-baseline writes one file from one session: run it with -n 0")
    with tempfile.TemporaryDirectory(prefix="edgevit-pytest-") as tmp:
        exports = Exports(Path(tmp), Path(option) if option else None, update)
        yield exports
        if update and exports.results:
            from edgevit.check.baseline import write_lock

            write_lock(list(exports.results.values()), Path(option))
