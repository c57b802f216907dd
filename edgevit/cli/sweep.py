"""``edgevit sweep``: a model x target x precision matrix, on a local pool or a Ray cluster (docs/sweep.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from edgevit.cli import INPUT_SHAPE_HELP, err_console, fail, out_console, parse_shape
from edgevit.errors import EdgevitError


def sweep_cmd(
    models: str = typer.Option(..., "--models", "-m", help="Zoo models, references, comma-separated, or 'all' "
                               "(every zoo model)."),
    targets: str = typer.Option("onnx,coreml,tflite,openvino", "--targets", "-t", help="Targets, comma-separated."),
    precisions: str = typer.Option("fp32", "--precisions", help="Precisions, comma-separated (int8 calibrates on "
                                   "seeded inputs)."),
    accelerators: Optional[str] = typer.Option(None, "--accelerators", "-a", help="Extra cells on these pipelines, "
                                               "e.g. onnx:nnapi,tflite:gpu."),
    bench: Optional[str] = typer.Option(None, "--bench", help="Also time each cell on these devices of its target, "
                                        "e.g. onnx:cpu,openvino:cpu."),
    executor: str = typer.Option("local", "--executor", "-e", help="'local' (a process pool) or 'ray'."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="local: cells at once."),
    address: Optional[str] = typer.Option(None, "--address", help="ray: the cluster to join (host:port, 'auto', "
                                          "ray://...) [default: start a local one]."),
    shared_dir: Optional[Path] = typer.Option(None, "--shared-dir", help="ray: a folder every node sees; the "
                                              "export cache lives there [default: artifacts return to this machine]."),
    timeout: float = typer.Option(1800, "--timeout", help="Seconds one cell's conversion may take."),
    passes: str = typer.Option("auto", "--passes", help="Pass pipeline of every cell: auto, none, or names."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size of zoo models."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    out: Path = typer.Option(Path("sweep"), "--out", "-o", help="Reports (and the export cache: OUT/cache)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Export cache [default: OUT/cache]; shared with "
                                         "'edgevit bench --cache'."),
    as_json: bool = typer.Option(False, "--json", help="Print sweep.json instead of the table."),
) -> None:
    """Export and verify every model x target x precision cell, streaming one line per cell.

    Exit 0 when every cell passed, 1 otherwise (failed, error, timeout, or not run after Ctrl-C), 2 on bad input.
    Ctrl-C stops scheduling new cells, lets the running ones finish, and writes the partial results.
    """
    from edgevit import sweep as sw
    from edgevit.sweep import report

    try:
        sw.check_executor(executor, jobs, address, shared_dir)
        plan = sw.Plan(_cells(models, targets, precisions, accelerators, bench, passes, input_size, input_shape),
                       cache=(cache or out / "cache").resolve(), timeout_s=timeout)
        if timeout <= 0:
            raise EdgevitError(f"--timeout must be > 0, got {timeout:g}")
        if shared_dir is not None:
            plan.cache = shared_dir.resolve() / "cache"
        out.mkdir(parents=True, exist_ok=True)
        done = [0]

        def stream(row: dict) -> None:
            done[0] += 1
            if not as_json:
                err_console.print(escape(report.line(row, done[0], len(plan.cells))), highlight=False, soft_wrap=True)

        if not as_json:
            err_console.print(f"{len(plan.cells)} cells on {executor}" + (f" ({jobs} at once)" if executor == "local"
                                                                          else ""), highlight=False)
        result = sw.run_sweep(plan, executor, jobs, address, shared_dir, stream)
    except EdgevitError as exc:
        fail(str(exc), exc.exit_code)
    paths = report.write_all(result, out)
    if as_json:
        out_console.file.write(paths["json"].read_text())
    else:
        out_console.print(report.table(result))
        out_console.print(report.summary(result), highlight=False)
        out_console.print("written: " + ", ".join(str(p) for p in paths.values()), highlight=False)
    raise typer.Exit(0 if result["complete"] and all(r["status"] == "passed" for r in result["rows"]) else 1)


def _cells(models: str, targets: str, precisions: str, accelerators: Optional[str], bench: Optional[str],
           passes: str, input_size: Optional[int], input_shape: Optional[str]) -> list:
    """The cells of the flags, every name checked (a model's factory is not built until its cell runs)."""
    from edgevit.export.options import ExportOptions
    from edgevit.registry import list_models
    from edgevit.sweep import plan_cells

    names = list_models() if models.strip() == "all" else _split(models, "--models")
    target_names = _split(targets, "--targets")
    shape = parse_shape(input_shape)
    for name in names:  # unknown models, sizes, passes: one line before any cell runs
        for target in target_names:
            ExportOptions(input_size=input_size, input_shape=shape, passes=passes, verify=False).check(
                name, target, build_reference=False)
    return plan_cells(names, target_names, _split(precisions, "--precisions"), _split(accelerators or "", None),
                      _split(bench or "", None), passes, input_size, shape)


def _split(text: str, flag: Optional[str]) -> list[str]:
    items = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if flag and not items:
        raise EdgevitError(f"{flag} needs at least one name")
    return items
