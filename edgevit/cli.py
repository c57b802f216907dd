"""The ``edgevit`` command line (typer + rich).

Errors caused by input (unknown model or target, bad size, unwritable directory, missing backend
package) print one line on stderr and exit with 2; a failed parity check exits with 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import edgevit
from edgevit.errors import EdgevitError
from edgevit.export.isolated import (
    TARGET_TIMEOUT_S,
    Terminated,
    export_in_child,
    guard_child,
    install_sigterm_handler,
)
from edgevit.export.manifest import missing_dirs, prepare_out_dir, remove_empty_dirs, to_json
from edgevit.export.targets import resolve_precision

app = typer.Typer(
    name="edgevit",
    help="Export vision transformers to ONNX, Core ML, TFLite and OpenVINO, and prove each artifact right.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Rich falls back to 80 columns when not on a terminal (CI logs); the parity table needs more.
out_console = Console(width=None if sys.stdout.isatty() else 132)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 132)

STATUS_STYLE = {"passed": "green", "failed": "red", "skipped": "yellow", "converted-not-verified": "yellow",
                "degenerate": "yellow"}
STATUS_TEXT = {"converted-not-verified": "converted, not verified"}


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version_callback(value: bool) -> None:
    if value:
        out_console.print(f"edgevit {edgevit.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
) -> None:
    """edgevit: efficient ViTs from PyTorch to edge runtimes, with conversion parity."""


@app.command("models")
def models_cmd(
    family: Optional[str] = typer.Option(None, help="Only this family (e.g. vit, mobilevit_v2)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the model zoo with parameters and MACs at each model's native input size."""
    from edgevit.registry import list_models, model_info

    infos = [model_info(n) for n in list_models(family)]
    if as_json:
        out_console.print_json(json.dumps([i.to_dict() for i in infos]))
        return
    table = Table(title="edgevit model zoo")
    for col in ("model", "family", "input", "params (M)", "GMACs", "aliases"):
        table.add_column(col, justify="right" if col in ("input", "params (M)", "GMACs") else "left")
    for i in infos:
        table.add_row(i.name, i.family, str(i.input_size), f"{i.params / 1e6:.3f}", f"{i.macs / 1e9:.3f}",
                      ", ".join(i.aliases))
    out_console.print(table)


@app.command("targets")
def targets_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List export targets: suffix, runtime, precisions, passes, install extra."""
    from edgevit.export.targets import TARGETS

    if as_json:
        rows = [asdict(t) | {"pipelines": {a.name: list(t.pipeline(a.name)) for a in t.accelerators}}
                for t in TARGETS.values()]
        out_console.print_json(json.dumps(rows))
        return
    table = Table(title="edgevit targets")
    for col in ("target", "suffix", "converter", "parity runtime", "precisions", "accelerators", "extra"):
        table.add_column(col)
    for t in TARGETS.values():
        precisions = ", ".join(f"{p}*" if p == t.default_precision else p for p in t.precisions)
        accs = ", ".join(f"{a.name}*" if a.name == t.default_accelerator else a.name for a in t.accelerators)
        table.add_row(t.name, t.suffix, t.converter, t.runtime, precisions, accs, t.extra)
    out_console.print(table)
    out_console.print("* default precision / accelerator; pass pipelines: 'edgevit passes --target T'")


@app.command("passes")
def passes_cmd(
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Only the pipeline of this target."),
    accelerator: Optional[str] = typer.Option(None, "--accelerator", "-a", help="Accelerator of --target."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the op-substitution passes, or one target's pipeline (``--passes auto``) in order."""
    from edgevit.export.passes import ORDER, PASSES, default_pipeline, resolve_passes
    from edgevit.export.targets import TARGETS, get_target

    try:
        if accelerator is not None and target is None:
            raise EdgevitError("--accelerator needs --target")
        if target is not None:
            tgt = get_target(target)
            acc = tgt.accelerator(accelerator).name
            names = tgt.pipeline(acc)
        else:
            names = resolve_passes(list(PASSES), "onnx", "cpu")  # every pass, in ORDER
    except EdgevitError as exc:
        _fail(str(exc), exc.exit_code)
    pairs = [(t.name, a.name) for t in TARGETS.values() for a in t.accelerators]
    rows = [
        {"name": n, "order": ORDER.index(n) if n in ORDER else len(ORDER), "kind": PASSES[n].kind,
         "exact": PASSES[n].exact, "summary": PASSES[n].summary(), "fixes": list(PASSES[n].fixes),
         "pipelines": [f"{t}:{a}" for t, a in pairs if n in default_pipeline(t, a)]}
        for n in names
    ]
    if as_json:
        out_console.print_json(json.dumps(rows))
        return
    title = f"pipeline for {target}:{acc}" if target else "edgevit passes"
    table = Table(title=title)
    for col in ("#", "pass", "exact", "what it rewrites", "in pipelines"):
        table.add_column(col, overflow="fold")
    for i, r in enumerate(rows, 1):
        where = "all" if len(r["pipelines"]) == len(pairs) else ", ".join(r["pipelines"]) or "none (on request)"
        table.add_row(str(i), r["name"], "yes" if r["exact"] else "[yellow]approx[/]", r["summary"], where)
    out_console.print(table)


