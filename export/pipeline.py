"""The export pipeline, step by step (:func:`run_export`; the public entry is :func:`edgevit.api.export_model`):

1. **options** resolved against the target: precision, accelerator, pass pipeline, backend installed
   (:class:`~edgevit.export.options.ExportOptions`);
2. **subject**: the model and its example inputs, built and checked (:mod:`edgevit.export.subject`);
3. **capture + passes**: ``torch.export`` and the op-substitution passes, each checked against the model
   on the parity inputs (:func:`edgevit.export.passes.run_pipeline`);
4. **convert** the rewritten graph with the target's backend (``export/backends/<name>/convert.py``), into
   a hidden staging folder beside the destination;
5. **verify**: run the artifact on the parity inputs and compare with PyTorch (:mod:`edgevit.export.parity`);
   a pipeline that fails to convert or breaks parity is rolled back (:meth:`Build.with_fallback`);
6. **place** the files (the previous export's are put back if anything fails) and write the **manifest**
   last (:func:`edgevit.export.manifest.build_manifest`).

Backends are never named here. Verification runs the artifact in its runtime (:func:`load_runner`),
unless the backend's convert module has its own ``verify`` hook (see :func:`verify`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from edgevit.devices.runtimes import load_runner
from edgevit.errors import EdgevitError, ParityError
from edgevit.export.capture import flatten_outputs, output_names
from edgevit.export.isolated import check_parent_alive
from edgevit.export.manifest import (
    MANIFEST_NAME,
    OWNER_FILE,
    approximations,
    build_manifest,
    is_no_space,
    make_staging,
    missing_dirs,
    no_space_message,
    passes_record,
    place,
    prepare_out_dir,
    remove_empty_dirs,
    sweep_stale_staging,
    tree_bytes,
    write_json_atomic,
)
from edgevit.export.options import ExportOptions
from edgevit.export.parity import ParityReport, compare
from edgevit.export.passes import PipelineResult, resolve_passes, run_pipeline
from edgevit.export.quantization import step as quantization
from edgevit.export.subject import Subject, parity_inputs, prepare_subject
from edgevit.export.targets import Target, get_target, resolve_precision

_log = logging.getLogger("edgevit.export")
_converters_log = logging.getLogger("edgevit.converters")  # what the converters print, captured
PREVIOUS_DIR = ".previous"  # in the staging folder: what this export replaces, put back if it fails


@dataclass
class ExportResult:
    """What one export produced: the artifact, its manifest (also on disk) and the parity report."""

    artifact: Path
    manifest_path: Path
    manifest: dict[str, Any]
    parity: ParityReport
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.parity.passed

    @property
    def quantization(self) -> dict[str, Any] | None:
        """Quantized artifacts: the tool, what stayed float, sizes, the gate and the accuracy (else None)."""
        return self.manifest.get("quantization")

    @property
    def accuracy(self) -> dict[str, Any] | None:
        """With evaluation data: fp32 and quantized top-1/top-5, the drop [95% CI], agreement, cosine, SQNR."""
        return (self.quantization or {}).get("accuracy")


def run_export(
    model_or_name: nn.Module | str,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None,
    target: str,
    out: str | os.PathLike,
    options: ExportOptions,
    *,
    name: str | None = None,
    seed: int = 0,
    calibration: Any = None,
    evaluation: Any = None,
) -> ExportResult:
    """Export ``model_or_name`` to ``target`` in ``out`` with ``options``; see :func:`edgevit.api.export_model`.

    ``calibration``/``evaluation``: the API's tensors for a quantized precision (folders come in ``options``).

    Raises :class:`~edgevit.errors.ParityError` (holding the result) after writing a failed manifest.
    """
    tgt = get_target(target)
    precision = resolve_precision(tgt, options.precision)
    acc = tgt.accelerator(options.accelerator).name
    pass_names = resolve_passes(options.passes, tgt.name, acc)
    tgt.check_installed()
    strict = options.strict()
    subject = prepare_subject(model_or_name, example_inputs, options.input_size, name, seed, options.weights,
                              options.init, options.verbose)
    quant = quantization.plan(tgt, subject, precision, options, calibration, evaluation)  # data checked before converting
    created = missing_dirs(Path(out))  # removed again if this export fails: no empty folder of ours is left
    out_dir = prepare_out_dir(Path(out))
    try:
        pipeline = run_pipeline(subject.model, subject.example_inputs, pass_names, parity_inputs(subject),
                                strict=strict)
        with torch.no_grad():
            example_out = subject.model(*subject.example_inputs)
        names = output_names(example_out)

        sweep_stale_staging(out_dir)  # staging folders of exports that were killed
        staging = make_staging(out_dir)
        previous = staging / PREVIOUS_DIR  # what this export replaces, put back if it fails
        placed: list[Path] = []
        try:
            previous.mkdir()
            _set_aside(out_dir / MANIFEST_NAME, previous)  # the old manifest must not vouch for new files
            build = Build(tgt, subject, names, precision, options.verify, options.latency_runs, quant)
            parity, pipeline, rollback = build.with_fallback(pipeline, staging, strict)
            without = (without_passes(tgt, subject, names, precision, staging)
                       if options.compare_without_passes else None)
            files = [out_dir / f.name for f in sorted(staging.iterdir()) if not f.name.startswith(".")]
            check_parent_alive()
            for f in files:
                _set_aside(f, previous)
                place(staging / f.name, f)
                placed.append(f)
            artifact = out_dir / f"{subject.name}{tgt.suffix}"
            record = passes_record(options.passes, pass_names, pipeline, parity, without, rollback)
            manifest = build_manifest(tgt, subject, precision, acc, artifact, files, parity,
                                      flatten_outputs(example_out), names, record)
            manifest_path = out_dir / MANIFEST_NAME
            check_parent_alive()  # an export child whose parent is gone writes no manifest
            write_json_atomic(manifest_path, manifest)
        except BaseException as exc:
            need = tree_bytes(staging) - tree_bytes(previous) + sum(tree_bytes(f) for f in placed)
            _undo_placement(placed, previous, out_dir)
            if is_no_space(exc):
                raise EdgevitError(no_space_message(out_dir, need)) from None
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        remove_empty_dirs(created)
        raise
    result = ExportResult(artifact, manifest_path, manifest, parity, files)
    if parity.status == "failed":
        raise ParityError(f"{subject.name} -> {tgt.name} ({precision}): parity failed; see {manifest_path}", result)
    return result


def _set_aside(path: Path, previous: Path) -> None:
    """Move an existing file or folder of a previous export into ``previous`` (same file system)."""
    if path.exists() or path.is_symlink():
        os.replace(path, previous / path.name)


def _undo_placement(placed: list[Path], previous: Path, out_dir: Path) -> None:
    """A failed or interrupted export: remove what it placed, put back what it replaced."""
    for f in placed:
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)
    if previous.is_dir():
        for f in previous.iterdir():
            try:
                os.replace(f, out_dir / f.name)
            except OSError as exc:
                _log.warning("could not restore %s: %s", out_dir / f.name, exc)


# --- convert + verify -------------------------------------------------------------------------------

@dataclass
class Build:
    """Convert + verify one pipeline's graph into a staging directory; fall back to no passes if needed."""

    tgt: Target
    subject: Subject
    names: list[str]
    precision: str
    verify: bool
    latency_runs: int
    quant: quantization.QuantPlan | None = None

    def run(self, pipeline: PipelineResult, where: Path) -> ParityReport:
        staged = where / f"{self.subject.name}{self.tgt.suffix}"
        if self.quant is not None:
            return self._quantized(pipeline, staged)
        convert(self.tgt, pipeline, self.subject.example_inputs, staged, self.precision, self.subject.verbose)
        if not self.verify:
            return ParityReport("skipped", self.precision, detail="--no-verify: parity not checked")
        parity = verify(self.tgt, staged, self.subject, self.names, self.precision, self.latency_runs,
                        reference_outputs(pipeline))
        gate_exact_passes(parity, pipeline, self.names)
        return parity

    def _quantized(self, pipeline: PipelineResult, staged: Path) -> ParityReport:
        """Convert at fp32, quantize with the backend's tool, judge by SQNR (and accuracy on labelled data)."""
        with converter_output(f"{self.tgt.name} quantizer", self.subject.verbose):  # NNCF & co. print progress
            info = quantization.build(self.tgt, self.quant, lambda fp32: convert(
                self.tgt, pipeline, self.subject.example_inputs, fp32, "fp32", self.subject.verbose), staged)
        if not self.verify:
            return ParityReport("skipped", self.precision, detail="--no-verify: parity not checked",
                                quantization=self.quant.record() | info)
        samples = [[t.numpy() for t in s] for s in parity_inputs(self.subject)]
        with converter_output(self.tgt.runtime, self.subject.verbose):
            return quantization.judge(self.tgt, staged, self.subject, self.names, self.quant, info, samples)

    def with_fallback(self, pipeline: PipelineResult, staging: Path,
                      strict: bool) -> tuple[ParityReport, PipelineResult, dict[str, Any] | None]:
        """Build with the passes; if that fails to convert or fails parity, build without them.

        Passes must never make a model worse: a model that converts with ``--passes none`` converts with
        ``--passes auto``. The artifact without passes is kept when it converts and does not fail parity;
        every pass that rewrote something is then marked rolled back, with the reason. ``strict`` (or a
        pipeline that rewrote nothing) keeps the first outcome.
        """
        try:
            parity, why = self.run(pipeline, staging), None
            if parity.status == "failed":
                why = f"parity failed with the passes: {parity.detail or 'outputs beyond the bound'}"
        except EdgevitError as exc:
            parity, why, error = None, f"the converter failed on the rewritten graph: {exc}", exc
        rewrote = any(r.sites for r in pipeline.reports)
        if why is None or not rewrote or strict:
            if parity is None:
                raise error
            return parity, pipeline, None
        bare = PipelineResult(self.subject.model, self.subject.example_inputs, [], 0.0,
                              pipeline.references, pipeline.references)
        scratch = staging / ".without-passes-fallback"
        scratch.mkdir()
        try:
            fallback = self.run(bare, scratch)
        except EdgevitError:
            if parity is None:
                raise error from None  # fails without passes too: the converter's own limit
            return parity, pipeline, {"tried": "without passes", "reason": why, "outcome": "conversion failed"}
        if parity is not None and fallback.status == "failed":
            return parity, pipeline, {"tried": "without passes", "reason": why, "outcome": "parity failed too"}
        for f in staging.iterdir():
            if f != scratch and f.name not in (OWNER_FILE, PREVIOUS_DIR):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        for f in scratch.iterdir():
            f.rename(staging / f.name)
        _log.warning("%s -> %s: passes rolled back (%s)", self.subject.name, self.tgt.name, why)
        for r in pipeline.reports:
            if r.sites:
                r.roll_back(f"whole pipeline rolled back: {why}")
        pipeline.max_abs_change, pipeline.outputs = 0.0, pipeline.references
        return fallback, pipeline, {"tried": "without passes", "reason": why, "outcome": "used"}


