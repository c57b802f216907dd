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
from dataclasses import dataclass, field
from typing import Any, Callable

from edgevit.errors import EdgevitError


Facts = dict[str, Any]  # what a machine can run: devices/worker.py probe(), read here or on a remote


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    runtime: str  # the worker's session kind (devices/worker.py SESSIONS)
    target: str | None  # the targets-table row whose artifacts it runs (None: PyTorch eager)
    accelerator: str | None  # the accelerator row whose pass pipeline the export uses
    probe: Callable[[Facts], str | None]  # None when usable on the machine the facts describe, else why not
    #: precision -> (export precision, worker options for it)
    precisions: dict[str, tuple[str | None, dict[str, Any]]] = field(hash=False)
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    on_cpu: bool = False  # part of `--device cpu`: runs on this machine's CPU cores

    def unavailable_reason(self, facts: Facts | None = None) -> str | None:
        """Why this device cannot be measured on the machine ``facts`` describe (default: this one)."""
        if facts is None:
            return _probe_here(self.name)
        try:
            return self.probe(facts)
        except Exception as exc:  # a probe that breaks means the device is not usable; say why
            return f"probe failed: {type(exc).__name__}: {exc}".splitlines()[0]

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    def worker_options(self, precision: str, facts: Facts | None = None) -> dict[str, Any]:
        options = {**self.options, **self.precisions[precision][1]}
        if options.get("delegate") == "gpu":  # the delegate library lives on the measuring machine
            options["delegate_library"] = (facts or local_facts())["litert"]["gpu_delegate"]
        return options

    def export_precision(self, precision: str) -> str | None:
        return self.precisions[precision][0]


# --- probes: each reads the facts of the machine that will measure ---------------------------------

def _install_hint(facts: Facts, package: str, extra: str) -> str:
    if facts.get("remote"):
        return f"pip install {package} for {facts['platform']['executable']} there"
    return f'pip install -c constraints.txt -e ".[{extra}]"'


def _package(facts: Facts, package: str, extra: str) -> str | None:
    """None when ``package`` imports on that machine, else why not (not installed / broken)."""
    state = facts["packages"].get(package, {"missing": True})
    if "version" in state:
        return None
    if state.get("missing"):
        return f"{package} is not installed ({_install_hint(facts, package, extra)})"
    return f"{package} is installed but does not import: {state['error']}"


def _litert(facts: Facts) -> str | None:
    if _package(facts, "tflite-runtime", "tflite") is None:  # the older wheel serves as well
        return None
    return _package(facts, "ai-edge-litert", "tflite")


def _ort_provider(provider: str, why: str) -> Callable[[Facts], str | None]:
    def probe(facts: Facts) -> str | None:
        missing = _package(facts, "onnxruntime", "onnx")
        if missing:
            return missing
        providers = facts["onnxruntime"].get("providers", [])
        return None if provider in providers else f"this onnxruntime has no {provider}: {why}"
    return probe


def _openvino_device(device: str, why: str) -> Callable[[Facts], str | None]:
    def probe(facts: Facts) -> str | None:
        missing = _package(facts, "openvino", "openvino")
        if missing:
            return missing
        found = facts["openvino"].get("devices", [])
        return None if any(d.split(".")[0] == device for d in found) else f"OpenVINO sees {found}, no {device}: {why}"
    return probe


def _macos(facts: Facts) -> str | None:
    system = facts["platform"]["system"]
    if system != "Darwin":
        return f"Core ML prediction needs macOS (this is {system}); on Linux .mlpackage files are converted, not run"
    return _package(facts, "coremltools", "coreml")


def _onnx_nnapi(facts: Facts) -> str | None:
    if not facts["platform"].get("android"):
        return "NNAPI exists only on Android; measure there with --remote adb:SERIAL"
    return _ort_provider("NnapiExecutionProvider", "install onnxruntime built with --use_nnapi")(facts)


def _tflite_nnapi(facts: Facts) -> str | None:
    if not facts["platform"].get("android"):
        return "NNAPI exists only on Android; measure there with --remote adb:SERIAL"
    return "the LiteRT Python interpreter loads no NNAPI delegate; use onnx:nnapi or an app-side benchmark"


