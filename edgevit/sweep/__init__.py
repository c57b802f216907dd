"""``edgevit sweep``: a model x target x precision matrix as independent cells, on a local pool or a Ray
cluster (docs/sweep.md).

- :mod:`.cells`: the cells and one cell's work (cached export + parity, optional latency);
- :mod:`.executors`: the local pool and the Ray executor (device cells on the nodes that advertise them);
- :mod:`.report`: the streamed table, ``sweep.json``, ``sweep.csv`` and ``report.md``.
"""

from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path
from typing import Any

from edgevit.errors import EdgevitError
from edgevit.sweep.cells import CELL_TIMEOUT_S, Plan, SweepCell, plan_cells, run_cell
from edgevit.sweep.executors import Interrupted, OnRow, describe_cluster, run_local, run_ray

__all__ = ["EXECUTORS", "Plan", "check_executor", "SweepCell", "plan_cells", "run_cell", "run_sweep", "describe_cluster",
           "CELL_TIMEOUT_S"]

EXECUTORS = ("local", "ray")
SCHEMA = 1


def run_sweep(plan: Plan, executor: str = "local", jobs: int = 1, address: str | None = None,
              shared: Path | None = None, on_row: OnRow = lambda row: None) -> dict[str, Any]:
    """Run every cell of ``plan``; the result document (rows in the plan's order, ``complete`` False when a
    Ctrl-C stopped scheduling)."""
    check_executor(executor, jobs, address, shared)
    started = time.monotonic()
    interrupted = Interrupted()
    cluster = None
    with interrupted.catching():
        if executor == "local":
            rows = run_local(plan, jobs, on_row, interrupted)
        else:
            rows, cluster = run_ray(plan, address, shared, on_row, interrupted)
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "complete": not interrupted.stopped, "executor": executor, "jobs": jobs, "address": address,
            "cluster": cluster, "machine": {"host": platform.node(), "system": platform.system(),
                                            "python": platform.python_version()},
            "versions": _versions(rows), "seconds": round(time.monotonic() - started, 1),
            "cache": str(plan.cache), "rows": rows}


def check_executor(executor: str, jobs: int, address: str | None, shared: Path | None) -> None:
    """The executor flags' one-line errors, before anything runs."""
    if executor not in EXECUTORS:
        raise EdgevitError(f"unknown --executor '{executor}'; choose one of: {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise EdgevitError(f"--jobs must be >= 1, got {jobs}")
    if executor == "local" and (address or shared):
        raise EdgevitError("--address/--shared-dir apply to --executor ray")
    if shared is not None and not shared.is_dir():
        raise EdgevitError(f"--shared-dir {shared}: not a folder")


def _versions(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The tool versions the cells' exports recorded, plus edgevit's own (also when no cell exported)."""
    from edgevit.check import tool_versions
    from edgevit.devices.worker import package_version

    return {"edgevit": package_version("edgevit")} | tool_versions(rows)
