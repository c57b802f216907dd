"""onnxruntime's rows of the devices table (``devices/table.py``): one per execution provider."""

from __future__ import annotations

from typing import Any, Callable

from edgevit.devices.device import Device, Facts, package_reason

PACKAGES = ("onnxruntime",)
#: the packages whose versions a bench report records for this backend
REPORTED_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def _onnxruntime(facts: Facts) -> str | None:
    return package_reason(facts, "onnxruntime", "onnx")


def _provider(provider: str, why: str) -> Callable[[Facts], str | None]:
    def probe(facts: Facts) -> str | None:
        missing = _onnxruntime(facts)
        if missing:
            return missing
        providers = facts["onnxruntime"].get("providers", [])
        return None if provider in providers else f"this onnxruntime has no {provider}: {why}"
    return probe


def _nnapi(facts: Facts) -> str | None:
    if not facts["platform"].get("android"):
        return "NNAPI exists only on Android; measure there with --remote adb:SERIAL"
    return _provider("NnapiExecutionProvider", "install onnxruntime built with --use_nnapi")(facts)


PRECISIONS = {"fp32": ("fp32", {}), "fp16": ("fp16", {})}
#: quantized artifacts (export/backends/onnx/quantize.py) run on the same providers: QDQ int8, MatMulNBits w8/w4
QUANTIZED = {"int8": ("int8", {}), "w8": ("w8", {}), "w4": ("w4", {})}

ROWS: tuple[Device, ...] = (
    Device("onnx:cpu", "onnxruntime, CPUExecutionProvider", "onnxruntime", "onnx", "cpu",
           _onnxruntime, PRECISIONS | QUANTIZED, {"providers": ["CPUExecutionProvider"]}, on_cpu=True, packages=PACKAGES),
    Device("onnx:xnnpack", "onnxruntime, XnnpackExecutionProvider", "onnxruntime", "onnx", "xnnpack",
           _provider("XnnpackExecutionProvider", "the PyPI wheel is built without it (--use_xnnpack builds, "
                     "onnxruntime-android)"), PRECISIONS | QUANTIZED,
           {"providers": ["XnnpackExecutionProvider", "CPUExecutionProvider"]}, on_cpu=True, packages=PACKAGES),
    Device("onnx:coreml", "onnxruntime, CoreMLExecutionProvider (MLProgram)", "onnxruntime", "onnx", "coreml",
           _provider("CoreMLExecutionProvider", "it exists in macOS/iOS builds only"), PRECISIONS,
           {"providers": ["CoreMLExecutionProvider", "CPUExecutionProvider"]}, packages=PACKAGES),
    Device("onnx:nnapi", "onnxruntime, NnapiExecutionProvider", "onnxruntime", "onnx", "nnapi",
           _nnapi, PRECISIONS | {"int8": QUANTIZED["int8"]}, {"providers": ["NnapiExecutionProvider", "CPUExecutionProvider"]}, packages=PACKAGES),
)


def slower_reasons(row: dict[str, Any]) -> list[str]:
    """Why a quantized onnxruntime row may be slower than its fp32 row, from the artifact's record."""
    quantized = (row.get("quantization") or {}).get("quantized_ops") or {}
    reasons = []
    folded = "session.disable_quant_qdq" in ((row.get("runtime_info") or {}).get("session_config") or {})
    if row.get("precision") == "w8" and quantized.get("Conv") and not folded:
        reasons.append(f"{quantized['Conv']} Conv weight(s) behind DequantizeLinear: not constants to the CPU "
                       "provider, which then cannot pre-pack them (no NCHWc kernels)")
    return reasons
