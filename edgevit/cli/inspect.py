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
    precision: Optional[str] = typer.Option(
        None, "--precision", help="Judge the artifact at this precision: fp32 [default], fp16, or quantized: int8, "
        "w8, w4 (made per accelerator, with its quantized-graph passes)."),
    quant_scheme: Optional[str] = typer.Option(
        None, "--quant-scheme", help="int8: 'safe' [default] or 'full' (every op the tool can: what integer-only "
        "accelerators need)."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="int8: a folder of images or a .npz of inputs [default: 32 seeded inputs; "
        "placement does not depend on the values]."),
    calibration_method: Optional[str] = typer.Option(
        None, "--calibration-method", help="int8: percentile, entropy or minmax [default: the backend's; minmax "
        "with the seeded inputs]."),
    keep: Optional[Path] = typer.Option(None, "--keep", help="Keep the inspected artifacts in this directory."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 unless every accelerator takes the whole model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """How much of MODEL each accelerator of a target runs, judged by the vendors' own checkers.

    Exports once per distinct pass pipeline (no parity run), then reports per accelerator: partitions,
    nodes (and MACs) on the accelerator, each unsupported op with its count, and the pass that fixes it.
    With --precision int8/w8/w4 the checkers judge the quantized artifact each accelerator would get.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgevit-inspect-") as tmp:
        try:
            opts, tgt, accs, name, arg, request = _checked_request(
                model, target, accelerator, passes, input_size, input_shape, precision, quant_scheme, calibration,
                calibration_method, Path(tmp))
            pipelines = {a: _pipeline_key(passes, tgt.name, a, opts.precision) for a in accs}
            if keep is not None:
                prepare_out_dir(keep)
        except EdgevitError as exc:
            fail(str(exc), exc.exit_code)
        if request.get("calibration") == "seeded" and not as_json:
            err_console.print(f"int8: calibrating on {SEEDED_NOTE}", highlight=False)
        rows = _inspect_rows(arg, tgt.name, pipelines, opts, keep or Path(tmp) / "artifacts", quiet=as_json)
    _inspect_report(name, tgt.name, rows, as_json, request)
    whole = all(r.get("coverage", {}).get("whole") for r in rows)
    raise typer.Exit(2 if any("error" in r for r in rows) else (1 if strict and not whole else 0))


SEEDED_NOTE = ("32 seeded inputs (no --calibration given): the values set the scales, never which ops are "
               "quantized or where they run, so the placement is that of any calibration data")


def _checked_request(model: str, target: str, accelerator: str | None, passes: str, input_size: int | None,
                     input_shape: str | None, precision: str | None, quant_scheme: str | None,
                     calibration: Path | None, calibration_method: str | None, tmp: Path
                     ) -> tuple[ExportOptions, Any, list[str], str, str, dict[str, Any]]:
    """The options of the inspection, every argument error raised before any export (int8 without data gets
    a seeded calibration .npz in ``tmp``); also what the report says of the precision."""
    from edgevit.export.quantization import CALIBRATED, QuantSpec, is_quantized
    from edgevit.export.targets import get_target, resolve_precision

    tgt = get_target(target)
    quantized = is_quantized(precision or "fp32")
    _check_int8_flags(precision, quant_scheme, calibration_method, calibration)
    opts = ExportOptions(input_size=input_size, verify=False, latency_runs=0, passes=passes,
                         input_shape=parse_shape(input_shape), precision=precision,
                         quant_scheme=quant_scheme or "safe", calibration_method=calibration_method or "auto",
                         calibration=str(calibration) if calibration is not None else None)
    seeded = precision in CALIBRATED and calibration is None
    # everything but the calibration data first: a bad model or flag fails before the seeded inputs are made
    probe = replace(opts, precision=None, calibration=None)
    name, arg, _ = probe.check(model, tgt.name)
    opts.input_shape, opts.weights = probe.input_shape, probe.weights  # a reference's shape, pinned once
    resolve_precision(tgt, precision)
    if quantized:  # unknown scheme or method, or a method the backend's tool lacks
        from edgevit.export.quantization.step import resolved_spec

        resolved_spec(tgt, QuantSpec(precision, opts.quant_scheme, opts.calibration_method))
    if seeded:
        from edgevit.export.quantization.data import seeded_calibration

        opts.calibration = str(seeded_calibration(arg, input_size, opts.input_shape, tmp / "seeded-calibration.npz"))
        # the values are arbitrary, so are their ranges: minmax, which every backend has and which cannot fail
        # on near-constant tensors as a histogram can
        opts.calibration_method = calibration_method or "minmax"
    opts.check(model, tgt.name, build_reference=False)
    accs = [tgt.accelerator(accelerator).name] if accelerator else [a.name for a in tgt.accelerators]
    request: dict[str, Any] = {"precision": precision or tgt.default_precision}
    if precision in CALIBRATED:
        request |= {"quant_scheme": opts.quant_scheme, "calibration_method": opts.calibration_method,
                    "calibration": "seeded" if seeded else opts.calibration}
    return opts, tgt, accs, name, arg, request


def _check_int8_flags(precision: str | None, quant_scheme: str | None, calibration_method: str | None,
                      calibration: Path | None) -> None:
    """The flags only int8 takes, given with another precision: one-line errors (fp32 with --calibration is
    ExportOptions' own error)."""
    from edgevit.export.quantization import CALIBRATED, is_quantized

    if not is_quantized(precision or "fp32") and (quant_scheme is not None or calibration_method is not None):
        raise EdgevitError(f"--quant-scheme/--calibration-method apply to --precision int8, not {precision or 'fp32'}")
    if is_quantized(precision or "fp32") and precision not in CALIBRATED and (
            quant_scheme or calibration_method or calibration):
        raise EdgevitError(f"--quant-scheme/--calibration/--calibration-method apply to --precision int8, "
                           f"not {precision}")


def _pipeline_key(passes: str, target: str, accelerator: str, precision: str | None) -> tuple[tuple[str, ...], ...]:
    """What decides the artifact an accelerator gets: its pass pipeline, and for a quantized precision its
    quantized-graph passes (export/quantization/passes.py)."""
    from edgevit.export.passes import resolve_passes
    from edgevit.export.quantization.passes import quantized_pipeline

    return resolve_passes(passes, target, accelerator), quantized_pipeline(target, accelerator, precision or "fp32")


def _inspect_rows(model: str, target: str, pipelines: dict[str, tuple[tuple[str, ...], ...]], opts: ExportOptions,
                  base: Path, quiet: bool) -> list[dict[str, Any]]:
    """Export once per distinct pipeline (isolated, like export) and run each accelerator's checker."""
    from edgevit.export.coverage import coverage

    exported: dict[tuple[tuple[str, ...], ...], dict[str, Any]] = {}
    rows = []
    for acc, key in pipelines.items():
        if key not in exported:
            out = base / f"{target}-{acc}"
            exported[key] = export_isolated(model, {target: out}, replace(opts, accelerator=acc), quiet=quiet)[0]
        manifest = exported[key]
        row: dict[str, Any] = {"accelerator": acc, "pipeline": list(key[0]),
                               "sites": (manifest.get("passes") or {}).get("sites_total")}
        if manifest.get("quantization"):
            row["quantization"] = _quantization_row(manifest["quantization"])
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


def _quantization_row(record: dict[str, Any]) -> dict[str, Any]:
    """What inspect reports of a quantized artifact: what stayed float, and the quantized-graph passes."""
    return {"tool": record.get("tool"), "quantized_ops": record.get("quantized_ops", {}),
            "float_ops": record.get("float_ops", {}), "passes": record.get("passes", [])}


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


def _inspect_report(model: str, target: str, rows: list[dict[str, Any]], as_json: bool,
                    request: dict[str, Any] | None = None) -> None:
    request = request or {}
    if as_json:
        out_console.print_json(to_json({"model": model, "target": target, **request, "accelerators": rows}))
        return
    title = f"accelerator coverage: {model} -> {target}"
    if "quant_scheme" in request:
        title += f" ({request['precision']}, {request['quant_scheme']})"
    elif request.get("precision") not in (None, "fp32"):
        title += f" ({request['precision']})"
    table = Table(title=title)
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
                      "[green]yes[/]" if c["whole"] else "[yellow]no[/]", _passes_cell(r))
    out_console.print(table)
    for r in rows:
        if "quantization" in r:
            _print_quantization(r["accelerator"], r["quantization"])
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


def _passes_cell(row: dict[str, Any]) -> str:
    """``graph passes (sites)``, and for a quantized artifact ``+ quantized passes applied (sites)``."""
    cell = f"{len(row['pipeline'])} ({row['sites']})"
    applied = [p for p in (row.get("quantization") or {}).get("passes", []) if p["status"] == "applied"]
    if applied:
        cell += f" + {len(applied)} quantized ({sum(p['sites'] for p in applied)})"
    return cell


def _print_quantization(accelerator: str, q: dict[str, Any]) -> None:
    kept = ", ".join(f"{op} x{n}" for op, n in sorted(q["float_ops"].items())) or "none"
    out_console.print(f"{accelerator}: stayed float: {kept}", highlight=False, soft_wrap=True)
    for p in q["passes"]:
        if p["status"] == "applied":
            out_console.print(f"{accelerator}: quantized pass {p['name']}: {p['sites']} sites", highlight=False)
        elif p["status"] in ("rolled back", "not run"):
            out_console.print(f"{accelerator}: quantized pass {p['name']} {p['status']}: {escape(p['reason'] or '')}",
                              highlight=False, soft_wrap=True)


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