def _litert_gpu(facts: Facts) -> str | None:
    missing = _litert(facts)
    if missing:
        return missing
    lib = facts["litert"]["gpu_delegate"]
    if not lib:
        return ("the ai-edge-litert wheel ships no GPU delegate; set EDGEVIT_TFLITE_GPU_DELEGATE to a "
                "libtensorflowlite_gpu_delegate.so built for this machine's GPU")
    return None if facts["litert"]["gpu_delegate_exists"] else f"EDGEVIT_TFLITE_GPU_DELEGATE={lib} does not exist"


def _torch(facts: Facts) -> str | None:
    return _package(facts, "torch", "all")


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
               lambda f: _package(f, "onnxruntime", "onnx"), onnx_precisions,
               {"providers": ["CPUExecutionProvider"]}, on_cpu=True),
        Device("onnx:xnnpack", "onnxruntime, XnnpackExecutionProvider", "onnxruntime", "onnx", "xnnpack",
               _ort_provider("XnnpackExecutionProvider", "the PyPI wheel is built without it (--use_xnnpack builds, "
                             "onnxruntime-android)"), onnx_precisions,
               {"providers": ["XnnpackExecutionProvider", "CPUExecutionProvider"]}, on_cpu=True),
        Device("onnx:coreml", "onnxruntime, CoreMLExecutionProvider (MLProgram)", "onnxruntime", "onnx", "coreml",
               _ort_provider("CoreMLExecutionProvider", "it exists in macOS/iOS builds only"), onnx_precisions,
               {"providers": ["CoreMLExecutionProvider", "CPUExecutionProvider"]}),
        Device("onnx:nnapi", "onnxruntime, NnapiExecutionProvider", "onnxruntime", "onnx", "nnapi",
               _onnx_nnapi, onnx_precisions, {"providers": ["NnapiExecutionProvider", "CPUExecutionProvider"]}),
        Device("tflite:xnnpack", "LiteRT interpreter, XNNPACK delegate (its default)", "litert", "tflite", "xnnpack",
               _litert, {"fp32": ("fp32", {}), "fp16": ("fp16", {})},
               {"delegate": "xnnpack"}, on_cpu=True),
        Device("tflite:gpu", "LiteRT interpreter, GPU delegate", "litert", "tflite", "gpu", _litert_gpu,
               {"fp32": ("fp32", {}), "fp16": ("fp16", {})},
               {"delegate": "gpu"}),
        Device("tflite:nnapi", "LiteRT interpreter, NNAPI delegate", "litert", "tflite", "nnapi", _tflite_nnapi,
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
                           _macos, coreml_precisions, {"compute_units": label}, on_cpu=on_cpu))
    return rows


DEVICES: dict[str, Device] = {d.name: d for d in _device_rows()}
BASELINE = "torch:eager"


@functools.lru_cache(maxsize=None)
def local_facts() -> Facts:
    """This machine's facts, read once per process (the worker's probe, run in-process)."""
    from edgevit.devices.worker import probe

    return probe()


def _probe_here(name: str) -> str | None:
    return DEVICES[name].unavailable_reason(local_facts())


#: the packages a worker runtime needs (any one of them)
RUNTIME_PACKAGES = {"torch": ("torch",), "onnxruntime": ("onnxruntime",), "litert": ("ai-edge-litert", "tflite-runtime"),
                    "openvino": ("openvino",), "coreml": ("coremltools",)}


def missing_runtimes(facts: Facts) -> list[Device]:
    """One CPU device per runtime whose package is missing or broken on that machine (Core ML only on
    macOS): what a remote bench lists as unavailable, so a device's gaps are visible in its report."""
    rows: dict[str, Device] = {}
    for device in DEVICES.values():
        if not device.on_cpu or device.runtime in rows:
            continue
        if device.runtime == "coreml" and facts["platform"]["system"] != "Darwin":
            continue
        packages = RUNTIME_PACKAGES.get(device.runtime, ())
        if not any("version" in facts["packages"].get(p, {}) for p in packages):
            rows[device.runtime] = device
    return list(rows.values())


