"""Core ML's rows of the devices table (``devices/table.py``): one per compute-units setting (macOS only)."""

from __future__ import annotations

from edgevit.devices.device import Device, Facts, package_reason

PACKAGES = ("coremltools",)
SYSTEMS = ("Darwin",)  # Core ML predicts on macOS only
#: the packages whose versions a bench report records for this backend
REPORTED_PACKAGES = ("coremltools",)


def _macos(facts: Facts) -> str | None:
    system = facts["platform"]["system"]
    if system not in SYSTEMS:
        return f"Core ML prediction needs macOS (this is {system}); on Linux .mlpackage files are converted, not run"
    return package_reason(facts, "coremltools", "coreml")


PRECISIONS = {"fp16": ("fp16", {}), "fp32": ("fp32", {}),  # quantized packages: coremltools.optimize
              "int8": ("int8", {}), "w8": ("w8", {}), "w4": ("w4", {})}

ROWS: tuple[Device, ...] = tuple(
    Device(f"coreml:{unit}", f"Core ML, compute units {label}", "coreml", "coreml", "ane", _macos, PRECISIONS,
           {"compute_units": label}, on_cpu=on_cpu, packages=PACKAGES, systems=SYSTEMS)
    for unit, label, on_cpu in (("all", "ALL", False), ("cpu", "CPU_ONLY", True),
                                ("cpu_and_ne", "CPU_AND_NE", False), ("cpu_and_gpu", "CPU_AND_GPU", False))
)
