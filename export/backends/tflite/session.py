"""LiteRT: the one session that runs .tflite artifacts, for parity (``edgevit export``) and the bench worker.

Self-contained on purpose (standard library + numpy + LiteRT's interpreter: ai-edge-litert, else the
older tflite-runtime wheel; no edgevit import): ``devices/worker_bundle.py`` bundles this file into the
worker that is pushed to remote machines. What the worker reads here by name (see
``export/backends/onnx/session.py``): ``RUNTIME``, ``SESSIONS``, ``PACKAGES``, ``probe_facts()``, ``describe()``.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    import numpy as np
except ImportError:  # the worker's probe still answers without numpy
    np = None  # type: ignore[assignment]

RUNTIME = "litert"
PACKAGES = (("ai_edge_litert", "ai-edge-litert", True), ("tflite_runtime", "tflite-runtime", True))
#: the environment variable naming a GPU delegate library built for the machine (the wheels ship none)
GPU_DELEGATE_ENV = "EDGEVIT_TFLITE_GPU_DELEGATE"


def probe_facts() -> dict[str, Any]:
    gpu = os.environ.get(GPU_DELEGATE_ENV, "")
    return {"gpu_delegate": gpu, "gpu_delegate_exists": bool(gpu) and os.path.exists(gpu)}


def describe(facts: dict[str, Any]) -> str | None:
    gpu_delegate = facts.get(RUNTIME, {}).get("gpu_delegate")
    return f"LiteRT GPU delegate: {gpu_delegate}" if gpu_delegate else None


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _litert_module() -> tuple[Any, str]:
    """LiteRT's interpreter module and its package: ai-edge-litert, else the older tflite-runtime wheel."""
    try:
        from ai_edge_litert import interpreter

        return interpreter, "ai-edge-litert"
    except ImportError:
        from tflite_runtime import interpreter  # type: ignore[no-redef]

        return interpreter, "tflite-runtime"


class LiteRTSession:
    """One loaded .tflite: ``run(inputs)`` (the outputs in order), ``info``, ``profile()``, ``compute_precision()``.

    ``config``: ``artifact``, ``threads``, ``options`` (``delegate``: xnnpack (default), none, or gpu/nnapi
    with ``delegate_library``); ``parity`` (see :meth:`for_parity`) gives ``info`` as export manifests record it.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.options: dict[str, Any] = config.get("options", {})
        self.threads = int(config.get("threads") or os.cpu_count() or 1)
        litert, package = _litert_module()
        delegate = self.options.get("delegate", "xnnpack")
        kwargs: dict[str, Any] = {"model_path": config["artifact"], "num_threads": self.threads}
        if delegate == "none":
            kwargs["experimental_op_resolver_type"] = litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        elif delegate != "xnnpack":  # the default delegate of the interpreter is XNNPACK
            kwargs["experimental_delegates"] = [litert.load_delegate(self.options["delegate_library"])]
        self.interpreter = litert.Interpreter(**kwargs)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()
        self.info: dict[str, Any] = {"threads": self.threads}
        if config.get("parity"):
            self.info |= {"runtime": package, "version": package_version(package), "delegate": delegate.upper()}
            return
        dtypes = {str(d["dtype"].__name__) for d in self.interpreter.get_tensor_details()
                  if d["dtype"] in (np.float16, np.float32)}
        self.info |= {"runtime": RUNTIME, "package": package, "version": package_version(package), "delegate": delegate,
                      "precision": "fp16 weights" if "float16" in dtypes else "fp32"}

    @classmethod
    def for_parity(cls, path: str, threads: int | None = None) -> "LiteRTSession":
        """The session ``edgevit export`` checks outputs with: the interpreter's default XNNPACK delegate."""
        return cls({"artifact": path, "threads": threads, "parity": True, "options": {}})

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        for detail, array in zip(self.inputs, inputs):
            # LiteRT narrows int64 graph inputs to int32; feed what the interpreter declares.
            self.interpreter.set_tensor(detail["index"], np.asarray(array, dtype=detail["dtype"]))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(d["index"]) for d in self.outputs]  # get_tensor copies

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        # XNNPACK (and LiteRT's reference kernels) dequantize fp16 weights to fp32 at preparation and compute
        # in fp32 unless the delegate's FORCE_FP16 flag is set, which the interpreter's Python API does not
        # set; a GPU/NNAPI delegate chooses for itself and does not say.
        return "fp32" if self.info["delegate"] in ("xnnpack", "none") else "unknown"

    def profile(self) -> list[dict[str, Any]]:
        return []  # the interpreter's Python API has no per-op profiler


SESSIONS = {RUNTIME: LiteRTSession}