def check_device_names(spec: str) -> list[str]:
    """The names of a ``--device`` value, each 'cpu' or a row of the table; a one-line error otherwise."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise EdgevitError("--device is empty; use 'cpu' or device names (edgevit devices lists them)")
    for name in names:
        if name != "cpu":
            get_device(name)
    return names


def get_device(name: str) -> Device:
    if name not in DEVICES:
        raise EdgevitError(f"unknown device '{name}'; choose 'cpu' or one of: {', '.join(DEVICES)}")
    return DEVICES[name]


def resolve_devices(spec: str, targets: list[str] | None = None, facts: Facts | None = None,
                    strict: bool = True) -> list[Device]:
    """``cpu`` (every available CPU runtime of the machine, the eager baseline first) or a comma list
    of device names; ``targets`` keeps the devices of those targets (the baseline always stays).
    ``facts`` describe the measuring machine (default: this one). A named device that is unavailable
    there is a one-line error saying why, unless ``strict`` is False (a remote bench reports it as a row)."""
    facts = facts or local_facts()
    names = check_device_names(spec)
    chosen: list[Device] = []
    for name in names:
        if name == "cpu":
            chosen += [d for d in DEVICES.values() if d.on_cpu and d.unavailable_reason(facts) is None]
            continue
        device = get_device(name)
        reason = device.unavailable_reason(facts)
        if reason and strict:
            where = f"on {facts['remote']}" if facts.get("remote") else "here"
            raise EdgevitError(f"device '{name}' is not available {where}: {reason}")
        chosen.append(device)
    if targets:
        from edgevit.export.targets import get_target

        wanted = {get_target(t).name for t in targets}
        chosen = [d for d in chosen if d.target is None or d.target in wanted]
    baseline = DEVICES[BASELINE]
    if baseline.unavailable_reason(facts) is None and baseline not in chosen:
        chosen.insert(0, baseline)
    unique = list(dict.fromkeys(chosen))
    return sorted(unique, key=lambda d: d.name != BASELINE)


def device_rows(facts: Facts, host: str = "local") -> list[dict[str, Any]]:
    """The devices table as seen on the machine ``facts`` describe (``edgevit devices``)."""
    rows = []
    for d in DEVICES.values():
        reason = d.unavailable_reason(facts)
        rows.append({"host": host, "device": d.name, "description": d.description, "target": d.target,
                     "accelerator": d.accelerator, "precisions": list(d.precisions), "in_cpu_set": d.on_cpu,
                     "available": reason is None, "reason": reason})
    return rows


def machine_summary(facts: Facts) -> str:
    """One line: CPU, cores, kernel-deciding flags, runtimes with versions, NPU/GPU device nodes."""
    cpu = facts["cpu"]
    flags = " ".join(cpu["flags"]) or ("none of those edgevit looks for" if cpu["flags_known"] else "unknown")
    runtimes = ", ".join(f"{p} {s['version']}" for p, s in facts["packages"].items() if "version" in s)
    nodes = "; ".join(f"{kind}: {' '.join(paths)}" for kind, paths in facts.get("accelerator_nodes", {}).items())
    ov = facts.get("openvino", {}).get("devices")
    providers = facts.get("onnxruntime", {}).get("providers")
    gpu_delegate = facts.get("litert", {}).get("gpu_delegate")
    return (f"{cpu['model']}, {cpu['cores']} cores ({facts['platform']['system']} {facts['platform']['machine']}, "
            f"python {facts['platform']['python']}); CPU flags: {flags}; runtimes: {runtimes or 'none'}"
            + (f"; onnxruntime providers: {', '.join(providers)}" if providers else "")
            + (f"; OpenVINO devices: {', '.join(ov)}" if ov else "")
            + (f"; LiteRT GPU delegate: {gpu_delegate}" if gpu_delegate else "")
            + (f"; device nodes: {nodes}" if nodes else ""))
