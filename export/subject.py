"""The subject of an export: the model, built or taken as given, with its example inputs, checked.

:func:`prepare_subject` is the first step of the export pipeline (:mod:`edgevit.export.pipeline`) and the
one way the rest of edgevit turns "what to export" into a module and inputs: the bench's eager worker and
its saved inputs, the floor measurements and the reference resolver all build a zoo model through it, so
they run exactly what ``export_model`` exports.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from edgevit.errors import EdgevitError
from edgevit.references import ResolvedModel, image_batch, is_reference, resolve_model
from edgevit.registry import ModelInfo, check_input_size, check_requested_size, create_model, model_info
from edgevit.weights import INIT_MODES, exercise_all_parameters, exercise_weights

PARITY_SAMPLES = 3  # seeded inputs parity compares the artifact on
_HALF = (torch.float16, torch.bfloat16)


@dataclass
class Subject:
    """What one export converts: the module in eval mode, its example inputs and where it came from."""

    model: nn.Module
    name: str
    info: ModelInfo | None  # zoo models only (at the exported input size)
    example_inputs: tuple[torch.Tensor, ...]
    seed: int
    weights: Path | None = None
    reference: ResolvedModel | None = None  # a Hugging Face folder or module:factory (edgevit.references)
    verbose: bool = False  # show the converters' output (logged on "edgevit.converters")


def prepare_subject(
    model_or_name: nn.Module | str,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    input_size: int | None = None,
    name: str | None = None,
    seed: int = 0,
    weights: str | os.PathLike | None = None,
    init: str = "keep",
    verbose: bool = False,
) -> Subject:
    """Build (or take) the model to export and its example inputs, checked as ``export_model`` checks them.

    ``model_or_name`` is a zoo name (built at ``input_size``, default the model's own, with random weights
    seeded by ``seed`` and every parameter exercised, or the checkpoint ``weights``; its example input is
    the seeded, normalised image batch of one), a reference string (a Hugging Face folder or
    ``package.module:factory``, see :func:`edgevit.references.resolve_model`; given ``example_inputs`` fix
    its input shape), or any ``nn.Module`` (``example_inputs`` required; ``init="exercise"`` re-initialises
    a copy so every layer passes signal). ``name`` overrides the name used for files and manifests.

    Every input ``export_model`` rejects fails here, as a one-line :class:`~edgevit.errors.EdgevitError`:
    unknown models and sizes, half-precision weights or inputs, empty inputs, non-tensor inputs.
    """
    subject = _build_subject(model_or_name, example_inputs, input_size, name, seed, weights, init)
    subject.verbose = verbose
    _check_subject(subject)
    return subject


def _check_subject(subject: Subject) -> None:
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
) -> Subject:
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
        inputs = example_inputs if example_inputs is not None else zoo_image_batch(info, size, seed)
        subject = Subject(model.eval(), name or info.name, model_info(info.name, size), _as_tuple(inputs), seed)
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
    return Subject(model_or_name.eval(), name or type(model_or_name).__name__, None, _as_tuple(example_inputs), seed)


def _reference_subject(
    ref: str,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None,
    input_size: int | None,
    name: str | None,
    seed: int,
    weights: str | os.PathLike | None,
    init: str,
) -> Subject:
    """A Hugging Face folder or ``module:factory`` string, built by :func:`edgevit.references.resolve_model`.

    Given ``example_inputs`` are used as they are and fix the input shape (the CLI passes the seeded
    batch of ``--input-shape``); without them a folder's config gives the shape and a factory fails.
    """
    shape = tuple(_as_tuple(example_inputs)[0].shape) if example_inputs is not None else None
    resolved = resolve_model(ref, shape, weights, None if shape else input_size, seed)
    if init == "exercise":  # freshly built: no copy needed, the manifest says the weights were replaced
        resolved.module, resolved.init = exercise_weights(resolved.module, seed), "exercise"
    inputs = _as_tuple(example_inputs) if example_inputs is not None else resolved.example_inputs
    return Subject(resolved.module.eval(), name or resolved.name, None, inputs, seed, resolved.weights, resolved)


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


def zoo_image_batch(info: ModelInfo, size: int, seed: int) -> torch.Tensor:
    """A zoo model's seeded image-like batch of one: uniform [0, 1] pixels, normalised as the model expects."""
    return image_batch((1, 3, size, size), info.mean, info.std, seed)


def parity_inputs(subject: Subject) -> list[tuple[torch.Tensor, ...]]:
    """The :data:`PARITY_SAMPLES` seeded inputs (seeds ``seed + 1``...) parity runs model and artifact on:
    image batches for zoo models and folders with a preprocessor, standard normal values otherwise."""
    return seeded_inputs(subject, range(subject.seed + 1, subject.seed + PARITY_SAMPLES + 1))


def seeded_inputs(subject: Subject, seeds: Iterable[int]) -> list[tuple[torch.Tensor, ...]]:
    """One seeded input per seed, made as :func:`parity_inputs` makes them (image-like where the model's
    normalisation is known)."""
    samples = []
    for seed in seeds:
        if subject.info is not None:
            samples.append((zoo_image_batch(subject.info, subject.example_inputs[0].shape[-1], seed),))
            continue
        ref = subject.reference
        if ref is not None and ref.mean is not None:  # a folder's images, normalised by its preprocessor
            samples.append((image_batch(subject.example_inputs[0].shape, ref.mean, ref.std, seed),))
            continue
        gen = torch.Generator().manual_seed(seed)
        samples.append(
            tuple(
                torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.is_floating_point() else t.clone()
                for t in subject.example_inputs
            )
        )
    return samples
