"""Capture: one ``torch.export`` of the model, handed to every converter."""

from __future__ import annotations

import torch
from torch import nn

from edgevit.errors import EdgevitError


def capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """Export ``model`` (in eval mode) at the static shapes of ``example_inputs``."""
    if not isinstance(model, torch.fx.GraphModule):  # the unlifted module of a program refuses eval()
        model = model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, example_inputs, strict=False)
    except Exception as exc:  # torch.export raises many types; the user needs the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgevitError(f"torch.export could not capture {type(model).__name__}: {first}") from exc


def flatten_outputs(outputs: object) -> list[torch.Tensor]:
    """Model outputs (tensor, tuple/list or dict of tensors) as a flat list, in a stable order."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for k in outputs for t in flatten_outputs(outputs[k])]
    if isinstance(outputs, (list, tuple)):
        return [t for o in outputs for t in flatten_outputs(o)]
    raise EdgevitError(f"model output of type {type(outputs).__name__} is not a tensor, tuple or dict")


def output_names(outputs: object, prefix: str = "") -> list[str]:
    """Names parallel to :func:`flatten_outputs`: dict keys where there are any, else output_i."""
    if isinstance(outputs, torch.Tensor):
        return [prefix or "output_0"]
    if isinstance(outputs, dict):
        return [n for k in outputs for n in output_names(outputs[k], f"{prefix}{k}")]
    names: list[str] = []
    for i, o in enumerate(outputs):  # type: ignore[arg-type]
        names += output_names(o, f"{prefix}output_{i}" if not prefix else f"{prefix}.{i}")
    return names
