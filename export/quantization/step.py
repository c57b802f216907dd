"""The pipeline's quantization step: plan the data, convert at fp32, quantize with the backend's tool,
judge the artifact (SQNR gate on held-out samples, accuracy on labelled data).

:func:`plan` turns the export's options into a :class:`QuantPlan` (data loaded and checked before any
conversion); :func:`build` writes the quantized artifact from a freshly converted fp32 one;
:func:`judge` runs it in its own runtime and returns the parity report, carrying the manifest's
``quantization`` record.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from edgevit.errors import EdgevitError
from edgevit.export.quantization import QuantSpec, check_request, is_quantized
from edgevit.export.quantization.accuracy import accuracy_report
from edgevit.export.quantization.data import (
    CalibrationSet,
    EvaluationSet,
    Preprocessing,
    calibration_set,
    evaluation_set,
    is_npz,
    preprocessing_for,
)
from edgevit.export.quantization.gate import decisive_agreement, required_sqnr_db, sqnr_db

if TYPE_CHECKING:
    from edgevit.export.options import ExportOptions
    from edgevit.export.parity import ParityReport
    from edgevit.export.subject import Subject
    from edgevit.export.targets import Target

DEFAULT_MAX_DROP = 1.0  # top-1 points


@dataclass
class QuantPlan:
    """What the quantization step needs, loaded and checked up front."""

    spec: QuantSpec
    calibration: CalibrationSet | None
    evaluation: EvaluationSet | None
    max_drop: float
    preprocessing: Preprocessing | None

    def record(self) -> dict[str, Any]:
        return {
            **self.spec.to_dict(),
            "calibration": self.calibration.record if self.calibration else None,
            "evaluation": self.evaluation.record if self.evaluation else None,
            "max_drop": self.max_drop if self.evaluation else None,
        }


def plan(tgt: "Target", subject: "Subject", precision: str, options: "ExportOptions", calibration: Any = None,
         evaluation: Any = None) -> QuantPlan | None:
    """The quantization plan of an export (None for fp32/fp16); one-line errors for bad data."""
    calibration = calibration if calibration is not None else options.calibration
    evaluation = evaluation if evaluation is not None else options.evaluation
    if not is_quantized(precision):
        if calibration is not None or evaluation is not None:
            raise EdgevitError(f"--calibration/--eval apply to the quantized precisions (int8, w8, w4), "
                               f"not {precision}")
        return None
    spec = resolved_spec(tgt, QuantSpec(precision, options.quant_scheme, options.calibration_method,
                                        tgt.accelerator(options.accelerator).name))
    check_request(spec, calibration is not None, options.max_drop)
    folder = (isinstance(calibration, (str, Path)) and not is_npz(calibration)) or isinstance(evaluation, (str, Path))
    prep = _preprocessing(subject, options) if folder else None
    calib = calibration_set(calibration, subject.example_inputs, prep) if calibration is not None else None
    evals = (evaluation_set(evaluation, subject.example_inputs, prep, _num_classes(subject))
             if evaluation is not None else None)
    return QuantPlan(spec, calib, evals, options.max_drop, prep)


def _preprocessing(subject: "Subject", options: "ExportOptions") -> Preprocessing:
    """Mean/std: the flags, else the model's metadata (zoo entry, a folder's preprocessor)."""
    info, ref = subject.info, subject.reference
    mean, std, source = None, None, ""
    if info is not None:
        mean, std, source = info.mean, info.std, f"zoo entry {info.name}"
    elif ref is not None and ref.mean is not None:
        mean, std, source = ref.mean, ref.std, f"{ref.source} (preprocessor)"
    if options.mean is not None or options.std is not None:
        if options.mean is None or options.std is None:
            raise EdgevitError("--mean and --std go together")
        mean, std, source = options.mean, options.std, "--mean/--std"
    flag = "--calibration" if options.calibration is not None else "--eval"
    return preprocessing_for(subject.example_inputs, mean, std, options.crop_pct, source, flag)


def _num_classes(subject: "Subject") -> int:
    with torch.no_grad():
        out = subject.model(*subject.example_inputs)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise EdgevitError("--eval needs a model with one output of class scores (batch, classes)")
    return int(out.shape[-1])


# --- build --------------------------------------------------------------------------------------------

def build(tgt: "Target", quant: QuantPlan, convert_fp32: Callable[[Path], None], staged: Path) -> dict[str, Any]:
    """Convert at fp32 into a scratch folder beside ``staged``, quantize into ``staged`` with the backend's tool;
    the tool's facts plus both sizes."""
    scratch = staged.parent / ".fp32-for-quantization"
    scratch.mkdir()
    try:
        fp32 = scratch / staged.name
        convert_fp32(fp32)
        fp32_bytes = _tree_bytes(scratch)
        samples = quant.calibration.samples if quant.calibration else []
        info = quantizer(tgt).quantize(fp32, staged, quant.spec, samples)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    staged_bytes = sum(_tree_bytes(f) for f in staged.parent.iterdir() if not f.name.startswith("."))
    return info | {"fp32_bytes": fp32_bytes, "bytes": staged_bytes, "size_ratio": staged_bytes / fp32_bytes}


