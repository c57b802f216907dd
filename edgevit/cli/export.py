"""``edgevit export``: options checked once here, one isolated child per target, and the parity table.

The parent builds an :class:`~edgevit.export.options.ExportOptions` from the flags, checks it
(:meth:`~edgevit.export.options.ExportOptions.check`) and hands it to each per-target export child
(:func:`edgevit.export.isolated.export_in_child`), which runs this same command with the hidden
``--in-process`` flag, exports (:func:`edgevit.export.pipeline.run_export`) and prints its manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from edgevit.cli import INPUT_SHAPE_HELP, MODEL_HELP, err_console, fail, out_console, parse_shape
from edgevit.errors import EdgevitError
from edgevit.export.isolated import (
    TARGET_TIMEOUT_S,
    StdoutToStderr,
    export_in_child,
    guard_child,
    take_child_options,
)
from edgevit.export.manifest import missing_dirs, prepare_out_dir, remove_empty_dirs, to_json
from edgevit.export.options import Checked, ExportOptions
from edgevit.export.targets import TARGETS

STATUS_STYLE = {"passed": "green", "failed": "red", "skipped": "yellow", "converted-not-verified": "yellow",
                "degenerate": "yellow"}
STATUS_TEXT = {"converted-not-verified": "converted, not verified"}


def export_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    target: str = typer.Option(..., "--target", "-t", help=f"{', '.join(TARGETS)}, or 'all'."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output directory [default: exports/MODEL/TARGET; with 'all': exports/MODEL]."
    ),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size [default: the model's]."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="fp32, fp16, or quantized: int8 (needs --calibration), w8, w4 [default: the "
        "target's]; 'edgevit targets' shows which target has which."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="int8: a folder of images to calibrate activation ranges (flat or class "
        "sub-folders; >= 32 images advised)."),
    evaluation: Optional[Path] = typer.Option(
        None, "--eval", help="Quantized: a labelled folder (one sub-folder per class): top-1/top-5 of fp32 and "
        "the artifact, the drop with a 95% interval."),
    quant_scheme: str = typer.Option(
        "safe", "--quant-scheme", help="int8: 'safe' (Linear/Conv/MatMul; norms, softmax, GELU, residual "
        "adds stay float; on LiteRT/XNNPACK the ops between the matmuls too when measured harmless) or 'full' "
        "(every op the tool can)."),
    calibration_method: str = typer.Option(
        "auto", "--calibration-method", help="int8: percentile, entropy or minmax activation ranges [default "
        "'auto': the backend's own default, see docs/quantization.md]."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="With --eval: a larger top-1 drop (points) fails the "
                                   "export (exit 1)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Image normalisation mean, e.g. 0.485,0.456,0.406 "
                                       "[default: the model's metadata]."),
    std: Optional[str] = typer.Option(None, "--std", help="Image normalisation std [default: the model's]."),
    crop_pct: Optional[float] = typer.Option(
        None, "--crop-pct", help="Folder images: resize the shorter side to size/crop_pct, centre-crop "
        "[default: 0.875; 1.0 resizes the whole image]."),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="Checkpoint (.safetensors or torch file, read weights-only, loaded strictly) "
        "[default: zoo: random, seed 0; folder: its own weights; factory: its own init]."
    ),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    init: str = typer.Option("keep", "--init", help="'keep' the weights, or 'exercise': re-initialise them so "
                             "every layer passes signal (random-weight parity of third-party models)."),
    strict_passes: bool = typer.Option(
        False, "--strict-passes", help="A pass that fails or breaks parity is an error, not rolled back."
    ),
    passes: str = typer.Option(
        "auto", "--passes", help="'auto' (the target's pipeline), 'none', or pass names, comma-separated."
    ),
    accelerator: Optional[str] = typer.Option(
        None, "--accelerator", "-a", help="Pipeline for this accelerator (see 'edgevit targets') [default: the first]."
    ),
    compare_without_passes: bool = typer.Option(
        False, "--compare-without-passes", help="Also convert without passes and record that parity (2x time)."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity check (the manifest says so)."),
    latency_runs: int = typer.Option(10, "--latency-runs", help="Timed runs for the median latency (0: none)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest(s) as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the converters' own output (on stderr)."),
    in_process: bool = typer.Option(False, "--in-process", hidden=True, help="Run here, not in a child process."),
) -> None:
    """Export MODEL to a target, run it in its runtime and compare with PyTorch.

    Each target converts in its own process with a timeout, so a converter crash or hang costs only
    its row. With --target all, artifacts go to OUT/TARGET.
    """

    if in_process:
        guard_child()  # an export child: dies with its parent, keeps its deadline, cleans up on SIGTERM
    created: list[Path] = []
    try:
        sent = take_child_options() if in_process else None
        if sent is not None:  # an export child of `edgevit export`/`inspect`/`bench`: checked by the parent
            opts, (name, arg, targets) = sent, Checked(model, model, [target])
        else:
            opts = ExportOptions(input_size=input_size, precision=precision, verify=not no_verify,
                                 latency_runs=latency_runs, weights=weights, passes=passes, accelerator=accelerator,
                                 compare_without_passes=compare_without_passes, input_shape=parse_shape(input_shape),
                                 init=init, strict_passes=True if strict_passes else None, verbose=verbose,
                                 calibration=str(calibration) if calibration else None,
                                 evaluation=str(evaluation) if evaluation else None, quant_scheme=quant_scheme,
                                 calibration_method=calibration_method, max_drop=max_drop, crop_pct=crop_pct,
                                 mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"))
            name, arg, targets = opts.check(model, target, build_reference=not in_process)
        base = out or (Path("exports") / name if target == "all" else Path("exports") / name / target)
        created = missing_dirs(base)
        prepare_out_dir(base)
    except EdgevitError as exc:
        remove_empty_dirs(created)
        fail(str(exc), exc.exit_code)
    if in_process:
        try:
            manifest = _export_here(arg, targets[0], base, opts)
        finally:
            remove_empty_dirs(created)  # only if the export left nothing in a folder it created
        out_console.file.write(to_json([manifest]) + "\n")
        raise typer.Exit(exit_code([manifest]))
    outs = {t: base / t if target == "all" else base for t in targets}
    try:
        manifests = export_isolated(arg, outs, opts, quiet=as_json)
    finally:
        remove_empty_dirs(created)
    if target != "all" and manifests[0]["status"] == "error":
        fail(manifests[0]["error"])
    report(manifests, as_json)
    raise typer.Exit(exit_code(manifests))


def parse_floats(text: Optional[str], flag: str) -> Optional[tuple[float, ...]]:
    """``--mean 0.5,0.5,0.5`` as a tuple; a malformed list is a one-line error."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EdgevitError(f"{flag} takes comma-separated numbers, e.g. 0.5,0.5,0.5; got '{text}'") from None


