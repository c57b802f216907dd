"""edgevit: efficient vision transformers from PyTorch to ONNX, Core ML, TFLite and OpenVINO, with parity.

Public API: ``create_model``, ``list_models``, ``model_info``, ``export_model``, ``ExportResult``.
They are imported lazily so that ``edgevit --version`` and argument errors do not pay for torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "edgevit.registry",
    "list_models": "edgevit.registry",
    "model_info": "edgevit.registry",
    "export_model": "edgevit.api",
    "ExportResult": "edgevit.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgevit' has no attribute {name!r}")