def resolved_spec(tgt: "Target", spec: QuantSpec) -> QuantSpec:
    """``method="auto"`` becomes the backend's default; a method its tool lacks is a one-line error."""
    methods = getattr(quantizer(tgt), "METHODS", ("percentile",))
    spec = spec.with_method(methods)
    if spec.calibrated and spec.method not in methods:
        raise EdgevitError(f"{tgt.name} cannot calibrate int8 activations by {spec.method}; "
                           f"--calibration-method takes: {', '.join(methods)}")
    return spec


def quantizer(tgt: "Target") -> Any:
    from edgevit.export.backends import get_backend

    return get_backend(tgt.name).module("quantize")


def _tree_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


# --- judge --------------------------------------------------------------------------------------------

def run_artifact(tgt: "Target", path: Path, samples: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
    """The artifact's outputs on each sample, in its own runtime (the backend's ``run`` hook when a runner
    cannot execute it here: Core ML off macOS runs in the MIL reference executor)."""
    backend = tgt.converter_module()
    if getattr(backend, "run", None) is not None:
        return backend.run(path, samples)
    from edgevit.devices.runtimes import load_runner

    # the runtime gets torch's thread budget: a caller that limits torch (a test worker sharing the machine,
    # a sweep's cell) limits the hundreds of evaluation runs too, instead of every runtime taking every core
    runner = load_runner(tgt.name, path, threads=torch.get_num_threads())
    return [runner.run(list(s)) for s in samples]


def _torch_outputs(model: torch.nn.Module, samples: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
    from edgevit.export.capture import flatten_outputs

    with torch.no_grad():
        return [[t.numpy() for t in flatten_outputs(model(*(torch.from_numpy(a) for a in s)))] for s in samples]


def judge(tgt: "Target", staged: Path, subject: "Subject", names: list[str], quant: QuantPlan,
          info: dict[str, Any], parity_samples: list[list[np.ndarray]]) -> "ParityReport":
    """Gate the artifact by SQNR and decisive agreement against fp32 (held-out calibration samples, else the
    seeded parity inputs), then by the top-1 drop on labelled data; the record goes in ``report.quantization``."""
    from edgevit.export.parity import ParityReport

    structural = getattr(tgt.converter_module(), "structural_check", None)
    if structural is not None:  # e.g. Core ML: the package's spec, I/O shapes and weight files
        found = structural(staged, subject.example_inputs, len(names))
        if not found["ok"]:
            raise EdgevitError(f"the quantized artifact is malformed: {'; '.join(found['problems'])}")
    held = quant.calibration.heldout if quant.calibration and quant.calibration.heldout else parity_samples
    where = "held-out calibration samples" if held is not parity_samples else "the seeded parity inputs"
    refs, outs = _torch_outputs(subject.model, held), run_artifact(tgt, staged, held)
    n_ops = sum(info.get("quantized_ops", {}).values())
    need = required_sqnr_db(quant.spec.precision, n_ops)
    outputs, problems = _gate_outputs(refs, outs, names, need)
    record = {**quant.record(), **info, "gate": {"on": where, "samples": len(held), "required_sqnr_db": need,
                                                 "quantized_ops": n_ops, "outputs": outputs}}
    if quant.evaluation is not None:
        accuracy = _evaluate(tgt, staged, subject, quant.evaluation)
        record["accuracy"] = accuracy
        if accuracy["top1_drop"] > quant.max_drop:
            problems.append(f"top-1 drop {accuracy['top1_drop']:.2f} points > --max-drop {quant.max_drop:g} "
                            f"(fp32 {accuracy['fp32_top1']:.2f}%, {quant.spec.precision} {accuracy['top1']:.2f}%)")
    status = "failed" if problems else "passed"
    verification = f"{'failed' if problems else 'verified'} ({quant.spec.precision}: SQNR >= {need:.1f} dB" + \
        (", accuracy on labelled data" if quant.evaluation is not None else "") + ")"
    return ParityReport(status, quant.spec.precision, len(held), {"min_sqnr_db": need}, None,
                        detail="; ".join(problems), verification=verification, quantization=record)


def _gate_outputs(refs: list[list[np.ndarray]], outs: list[list[np.ndarray]], names: list[str],
                  need: float) -> tuple[list[dict[str, Any]], list[str]]:
    results, problems = [], []
    for i, name in enumerate(names):
        ref, out = np.stack([r[i] for r in refs]), np.stack([o[i] for o in outs])
        if ref.shape != out.shape:
            raise EdgevitError(f"output '{name}': artifact shape {list(out.shape)} != PyTorch {list(ref.shape)}")
        entry = {"name": name, "sqnr_db": sqnr_db(ref, out)}
        if ref.ndim >= 2 and ref.shape[-1] >= 2:
            entry |= decisive_agreement(ref, out)
        results.append(entry)
        if not entry["sqnr_db"] >= need:
            problems.append(f"output '{name}': SQNR {entry['sqnr_db']:.1f} dB < {need:.1f} dB")
        if not entry.get("decisive_ok", True):
            problems.append(f"output '{name}': {entry['decisive_flips']} of {entry['decisive']} decisive top-1 "
                            "decisions flipped")
    return results, problems


def _evaluate(tgt: "Target", staged: Path, subject: "Subject", evals: EvaluationSet) -> dict[str, Any]:
    ref = np.concatenate([o[0] for o in _torch_outputs(subject.model, evals.samples)])
    out = np.concatenate([o[0] for o in run_artifact(tgt, staged, evals.samples)])
    return accuracy_report(ref, out, evals.labels[:len(ref)])
