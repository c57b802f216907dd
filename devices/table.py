"""The devices table: where an artifact can be measured, and with which runtime settings.

Like the targets table it is the single source of truth: ``edgevit devices``, ``edgevit bench``, the
harness and the tests read :data:`DEVICES`. A device is named ``target:accelerator-or-unit``; it says
which targets-table row it runs (so the bench exports with that accelerator's pass pipeline), which
worker runtime and options measure it, which precisions it can measure and how each is obtained (an
export precision plus runtime options), and a probe that says why it is unavailable here.
``torch:eager`` is the baseline every comparison is made against.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Callable

from edgevit.errors import EdgevitError


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    runtime: str  # the worker's session kind (devices/worker.py SESSIONS)
    target: str | None  # the targets-table row whose artifacts it runs (None: PyTorch eager)
    accelerator: str | None  # the accelerator row whose pass pipeline the export uses
    probe: Callable[[], str | None]  # None when usable here, else why not (one line)
    #: precision -> (export precision, worker options for it)
    precisions: dict[str, tuple[str | None, dict[str, Any]]] = field(hash=False)
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    on_cpu: bool = False  # part of `--device cpu`: runs on this machine's CPU cores

    def unavailable_reason(self) -> str | None:
        return _probe(self.name)

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    def worker_options(self, precision: str) -> dict[str, Any]:
        return {**self.options, **self.precisions[precision][1]}

    def export_precision(self, precision: str) -> str | None:
        return self.precisions[precision][0]


# --- probes ------------------------------------------------------------------------------------

def _module(name: str, extra: str) -> str | None:
    try:
        found = importlib.util.find_spec(name) is not None
    except ImportError:
        found = False
    return None if found else f"{name} is not installed (pip install -c constraints.txt -e \".[{extra}]\")"


def _ort_provider(provider: str, why: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        missing = _module("onnxruntime", "onnx")
        if missing:
            return missing
        import onnxruntime as ort

        return None if provider in ort.get_available_providers() else f"this onnxruntime has no {provider}: {why}"
    return probe


def _openvino_device(device: str, why: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        missing = _module("openvino", "openvino")
        if missing:
            return missing
        import openvino as ov

        found = ov.Core().available_devices
        return None if any(d.split(".")[0] == device for d in found) else f"OpenVINO sees {found}, no {device}: {why}"
    return probe


def _macos(extra_check: Callable[[], str | None] | None = None) -> Callable[[], str | None]:
    def probe() -> str | None:
        if platform.system() != "Darwin":
            return f"Core ML prediction needs macOS (this is {platform.system()}); on Linux .mlpackage files are converted, not run"
        return extra_check() if extra_check else _module("coremltools", "coreml")
    return probe


def _android() -> str | None:
    return "NNAPI exists only on Android; run it there through the adb transport (devices/remote.py)"


def _litert_gpu() -> str | None:
    missing = _module("ai_edge_litert", "tflite")
    if missing:
        return missing
    lib = os.environ.get("EDGEVIT_TFLITE_GPU_DELEGATE")
    if not lib:
        return ("the ai-edge-litert wheel ships no GPU delegate; set EDGEVIT_TFLITE_GPU_DELEGATE to a "
                "libtensorflowlite_gpu_delegate.so built for this machine's GPU")
    return None if os.path.exists(lib) else f"EDGEVIT_TFLITE_GPU_DELEGATE={lib} does not exist"


def _torch() -> str | None:
    return _module("torch", "all")


FP32: dict[str, tuple[str | None, dict[str, Any]]] = {"fp32": ("fp32", {})}


def _device_rows() -> list[Device]:
    onnx_precisions = {"fp32": ("fp32", {}), "fp16": ("fp16", {})}
    ov_precisions = {"fp32": ("fp32", {"inference_precision": "f32"}),
                     "bf16": ("fp32", {"inference_precision": "bf16"}),  # the runtime lowers an fp32 IR
                     "fp16": ("fp32", {"inference_precision": "f16"})}
    coreml_precisions = {"fp16": ("fp16", {}), "fp32": ("fp32", {})}
    rows = [
        Device("torch:eager", "PyTorch eager on the CPU (inference_mode), the baseline", "torch", None, None,
               _torch, {"fp32": (None, {"precision": "fp32"}), "bf16": (None, {"precision": "bf16"})}, on_cpu=True),
        Device("onnx:cpu", "onnxruntime, CPUExecutionProvider", "onnxruntime", "onnx", "cpu",
               lambda: _module("onnxruntime", "onnx"), onnx_precisions,
               {"providers": ["CPUExecutionProvider"]}, on_cpu=True),
        Device("onnx:xnnpack", "onnxruntime, XnnpackExecutionProvider", "onnxruntime", "onnx", "xnnpack",
               _ort_provider("XnnpackExecutionProvider", "the PyPI wheel is built without it (--use_xnnpack builds, "
                             "onnxruntime-android)"), onnx_precisions,
               {"providers": ["XnnpackExecutionProvider", "CPUExecutionProvider"]}, on_cpu=True),
        Device("onnx:coreml", "onnxruntime, CoreMLExecutionProvider (MLProgram)", "onnxruntime", "onnx", "coreml",
               _ort_provider("CoreMLExecutionProvider", "it exists in macOS/iOS builds only"), onnx_precisions,
               {"providers": ["CoreMLExecutionProvider", "CPUExecutionProvider"]}),
        Device("onnx:nnapi", "onnxruntime, NnapiExecutionProvider", "onnxruntime", "onnx", "nnapi",
               _android, onnx_precisions, {"providers": ["NnapiExecutionProvider", "CPUExecutionProvider"]}),
        Device("tflite:xnnpack", "LiteRT interpreter, XNNPACK delegate (its default)", "litert", "tflite", "xnnpack",
               lambda: _module("ai_edge_litert", "tflite"), {"fp32": ("fp32", {}), "fp16": ("fp16", {})},
               {"delegate": "xnnpack"}, on_cpu=True),
        Device("tflite:gpu", "LiteRT interpreter, GPU delegate", "litert", "tflite", "gpu", _litert_gpu,
               {"fp32": ("fp32", {}), "fp16": ("fp16", {})},
               {"delegate": "gpu", "delegate_library": os.environ.get("EDGEVIT_TFLITE_GPU_DELEGATE", "")}),
        Device("tflite:nnapi", "LiteRT interpreter, NNAPI delegate", "litert", "tflite", "nnapi", _android,
               {"fp32": ("fp32", {})}, {"delegate": "nnapi"}),
        Device("openvino:cpu", "OpenVINO runtime, CPU plugin", "openvino", "openvino", "cpu",
               _openvino_device("CPU", "no CPU plugin"), ov_precisions, {"device": "CPU"}, on_cpu=True),
        Device("openvino:gpu", "OpenVINO runtime, GPU plugin", "openvino", "openvino", "gpu",
               _openvino_device("GPU", "no Intel GPU or no GPU driver (intel-opencl-icd)"), ov_precisions,
               {"device": "GPU"}),
        Device("openvino:npu", "OpenVINO runtime, NPU plugin", "openvino", "openvino", "npu",
               _openvino_device("NPU", "no Intel NPU or no NPU driver (/dev/accel)"), ov_precisions,
               {"device": "NPU"}),
    ]
    for unit, label, on_cpu in (("all", "ALL", False), ("cpu", "CPU_ONLY", True),
                                ("cpu_and_ne", "CPU_AND_NE", False), ("cpu_and_gpu", "CPU_AND_GPU", False)):
        rows.append(Device(f"coreml:{unit}", f"Core ML, compute units {label}", "coreml", "coreml", "ane",
                           _macos(), coreml_precisions, {"compute_units": label}, on_cpu=on_cpu))
    return rows


DEVICES: dict[str, Device] = {d.name: d for d in _device_rows()}
BASELINE = "torch:eager"


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> str | None:
    try:
        return DEVICES[name].probe()
    except Exception as exc:  # a probe that breaks means the device is not usable; say why
        return f"probe failed: {type(exc).__name__}: {exc}".splitlines()[0]


def get_device(name: str) -> Device:
    if name not in DEVICES:
        raise EdgevitError(f"unknown device '{name}'; choose 'cpu' or one of: {', '.join(DEVICES)}")
    return DEVICES[name]


def resolve_devices(spec: str, targets: list[str] | None = None) -> list[Device]:
    """``cpu`` (every available CPU runtime of this machine, the eager baseline first) or a comma list
    of device names; ``targets`` keeps the devices of those targets (the baseline always stays).
    A named device that is unavailable here is a one-line error saying why."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise EdgevitError("--device is empty; use 'cpu' or device names (edgevit devices lists them)")
    chosen: list[Device] = []
    for name in names:
        if name == "cpu":
            chosen += [d for d in DEVICES.values() if d.on_cpu and d.available]
            continue
        device = get_device(name)
        reason = device.unavailable_reason()
        if reason:
            raise EdgevitError(f"device '{name}' is not available here: {reason}")
        chosen.append(device)
    if targets:
        from edgevit.export.targets import get_target

        wanted = {get_target(t).name for t in targets}
        chosen = [d for d in chosen if d.target is None or d.target in wanted]
    baseline = DEVICES[BASELINE]
    if baseline.available and baseline not in chosen:
        chosen.insert(0, baseline)
    unique = list(dict.fromkeys(chosen))
    return sorted(unique, key=lambda d: d.name != BASELINE)
