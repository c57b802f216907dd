"""The backends: one package per export target, each holding everything edgevit knows about it.

A backend package (``export/backends/<name>/``) provides, under fixed module names:

- ``__init__.py``: ``BACKEND``, a :class:`Backend`: its targets-table row, its pass pipelines (one
  explicit, ordered list per accelerator), the packages whose versions key cached exports;
- ``convert.py``: ``convert(program_or_module, example_inputs, out, precision) -> Path`` and ``versions()``;
  optionally ``structural_check(path, example_inputs, num_outputs) -> dict`` and ``verify(path, samples,
  refs, names, precision, structural) -> ParityReport`` when parity cannot simply run the artifact in its
  runtime here (Core ML on Linux: the MIL reference executor in ``coreml/mil/``);
- ``coverage.py``: ``coverage(path, accelerator) -> Coverage``, how much of an artifact an accelerator takes;
- ``devices.py``: ``ROWS``, the devices-table rows it contributes (runtime, options, probes);
- ``session.py``: the runtime session that parity and the bench worker both use;
- ``quantize.py``: int8/w8/w4 with the vendor's tool from the fp32 artifact (see ``export/quantization``);
- ``passes/`` (optional): passes only this backend wants.

Modules are imported when first needed, so listing the targets does not import a converter. The
registry below is the one place outside the packages that names the backends.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

from edgevit.errors import EdgevitError

if TYPE_CHECKING:
    from pathlib import Path

    from edgevit.devices.device import Device
    from edgevit.export.targets import Target

#: the backends in the order the CLI, the tables and ``--target all`` list them
NAMES = ("onnx", "coreml", "tflite", "openvino")


@dataclass(frozen=True)
class Backend:
    """What a backend declares; its modules (convert, coverage, devices, session) are found by name."""

    target: "Target"
    #: accelerator name -> the passes ``--passes auto`` runs there, in order (see export/passes/__init__.py)
    pipelines: Mapping[str, tuple[str, ...]] = field(hash=False)
    #: the packages whose versions decide an export's bytes (the bench's cache key)
    packages: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.target.name

    def module(self, name: str) -> ModuleType:
        """The backend's module ``name`` (convert, coverage, devices, session)."""
        return importlib.import_module(f"{__name__}.{self.name}.{name}")

    def coverage(self, path: "str | Path", accelerator: str) -> Any:
        return self.module("coverage").coverage(path, accelerator)

    def device_rows(self) -> list["Device"]:
        return list(self.module("devices").ROWS)


def _load() -> dict[str, Backend]:
    backends = {}
    for name in NAMES:
        backend = importlib.import_module(f"{__name__}.{name}").BACKEND
        if backend.name != name:
            raise TypeError(f"backend package {name} declares target {backend.name}")
        backends[name] = backend
    return backends


BACKENDS: dict[str, Backend] = _load()


def get_backend(name: str) -> Backend:
    """The backend of target ``name``, or a one-line error listing the valid names."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise EdgevitError(f"unknown target '{name}'; choose one of: {', '.join(BACKENDS)}") from None
