"""OpenVINO: the one session that runs IR (.xml + .bin) artifacts, for parity (``edgevit export``) and the bench worker.

Self-contained on purpose (standard library + numpy + openvino; no edgevit import):
``devices/worker_bundle.py`` bundles this file into the worker that is pushed to remote machines. What
the worker reads here by name (see ``export/backends/onnx/session.py``): ``RUNTIME``, ``SESSIONS``,
``PACKAGES``, ``probe_facts()``, ``describe()``.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    import numpy as np
except ImportError:  # the worker's probe still answers without numpy
    np = None  # type: ignore[assignment]

RUNTIME = "openvino"
PACKAGES = (("openvino", "openvino", True),)


def probe_facts() -> dict[str, Any]:
    """The devices OpenVINO sees (CPU, GPU.0, NPU...) and their full names."""
    import openvino as ov

    core = ov.Core()
    names = {}
    for device in core.available_devices:
        try:
            names[device] = str(core.get_property(device, "FULL_DEVICE_NAME"))
        except Exception:  # some plugins refuse properties without their driver; the name is informative only
            names[device] = ""
    return {"devices": list(core.available_devices), "names": names}


def describe(facts: dict[str, Any]) -> str | None:
    devices = facts.get(RUNTIME, {}).get("devices")
    return f"OpenVINO devices: {', '.join(devices)}" if devices else None


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def top_ops(totals: dict[str, float], counts: dict[str, int], runs: int, limit: int = 15) -> list[dict[str, Any]]:
    """Aggregate per op type: ms per inference and share of the profiled time, largest first."""
    whole = sum(totals.values()) or 1.0
    rows = [{"op": op, "ms_per_run": ms / max(runs, 1), "share": ms / whole, "calls_per_run": counts[op] / max(runs, 1)}
            for op, ms in totals.items()]
    return sorted(rows, key=lambda r: -r["ms_per_run"])[:limit]


class OpenVINOSession:
    """One compiled IR: ``run(inputs)`` (the outputs in order), ``info``, ``profile()``, ``compute_precision()``.

    ``config``: ``artifact``, ``threads``, ``options`` (``device`` CPU/GPU/NPU, ``inference_precision``
    f32/bf16/f16, ``hint``: the performance hint, LATENCY by default, None to leave it unset), ``profile``;
    ``parity`` (see :meth:`for_parity`) gives ``info`` as export manifests record it.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import openvino as ov

        self.config = config
        self.options: dict[str, Any] = config.get("options", {})
        self.threads = int(config.get("threads") or os.cpu_count() or 1)
        device = self.options.get("device", "CPU")
        requested = self.options.get("inference_precision", "f32")
        hint = self.options.get("hint", "LATENCY")
        props = {"INFERENCE_PRECISION_HINT": requested, "INFERENCE_NUM_THREADS": self.threads}
        if hint is not None:
            props["PERFORMANCE_HINT"] = hint
        if config.get("profile"):
            props["PERF_COUNT"] = True
        self.compiled = ov.Core().compile_model(config["artifact"], device, props)
        self.request = self.compiled.create_infer_request()
        reported = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # e.g. "f32", "bf16"
        self.info: dict[str, Any] = {"threads": self.threads, "runtime": RUNTIME, "version": package_version("openvino"),
                                     "device": device}
        if config.get("parity"):
            self.info |= {"inference_precision_requested": requested, "inference_precision_reported": reported}
        else:
            self.info |= {"hint": str(self.compiled.get_property("PERFORMANCE_HINT")),
                          "inference_precision_requested": requested, "precision": reported}

    @classmethod
    def for_parity(cls, path: str, threads: int | None = None) -> "OpenVINOSession":
        """The session ``edgevit export`` checks outputs with: the CPU plugin, inference precision forced to f32."""
        return cls({"artifact": path, "threads": threads, "parity": True,
                    "options": {"device": "CPU", "inference_precision": "f32", "hint": None}})

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(inputs)
        return [np.asarray(result[o]) for o in self.compiled.outputs]

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        return {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}.get(self.info["precision"], "unknown")

    def profile(self) -> list[dict[str, Any]]:
        """Per-op times of the last inference (PERF_COUNT enabled at load), top first."""
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for info in self.request.get_profiling_info():  # the last inference's counters
            if info.status.name != "EXECUTED":
                continue
            kind = f"{info.node_type} ({info.exec_type})"
            totals[kind] = totals.get(kind, 0.0) + info.real_time.total_seconds() * 1e3
            counts[kind] = counts.get(kind, 0) + 1
        return top_ops(totals, counts, 1)


SESSIONS = {RUNTIME: OpenVINOSession}
