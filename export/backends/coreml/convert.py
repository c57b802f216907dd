"""Core ML target: coremltools converts the captured program to an ML Program (.mlpackage), iOS 17+.

Parity (:func:`verify`): the saved package is executed by edgevit's MIL reference executor
(:mod:`edgevit.export.backends.coreml.mil`) in fp32 and fp16 modes on every platform, and on macOS
also by Core ML itself. The manifest's ``parity.checks`` lists each check that ran and
``parity.verification`` says it in words. Only a package whose program uses an op the executor lacks
stays "converted, not verified".
"""

from __future__ import annotations

import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgevit.export.parity import ParityReport, compare

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
    # An ML Program without weights (a pre/post-processing graph, a pure reshuffle) is valid and has no
    # blob; a program whose consts point into a blob needs that file in the package.
    for blob in sorted(_blob_files(spec)):
        if not (path / "Data/com.apple.CoreML" / blob.removeprefix("@model_path/")).is_file():
            problems.append(f"weight blob {blob} is missing from the package")
    return {
        "ok": not problems,
        "problems": problems,
        "spec_version": spec.specificationVersion,
        "inputs": [d.name for d in spec.description.input],
        "outputs": [d.name for d in spec.description.output],
    }


def _blob_files(spec: Any) -> set[str]:
    """The weight files (``@model_path/weights/weight.bin``) that the program's ops refer to."""
    files: set[str] = set()

    def walk(block: Any) -> None:
        for op in block.operations:
            for value in op.attributes.values():
                if value.WhichOneof("value") == "blobFileValue":
                    files.add(value.blobFileValue.fileName)
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return files


def versions() -> dict[str, str]:
    return {name: version(name) for name in ("torch", "coremltools")} | {"deployment_target": DEPLOYMENT_TARGET}


def run(path: Path, samples: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """The package's outputs on each sample: Core ML itself on macOS, else the MIL reference executor in
    fp32 mode (what quantized packages are judged and evaluated with on Linux)."""
    if platform.system() == "Darwin":
        from edgevit.devices.runtimes import load_runner

        runner = load_runner("coreml", path)
        return [runner.run(list(s)) for s in samples]
    from edgevit.export.backends.coreml.mil import MILExecutor, UnsupportedOpError, load_program
    from edgevit.errors import EdgevitError

    program = load_program(path)
    try:
        program.check_supported()
    except UnsupportedOpError as exc:
        raise EdgevitError(f"the quantized package cannot be verified here: {exc}") from None
    executor = MILExecutor(program, "fp32")
    return [executor.run(list(s)) for s in samples]


def _check(name: str, refs: list[list[np.ndarray]], outs: list[list[np.ndarray]], names: list[str],
           tolerance: str, gating: bool) -> tuple[dict[str, Any], ParityReport]:
    report = compare(refs, outs, names, tolerance)
    ratios = [o.max_abs_err / o.peak for o in report.outputs or [] if o.peak]
    return {
        "check": name, "status": report.status, "gating": gating, "tolerance": tolerance,
        "max_abs_err": report.worst("max_abs_err"), "max_err_over_peak": max(ratios) if ratios else None,
        "cosine": report.worst("cosine"), "top1_agreement": report.worst("top1_agreement"),
    }, report


def verify(path: Path, samples: list[list[np.ndarray]], refs: list[list[np.ndarray]], names: list[str],
           precision: str, structural: dict[str, Any]) -> ParityReport:
    """Check the package's numbers: the reference executor in fp32 and fp16 modes, plus Core ML on macOS.

    Gating: fp32 mode at the artifact's precision bound always; fp16 mode at the fp16 bound when the
    artifact is fp16 (what the Neural Engine runs); for an fp32 artifact the fp16 mode is reported, not
    gated (Core ML runs fp32 programs on CPU/GPU, not the ANE). Real Core ML predictions gate at the
    artifact's bound. The report's ``outputs`` are those of the check matching the artifact's precision.
    """
    from edgevit.export.backends.coreml.mil import Fp16RangeObserver, MILExecutor, UnsupportedOpError, load_program

    try:
        program = load_program(path)
        program.check_supported()
    except UnsupportedOpError as exc:
        return ParityReport("converted-not-verified", precision, runtime={"structural_check": structural},
                            detail=f"structural check passed; {exc}", verification="converted, not verified")
    checks, reports = [], {}
    range_observer = Fp16RangeObserver()
    for mode in ("fp32", "fp16"):
        executor = MILExecutor(program, mode)
        # the fp32-mode run of sample 1 also yields the fp16 range report (no extra run)
        outs = [executor.run(sample, observer=range_observer if mode == "fp32" and i == 0 else None)
                for i, sample in enumerate(samples)]
        tolerance = "fp16" if mode == "fp16" else precision
        entry, reports[mode] = _check(f"reference executor, {mode} mode", refs, outs, names, tolerance,
                                      gating=mode == "fp32" or precision == "fp16")
        checks.append(entry)
    ran = ["reference executor, fp32 and fp16"]
    if platform.system() == "Darwin":
        from edgevit.devices.runtimes import load_runner

        runner = load_runner("coreml", path)
        entry, reports["coreml"] = _check("Core ML prediction (macOS, CPU_ONLY)", refs,
                                          [runner.run(s) for s in samples], names, precision, gating=True)
        checks.append(entry)
        ran.append("Core ML prediction")
    main = reports["coreml" if "coreml" in reports else precision]
    failed = [c["check"] for c in checks if c["gating"] and c["status"] == "failed"]
    degenerate = "" if failed else next((r.detail for r in reports.values() if r.status == "degenerate"), "")
    main.status = "failed" if failed else "degenerate" if degenerate else "passed"
    main.detail = f"failed: {'; '.join(failed)}" if failed else degenerate
    main.checks = checks
    main.fp16_range = range_observer.report()  # the ops that misbehave in fp16, on sample 1
    main.verification = f"{'failed' if failed else 'not judged' if degenerate else 'verified'} ({' + '.join(ran)})"
    main.runtime = {"runtime": "edgevit MIL reference executor", "loader": f"coremltools {version('coremltools')}",
                    "opset": program.opset, "ops": program.op_types(), "structural_check": structural}
    return main
