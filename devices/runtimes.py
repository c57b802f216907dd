"""Runners: load an exported artifact in its own runtime and run it on numpy inputs (parity).

A runner is the backend's session (``export/backends/<name>/session.py``, the same class the bench
worker measures with) built as parity builds it (``for_parity``: e.g. OpenVINO forced to f32, Core ML
on CPU_ONLY), plus a quick median. Its ``info`` reports the runtime's version and the precision the
runtime says it computes in, so a silent bf16/fp16 switch is visible in manifests.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.errors import EdgevitError

Arrays = list[np.ndarray]


class Runner:
    """``run(inputs) -> outputs`` on positional numpy inputs, plus ``info``, over one backend's session."""

    def __init__(self, target: str, path: Path, threads: int | None = None) -> None:
        from edgevit.export.backends import get_backend

        module = get_backend(target).module("session")
        self.target, self.path = target, Path(path)
        self.threads = threads or os.cpu_count() or 1
        try:
            self.session = module.SESSIONS[module.RUNTIME].for_parity(str(self.path), self.threads)
        except getattr(module, "Unavailable", ()) as exc:  # the runtime cannot run here at all (Core ML off macOS)
            raise EdgevitError(str(exc)) from None
        self.info: dict[str, Any] = self.session.info

    def run(self, inputs: Arrays) -> Arrays:
        return self.session.run(inputs)

    def median_ms(self, inputs: Arrays, runs: int = 20, warmup: int = 3) -> float:
        """Median wall time of ``runs`` calls after ``warmup`` calls (a quick figure)."""
        for _ in range(warmup):
            self.run(inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.run(inputs)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def load_runner(target: str, path: Path, threads: int | None = None) -> Runner:
    """The runner for ``target`` with the artifact at ``path`` loaded."""
    return Runner(target, path, threads)
