"""The targets table: the single source of truth for export targets (the Ultralytics habit).

The CLI's choices, the exporter's dispatch, the parity runner, the README's table and the tests all
read :data:`TARGETS`; adding a target means adding one row here and one converter module.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from edgevit.errors import EdgevitError, MissingBackendError

PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class Target:
    """One export target: what it writes, what runs it, and what it needs installed."""

    name: str
    suffix: str  # artifact suffix; a directory for Core ML, .xml (+ .bin) for OpenVINO
    runtime: str  # the runtime parity runs the artifact in
    converter: str  # the converter, for humans and manifests
    module: str  # edgevit.export.<module> implements convert()
    requires: tuple[str, ...]  # importable packages needed to convert and verify
    extra: str  # pip extra that installs them
    precisions: tuple[str, ...]
    default_precision: str
    passes: tuple[str, ...]  # op-substitution passes in the default pipeline (framework: issue 4)
    verified_on_linux: bool  # False: converted and structurally checked; numbers need macOS
    precision_notes: str = ""

    def converter_module(self) -> ModuleType:
        return importlib.import_module(f"edgevit.export.{self.module}")

    def check_installed(self) -> None:
        """Raise a one-line :class:`MissingBackendError` naming the extra if a package is missing."""
        for package in self.requires:
            try:
                found = importlib.util.find_spec(package) is not None
            except ImportError:  # a broken or half-removed install counts as missing
                found = False
            if not found:
                raise MissingBackendError(self.name, package, self.extra)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="onnx",
            suffix=".onnx",
            runtime="onnxruntime (CPUExecutionProvider)",
            converter="torch.onnx dynamo exporter (opset 18)",
            module="onnx",
            requires=("onnx", "onnxscript", "onnxruntime"),
            extra="onnx",
            precisions=("fp32", "fp16"),
            default_precision="fp32",
            passes=(),
            verified_on_linux=True,
            precision_notes="fp16: float16 graph with fp32 inputs/outputs (onnxruntime float16 converter)",
        ),
        Target(
            name="coreml",
            suffix=".mlpackage",
            runtime="Core ML (macOS only)",
            converter="coremltools ML Program, iOS17 deployment target",
            module="coreml",
            requires=("coremltools",),
            extra="coreml",
            precisions=("fp16", "fp32"),
            default_precision="fp16",
            passes=(),
            verified_on_linux=False,
            precision_notes="fp16 is the ML Program default and the only precision the Neural Engine runs",
        ),
        Target(
            name="tflite",
            suffix=".tflite",
            runtime="LiteRT interpreter (ai-edge-litert, XNNPACK)",
            converter="litert-torch",
            module="tflite",
            requires=("litert_torch", "ai_edge_litert", "ai_edge_quantizer"),
            extra="tflite",
            precisions=("fp32", "fp16"),
            default_precision="fp32",
            passes=(),
            verified_on_linux=True,
            precision_notes="fp16: float16 weights dequantized at load (ai-edge-quantizer float casting)",
        ),
        Target(
            name="openvino",
            suffix=".xml",
            runtime="OpenVINO CPU, inference precision forced to f32",
            converter="openvino.convert_model (IR .xml + .bin)",
            module="openvino",
            requires=("openvino",),
            extra="openvino",
            precisions=("fp32", "fp16"),
            default_precision="fp32",
            passes=(),
            verified_on_linux=True,
            precision_notes="fp16: IR weights compressed to float16; inference precision as OpenVINO reports it",
        ),
    )
}


def get_target(name: str) -> Target:
    """The target row for ``name``, or a one-line error listing the valid names."""
    try:
        return TARGETS[name]
    except KeyError:
        raise EdgevitError(f"unknown target '{name}'; choose one of: {', '.join(TARGETS)}") from None


def resolve_precision(target: Target, precision: str | None) -> str:
    """The precision to export at: the target's default, or ``precision`` if the target supports it."""
    if precision is None:
        return target.default_precision
    if precision not in target.precisions:
        raise EdgevitError(
            f"target '{target.name}' does not support precision '{precision}'; "
            f"choose one of: {', '.join(target.precisions)}"
        )
    return precision
