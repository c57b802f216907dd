"""``edgevit inspect``: how much of a model each accelerator of a target runs, and its renderer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from edgevit.cli import INPUT_SHAPE_HELP, MODEL_HELP, err_console, fail, out_console, parse_shape
from edgevit.cli.export import export_isolated
from edgevit.errors import EdgevitError
from edgevit.export.manifest import prepare_out_dir, to_json
from edgevit.export.options import ExportOptions
from edgevit.export.targets import TARGETS


def _targets_help() -> str:
    *first, last = TARGETS
    return f"{', '.join(first)} or {last}."


def inspect_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    target: str = typer.Option(..., "--target", "-t", help=_targets_help()),
    accelerator: Optional[str] = typer.Option(
        None, "--accelerator", "-a", help="One accelerator of the target [default: every one of them]."
    ),
    passes: str = typer.Option("auto", "--passes", help="'auto' (each accelerator's pipeline), 'none', or names."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size [default: the model's]."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    keep: Optional[Path] = typer.Option(None, "--keep", help="Keep the inspected artifacts in this directory."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 unless every accelerator takes the whole model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """How much of MODEL each accelerator of a target runs, judged by the vendors' own checkers.

    Exports once per distinct pass pipeline (no parity run), then reports per accelerator: partitions,
    nodes (and MACs) on the accelerator, each unsupported op with its count, and the pass that fixes it.
    """
    import tempfile

    from edgevit.export.passes import resolve_passes
    from edgevit.export.targets import get_target

    try:
        opts = ExportOptions(input_size=input_size, verify=False, latency_runs=0, passes=passes,
                             input_shape=parse_shape(input_shape))
        tgt = get_target(target)
        accs = [tgt.accelerator(accelerator).name] if accelerator else [a.name for a in tgt.accelerators]
        name, arg, _ = opts.check(model, tgt.name)
        pipelines = {a: resolve_passes(passes, tgt.name, a) for a in accs}
        if keep is not None:
            prepare_out_dir(keep)
    except EdgevitError as exc:
        fail(str(exc), exc.exit_code)
    with tempfile.TemporaryDirectory(prefix="edgevit-inspect-") as tmp:
        rows = _inspect_rows(arg, tgt.name, pipelines, opts, keep or Path(tmp), quiet=as_json)
    _inspect_report(name, tgt.name, rows, as_json)
    whole = all(r.get("coverage", {}).get("whole") for r in rows)
    raise typer.Exit(2 if any("error" in r for r in rows) else (1 if strict and not whole else 0))


def _inspect_rows(model: str, target: str, pipelines: dict[str, tuple[str, ...]], opts: ExportOptions,
                  base: Path, quiet: bool) -> list[dict[str, Any]]:
    """Export once per distinct pipeline (isolated, like export) and run each accelerator's checker."""
    from edgevit.export.coverage import coverage

    exported: dict[tuple[str, ...], dict[str, Any]] = {}
    rows = []
    for acc, names in pipelines.items():
        if names not in exported:
            out = base / f"{target}-{acc}"
            exported[names] = export_isolated(model, {target: out}, replace(opts, accelerator=acc), quiet=quiet)[0]
        manifest = exported[names]
        row: dict[str, Any] = {"accelerator": acc, "pipeline": list(names),
                               "sites": (manifest.get("passes") or {}).get("sites_total")}
        if manifest["status"] == "error":
            row["error"] = manifest["error"]
        else:
            try:
                row["coverage"] = coverage(Path(manifest["artifact_path"]), target, acc).to_dict()
                range_report = _fp16_range_report(target)
                if range_report is not None:
                    row["fp16_range"] = _fp16_range(model, manifest, range_report)
            except EdgevitError as exc:
                row["error"] = str(exc)
        rows.append(row)
    return rows


