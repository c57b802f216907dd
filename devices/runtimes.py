"""Runners: load an exported artifact in its own runtime and run it on numpy inputs.

One runner per target (keyed like the targets table). Each reports the runtime's version and the
precision the runtime says it computes in, so a silent bf16/fp16 switch is visible in manifests.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgevit.errors import EdgevitError

Arrays = list[np.ndarray]


class Runner:
    """Base class: ``run(inputs) -> outputs`` on positional numpy inputs, plus ``info``."""

    target = ""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.threads = threads or os.cpu_count() or 1
        self.info: dict[str, Any] = {"threads": self.threads}

    def run(self, inputs: Arrays) -> Arrays:
        raise NotImplementedError

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


class OnnxRuntimeRunner(Runner):
    target = "onnx"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__(path, threads)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.info |= {"runtime": "onnxruntime", "version": version("onnxruntime"), "provider": "CPUExecutionProvider"}

    def run(self, inputs: Arrays) -> Arrays:
        return list(self.session.run(None, dict(zip(self.names, inputs))))


class LiteRTRunner(Runner):
    target = "tflite"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__(path, threads)
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()
        self.info |= {"runtime": "ai-edge-litert", "version": version("ai-edge-litert"), "delegate": "XNNPACK"}

    def run(self, inputs: Arrays) -> Arrays:
        for detail, array in zip(self.inputs, inputs):
            # LiteRT narrows int64 graph inputs to int32; feed what the interpreter declares.
            self.interpreter.set_tensor(detail["index"], np.asarray(array, dtype=detail["dtype"]))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(d["index"]).copy() for d in self.outputs]


class OpenVINORunner(Runner):
    target = "openvino"

    def __init__(self, path: Path, threads: int | None = None, inference_precision: str = "f32") -> None:
        super().__init__(path, threads)
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": inference_precision, "INFERENCE_NUM_THREADS": self.threads}
        self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        reported = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # e.g. "f32", "bf16"
        self.info |= {
            "runtime": "openvino",
            "version": version("openvino"),
            "device": "CPU",
            "inference_precision_requested": inference_precision,
            "inference_precision_reported": reported,
        }

    def run(self, inputs: Arrays) -> Arrays:
        result = self.request.infer(inputs)
        return [np.asarray(result[o]) for o in self.compiled.outputs]


class CoreMLRunner(Runner):
    """Real Core ML prediction; only constructible on macOS."""

    target = "coreml"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__(path, threads)
        if platform.system() != "Darwin":
            raise EdgevitError("Core ML prediction needs macOS; on Linux the .mlpackage is converted, not verified")
        import coremltools as ct

        self.model = ct.models.MLModel(str(self.path), compute_units=ct.ComputeUnit.CPU_ONLY)
        spec = self.model.get_spec()
        self.names = [d.name for d in spec.description.input]
        self.output_names = [d.name for d in spec.description.output]
        self.info |= {"runtime": "coreml", "version": version("coremltools"), "compute_units": "CPU_ONLY"}

    def run(self, inputs: Arrays) -> Arrays:
        result = self.model.predict(dict(zip(self.names, inputs)))
        return [np.asarray(result[n]) for n in self.output_names]


RUNNERS: dict[str, Callable[..., Runner]] = {
    r.target: r for r in (OnnxRuntimeRunner, LiteRTRunner, OpenVINORunner, CoreMLRunner)
}


def load_runner(target: str, path: Path, threads: int | None = None) -> Runner:
    """The runner for ``target`` with the artifact at ``path`` loaded."""
    return RUNNERS[target](path, threads)