_MODEL_HELP = ("Zoo model name (see 'edgevit models'), a saved Hugging Face folder (config.json + weights), "
               "or package.module:factory (a callable returning an nn.Module; needs --input-shape).")
_INPUT_SHAPE_HELP = "Input shape of a folder or module:factory, e.g. 1,3,224,224 [default: a folder's config]."


def _parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    from edgevit.references import parse_input_shape

    return parse_input_shape(text) if text else None


@dataclass
class _ExportOptions:
    """The export flags a parent forwards to each per-target child process."""

    input_size: Optional[int] = None
    precision: Optional[str] = None
    no_verify: bool = False
    latency_runs: int = 10
    weights: Optional[Path] = None
    passes: str = "auto"
    accelerator: Optional[str] = None
    compare_without_passes: bool = False
    input_shape: Optional[tuple[int, ...]] = None  # references only; the parent fills in the full shape
    init: str = "keep"
    strict_passes: bool = False
    verbose: bool = False

    def to_flags(self) -> list[str]:
        flags = ["--latency-runs", str(self.latency_runs), "--passes", self.passes, "--init", self.init]
        shape = ",".join(map(str, self.input_shape)) if self.input_shape else None
        for flag, value in (("--weights", self.weights), ("--input-size", self.input_size),
                            ("--precision", self.precision), ("--accelerator", self.accelerator),
                            ("--input-shape", shape)):
            if value:
                flags += [flag, str(value)]
        flags += ["--no-verify"] * self.no_verify + ["--compare-without-passes"] * self.compare_without_passes
        return flags + ["--strict-passes"] * self.strict_passes + ["--verbose"] * self.verbose


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    target: str = typer.Option(..., "--target", "-t", help="onnx, coreml, tflite, openvino, or 'all'."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output directory [default: exports/MODEL/TARGET; with 'all': exports/MODEL]."
    ),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size [default: the model's]."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 or fp16 [default: the target's]."),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="Checkpoint (.safetensors or torch file, read weights-only, loaded strictly) "
        "[default: zoo: random, seed 0; folder: its own weights; factory: its own init]."
    ),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=_INPUT_SHAPE_HELP),
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
        opts = _ExportOptions(input_size, precision, no_verify, latency_runs, weights, passes, accelerator,
                              compare_without_passes, _parse_shape(input_shape), init, strict_passes, verbose)
        name, arg, targets = _check_export_args(model, target, opts, resolve=not in_process)
        base = out or (Path("exports") / name if target == "all" else Path("exports") / name / target)
        created = missing_dirs(base)
        prepare_out_dir(base)
    except EdgevitError as exc:
        remove_empty_dirs(created)
        _fail(str(exc), exc.exit_code)
    if in_process:
        try:
            manifest = _export_here(arg, targets[0], base, opts)
        finally:
            remove_empty_dirs(created)  # only if the export left nothing in a folder it created
        out_console.file.write(to_json([manifest]) + "\n")
        raise typer.Exit(_exit_code([manifest]))
    outs = {t: base / t if target == "all" else base for t in targets}
    try:
        manifests = _export_isolated(arg, outs, opts.to_flags(), quiet=as_json)
    finally:
        remove_empty_dirs(created)
    if target != "all" and manifests[0]["status"] == "error":
        _fail(manifests[0]["error"])
    _report(manifests, as_json)
    raise typer.Exit(_exit_code(manifests))