def _export_here(model: str, target: str, out: Path, opts: ExportOptions) -> dict[str, Any]:
    """The child's side: export in this process, converters' prints kept off stdout."""
    from edgevit.errors import ParityError
    from edgevit.export.pipeline import run_export
    from edgevit.references import example_inputs

    try:
        # a reference's shape travels in the options; its seeded batch is what the parent ran
        inputs = example_inputs(model, opts.input_shape) if opts.input_shape else None
        with StdoutToStderr():
            result = run_export(model, inputs, target, out, opts)
    except ParityError as exc:
        result = exc.result
    except EdgevitError as exc:
        fail(str(exc), exc.exit_code)
    return result.manifest | {"artifact_path": str(result.artifact)}


def export_isolated(model: str, outs: dict[str, Path], opts: ExportOptions, quiet: bool) -> list[dict]:
    """Run each target's export in a child process with a timeout; failures become error rows."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    manifests = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, disable=quiet, transient=True) as progress:
        task = progress.add_task(f"exporting {model}", total=len(outs))
        for target, out in outs.items():
            progress.update(task, description=f"exporting {model} -> {target}")
            manifests.append(export_in_child(model, target, out, opts, TARGET_TIMEOUT_S, echo_stderr=opts.verbose))
            progress.advance(task)
    return manifests


def exit_code(manifests: list[dict]) -> int:
    """2 if an export errored, 1 if parity failed or could not judge, else 0."""
    if any(m["status"] == "error" for m in manifests):
        return 2
    return 1 if any(m["status"] in ("failed", "degenerate") for m in manifests) else 0


# --- the parity table --------------------------------------------------------------------------------

def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _worst(outputs: list[dict], key: str, fn: Any) -> Optional[float]:
    """``fn`` (max or min) of a metric over the outputs that have it (top-k exists only for class scores)."""
    values = [o[key] for o in outputs if o.get(key) is not None]
    return fn(values) if values else None


def report(manifests: list[dict], as_json: bool) -> None:
    """The manifests as JSON, or the parity table followed by checks, warnings, paths and failures."""
    if as_json:
        out_console.print_json(to_json(manifests))
        return
    quantized = any(m.get("quantization") for m in manifests)
    table = quantized_table(manifests) if quantized else parity_table(manifests)
    out_console.print(table)
    for m in manifests:
        if (m.get("parity") or {}).get("checks"):
            out_console.print(f"{m['target']} {m['precision']}: {m['parity']['verification']}", highlight=False)
        for check in (m.get("parity") or {}).get("checks") or []:
            gate = "" if check["gating"] else ", reported only"
            out_console.print(f"{m['target']} {m['precision']}: {check['check']}: {check['status']} at the "
                              f"{check['tolerance']} bound{gate} (err/peak {_fmt(check['max_err_over_peak'], '.1e')}, "
                              f"cosine {_fmt(check['cosine'], '.7f')})", highlight=False)
        misbehaving = ((m.get("parity") or {}).get("fp16_range") or {}).get("issues")
        if misbehaving:  # only targets whose verification reports the fp16 range list ops here
            out_console.print(f"{m['target']}: {len(misbehaving)} op(s) misbehave in fp16 (see 'edgevit inspect "
                              f"{m['model'].get('reference', m['model']['name'])} -t {m['target']}'): "
                              + "; ".join(i["op"] for i in misbehaving[:5]), highlight=False)
    for m in manifests:
        q = m.get("quantization")
        if q:
            kept = ", ".join(f"{op} x{n}" for op, n in sorted(q.get("float_ops", {}).items())) or "none"
            out_console.print(f"{m['target']} {m['precision']}: {q['tool']}; weights {q['weights']}, activations "
                              f"{q['activations']}; stayed float: {kept}", highlight=False, soft_wrap=True)
            if q.get("int8_region"):  # which int8 region LiteRT's `safe` scheme kept, and why
                out_console.print(f"{m['target']} {m['precision']}: {escape(q['int8_region']['note'])}",
                                  highlight=False, soft_wrap=True)
            warning = (q.get("calibration") or {}).get("warning")
            if warning:  # logged in the export child, whose stderr is not shown: say it here
                err_console.print(f"[yellow]warning:[/] {m['target']}: {warning}; activation ranges from so few "
                                  "are unreliable", highlight=False, soft_wrap=True)
    for m in manifests:
        for r in rolled_back(m):  # the passes never cost a model its export, but the user must know
            err_console.print(f"[yellow]warning:[/] {m['target']}: pass {r['name']} rolled back: "
                              f"{escape(r['reason'] or '')}", highlight=False, soft_wrap=True)
    for m in manifests:
        if m["status"] == "error":
            err_console.print(f"[red]{m['target']}:[/] {escape(m['error'])}", highlight=False, soft_wrap=True)
        elif m.get("artifact_path"):
            out_console.print(f"{m['target']}: {m['artifact_path']}", highlight=False)
    for m in manifests:
        if m["status"] in ("failed", "degenerate"):
            detail = m["parity"].get("detail") or f"see {m.get('artifact_path', 'the manifest')}"
            verdict = "parity failed" if m["status"] == "failed" else "parity not judged"
            err_console.print(f"[red]{verdict}[/] for {m['target']}: {escape(detail)}", soft_wrap=True)


def parity_table(manifests: list[dict]) -> Table:
    """fp32/fp16: the errors against PyTorch at the precision's rounding bound."""
    table = Table(title=f"parity vs PyTorch: {manifests[0]['model']['name']}")
    columns = ["target", "precision", "status", "max abs err", "err/peak", "cosine", "top-1", "top-5", "median ms",
               "passes (sites)"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("target", "status") else "right")
    for m in manifests:
        if m["status"] == "error":
            table.add_row(m["target"], "-", "[red]error[/]", *["-"] * (len(columns) - 3))
            continue
        p = m["parity"]
        outs = p.get("outputs") or []
        worst = lambda key, fn: _worst(outs, key, fn)  # noqa: E731
        err = worst("max_abs_err", max)
        ratios = [o["max_abs_err"] / o["peak"] for o in outs if o.get("peak") and o.get("max_abs_err") is not None]
        table.add_row(
            m["target"], m["precision"], status_cell(m), _fmt(err, ".2e"), _fmt(max(ratios) if ratios else None, ".1e"),
            _fmt(worst("cosine", min), ".7f"), _fmt(worst("top1_agreement", min), ".2f"),
            _fmt(worst("top5_agreement", min), ".2f"), _fmt(p.get("median_ms"), ".2f"), passes_cell(m),
        )
    return table


