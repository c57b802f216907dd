"""Where a sweep's cells run: a local pool (default) or a Ray cluster (docs/sweep.md).

Both run :func:`edgevit.sweep.cells.run_cell` per cell and stream rows back as cells end. Both submit at
most a window of cells at a time (the pool's size, or the cluster's CPUs), so that a Ctrl-C stops
*scheduling*: the cells already running finish (or reach their timeout), the rest are recorded as not run,
and the partial results are written. A second Ctrl-C stops the running conversions too.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgevit.errors import EdgevitError
from edgevit.sweep.cells import Plan, SweepCell, add_latency, run_cell

OnRow = Callable[[dict[str, Any]], None]


class Interrupted:
    """Set by the first Ctrl-C while cells run: no new cell starts; the second one raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.event = threading.Event()

    @contextmanager
    def catching(self) -> Iterator["Interrupted"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def first(signum: int, frame: Any) -> None:
            self.event.set()
            signal.signal(signal.SIGINT, previous)  # the next Ctrl-C: the default, KeyboardInterrupt

        signal.signal(signal.SIGINT, first)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    @property
    def stopped(self) -> bool:
        return self.event.is_set()


def not_run(cell: SweepCell) -> dict[str, Any]:
    return {"cell": cell.id, **cell.to_dict(), "status": "not run", "reason": "interrupted before it started"}


# --- local --------------------------------------------------------------------------------------------------

def run_local(plan: Plan, jobs: int, on_row: OnRow, interrupted: Interrupted) -> list[dict[str, Any]]:
    """Up to ``jobs`` cells at once, each in a thread waiting on its conversion child; the latency of the cells
    that have bench devices after every export, one cell at a time (a measurement beside a running
    conversion would measure the conversion)."""
    from edgevit.export.isolated import terminate_running_children

    rows: dict[str, dict[str, Any]] = {}
    queue = list(plan.cells)
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="edgevit-sweep") as pool:
        running: dict[Future[dict[str, Any]], SweepCell] = {}
        try:
            while queue or running:
                while queue and len(running) < jobs and not interrupted.stopped:
                    cell = queue.pop(0)
                    running[pool.submit(run_cell, cell.to_dict(), str(plan.cache), plan.timeout_s,
                                        plan.bench_runs, False)] = cell
                if not running:
                    break
                done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    cell = running.pop(future)
                    rows[cell.id] = _row_of(future, cell)
                    if not cell.bench:
                        on_row(rows[cell.id])
        except BaseException:  # the second Ctrl-C, SIGTERM: stop the conversions, then leave
            terminate_running_children()
            raise
    for cell in plan.cells:
        if cell.bench and cell.id in rows:
            if not interrupted.stopped:
                rows[cell.id] = add_latency(rows[cell.id], str(plan.cache), plan.bench_runs)
            on_row(rows[cell.id])
    return [rows.get(c.id) or not_run(c) for c in plan.cells]


def _row_of(future: Future[dict[str, Any]], cell: SweepCell) -> dict[str, Any]:
    try:
        return future.result()
    except Exception as exc:  # a bug outside the child: the cell's error, the sweep goes on
        return {"cell": cell.id, **cell.to_dict(), "status": "error", "reason": f"{type(exc).__name__}: {exc}"}


# --- Ray ----------------------------------------------------------------------------------------------------

