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
class Accelerator:
    """Where an artifact of a target runs on the device; the pass pipeline is chosen per accelerator."""

    name: str
    description: str
    max_rank: int | None  # the largest tensor rank it accepts (None: no practical limit)
    checker: str  # what `edgevit inspect` uses to judge coverage


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
    accelerators: tuple[Accelerator, ...]  # the first is the default; pipelines come from the passes' wanted_by
    precision_notes: str = ""
    # What convert() is handed: "program" (edgevit's capture of the rewritten graph) or "module" (the
    # rewritten graph module, for a converter that runs torch.export itself: capturing it first is wasted)
    converter_input: str = "program"

    @property
    def default_accelerator(self) -> str:
        return self.accelerators[0].name

    def accelerator(self, name: str | None) -> Accelerator:
        """The accelerator row for ``name`` (default: the first), or a one-line error."""
        if name is None:
            return self.accelerators[0]
        for acc in self.accelerators:
            if acc.name == name:
                return acc
        names = ", ".join(a.name for a in self.accelerators)
        raise EdgevitError(f"target '{self.name}' has no accelerator '{name}'; choose one of: {names}")

    def pipeline(self, accelerator: str | None = None) -> tuple[str, ...]:
        """The default (``--passes auto``) pass pipeline for ``accelerator``."""
        from edgevit.export.passes import default_pipeline

        return default_pipeline(self.name, self.accelerator(accelerator).name)

    @property
    def passes(self) -> tuple[str, ...]:
        """The default pipeline of the default accelerator."""
        return self.pipeline()

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
            accelerators=(
                Accelerator("cpu", "onnxruntime CPU execution provider", None, "onnxruntime session"),
                Accelerator("xnnpack", "onnxruntime XNNPACK execution provider", None,
                            "softmax on the last axis (XNNPACK EP rule)"),
                Accelerator("nnapi", "Android NNAPI execution provider", 4,
                            "onnxruntime mobile usability checker (NNAPI)"),
                Accelerator("coreml", "Core ML execution provider (MLProgram)", 5,
                            "onnxruntime mobile usability checker (CoreML MLProgram)"),
            ),
            precision_notes="fp16: float16 graph with fp32 inputs/outputs (onnxruntime float16 converter)",
        ),
        Target(
            name="coreml",
            suffix=".mlpackage",
            runtime="edgevit MIL reference executor (fp32 + fp16 modes); + Core ML prediction on macOS",
            converter="coremltools ML Program, iOS17 deployment target",
            module="coreml",
            requires=("coremltools",),
            extra="coreml",
            precisions=("fp16", "fp32"),
            default_precision="fp16",
            accelerators=(
                Accelerator("ane", "Apple Neural Engine (ComputeUnit.ALL / CPU_AND_NE)", 5,
                            "ANE rules over the MIL program; MLComputePlan on macOS"),
            ),
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
            accelerators=(
                Accelerator("xnnpack", "LiteRT CPU with the XNNPACK delegate", 6, "LiteRT interpreter"),
                Accelerator("gpu", "LiteRT GPU delegate", 4,
                            "TensorFlow Lite analyzer (gpu_compatibility) + rank<=4 / batch 1 scan"),
                Accelerator("nnapi", "LiteRT NNAPI delegate", 4, "rank<=4 scan + NNAPI op list"),
            ),
            precision_notes="fp16: float16 weights dequantized at load (ai-edge-quantizer float casting)",
            converter_input="module",  # litert-torch exports the module itself
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
            accelerators=(
                Accelerator("cpu", "OpenVINO CPU plugin", None, "Core.query_model"),
                Accelerator("gpu", "OpenVINO GPU plugin (f16 by default)", None, "Core.query_model if present"),
                Accelerator("npu", "OpenVINO NPU plugin (static shapes, f16)", None,
                            "Core.query_model if present + static-shape rules"),
            ),
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