def _check_export_args(model: str, target: str, opts: _ExportOptions,
                       resolve: bool = True) -> tuple[str, str, list[str]]:
    """Every argument error as a one-line EdgevitError, before any child process starts.

    Returns the model's name (for paths and titles), the model argument the export child gets (the
    canonical zoo name, or the reference) and the targets. ``resolve=False`` (in the child) skips building
    a reference: export_model builds it next anyway.
    """
    from edgevit.export.passes import resolve_passes
    from edgevit.export.targets import PRECISIONS, TARGETS, get_target
    from edgevit.references import is_reference
    from edgevit.registry import check_input_memory, check_requested_size
    from edgevit.weights import INIT_MODES

    check_requested_size(opts.input_size)  # 0 is not "the model's size"; a huge size fails here, not in malloc
    if opts.input_shape is not None:
        check_input_memory(opts.input_shape, f"--input-shape {','.join(map(str, opts.input_shape))}")
    reference = is_reference(model)
    info = None if reference else _zoo_info(model, opts)
    if opts.init not in INIT_MODES:
        raise EdgevitError(f"unknown --init '{opts.init}'; choose one of: {', '.join(INIT_MODES)}")
    targets = list(TARGETS) if target == "all" else [get_target(target).name]
    if opts.precision is not None and opts.precision not in PRECISIONS:
        raise EdgevitError(f"unknown precision '{opts.precision}'; choose one of: {', '.join(PRECISIONS)}")
    if opts.accelerator is not None and target == "all":
        raise EdgevitError("--accelerator applies to one target; pick it with --target")
    for t in targets:
        resolve_passes(opts.passes, t, TARGETS[t].accelerator(opts.accelerator).name)
    if opts.weights is not None:
        opts.weights = opts.weights.resolve()  # the child may not share our idea of relative paths
    if info is not None and opts.weights is not None:
        from edgevit.registry import create_model

        create_model(info.name, weights=opts.weights, img_size=opts.input_size or info.input_size)  # fail early
    if target != "all":
        tgt = TARGETS[targets[0]]
        resolve_precision(tgt, opts.precision)
        tgt.check_installed()
    if info is not None:
        return info.name, info.name, targets
    return (*_check_reference(model, opts, resolve), targets)


def _zoo_info(model: str, opts: _ExportOptions) -> Any:
    """The zoo entry of ``model`` (unknown names: the 'did you mean' error), its input size checked."""
    from edgevit.registry import check_input_size, model_info

    info = model_info(model)
    if opts.input_shape is not None:
        raise EdgevitError(f"--input-shape applies to a Hugging Face folder or a module:factory; "
                           f"zoo model '{info.name}' takes --input-size")
    check_input_size(info, opts.input_size or info.input_size)
    return info


def _check_reference(model: str, opts: _ExportOptions, resolve: bool) -> tuple[str, str]:
    """Build a folder or factory once (bad references fail here, in one line), run it on its input,
    and pin the full input shape in ``opts``, so that children rebuild exactly this model."""
    from edgevit.references import check_forward, resolve_model

    if not resolve:
        return model, model
    resolved = resolve_model(model, opts.input_shape, opts.weights, opts.input_size)
    check_forward(resolved)
    opts.input_shape = resolved.input_shape
    return resolved.name, resolved.reference