def run_ray(plan: Plan, address: str | None, shared: Path | None, on_row: OnRow,
            interrupted: Interrupted) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each cell a Ray task (``num_cpus`` = its cost, capped by the largest node; a bench cell also asks for
    its devices' custom resources, so it runs only on a node that advertises them). Without ``shared`` each
    node exports into its own cache and returns the artifact's files, which land in ``plan.cache``'s
    sibling ``artifacts/``. Returns the rows and the cluster (nodes with their resources)."""
    ray = _ray()
    _connect(ray, address, _runtime_env(plan))
    cluster = describe_cluster(ray)
    task = ray.remote(max_retries=0)(_ray_cell)
    biggest = max((n["cpus"] for n in cluster["nodes"]), default=1) or 1
    advertised = {r for n in cluster["nodes"] for r in n["resources"]}
    window = max(1, int(sum(n["cpus"] for n in cluster["nodes"])))
    rows: dict[str, dict[str, Any]] = {}
    queue, running = list(plan.cells), {}
    cache = str(shared / "cache") if shared else None
    try:
        while queue or running:
            while queue and len(running) < window and not interrupted.stopped:
                cell = queue.pop(0)
                # SPREAD: cells are independent and about the same size, so balance them over the nodes. A cell
                # that measures latency takes a whole node (nothing converts beside its measurement), and the
                # devices it is measured on where a node advertises them.
                cost = biggest if cell.bench else min(cell.cost, biggest)
                options: dict[str, Any] = {"num_cpus": cost, "scheduling_strategy": "SPREAD"}
                wanted = {d: 1 for d in cell.bench if d in advertised}
                if wanted:
                    options["resources"] = wanted
                running[task.options(**options).remote(cell.to_dict(), cache, plan.timeout_s, plan.bench_runs)] = cell
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in done:
                cell = running.pop(ref)
                rows[cell.id] = _ray_row(ray, ref, cell, plan.cache.parent / "artifacts")
                on_row(rows[cell.id])
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    return [rows.get(c.id) or not_run(c) for c in plan.cells], cluster


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EdgevitError("--executor ray needs Ray: pip install -c constraints.txt 'edgevit[ray]'") from None
    return ray


#: never shipped with the working directory: environments, caches, version control, exports
SHIP_EXCLUDES = [".git", ".venv", "venv", "__pycache__", ".pytest_cache", "*.onnx", "*.onnx.data", "*.tflite",
                 "*.mlpackage", "*.bin", "*.safetensors", "*.pt", "*.pth", "*.npz"]


def _runtime_env(plan: Plan) -> dict[str, Any] | None:
    """The driver's working directory shipped to every node when a cell's model is ``module:factory`` code
    (found on ``sys.path`` from there, as ``python -m`` would), minus the sweep's own output."""
    if not any(":" in c.model and not os.path.isdir(c.model.split(":")[0]) for c in plan.cells):
        return None
    here = Path.cwd()
    excludes = list(SHIP_EXCLUDES)
    out = plan.cache.parent.resolve()
    if out.is_relative_to(here):
        excludes.append(out.relative_to(here).as_posix())
    return {"working_dir": str(here), "excludes": excludes}


def _connect(ray: Any, address: str | None, runtime_env: dict[str, Any] | None = None) -> None:
    """Join the cluster at ``address`` (``auto``, host:port or ``ray://``), or start a local one."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 configure_logging=False, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a new local cluster"
        raise EdgevitError(f"cannot join the Ray cluster at {where}: {str(exc).splitlines()[0]}") from None


def describe_cluster(ray: Any) -> dict[str, Any]:
    """The live nodes: id, address, CPUs and their custom resources (the devices they advertise)."""
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
                  and not k.startswith("node:") and not k.startswith("accelerator_type")}
        nodes.append({"id": node["NodeID"], "address": node.get("NodeManagerAddress"),
                      "cpus": resources.get("CPU", 0), "resources": custom})
    return {"nodes": nodes}


def _ray_cell(cell_data: dict[str, Any], cache: str | None, timeout_s: float, bench_runs: int) -> dict[str, Any]:
    """The Ray task: the cell on this node; without a shared cache, the artifact's files travel back."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    local = cache or os.path.join(tempfile.gettempdir(), "edgevit-sweep-cache")
    row = run_cell(cell_data, local, timeout_s, bench_runs) | {"node": node}
    artifact = row.get("artifact")
    if cache is None and artifact and os.path.exists(artifact):
        folder = Path(artifact).parent
        row["files"] = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return row


def _ray_row(ray: Any, ref: Any, cell: SweepCell, artifacts: Path) -> dict[str, Any]:
    """A finished task's row, its returned files written under ``artifacts/<cell>`` (whole or not at all)."""
    try:
        row = ray.get(ref)
    except Exception as exc:  # the task died (its node went away, a worker crashed): the cell's error
        return {"cell": cell.id, **cell.to_dict(), "status": "error",
                "reason": f"Ray task failed: {str(exc).splitlines()[0]}"}
    files = row.pop("files", None)
    if files:
        staging = Path(tempfile.mkdtemp(prefix=".artifact-", dir=_mkdir(artifacts)))
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        final = artifacts / cell.slug
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        row["artifact"] = str(final / Path(row["artifact"]).name)
    return row


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
