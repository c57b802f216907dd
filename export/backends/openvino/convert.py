"""OpenVINO target: ``openvino.convert_model`` on the captured program, saved as IR (.xml + .bin)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch


def convert(program: torch.export.ExportedProgram, example_inputs: tuple, out: Path, precision: str) -> Path:
    """Write ``out`` (.xml) and its .bin; fp16 compresses the stored weights (OpenVINO's own default)."""
    import openvino as ov

    model = ov.convert_model(program)
    # Pin the captured static shapes: the IR otherwise declares dynamic inputs, which NPU refuses and
    # which cost the CPU/GPU plugins shape inference at run time.
    model.reshape({port.any_name: ov.PartialShape(list(t.shape)) for port, t in zip(model.inputs, example_inputs)})
    # save_model compresses weights to fp16 unless told otherwise; fp32 artifacts must not be.
    ov.save_model(model, str(out), compress_to_fp16=precision == "fp16")
    return out


def versions() -> dict[str, str]:
    return {name: version(name) for name in ("torch", "openvino")}
