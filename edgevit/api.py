"""Public export API: ``export_model`` for zoo names and any ``nn.Module``."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import edgevit
from edgevit.devices.runtimes import load_runner
from edgevit.errors import EdgevitError, ParityError
from edgevit.export.capture import flatten_outputs, output_names
from edgevit.export.isolated import check_parent_alive
from edgevit.export.manifest import (
    MANIFEST_NAME,
    OWNER_FILE,
    SCHEMA_VERSION,
    host_info,
    is_no_space,
    make_staging,
    missing_dirs,
    no_space_message,
    place,
    prepare_out_dir,
    remove_empty_dirs,
    sha256_of,
    sweep_stale_staging,
    tree_bytes,
    write_json_atomic,
)
from edgevit.export.parity import ParityReport, compare
from edgevit.export.passes import PipelineResult, resolve_passes, run_pipeline
from edgevit.export.targets import Target, get_target, resolve_precision
from edgevit.references import ResolvedModel, image_batch, is_reference, resolve_model
from edgevit.registry import ModelInfo, check_input_size, check_requested_size, create_model, model_info
from edgevit.weights import INIT_MODES, exercise_all_parameters, exercise_weights

PARITY_SAMPLES = 3
STRICT_PASSES_ENV = "EDGEVIT_STRICT_PASSES"  # "1": strict_passes defaults to True
_log = logging.getLogger("edgevit.export")
_converters_log = logging.getLogger("edgevit.converters")  # what the converters print, captured
_HALF = (torch.float16, torch.bfloat16)


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


@dataclass
class _Subject:
    model: nn.Module
    name: str
    info: ModelInfo | None
    example_inputs: tuple[torch.Tensor, ...]
    seed: int
    weights: Path | None = None
    reference: ResolvedModel | None = None  # a Hugging Face folder or module:factory (edgevit.references)
    verbose: bool = False  # show the converters' output (logged on "edgevit.converters")


def export_model(
    model_or_name: nn.Module | str,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    target: str = "onnx",
    out: str | os.PathLike = "exports",
    precision: str | None = None,
    *,
    verify: bool = True,
    input_size: int | None = None,
    name: str | None = None,
    seed: int = 0,
    latency_runs: int = 0,
    weights: str | os.PathLike | None = None,
    passes: str | Sequence[str] | None = "auto",
    accelerator: str | None = None,
    compare_without_passes: bool = False,
    strict_passes: bool | None = None,
    init: str = "keep",
    verbose: bool = False,
) -> ExportResult:
    """Export a zoo model (by name) or any module to ``target``, check parity, write a manifest.

    The artifact and ``manifest.json`` land in ``out``. ``precision`` defaults to the target's default.
    ``weights`` loads a checkpoint into a zoo model (random weights, seeded by ``seed``, otherwise).
    ``passes`` is ``"auto"`` (the pipeline of ``target`` on ``accelerator``, default: the target's first
    accelerator), ``"none"``, or pass names; the manifest records each pass's sites and numerical change.
    ``compare_without_passes`` also converts the unrewritten program and records its parity (or its
    conversion error) next to the pipeline's, at the cost of a second conversion.
    A pass that raises, breaks the graph or moves the outputs beyond its bound is rolled back (recorded in
    the manifest as ``passes.applied[i].status == "rolled back"``, with a warning); ``strict_passes`` makes
    that an error instead (default: off, unless the environment sets ``EDGEVIT_STRICT_PASSES=1``, as
    edgevit's own test suite does, so that a pass bug fails a test instead of being absorbed).
    ``init="exercise"`` re-initialises a user module's weights (seeded by ``seed``)
    so every layer passes signal (see :func:`edgevit.weights.exercise_weights`); ``"keep"`` (default)
    exports the weights it has; float16/bfloat16 weights or inputs are refused (call ``model.float()``:
    ``precision="fp16"`` makes the half-precision artifact from fp32 weights).
    The converters' own output (progress bars, C++ logs) never reaches the caller's stdout/stderr: it is
    logged on the ``edgevit.converters`` logger at DEBUG, or shown (at INFO) with ``verbose=True``.
    A parity failure still writes both (the manifest says ``failed``) and then raises
    :class:`~edgevit.errors.ParityError`, whose ``result`` attribute holds the :class:`ExportResult`.
    """
    tgt = get_target(target)
    precision = resolve_precision(tgt, precision)
    acc = tgt.accelerator(accelerator).name
    pass_names = resolve_passes(passes, tgt.name, acc)
    tgt.check_installed()
    if strict_passes is None:
        strict_passes = os.environ.get(STRICT_PASSES_ENV) == "1"
    subject = _prepare_subject(model_or_name, example_inputs, input_size, name, seed, weights, init, verbose)
    created = missing_dirs(Path(out))  # removed again if this export fails: no empty folder of ours is left
    out_dir = prepare_out_dir(Path(out))
    try:
        pipeline = run_pipeline(subject.model, subject.example_inputs, pass_names, _parity_inputs(subject),
                                strict=strict_passes)
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
            build = _Build(tgt, subject, names, precision, verify, latency_runs)
            parity, pipeline, rollback = build.with_fallback(pipeline, staging, strict_passes)
            without = _without_passes(tgt, subject, names, precision, staging) if compare_without_passes else None
            files = [out_dir / f.name for f in sorted(staging.iterdir()) if not f.name.startswith(".")]
            check_parent_alive()
            for f in files:
                _set_aside(f, previous)
                place(staging / f.name, f)
                placed.append(f)
            artifact = out_dir / f"{subject.name}{tgt.suffix}"
            manifest = _manifest(tgt, subject, precision, artifact, files, parity, example_out, names)
            manifest["accelerator"] = acc
            manifest["passes"] = _passes_record(passes, pass_names, pipeline, parity, without) | {"rollback": rollback}
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


PREVIOUS_DIR = ".previous"


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


@dataclass
class _Build:
    """Convert + verify one pipeline's graph into a staging directory; fall back to no passes if needed."""

    tgt: Target
    subject: _Subject
    names: list[str]
    precision: str
    verify: bool
    latency_runs: int

    def run(self, pipeline: PipelineResult, where: Path) -> ParityReport:
        staged = where / f"{self.subject.name}{self.tgt.suffix}"
        _convert(self.tgt, pipeline, self.subject.example_inputs, staged, self.precision, self.subject.verbose)
        if not self.verify:
            return ParityReport("skipped", self.precision, detail="--no-verify: parity not checked")
        parity = _verify(self.tgt, staged, self.subject, self.names, self.precision, self.latency_runs,
                         _reference_outputs(pipeline))
        _gate_exact_passes(parity, pipeline, self.names)
        return parity

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


def _prepare_subject(
    model_or_name: nn.Module | str,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None,
    input_size: int | None,
    name: str | None,
    seed: int,
    weights: str | os.PathLike | None = None,
    init: str = "keep",
    verbose: bool = False,
) -> _Subject:
    """What to export, checked: every input ``export_model`` rejects fails here as an EdgevitError."""
    subject = _build_subject(model_or_name, example_inputs, input_size, name, seed, weights, init)
    subject.verbose = verbose
    _check_subject(subject)
    return subject


def _check_subject(subject: _Subject) -> None:
    """Refuse inputs and weights the exporters cannot take, saying what to change."""
    half = [(n, t.dtype) for n, t in [*subject.model.named_parameters(), *subject.model.named_buffers()]
            if t.dtype in _HALF]
    if half:
        more = f" and {len(half) - 1} more" if len(half) > 1 else ""
        raise EdgevitError(f"{subject.name} has {half[0][1]} weights ('{half[0][0]}'{more}): edgevit exports from "
                           "float32 weights; call model.float() before exporting and use precision='fp16' for a "
                           "half-precision artifact")
    for i, t in enumerate(subject.example_inputs):
        if t.numel() == 0:
            raise EdgevitError(f"example input {i} has shape {list(t.shape)}, with no elements: give at least one "
                               "sample (batch size >= 1) and no zero-size dimension")
        if t.dtype in _HALF:
            raise EdgevitError(f"example input {i} is {t.dtype}: edgevit exports float32 models; pass float32 "
                               "inputs (.float()) and use precision='fp16' for a half-precision artifact")


def _build_subject(
    model_or_name: nn.Module | str,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None,
    input_size: int | None,
    name: str | None,
    seed: int,
    weights: str | os.PathLike | None = None,
    init: str = "keep",
) -> _Subject:
    if init not in INIT_MODES:
        raise EdgevitError(f"unknown init '{init}'; choose one of: {', '.join(INIT_MODES)}")
    if isinstance(model_or_name, str) and is_reference(model_or_name):  # zoo names never get here
        return _reference_subject(model_or_name, example_inputs, input_size, name, seed, weights, init)
    if isinstance(model_or_name, str):
        info = model_info(model_or_name)
        size = check_input_size(info, check_requested_size(input_size) or info.input_size)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = create_model(info.name, img_size=size, weights=weights)
            if weights is None:
                exercise_all_parameters(model, seed)
        inputs = example_inputs if example_inputs is not None else _image_batch(info, size, seed)
        subject = _Subject(model.eval(), name or info.name, model_info(info.name, size), _as_tuple(inputs), seed)
        subject.weights = Path(weights) if weights is not None else None
        return subject
    if not isinstance(model_or_name, nn.Module):
        raise EdgevitError(f"expected a model name or a torch.nn.Module, got {type(model_or_name).__name__}")
    if weights is not None:
        raise EdgevitError("weights= applies to zoo models; load your module's weights before exporting it")
    if example_inputs is None:
        raise EdgevitError("example_inputs are required to export a module that is not in the zoo")
    if init == "exercise":  # on a copy: the caller's module keeps its weights
        model_or_name = exercise_weights(copy.deepcopy(model_or_name), seed)
    return _Subject(model_or_name.eval(), name or type(model_or_name).__name__, None, _as_tuple(example_inputs), seed)


def _reference_subject(
    ref: str,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None,
    input_size: int | None,
    name: str | None,
    seed: int,
    weights: str | os.PathLike | None,
    init: str,
) -> _Subject:
    """A Hugging Face folder or ``module:factory`` string, built by :func:`edgevit.references.resolve_model`.

    Given ``example_inputs`` are used as they are and fix the input shape (the CLI passes the seeded
    batch of ``--input-shape``); without them a folder's config gives the shape and a factory fails.
    """
    shape = tuple(_as_tuple(example_inputs)[0].shape) if example_inputs is not None else None
    resolved = resolve_model(ref, shape, weights, None if shape else input_size, seed)
    if init == "exercise":  # freshly built: no copy needed, the manifest says the weights were replaced
        resolved.module, resolved.init = exercise_weights(resolved.module, seed), "exercise"
    inputs = _as_tuple(example_inputs) if example_inputs is not None else resolved.example_inputs
    return _Subject(resolved.module.eval(), name or resolved.name, None, inputs, seed, resolved.weights, resolved)


def _as_tuple(inputs: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of dense (contiguous) tensors.

    A runtime's input is a dense array, whatever the example's strides: a channels-last example would
    only make ``torch.export`` record a non-default dim order, which coremltools rejects ("Core ML does
    not have general support for non-contiguous dim order"). The values are the same.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, (list, tuple)) and inputs:
        inputs = tuple(inputs)
    else:
        raise EdgevitError(f"example_inputs must be a torch.Tensor or a non-empty list/tuple of tensors, got "
                           f"{_describe(inputs)}{_tensor_hint(inputs)}")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise EdgevitError(f"example input {i} is {_describe(t)}, not a torch.Tensor{_tensor_hint(t)}")
    return tuple(t.contiguous() for t in inputs)


def _describe(value: object) -> str:
    if isinstance(value, (list, tuple)) and not value:
        return f"an empty {type(value).__name__}"
    cls = type(value)
    package = cls.__module__.split(".")[0]
    return f"a {cls.__name__}" if package == "builtins" else f"a {package}.{cls.__name__}"


def _tensor_hint(value: object) -> str:
    if isinstance(value, np.ndarray):
        return ": convert it with torch.from_numpy(array)"
    if isinstance(value, dict):
        return ": pass the tensors as a tuple, in the order forward() takes them"
    if isinstance(value, (list, tuple, int, float)) and not (isinstance(value, (list, tuple)) and not value):
        return ": convert it with torch.tensor(...)"
    return ""


def _image_batch(info: ModelInfo, size: int, seed: int) -> torch.Tensor:
    """A seeded image-like batch of one: uniform [0, 1] pixels, normalised as the model expects."""
    return image_batch((1, 3, size, size), info.mean, info.std, seed)


def _parity_inputs(subject: _Subject) -> list[tuple[torch.Tensor, ...]]:
    samples = []
    for k in range(1, PARITY_SAMPLES + 1):
        if subject.info is not None:
            samples.append((_image_batch(subject.info, subject.example_inputs[0].shape[-1], subject.seed + k),))
            continue
        ref = subject.reference
        if ref is not None and ref.mean is not None:  # a folder's images, normalised by its preprocessor
            samples.append((image_batch(subject.example_inputs[0].shape, ref.mean, ref.std, subject.seed + k),))
            continue
        gen = torch.Generator().manual_seed(subject.seed + k)
        samples.append(
            tuple(
                torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.is_floating_point() else t.clone()
                for t in subject.example_inputs
            )
        )
    return samples


def _convert(tgt: Target, pipeline: PipelineResult, inputs: tuple, dst: Path, precision: str,
             verbose: bool = False) -> None:
    source = pipeline.model if tgt.converter_input == "module" else pipeline.program
    try:
        with _converter_output(tgt.converter, verbose):
            tgt.converter_module().convert(source, inputs, dst, precision)
    except EdgevitError:
        raise
    except Exception as exc:  # converters raise anything; keep the first line, hide the traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgevitError(f"{tgt.converter} failed: {type(exc).__name__}: {first[:300]}") from exc


@contextlib.contextmanager
def _converter_output(converter: str, verbose: bool) -> Any:
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


def _passes_record(
    requested: str | Sequence[str] | None,
    names: tuple[str, ...],
    pipeline: PipelineResult,
    parity: ParityReport,
    without: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest's account of the pipeline: what ran, where it rewrote, and what it cost."""
    spec = requested if isinstance(requested, str) or requested is None else ",".join(requested)
    with_passes = parity.worst("max_abs_err")
    approximate = _approximations(pipeline)
    return {
        "requested": spec or "auto",
        "pipeline": list(names),
        "applied": [r.to_dict() for r in pipeline.reports],
        "sites_total": sum(r.sites for r in pipeline.reports),
        "approximations": approximate,  # non-exact passes that rewrote something
        "parity_reference": "rewritten graph (approximate passes applied)" if approximate else "model",
        "parity_cost": {
            "graph_max_abs_change": pipeline.max_abs_change,  # rewritten graph vs the model, in PyTorch
            "artifact_max_abs_with_passes": with_passes,
            "without_passes": without,  # only with compare_without_passes
        },
    }


def _without_passes(
    tgt: Target, subject: _Subject, names: list[str], precision: str, staging: Path
) -> dict[str, Any]:
    """Convert the unrewritten program too and report its parity, or the conversion's error."""
    scratch = staging / ".without-passes"
    scratch.mkdir()
    try:
        unrewritten = PipelineResult(subject.model, subject.example_inputs)  # captured if the converter needs it
        artifact = scratch / f"{subject.name}{tgt.suffix}"
        try:
            _convert(tgt, unrewritten, subject.example_inputs, artifact, precision, subject.verbose)
        except EdgevitError as exc:
            return {"status": "conversion failed", "error": str(exc)}
        report = _verify(tgt, artifact, subject, names, precision, 0)
        return {"status": report.status, "max_abs": report.worst("max_abs_err")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _approximations(pipeline: PipelineResult) -> list[str]:
    return [r.name for r in pipeline.reports if r.sites and not r.exact]


def _reference_outputs(pipeline: PipelineResult) -> list[list[np.ndarray]]:
    """What the artifact's parity is measured against, on the parity inputs (already run once).

    The model's outputs, unless an approximate pass (e.g. ``gelu_tanh`` for NNAPI) rewrote it: then the
    rewritten graph's, so the converter is still held to the fp32/fp16 bound, while the approximation's
    own cost against the model is reported separately in the manifest (``passes.parity_cost``).
    """
    chosen = pipeline.outputs if _approximations(pipeline) else pipeline.references
    return [[t.numpy() for t in sample] for sample in chosen]


def _gate_exact_passes(parity: ParityReport, pipeline: PipelineResult, names: list[str]) -> None:
    """Exact passes may only move the outputs by fp32 rounding: check it like any artifact."""
    if _approximations(pipeline) or not any(r.sites for r in pipeline.reports) or parity.status == "failed":
        return
    as_numpy = [[[t.numpy() for t in sample] for sample in runs] for runs in (pipeline.references, pipeline.outputs)]
    graph = compare(*as_numpy, names, "fp32")
    if graph.status == "failed":
        parity.status = "failed"
        parity.detail = (f"the exact passes changed the model's outputs by {graph.worst('max_abs_err'):.3g}, "
                         "beyond fp32 rounding: a pass is wrong")


def _verify(
    tgt: Target,
    artifact: Path,
    subject: _Subject,
    names: list[str],
    precision: str,
    latency_runs: int,
    refs: list[list[np.ndarray]] | None = None,
) -> ParityReport:
    samples = _parity_inputs(subject)
    if refs is None:  # export_model passes the outputs the pipeline computed on these seeded samples
        with torch.no_grad():
            refs = [[t.numpy() for t in flatten_outputs(subject.model(*s))] for s in samples]
    _check_outputs(refs, names)
    with _converter_output(tgt.runtime, subject.verbose):  # runtimes print too (TFLite: its delegate)
        if tgt.name == "coreml":
            report = _verify_coreml(artifact, subject, samples, refs, names, precision)
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


def _verify_coreml(
    artifact: Path,
    subject: _Subject,
    samples: list[tuple[torch.Tensor, ...]],
    refs: list[list[np.ndarray]],
    names: list[str],
    precision: str,
) -> ParityReport:
    """Structural check, then the reference executor (fp32 + fp16 modes; + Core ML on macOS)."""
    from edgevit.export.backends.coreml.convert import structural_check, verify

    structural = structural_check(artifact, subject.example_inputs, len(names))
    if not structural["ok"]:
        return ParityReport("failed", precision, runtime={"structural_check": structural},
                            detail="; ".join(structural["problems"]))
    return verify(artifact, [[t.numpy() for t in s] for s in samples], refs, names, precision, structural)


def _manifest(
    tgt: Target,
    subject: _Subject,
    precision: str,
    artifact: Path,
    files: list[Path],
    parity: ParityReport,
    example_out: Any,
    names: list[str],
) -> dict[str, Any]:
    info, ref = subject.info, subject.reference
    return {
        "schema": SCHEMA_VERSION,
        "status": parity.status,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": subject.name,
            "source": "zoo" if info else (ref.kind if ref else "user"),
            **({"reference": ref.source} if ref else {}),  # the folder or module:factory it was built from
            "family": info.family if info else None,
            "variant": info.extra if info else None,
            "paper": info.paper if info else None,
            "params": info.params if info else sum(p.numel() for p in subject.model.parameters()),
            "macs": info.macs if info else None,
            "weights": ref.weights_record(subject.seed) if ref
            else {"path": str(subject.weights), "sha256": sha256_of(subject.weights)} if subject.weights
            else (f"random, seed {subject.seed}, every parameter exercised" if info else "user module"),
        },
        "inputs": [
            {"name": f"input_{i}", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for i, t in enumerate(subject.example_inputs)
        ],
        "normalisation": {"mean": info.mean, "std": info.std} if info
        else ({"mean": list(ref.mean), "std": list(ref.std)} if ref and ref.mean else None),
        "outputs": [{"name": n, "shape": list(t.shape)} for n, t in zip(names, flatten_outputs(example_out))],
        "target": tgt.name,
        "precision": precision,
        "converter": tgt.converter,
        "runtime": tgt.runtime,
        "accelerator": None,  # filled in by export_model
        "passes": None,
        "artifact": {
            "file": artifact.name,
            "sha256": sha256_of(artifact),
            "files": {f.name: sha256_of(f) for f in files},
            "bytes": sum(_size(f) for f in files),
        },
        "parity": parity.to_dict(),
        "versions": {"edgevit": edgevit.__version__} | tgt.converter_module().versions() | host_info(),
    }


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
