"""Runners: load an exported artifact in its own runtime and run it on numpy inputs (parity).

A runner is the backend's session (``export/backends/<name>/session.py``, the same class the bench
worker measures with) built as parity builds it (``for_parity``: e.g. OpenVINO forced to f32, Core ML
on CPU_ONLY), plus a quick median. Its ``info`` reports the runtime's version and the precision the
runtime says it computes in, so a silent bf16/fp16 switch is visible in manifests.

Each target gets its own ``Runner`` subclass, named after its session class (``OnnxRuntimeSession`` ->
``OnnxRuntimeRunner``) and reachable here by that name, so a caller or a test can reach one target's runners.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from edgevit.errors import EdgevitError

Arrays = list[np.ndarray]


class Runner:
    """Base class: ``run(inputs) -> outputs`` on positional numpy inputs, plus ``info``."""

    target = ""
    session_class: Any = None  # the backend's session class (``for_parity(path, threads)``)
    unavailable: Any = ()  # the exception the session raises where it cannot run at all

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.threads = threads or os.cpu_count() or 1
        try:
            self.session = self.session_class.for_parity(str(self.path), self.threads)
        except self.unavailable as exc:
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


@functools.lru_cache(maxsize=None)
def runner_class(target: str) -> type[Runner]:
    """The ``Runner`` subclass of ``target``: its backend's session (the one of its ``RUNTIME``)."""
    from edgevit.export.backends import get_backend

    module = get_backend(target).module("session")
    session = module.SESSIONS[module.RUNTIME]
    name = session.__name__.removesuffix("Session") + "Runner"
    return type(name, (Runner,), {"__module__": __name__, "__doc__": f"{target}: {session.__name__} as parity builds it",
                                  "target": target, "session_class": session,
                                  "unavailable": getattr(module, "Unavailable", ())})


class _Runners(Mapping[str, type[Runner]]):
    """target -> its ``Runner`` class, for every backend (built when first asked for)."""

    def _targets(self) -> tuple[str, ...]:
        from edgevit.export.backends import BACKENDS

        return tuple(BACKENDS)

    def __getitem__(self, target: str) -> type[Runner]:
        if target not in self._targets():
            raise KeyError(target)
        return runner_class(target)

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets())

    def __len__(self) -> int:
        return len(self._targets())


RUNNERS: Mapping[str, type[Runner]] = _Runners()


def load_runner(target: str, path: Path, threads: int | None = None) -> Runner:
    """The runner for ``target`` with the artifact at ``path`` loaded."""
    return RUNNERS[target](path, threads)


def __getattr__(name: str) -> type[Runner]:
    """A target's ``Runner`` class by its name (e.g. ``CoreMLRunner``, ``OnnxRuntimeRunner``)."""
    if name.startswith("__"):
        raise AttributeError(name)
    for target in RUNNERS:
        if runner_class(target).__name__ == name:
            return runner_class(target)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
