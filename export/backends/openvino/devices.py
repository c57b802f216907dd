"""OpenVINO's rows of the devices table (``devices/table.py``): one per plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgevit.devices.device import Device, Facts, package_reason

PACKAGES = ("openvino",)
#: the packages whose versions a bench report records for this backend
REPORTED_PACKAGES = ("openvino",)


def companions(artifact: Path) -> list[Path]:
    """Files an artifact needs beside it when copied to a remote machine: the IR's .bin next to its .xml."""
    weights = artifact.with_suffix(".bin")
    return [weights] if artifact.suffix == ".xml" and weights.exists() else []


def _plugin(device: str, why: str) -> Callable[[Facts], str | None]:
    def probe(facts: Facts) -> str | None:
        missing = package_reason(facts, "openvino", "openvino")
        if missing:
            return missing
        found = facts["openvino"].get("devices", [])
        return None if any(d.split(".")[0] == device for d in found) else f"OpenVINO sees {found}, no {device}: {why}"
    return probe


PRECISIONS = {"fp32": ("fp32", {"inference_precision": "f32"}),
              "bf16": ("fp32", {"inference_precision": "bf16"}),  # the runtime lowers an fp32 IR
              "fp16": ("fp32", {"inference_precision": "f16"}),
              # quantized IRs (NNCF): what stays float runs in f32, like the fp32 row it is compared with
              "int8": ("int8", {"inference_precision": "f32"}),
              "w8": ("w8", {"inference_precision": "f32"}),
              "w4": ("w4", {"inference_precision": "f32"})}

ROWS: tuple[Device, ...] = (
    Device("openvino:cpu", "OpenVINO runtime, CPU plugin", "openvino", "openvino", "cpu",
           _plugin("CPU", "no CPU plugin"), PRECISIONS, {"device": "CPU"}, on_cpu=True, packages=PACKAGES),
    Device("openvino:gpu", "OpenVINO runtime, GPU plugin", "openvino", "openvino", "gpu",
           _plugin("GPU", "no Intel GPU or no GPU driver (intel-opencl-icd)"), PRECISIONS, {"device": "GPU"},
           packages=PACKAGES),
    Device("openvino:npu", "OpenVINO runtime, NPU plugin", "openvino", "openvino", "npu",
           _plugin("NPU", "no Intel NPU or no NPU driver (/dev/accel)"), PRECISIONS, {"device": "NPU"},
           packages=PACKAGES),
)