def convert(tgt: Target, pipeline: PipelineResult, inputs: tuple, dst: Path, precision: str,
            verbose: bool = False) -> None:
    """Convert the pipeline's graph (its module or its captured program, as the target takes it) to ``dst``;
    a converter's exception becomes a one-line EdgevitError, its prints are captured (:func:`converter_output`)."""
    source = pipeline.model if tgt.converter_input == "module" else pipeline.program
    try:
        with converter_output(tgt.converter, verbose):
            tgt.converter_module().convert(source, inputs, dst, precision)
    except EdgevitError:
        raise
    except Exception as exc:  # converters raise anything; keep the first line, hide the traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgevitError(f"{tgt.converter} failed: {type(exc).__name__}: {first[:300]}") from exc


@contextlib.contextmanager
def converter_output(converter: str, verbose: bool) -> Any:
    """Capture what a converter prints, at the fd level (they print from C++ too), and log it.

    fds 1 and 2 and ``sys.stdout``/``sys.stderr`` (which may not be fds 1/2: notebooks, pytest) go to one
    temp file (O_APPEND: both writers interleave); on exit the text is logged on ``edgevit.converters`` at
    DEBUG, or at INFO with ``verbose`` (written to stderr when logging would not show INFO).
    """
    fd, path = tempfile.mkstemp(prefix="edgevit-converter-", suffix=".log")
    os.close(fd)
    sink = os.open(path, os.O_WRONLY | os.O_APPEND)
    text = open(os.dup(sink), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 (closed below)
    streams = sys.stdout, sys.stderr
    saved: list[tuple[int, int]] = []
    try:
        for stream in streams:
            with contextlib.suppress(Exception):
                stream.flush()
        for target in (1, 2):
            with contextlib.suppress(OSError):  # a closed fd 1/2 (daemons) has nothing to capture
                saved.append((target, os.dup(target)))
                os.dup2(sink, target)
        sys.stdout = sys.stderr = text
        yield
    finally:
        with contextlib.suppress(Exception):
            text.flush()
        sys.stdout, sys.stderr = streams
        for target, copy_of in saved:
            os.dup2(copy_of, target)
            os.close(copy_of)
        text.close()
        os.close(sink)
        with open(path, encoding="utf-8", errors="replace") as fh:
            printed = fh.read().strip()
        os.unlink(path)
        if printed:
            _log_converter_output(converter, printed, verbose)


def _log_converter_output(converter: str, printed: str, verbose: bool) -> None:
    if not verbose:
        _converters_log.debug("%s printed:\n%s", converter, printed)
    elif _converters_log.isEnabledFor(logging.INFO) and _converters_log.hasHandlers():
        _converters_log.info("%s printed:\n%s", converter, printed)
    else:  # logging not set up to show INFO: verbose=True still shows it
        sys.stderr.write(f"{converter} printed:\n{printed}\n")


def without_passes(tgt: Target, subject: Subject, names: list[str], precision: str, staging: Path) -> dict[str, Any]:
    """Convert the unrewritten program too and report its parity, or the conversion's error."""
    scratch = staging / ".without-passes"
    scratch.mkdir()
    try:
        unrewritten = PipelineResult(subject.model, subject.example_inputs)  # captured if the converter needs it
        artifact = scratch / f"{subject.name}{tgt.suffix}"
        try:
            convert(tgt, unrewritten, subject.example_inputs, artifact, precision, subject.verbose)
        except EdgevitError as exc:
            return {"status": "conversion failed", "error": str(exc)}
        report = verify(tgt, artifact, subject, names, precision, 0)
        return {"status": report.status, "max_abs": report.worst("max_abs_err")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def reference_outputs(pipeline: PipelineResult) -> list[list[np.ndarray]]:
    """What the artifact's parity is measured against, on the parity inputs (already run once).

    The model's outputs, unless an approximate pass (e.g. ``gelu_tanh`` for NNAPI) rewrote it: then the
    rewritten graph's, so the converter is still held to the fp32/fp16 bound, while the approximation's
    own cost against the model is reported separately in the manifest (``passes.parity_cost``).
    """
    chosen = pipeline.outputs if approximations(pipeline) else pipeline.references
    return [[t.numpy() for t in sample] for sample in chosen]


def gate_exact_passes(parity: ParityReport, pipeline: PipelineResult, names: list[str]) -> None:
    """Exact passes may only move the outputs by fp32 rounding: check it like any artifact."""
    if approximations(pipeline) or not any(r.sites for r in pipeline.reports) or parity.status == "failed":
        return
    as_numpy = [[[t.numpy() for t in sample] for sample in runs] for runs in (pipeline.references, pipeline.outputs)]
    graph = compare(*as_numpy, names, "fp32")
    if graph.status == "failed":
        parity.status = "failed"
        parity.detail = (f"the exact passes changed the model's outputs by {graph.worst('max_abs_err'):.3g}, "
                         "beyond fp32 rounding: a pass is wrong")


def verify(
    tgt: Target,
    artifact: Path,
    subject: Subject,
    names: list[str],
    precision: str,
    latency_runs: int,
    refs: list[list[np.ndarray]] | None = None,
) -> ParityReport:
    """Parity of ``artifact`` against PyTorch on the subject's parity inputs (``refs``: the outputs to
    compare with, computed here when not given).

    The artifact runs in its runtime (:func:`edgevit.devices.runtimes.load_runner`), with ``latency_runs``
    timed runs, unless the backend's convert module defines its own check (:func:`_backend_verify`).
    """
    samples = parity_inputs(subject)
    if refs is None:  # run_export passes the outputs the pipeline computed on these seeded samples
        with torch.no_grad():
            refs = [[t.numpy() for t in flatten_outputs(subject.model(*s))] for s in samples]
    _check_outputs(refs, names)
    backend = tgt.converter_module()
    with converter_output(tgt.runtime, subject.verbose):  # runtimes print too (TFLite: its delegate)
        if getattr(backend, "verify", None) is not None:
            report = _backend_verify(backend, artifact, subject, samples, refs, names, precision)
        else:
            runner = load_runner(tgt.name, artifact)
            outs = [runner.run([t.numpy() for t in s]) for s in samples]
            report = compare(refs, outs, names, precision)
            report.runtime = runner.info
            if latency_runs > 0:
                report.median_ms = runner.median_ms([t.numpy() for t in samples[0]], runs=latency_runs)
    if report.status == "degenerate":  # not a failure, not a pass: say so (the CLI exits 1)
        _log.warning("%s -> %s: %s", subject.name, tgt.name, report.detail)
    return report


def _check_outputs(refs: list[list[np.ndarray]], names: list[str]) -> None:
    """Outputs parity (and any exported graph) can take: non-empty, with a shape fixed by the input shape."""
    for i, name in enumerate(names):
        shapes = [list(sample[i].shape) for sample in refs]
        if any(0 in shape for shape in shapes):
            raise EdgevitError(f"output '{name}' is empty (shape {shapes[0]}): every output needs at least one "
                               "element; check the slicing that produces it")
        if any(shape != shapes[0] for shape in shapes):
            other = next(shape for shape in shapes if shape != shapes[0])
            raise EdgevitError(f"output '{name}' has a data-dependent shape ({shapes[0]} on one input, {other} on "
                               "another of the same shape): exported graphs need shapes fixed by the input shape; "
                               "e.g. use torch.where(mask, x, 0) instead of x[mask], or pad to a maximum size")


def _backend_verify(
    backend: Any,
    artifact: Path,
    subject: Subject,
    samples: list[tuple[torch.Tensor, ...]],
    refs: list[list[np.ndarray]],
    names: list[str],
    precision: str,
) -> ParityReport:
    """A backend's own verification, for artifacts no runner executes here (Core ML off macOS: a reference
    executor). The hooks of ``export/backends/<name>/convert.py``:

    - ``structural_check(path, example_inputs, num_outputs) -> dict`` (optional): checks the artifact
      without running it; ``{"ok": bool, "problems": [str], ...}``; not ok fails parity with the problems;
    - ``verify(path, samples, refs, names, precision, structural) -> ParityReport``: the numbers, on the
      numpy ``samples`` against ``refs``; ``structural`` is the structural check's result (or None).
    """
    check = getattr(backend, "structural_check", None)
    structural = check(artifact, subject.example_inputs, len(names)) if check is not None else None
    if structural is not None and not structural["ok"]:
        return ParityReport("failed", precision, runtime={"structural_check": structural},
                            detail="; ".join(structural["problems"]))
    return backend.verify(artifact, [[t.numpy() for t in s] for s in samples], refs, names, precision, structural)