def _export_here(model: str, target: str, out: Path, opts: _ExportOptions) -> dict[str, Any]:
    """The child's side: export in this process, converters' prints kept off stdout."""
    from edgevit.api import export_model
    from edgevit.errors import ParityError
    from edgevit.references import example_inputs

    try:
        # a reference's shape travels as --input-shape; its seeded batch is what the parent ran
        inputs = example_inputs(model, opts.input_shape) if opts.input_shape else None
        with _StdoutToStderr():
            result = export_model(
                model, inputs, target=target, out=out, precision=opts.precision, verify=not opts.no_verify,
                input_size=opts.input_size, latency_runs=opts.latency_runs, weights=opts.weights,
                passes=opts.passes, accelerator=opts.accelerator,
                compare_without_passes=opts.compare_without_passes, strict_passes=opts.strict_passes or None,
                init=opts.init, verbose=opts.verbose,
            )
    except ParityError as exc:
        result = exc.result
    except EdgevitError as exc:
        _fail(str(exc), exc.exit_code)
    return result.manifest | {"artifact_path": str(result.artifact)}


class _StdoutToStderr:
    """Send everything written to fd 1 (converters print from C++ too) to stderr, so stdout stays JSON."""

    def __enter__(self) -> None:
        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)

    def __exit__(self, *args: object) -> None:
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)


