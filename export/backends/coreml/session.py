"""Core ML prediction (macOS only): the one session that runs .mlpackage artifacts, for parity and the bench worker.

Self-contained on purpose (standard library + numpy + coremltools; no edgevit import):
``devices/worker_bundle.py`` bundles this file into the worker that is pushed to remote machines. What
the worker reads here by name (see ``export/backends/onnx/session.py``): ``RUNTIME``, ``SESSIONS``, ``PACKAGES``.
Off macOS the .mlpackage is converted and checked by edgevit's MIL reference executor (``convert.verify``).
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    import numpy as np
except ImportError:  # the worker's probe still answers without numpy
    np = None  # type: ignore[assignment]

RUNTIME = "coreml"
# coremltools is imported only where it can predict (macOS): elsewhere importing it costs seconds and
# tells the devices table nothing more
PACKAGES = (("coremltools", "coremltools", platform.system() == "Darwin"),)
PARITY_UNITS = "CPU_ONLY"


class Unavailable(RuntimeError):
    """This machine cannot run the session at all; parity says so as a one-line error."""


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


class CoreMLSession:
    """One loaded .mlpackage: ``run(inputs)`` (the outputs in order), ``info``, ``profile()``, ``compute_precision()``.

    ``config``: ``artifact``, ``threads``, ``options`` (``compute_units``: ALL (default), CPU_ONLY,
    CPU_AND_NE, CPU_AND_GPU); ``parity`` (see :meth:`for_parity`) gives ``info`` as export manifests record it.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.options: dict[str, Any] = config.get("options", {})
        self.threads = int(config.get("threads") or os.cpu_count() or 1)
        parity = bool(config.get("parity"))
        if platform.system() != "Darwin":
            if parity:
                raise Unavailable("Core ML prediction needs macOS; on Linux the .mlpackage is converted, not verified")
            raise RuntimeError("Core ML prediction needs macOS")
        import coremltools as ct

        units = self.options.get("compute_units", "ALL")
        self.model = ct.models.MLModel(config["artifact"], compute_units=getattr(ct.ComputeUnit, units))
        spec = self.model.get_spec()
        self.names = [d.name for d in spec.description.input]
        self.output_names = [d.name for d in spec.description.output]
        self.info: dict[str, Any] = {"threads": self.threads, "runtime": RUNTIME,
                                     "version": package_version("coremltools"), "compute_units": units}
        if not parity:
            self.info["precision"] = "fp16" if "fp16" in config["artifact"] else "as converted"

    @classmethod
    def for_parity(cls, path: str, threads: int | None = None) -> "CoreMLSession":
        """The session ``edgevit export`` checks outputs with: compute units CPU_ONLY."""
        return cls({"artifact": path, "threads": threads, "parity": True, "options": {"compute_units": PARITY_UNITS}})

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        result = self.model.predict(dict(zip(self.names, inputs)))
        return [np.asarray(result[n]) for n in self.output_names]

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        return "unknown"  # Core ML chooses per op and compute unit, and does not say

    def profile(self) -> list[dict[str, Any]]:
        return []


SESSIONS = {RUNTIME: CoreMLSession}