def quantized_table(manifests: list[dict]) -> Table:
    """int8/w8/w4: SQNR against fp32 (and the bound), size against fp32, accuracy (docs/quantization.md)."""
    table = Table(title=f"quantized vs fp32: {manifests[0]['model']['name']}")
    columns = ["target", "precision", "status", "SQNR dB (bound)", "size (vs fp32)", "accuracy (top-1 %)",
               "passes (sites)"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("target", "status", "accuracy (top-1 %)") else "right")
    for m in manifests:
        if m["status"] == "error":
            table.add_row(m["target"], "-", "[red]error[/]", *["-"] * (len(columns) - 3))
            continue
        table.add_row(m["target"], m["precision"], status_cell(m, short=True), *quantization_cells(m), passes_cell(m))
    return table


def status_cell(manifest: dict, short: bool = False) -> str:
    status = manifest["status"]
    text = STATUS_TEXT.get(status, status) if short else manifest["parity"].get("verification") or \
        STATUS_TEXT.get(status, status)
    return f"[{STATUS_STYLE.get(status, 'white')}]{text}[/]"


def quantization_cells(manifest: dict) -> list[str]:
    """size (and vs fp32), SQNR against fp32, and the accuracy on labelled data, for a quantized row."""
    size = f"{manifest['artifact']['bytes'] / 1e6:.2f} MB"
    q = manifest.get("quantization")
    gate = q.get("gate") or {}
    sqnr = min((o["sqnr_db"] for o in gate.get("outputs", [])), default=None)
    agreement = min((o["agreement"] for o in gate.get("outputs", []) if "agreement" in o), default=None)
    acc = q.get("accuracy")
    if acc:
        cell = (f"{acc['fp32_top1']:.1f} -> {acc['top1']:.1f} (drop {acc['top1_drop']:+.2f} "
                f"[{acc['top1_drop_ci95'][0]:+.2f}, {acc['top1_drop_ci95'][1]:+.2f}])")
    else:  # no labels: how often the artifact's top-1 is fp32's, on the gate's samples
        cell = "-" if agreement is None else (
            f"top-1 agrees {100 * agreement:.0f}% ({gate.get('samples')} "
            f"{'held-out' if 'held-out' in gate.get('on', '') else 'parity'} samples)")
    bound = gate.get("required_sqnr_db")
    return [f"{_fmt(sqnr, '.1f')} ({_fmt(bound, '.1f')})", f"{size} ({q['size_ratio']:.2f}x)", cell]


def passes_cell(manifest: dict) -> str:
    """The table's "passes (sites)" cell: passes that rewrote / pipeline length (sites), and rollbacks."""
    record = manifest.get("passes") or {}
    applied = [r for r in record.get("applied", []) if r["sites"]]
    cell = f"{len(applied)}/{len(record.get('pipeline', []))} ({record.get('sites_total', 0)})"
    rolled = rolled_back(manifest)
    return f"{cell} [yellow]{len(rolled)} rolled back[/]" if rolled else cell


def rolled_back(manifest: dict) -> list[dict]:
    return [r for r in (manifest.get("passes") or {}).get("applied", []) if r.get("status") == "rolled back"]