def _export_isolated(model: str, outs: dict[str, Path], flags: list[str], quiet: bool) -> list[dict]:
    """Run each target's export in a child process with a timeout; failures become error rows."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    manifests = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, disable=quiet, transient=True) as progress:
        task = progress.add_task(f"exporting {model}", total=len(outs))
        for target, out in outs.items():
            progress.update(task, description=f"exporting {model} -> {target}")
            manifests.append(export_in_child(model, target, out, flags, TARGET_TIMEOUT_S,
                                             echo_stderr="--verbose" in flags))
            progress.advance(task)
    return manifests


def _exit_code(manifests: list[dict]) -> int:
    if any(m["status"] == "error" for m in manifests):
        return 2
    return 1 if any(m["status"] in ("failed", "degenerate") for m in manifests) else 0


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _worst(outputs: list[dict], key: str, fn: Any) -> Optional[float]:
    """``fn`` (max or min) of a metric over the outputs that have it (top-k exists only for class scores)."""
    values = [o[key] for o in outputs if o.get(key) is not None]
    return fn(values) if values else None


def _report(manifests: list[dict], as_json: bool) -> None:
    if as_json:
        out_console.print_json(to_json(manifests))
        return
    table = Table(title=f"parity vs PyTorch: {manifests[0]['model']['name']}")
    for col in ("target", "precision", "status", "max abs err", "err/peak", "cosine", "top-1", "top-5",
                "median ms", "passes (sites)"):
        table.add_column(col, justify="left" if col in ("target", "status") else "right")
    for m in manifests:
        if m["status"] == "error":
            table.add_row(m["target"], "-", "[red]error[/]", *["-"] * 7)
            continue
        p = m["parity"]
        outs = p.get("outputs") or []
        worst = lambda key, fn: _worst(outs, key, fn)  # noqa: E731
        err = worst("max_abs_err", max)
        ratios = [o["max_abs_err"] / o["peak"] for o in outs if o.get("peak") and o.get("max_abs_err") is not None]
        status = m["status"]
        text = p.get("verification") or STATUS_TEXT.get(status, status)
        table.add_row(
            m["target"], m["precision"], f"[{STATUS_STYLE.get(status, 'white')}]{text}[/]",
            _fmt(err, ".2e"), _fmt(max(ratios) if ratios else None, ".1e"),
            _fmt(worst("cosine", min), ".7f"), _fmt(worst("top1_agreement", min), ".2f"),
            _fmt(worst("top5_agreement", min), ".2f"), _fmt(p.get("median_ms"), ".2f"), _passes_cell(m),
        )
    out_console.print(table)
    for m in manifests:
        if (m.get("parity") or {}).get("checks"):
            out_console.print(f"{m['target']} {m['precision']}: {m['parity']['verification']}", highlight=False)
        for check in (m.get("parity") or {}).get("checks") or []:
            gate = "" if check["gating"] else ", reported only"
            out_console.print(f"{m['target']} {m['precision']}: {check['check']}: {check['status']} at the "
                              f"{check['tolerance']} bound{gate} (err/peak {_fmt(check['max_err_over_peak'], '.1e')}, "
                              f"cosine {_fmt(check['cosine'], '.7f')})", highlight=False)
        issues = ((m.get("parity") or {}).get("fp16_range") or {}).get("issues")
        if issues:
            out_console.print(f"{m['target']}: {len(issues)} op(s) misbehave in fp16 (see 'edgevit inspect "
                              f"{m['model'].get('reference', m['model']['name'])} -t coreml'): " + "; ".join(i["op"] for i in issues[:5]),
                              highlight=False)
    for m in manifests:
        for r in _rolled_back(m):  # the passes never cost a model its export, but the user must know
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


@app.command("inspect")
def inspect_cmd(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    target: str = typer.Option(..., "--target", "-t", help="onnx, coreml, tflite or openvino."),
    accelerator: Optional[str] = typer.Option(
        None, "--accelerator", "-a", help="One accelerator of the target [default: every one of them]."
    ),
    passes: str = typer.Option("auto", "--passes", help="'auto' (each accelerator's pipeline), 'none', or names."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size [default: the model's]."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=_INPUT_SHAPE_HELP),
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
        opts = _ExportOptions(input_size=input_size, no_verify=True, latency_runs=0, passes=passes,
                              input_shape=_parse_shape(input_shape))
        tgt = get_target(target)
        accs = [tgt.accelerator(accelerator).name] if accelerator else [a.name for a in tgt.accelerators]
        name, arg, _ = _check_export_args(model, tgt.name, opts)
        pipelines = {a: resolve_passes(passes, tgt.name, a) for a in accs}
        if keep is not None:
            prepare_out_dir(keep)
    except EdgevitError as exc:
        _fail(str(exc), exc.exit_code)
    with tempfile.TemporaryDirectory(prefix="edgevit-inspect-") as tmp:
        rows = _inspect_rows(arg, tgt.name, pipelines, opts, keep or Path(tmp), quiet=as_json)
    _inspect_report(name, tgt.name, rows, as_json)
    whole = all(r.get("coverage", {}).get("whole") for r in rows)
    raise typer.Exit(2 if any("error" in r for r in rows) else (1 if strict and not whole else 0))


def _inspect_rows(model: str, target: str, pipelines: dict[str, tuple[str, ...]], opts: _ExportOptions,
                  base: Path, quiet: bool) -> list[dict[str, Any]]:
    """Export once per distinct pipeline (isolated, like export) and run each accelerator's checker."""
    from edgevit.devices.coverage import coverage

    exported: dict[tuple[str, ...], dict[str, Any]] = {}
    rows = []
    for acc, names in pipelines.items():
        if names not in exported:
            flags = replace(opts, accelerator=acc).to_flags()
            out = base / f"{target}-{acc}"
            exported[names] = _export_isolated(model, {target: out}, flags, quiet=quiet)[0]
        manifest = exported[names]
        row: dict[str, Any] = {"accelerator": acc, "pipeline": list(names),
                               "sites": (manifest.get("passes") or {}).get("sites_total")}
        if manifest["status"] == "error":
            row["error"] = manifest["error"]
        else:
            try:
                row["coverage"] = coverage(Path(manifest["artifact_path"]), target, acc).to_dict()
                if target == "coreml":
                    row["fp16_range"] = _fp16_range(model, manifest)
            except EdgevitError as exc:
                row["error"] = str(exc)
        rows.append(row)
    return rows