def _fp16_range_report(target: str) -> Callable[[Path, list[Any]], dict[str, Any]] | None:
    """The backend's fp16 range report, if it has one: a backend that executes its own programs (a ``mil``
    module with ``load_program(path)`` and ``fp16_range_report(program, inputs)``) reports the ops that
    overflow, underflow or lose precision in fp16. None for the others."""
    from edgevit.export.backends import get_backend

    backend = get_backend(target)
    try:
        mil = backend.module("mil")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").endswith(f".{backend.name}.mil"):
            raise  # the module exists but cannot import what it needs
        return None
    return lambda path, inputs: mil.fp16_range_report(mil.load_program(path), inputs)


def _fp16_range(model: str, manifest: dict[str, Any], range_report: Callable[[Path, list[Any]], dict[str, Any]]
                ) -> dict[str, Any]:
    """The fp16 range report of an artifact on a seeded image (``seed=1``; a reference: its seeded input)."""
    from edgevit.export.subject import zoo_image_batch
    from edgevit.references import example_inputs, is_reference
    from edgevit.registry import model_info

    shape = manifest["inputs"][0]["shape"]
    if is_reference(model):
        x = example_inputs(model, shape, seed=1)[0].numpy()
    else:
        x = zoo_image_batch(model_info(model, shape[-1]), shape[-1], seed=1).numpy()
    return range_report(Path(manifest["artifact_path"]), [x])


def _inspect_report(model: str, target: str, rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        out_console.print_json(to_json({"model": model, "target": target, "accelerators": rows}))
        return
    table = Table(title=f"accelerator coverage: {model} -> {target}")
    for col in ("accelerator", "checker", "partitions", "nodes on it", "MACs on it", "whole", "passes (sites)"):
        table.add_column(col, justify="right" if col in ("partitions", "nodes on it", "MACs on it") else "left")
    for r in rows:
        c = r.get("coverage")
        if c is None:
            table.add_row(r["accelerator"], "-", "-", "-", "-", "[red]error[/]", "-")
            continue
        macs = (f"{100 * c['macs_supported'] / c['macs_total']:.1f}%" if c.get("macs_total") else "-")
        table.add_row(r["accelerator"], c["checker"], str(c["partitions"]),
                      f"{c['supported']}/{c['nodes']} ({c['percent']:.1f}%)", macs,
                      "[green]yes[/]" if c["whole"] else "[yellow]no[/]", f"{len(r['pipeline'])} ({r['sites']})")
    out_console.print(table)
    for r in rows:
        if "error" in r:
            err_console.print(f"[red]{r['accelerator']}:[/] {escape(r['error'])}", highlight=False, soft_wrap=True)
            continue
        c = r["coverage"]
        for op, count in c["unsupported"].items():
            fix = ", ".join(c["fixes"].get(op, [])) or "no pass yet"
            out_console.print(f"{r['accelerator']}: unsupported {op} x{count} -> fix: {fix}", highlight=False)
        for problem in c["problems"]:
            fix = ", ".join(c["fixes"].get(problem, [])) or "no pass yet"
            out_console.print(f"{r['accelerator']}: {problem} -> fix: {fix}", highlight=False)
        for note in c.get("notes", []):
            out_console.print(f"{r['accelerator']}: note: {note}", highlight=False)
        if "fp16_range" in r:
            _print_fp16_range(r["accelerator"], r["fp16_range"])


def _print_fp16_range(accelerator: str, report: dict[str, Any]) -> None:
    rules = report["rules"]
    issues = report["issues"]
    out_console.print(f"{accelerator}: fp16 range (MIL reference executor, seeded input; each op on fp16-rounded "
                      f"inputs): {report['ops_checked']} op outputs checked, {len(issues)} misbehave "
                      f"(overflow to inf, >= {rules['underflow_fraction']:g} of values flushed to 0, or error "
                      f"> {rules['loss_tolerance']:g} of the peak)", highlight=False)
    for issue in issues:
        reasons = ", ".join(issue["reasons"])
        out_console.print(f"  {issue['op_type']} {issue['op']} {issue['shape']}: {reasons} "
                          f"(fp32 peak {issue['fp32_peak']:.3g})", highlight=False)
