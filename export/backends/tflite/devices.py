"""LiteRT's rows of the devices table (``devices/table.py``): one per delegate."""

from __future__ import annotations

from typing import Any

from edgevit.devices.device import Device, Facts, package_reason

PACKAGES = ("ai-edge-litert", "tflite-runtime")  # either interpreter will do
#: the packages whose versions a bench report records for this backend
REPORTED_PACKAGES = ("litert-torch", "ai-edge-litert", "tensorflow-cpu")


def _litert(facts: Facts) -> str | None:
    if package_reason(facts, "tflite-runtime", "tflite") is None:  # the older wheel serves as well
        return None
    return package_reason(facts, "ai-edge-litert", "tflite")


def _gpu(facts: Facts) -> str | None:
    missing = _litert(facts)
    if missing:
        return missing
    lib = facts["litert"]["gpu_delegate"]
    if not lib:
        return ("the ai-edge-litert wheel ships no GPU delegate; set EDGEVIT_TFLITE_GPU_DELEGATE to a "
                "libtensorflowlite_gpu_delegate.so built for this machine's GPU")
    return None if facts["litert"]["gpu_delegate_exists"] else f"EDGEVIT_TFLITE_GPU_DELEGATE={lib} does not exist"


def _gpu_library(facts: Facts) -> dict[str, Any]:
    """The GPU delegate library lives on the measuring machine: its path there."""
    return {"delegate_library": facts["litert"]["gpu_delegate"]}


def _nnapi(facts: Facts) -> str | None:
    if not facts["platform"].get("android"):
        return "NNAPI exists only on Android; measure there with --remote adb:SERIAL"
    return "the LiteRT Python interpreter loads no NNAPI delegate; use onnx:nnapi or an app-side benchmark"


def slower_reasons(row: dict[str, Any]) -> list[str]:
    """Why a quantized LiteRT row is slow, from how XNNPACK split it (``session.delegate_placement``)."""
    info = row.get("runtime_info") or {}
    outside = info.get("outside_delegate") or {}
    if not outside:
        return []
    ops = ", ".join(f"{name} x{count}" for name, count in sorted(outside.items(), key=lambda kv: -kv[1]))
    return [f"XNNPACK takes the graph in {info.get('delegate_partitions')} pieces; between them LiteRT's own "
            f"kernels run {sum(outside.values())} op(s) ({ops})"]


ROWS: tuple[Device, ...] = (
    Device("tflite:xnnpack", "LiteRT interpreter, XNNPACK delegate (its default)", "litert", "tflite", "xnnpack",
           _litert, {"fp32": ("fp32", {}), "fp16": ("fp16", {}), "int8": ("int8", {}), "w8": ("w8", {}),
                     "w4": ("w4", {})}, {"delegate": "xnnpack"}, on_cpu=True,
           packages=PACKAGES),
    Device("tflite:gpu", "LiteRT interpreter, GPU delegate", "litert", "tflite", "gpu", _gpu,
           {"fp32": ("fp32", {}), "fp16": ("fp16", {})}, {"delegate": "gpu"}, packages=PACKAGES,
           facts_options=_gpu_library),
    Device("tflite:nnapi", "LiteRT interpreter, NNAPI delegate", "litert", "tflite", "nnapi", _nnapi,
           {"fp32": ("fp32", {}), "int8": ("int8", {})}, {"delegate": "nnapi"}, packages=PACKAGES),
)