def _fp16_range(model: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The fp16 range report of a Core ML artifact on a seeded image (the MIL reference executor)."""
    from edgevit.api import _image_batch
    from edgevit.devices.mil import fp16_range_report, load_program
    from edgevit.references import example_inputs, is_reference
    from edgevit.registry import model_info

    shape = manifest["inputs"][0]["shape"]
    if is_reference(model):
        x = example_inputs(model, shape, seed=1)[0].numpy()
    else:
        x = _image_batch(model_info(model, shape[-1]), shape[-1], seed=1).numpy()
    return fp16_range_report(load_program(Path(manifest["artifact_path"])), [x])


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


REMOTE_HELP = ("Measure on another machine: ssh:[user@]host, ssh://[user@]host[:port], adb:SERIAL or a name "
               "from the devices file; comma-separated for several.")


@app.command("devices")
def devices_cmd(
    remote: Optional[str] = typer.Option(None, "--remote", "-r", help=REMOTE_HELP),
    every: bool = typer.Option(False, "--all", help="This machine and every device named in the devices file."),
    remote_python: Optional[str] = typer.Option(None, "--remote-python", help="Python on the remote [default: python3, or the devices file's]."),
    devices_file: Optional[Path] = typer.Option(None, "--devices-file", help="Devices file [default: edgevit-devices.toml or pyproject.toml here]."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The devices table: every runtime edgevit can measure on, and whether it is available (and why not),
    here or on remote machines (probed over ssh or adb)."""
    from edgevit.devices.inventory import resolve_remotes
    from edgevit.devices.remote import RemoteError, RemoteHost
    from edgevit.devices.table import device_rows, local_facts

    try:
        specs = resolve_remotes(remote, devices_file, remote_python, every_named=every)
    except EdgevitError as exc:
        _fail(str(exc), exc.exit_code)
    machines: list[dict[str, Any]] = []
    if remote is None or every:
        machines.append({"name": "local", "address": "local", "status": "ok", "reason": "", "facts": local_facts()})
    for spec in specs:
        with RemoteHost(spec) as host:
            try:
                machines.append({"name": spec.name, "address": spec.address, "status": "ok", "reason": "",
                                 "facts": host.open()})
            except RemoteError as exc:
                machines.append({"name": spec.name, "address": spec.address, "status": exc.kind, "reason": str(exc),
                                 "facts": None})
    rows = [r for m in machines if m["facts"] for r in device_rows(m["facts"], m["name"])]
    if as_json:
        out_console.file.write(to_json({"machines": machines, "devices": rows}) + "\n")
    else:
        _print_devices(machines, rows)
    failed = [m for m in machines if m["status"] != "ok"]
    for m in failed:
        err_console.print(f"error: {m['reason']}", highlight=False, markup=False)
    raise typer.Exit(1 if failed else 0)


def _print_devices(machines: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    from edgevit.devices.table import machine_summary

    for m in machines:
        if not m["facts"]:
            continue
        where = ("this machine" if m["address"] == "local"
                 else m["name"] if m["name"] == m["address"] else f"{m['name']} ({m['address']})")
        table = Table(title=f"devices on {where} ('edgevit bench --device cpu' measures the available ones marked cpu)",
                      caption=escape(machine_summary(m["facts"])), caption_justify="left")
        for col in ("device", "runtime", "precisions", "cpu", "available"):
            table.add_column(col)
        for r in (r for r in rows if r["host"] == m["name"]):
            here = "[green]yes[/]" if r["available"] else f"[yellow]no[/]: {escape(r['reason'])}"
            table.add_row(r["device"], r["description"], ", ".join(r["precisions"]), "cpu" if r["in_cpu_set"] else "", here)
        out_console.print(table)


@app.command("bench")
def bench_cmd(
    device: str = typer.Option("cpu", "--device", "-d", help="'cpu' (every CPU runtime here) or device names, comma-separated."),
    models: Optional[str] = typer.Option(None, "--models", "-m", help="Zoo models, Hugging Face folders or module:factory references, comma-separated [default: deit_tiny,mobilevit_v2_050]."),
    targets: Optional[str] = typer.Option(None, "--targets", "-t", help="Keep these targets' runtimes (eager stays)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 (each runtime's way of running it)."),
    runs: int = typer.Option(40, "--runs", help="Timed inferences per configuration."),
    rounds: int = typer.Option(10, "--rounds", help="Interleaved rounds the runs are split into (>= 6 for a noise verdict from the spread)."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed inferences after the first one."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Seconds of timed runs per configuration (stops early)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads per runtime [default: all cores]."),
    passes: str = typer.Option("auto", "--passes", help="Export pass pipeline: auto, none, or names."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size [default: each model's]."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Input shape of the folders and module:factory references in --models, e.g. 1,3,224,224."),
    profile: bool = typer.Option(False, "--profile", help="Also collect each runtime's per-op profile (top ops)."),
    no_roofline: bool = typer.Option(False, "--no-roofline", help="Skip the GEMM throughput measurement."),
    out: Path = typer.Option(Path("bench"), "--out", "-o", help="Report directory (exports cached in OUT/cache)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Export cache directory [default: OUT/cache]."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the JSON result here ('-': stdout only)."),
    timeout: float = typer.Option(300, "--timeout", help="Seconds a runtime may take to load or to run one block."),
    remote: Optional[str] = typer.Option(None, "--remote", "-r", help=REMOTE_HELP),
    remote_python: Optional[str] = typer.Option(None, "--remote-python", help="Python on the remote [default: python3, or the devices file's]."),
    devices_file: Optional[Path] = typer.Option(None, "--devices-file", help="Devices file [default: edgevit-devices.toml or pyproject.toml here]."),
) -> None:
    """Measure inference latency of models (zoo or references) on every runtime of a device, against PyTorch eager.

    Exports are cached by content hash, so re-runs only measure. With --remote, exports are made here and
    measured there (ssh or adb), with the same protocol. Writes OUT/bench.json, bench.csv,
    latency_vs_macs.png and report.md, and prints the table.
    """
    from edgevit.devices.bench import DEFAULT_MODELS, BenchOptions, check_file_path, check_options, run_bench
    from edgevit.devices.report import gemm_lines, machine_lines, table_header, table_rows, write_all
    from edgevit.references import split_model_list

    model_list = list(DEFAULT_MODELS) if models is None else split_model_list(models)
    if not model_list:
        _fail(f"--models '{models}' names no model; give model names, comma-separated, or leave it out")
    opts = BenchOptions(models=model_list, device=device,
                        targets=_split(targets), precision=precision, runs=runs, rounds=rounds, warmup=warmup,
                        threads=threads, passes=passes, input_size=input_size, out=out, cache=cache, profile=profile,
                        roofline=not no_roofline, budget_s=budget, run_timeout_s=timeout)
    to_stdout = json_path is not None and str(json_path) == "-"
    try:
        from edgevit.devices.inventory import resolve_remotes

        if remote is not None:
            opts.remotes = resolve_remotes(remote, devices_file, remote_python)
        elif remote_python is not None:
            raise EdgevitError("--remote-python needs --remote")
        opts.input_shape = _parse_shape(input_shape)
        if json_path is not None and not to_stdout:
            check_file_path("--json", json_path)
        devices = check_options(opts)
        prepare_out_dir(out)
        prepare_out_dir(opts.cache_dir)
    except EdgevitError as exc:
        _fail(str(exc), exc.exit_code)
    result = _bench_with_progress(opts, devices, quiet=to_stdout, run=run_bench)
    paths = write_all(result, out, None if to_stdout else json_path)
    if to_stdout:
        out_console.file.write(to_json(result, default=str) + "\n")
    else:
        for line in machine_lines(result) + gemm_lines(result):
            out_console.print(line, highlight=False)
        where = ", ".join(r.name for r in opts.remotes) if opts.remotes else "this machine"
        table = Table(title=f"edgevit bench on {where}: {device} ({opts.precision}, batch 1)")
        for col in table_header(result):
            table.add_column(col, justify="right" if col not in ("host", "model", "runtime", "status") else "left")
        for row in table_rows(result):
            table.add_row(*(escape(c) for c in row))
        out_console.print(table)
        written = ", ".join(str(p) for p in paths.values() if p is not None)
        out_console.print(f"written: {written}", highlight=False)
        if paths["png"] is None:
            err_console.print("no plot: matplotlib is not installed (pip install -c constraints.txt -e \".[bench]\")")
    # a runtime missing on a remote is listed for information; only what was asked for and failed counts
    failed = [r for r in result["rows"] if r.get("status") != "ok" and r.get("requested", True)]
    raise typer.Exit(1 if failed else 0)


def _split(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _bench_with_progress(opts: Any, devices: list, quiet: bool, run: Any) -> dict[str, Any]:
    """``run(opts, note)`` under a rich progress bar: exports, then per configuration load + rounds."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    gemm_steps = (1 + min(opts.rounds, 4)) * (1 + (opts.precision != "fp32")) if opts.roofline else 0
    per_host = len(devices) or 4  # a remote's devices are known once it is probed: guess the CPU set
    hosts = max(1, len(opts.remotes))
    total = hosts * (gemm_steps + len(opts.models) * per_host * (opts.rounds + 1))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=err_console, disable=quiet, transient=True) as progress:
        task = progress.add_task("bench", total=total)

        def note(message: str, done: float) -> None:
            progress.update(task, description=message[:60], advance=done)

        return run(opts, note)


def _passes_cell(manifest: dict) -> str:
    record = manifest.get("passes") or {}
    applied = [r for r in record.get("applied", []) if r["sites"]]
    cell = f"{len(applied)}/{len(record.get('pipeline', []))} ({record.get('sites_total', 0)})"
    rolled = _rolled_back(manifest)
    return f"{cell} [yellow]{len(rolled)} rolled back[/]" if rolled else cell


def _rolled_back(manifest: dict) -> list[dict]:
    return [r for r in (manifest.get("passes") or {}).get("applied", []) if r.get("status") == "rolled back"]


def _quiet_third_party() -> None:
    """Keep converters' chatter (C++ logs, tqdm bars, deprecation warnings) out of the user's terminal."""
    # transformers (Hugging Face folders) logs weight-loading notes and bars, and never goes online here
    for var, value in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("GLOG_minloglevel", "2"), ("TQDM_DISABLE", "1"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("HF_HUB_OFFLINE", "1"),
                       # `import torch` resets the torch logger to WARNING: only its env var keeps it at ERROR
                       # (torchao, imported by transformers, logs pytree deprecations through it)
                       ("TORCH_LOGS", "-all")):
        os.environ.setdefault(var, value)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for logger in ("torch", "torchao", "transformers"):  # torchao: optional kernels it cannot load, at import
        logging.getLogger(logger).setLevel(logging.ERROR)


def main() -> None:
    """Run the CLI; usage errors (unknown option, missing or bad argument) are one line on stderr, exit 2."""
    try:  # typer >= 0.2x vendors its own click (and its own Abort); older ones use click itself
        from typer import Abort
        from typer._click import exceptions as click_exceptions
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exceptions
        from click.exceptions import Abort

    _quiet_third_party()
    install_sigterm_handler()  # SIGTERM unwinds like Ctrl-C: children stopped, staging folders removed
    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:  # bare 'edgevit': typer printed the help, as before
        code = exc.exit_code
    except click_exceptions.ClickException as exc:
        where = getattr(getattr(exc, "ctx", None), "command_path", None)
        hint = f" (see '{where} --help')" if isinstance(exc, click_exceptions.UsageError) and where else ""
        message = " ".join(exc.format_message().split())
        sys.stderr.write(f"error: {message}{hint}\n")
        code = 2 if isinstance(exc, click_exceptions.UsageError) else exc.exit_code
    except Abort:  # Ctrl-C at a prompt, or end of input: reported below
        code = 130
    except Terminated as exc:  # SIGTERM: children stopped and staging folders removed on the way here
        sys.stderr.write("error: terminated\n")
        code = exc.code
    if code == 130:  # typer's answer to Ctrl-C (no command exits with 130 itself)
        sys.stderr.write("error: interrupted\n")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
