"""Core ML target: coremltools converts the captured program to an ML Program (.mlpackage), iOS 17+.

Prediction needs macOS. On Linux the saved package gets a structural check only and is reported as
"converted, not verified" (see :func:`structural_check`).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch

DEPLOYMENT_TARGET = "iOS17"


def convert(program: torch.export.ExportedProgram, example_inputs: tuple, out: Path, precision: str) -> Path:
    """Write ``out`` (.mlpackage directory) at fp16 or fp32 compute precision."""
    import coremltools as ct

    compute_precision = ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32
    # coremltools consumes the ATen (post-decomposition) dialect of the program.
    mlmodel = ct.convert(
        program.run_decompositions({}),
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
        compute_precision=compute_precision,
        skip_model_load=True,
    )
    mlmodel.save(str(out))
    return out


def structural_check(path: Path, example_inputs: tuple, num_outputs: int) -> dict:
    """Check the saved package without running it: ML Program spec, iOS17 spec version, I/O shapes, weights."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    problems = []
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append(f"model type is {spec.WhichOneof('Type')}, not mlProgram")
    if spec.specificationVersion < 8:  # 8 == iOS17
        problems.append(f"specification version {spec.specificationVersion} < 8 (iOS17)")
    shapes = [list(d.type.multiArrayType.shape) for d in spec.description.input]
    expected = [list(t.shape) for t in example_inputs]
    if shapes != expected:
        problems.append(f"input shapes {shapes} != {expected}")
    if len(spec.description.output) != num_outputs:
        problems.append(f"{len(spec.description.output)} outputs, PyTorch gives {num_outputs}")
    if not any(path.glob("Data/com.apple.CoreML/weights/*.bin")):
        problems.append("no weight blob in the package")
    return {
        "ok": not problems,
        "problems": problems,
        "spec_version": spec.specificationVersion,
        "inputs": [d.name for d in spec.description.input],
        "outputs": [d.name for d in spec.description.output],
    }


def versions() -> dict[str, str]:
    return {name: version(name) for name in ("torch", "coremltools")} | {"deployment_target": DEPLOYMENT_TARGET}
