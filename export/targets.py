"""The targets table: the single source of truth for export targets.

The CLI's choices, the exporter's dispatch, the parity runner, the README's table and the tests all
read :data:`TARGETS`. Its rows are declared by the backend packages (``export/backends/<name>/``): adding
a target means adding one backend package and its name in ``export/backends/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from edgevit.errors import EdgevitError, MissingBackendError

PRECISIONS = ("fp32", "fp16", "int8", "w8", "w4")  # int8/w8/w4: see export/quantization/


@dataclass(frozen=True)
class Accelerator:
    """Where an artifact of a target runs on the device; the pass pipeline is chosen per accelerator."""

    name: str
    description: str
    max_rank: int | None  # the largest tensor rank it accepts (None: no practical limit)
    checker: str  # what `edgevit inspect` uses to judge coverage


@dataclass(frozen=True)
class Target:
    """One export target: what it writes, what runs it, and what it needs installed."""

    name: str
    suffix: str  # artifact suffix; a directory for Core ML, .xml (+ .bin) for OpenVINO
    runtime: str  # the runtime parity runs the artifact in
    converter: str  # the converter, for humans and manifests
    module: str  # edgevit.export.<module> implements convert() (the backend's convert.py)
    requires: tuple[str, ...]  # importable packages needed to convert and verify
    extra: str  # pip extra that installs them
    precisions: tuple[str, ...]
    default_precision: str
    accelerators: tuple[Accelerator, ...]  # the first is the default; each has a pass pipeline in its backend
    precision_notes: str = ""
    # What convert() is handed: "program" (edgevit's capture of the rewritten graph) or "module" (the
    # rewritten graph module, for a converter that runs torch.export itself: capturing it first is wasted)
    converter_input: str = "program"

    @property
    def default_accelerator(self) -> str:
        return self.accelerators[0].name

    def accelerator(self, name: str | None) -> Accelerator:
        """The accelerator row for ``name`` (default: the first), or a one-line error."""
        if name is None:
            return self.accelerators[0]
        for acc in self.accelerators:
            if acc.name == name:
                return acc
        names = ", ".join(a.name for a in self.accelerators)
        raise EdgevitError(f"target '{self.name}' has no accelerator '{name}'; choose one of: {names}")

    def pipeline(self, accelerator: str | None = None) -> tuple[str, ...]:
        """The default (``--passes auto``) pass pipeline for ``accelerator``."""
        from edgevit.export.passes import default_pipeline

        return default_pipeline(self.name, self.accelerator(accelerator).name)

    @property
    def passes(self) -> tuple[str, ...]:
        """The default pipeline of the default accelerator."""
        return self.pipeline()

    def converter_module(self) -> ModuleType:
        return importlib.import_module(f"edgevit.export.{self.module}")

    def check_installed(self) -> None:
        """Raise a one-line :class:`MissingBackendError` naming the extra if a package is missing."""
        for package in self.requires:
            try:
                found = importlib.util.find_spec(package) is not None
            except ImportError:  # a broken or half-removed install counts as missing
                found = False
            if not found:
                raise MissingBackendError(self.name, package, self.extra)


# The rows come from the backend packages (export/backends/<name>/__init__.py), which import the classes
# above: this import stays below them.
from edgevit.export.backends import BACKENDS  # noqa: E402

TARGETS: dict[str, Target] = {name: backend.target for name, backend in BACKENDS.items()}


def get_target(name: str) -> Target:
    """The target row for ``name``, or a one-line error listing the valid names."""
    try:
        return TARGETS[name]
    except KeyError:
        raise EdgevitError(f"unknown target '{name}'; choose one of: {', '.join(TARGETS)}") from None


def resolve_precision(target: Target, precision: str | None) -> str:
    """The precision to export at: the target's default, or ``precision`` if the target supports it."""
    if precision is None:
        return target.default_precision
    if precision not in target.precisions:
        raise EdgevitError(
            f"target '{target.name}' does not support precision '{precision}'; "
            f"choose one of: {', '.join(target.precisions)}"
        )
    return precision
