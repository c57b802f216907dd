"""Public export API: ``export_model`` for zoo names and any ``nn.Module``.

The steps (subject, capture and passes, convert, verify, manifest) are in :mod:`edgevit.export.pipeline`;
building the model and its example inputs is :func:`edgevit.export.subject.prepare_subject`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from edgevit.export.options import STRICT_PASSES_ENV, ExportOptions
from edgevit.export.pipeline import ExportResult, run_export
from edgevit.export.subject import PARITY_SAMPLES
from edgevit.export.targets import TARGETS

__all__ = ["export_model", "ExportResult", "ExportOptions", "DEFAULT_TARGET", "PARITY_SAMPLES", "STRICT_PASSES_ENV"]

DEFAULT_TARGET = next(iter(TARGETS))  # the first row of the targets table


def export_model(
    model_or_name: nn.Module | str,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    target: str = DEFAULT_TARGET,
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
    calibration: str | os.PathLike | Iterable[Any] | None = None,
    evaluation: str | os.PathLike | Iterable[Any] | None = None,
    quant_scheme: str = "safe",
    calibration_method: str = "auto",
    max_drop: float = 1.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
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

    Quantized precisions (``"int8"``, ``"w8"``, ``"w4"``; see ``docs/quantization.md``) are made by the
    backend's own quantizer from the fp32 artifact. ``calibration`` (required for int8) is a folder of
    images or an iterable of input tensors (or tuples of them); ``evaluation`` a labelled folder
    (one sub-folder per class) or an iterable of ``(inputs, label)`` pairs: the manifest's
    ``quantization.accuracy`` (also ``result.accuracy``) then has fp32 and quantized top-1/top-5, the drop
    with a 95% interval, agreement, cosine and SQNR, and a top-1 drop above ``max_drop`` points fails the
    export. ``quant_scheme`` is ``"safe"`` (matrix multiplications only) or ``"full"``;
    ``calibration_method`` ``"auto"`` (the backend's default), ``"percentile"``, ``"entropy"`` or ``"minmax"``; ``mean``/``std``/``crop_pct``
    override how folder images are preprocessed (default: the model's metadata, crop 0.875).
    """
    options = ExportOptions(
        input_size=input_size, precision=precision, verify=verify, latency_runs=latency_runs, weights=weights,
        passes=passes, accelerator=accelerator, compare_without_passes=compare_without_passes,
        init=init, strict_passes=strict_passes, verbose=verbose, quant_scheme=quant_scheme,
        calibration_method=calibration_method, max_drop=max_drop, crop_pct=crop_pct,
        mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
        calibration=os.fspath(calibration) if isinstance(calibration, (str, os.PathLike)) else None,
        evaluation=os.fspath(evaluation) if isinstance(evaluation, (str, os.PathLike)) else None,
    )
    tensors = {key: value for key, value in (("calibration", calibration), ("evaluation", evaluation))
               if value is not None and not isinstance(value, (str, os.PathLike))}
    return run_export(model_or_name, example_inputs, target, out, options, name=name, seed=seed, **tensors)
