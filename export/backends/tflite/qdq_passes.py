"""Passes on the full-integer .tflite ai-edge-quantizer writes, for the NNAPI delegate.

The NNAPI delegate validates each int8 op against NNAPI's operand rules (``nnapi_delegate.cc``
``Validate``); an op it refuses runs on the CPU and splits the model. Of those rules, one is an encoding
choice a quantizer can make either way: NNAPI's MEAN keeps its input's scale and zero point, where
ai-edge-quantizer calibrates the MEAN's output on its own (:class:`MeanInputScale`). The others are
NNAPI's op set itself (no int8 DIV, SQRT, SUM, EXP, ...) and no encoding fixes them: the coverage
checker (``export/backends/tflite/coverage.py``) reports them.

The passes edit the flatbuffer with LiteRT's own object API (``flatbuffer_utils``) and are checked by the
runner of :mod:`edgevit.export.quantization.passes` on the LiteRT interpreter against the fp32 model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgevit.export.quantization.passes import ArtifactPass, register_quantized_pass

PIPELINES: dict[str, tuple[str, ...]] = {"nnapi": ("mean_input_scale",)}


def _op_names(model: Any) -> list[str]:
    from ai_edge_litert.tools import flatbuffer_utils

    codes = [flatbuffer_utils.opcode_to_name(model, i) for i in range(len(model.operatorCodes))]
    return [codes[op.opcodeIndex] for op in model.subgraphs[0].operators or []]


@register_quantized_pass
class MeanInputScale(ArtifactPass[Any]):
    """An int8 MEAN's output encoding → its input's scale and zero point.

    Before: ``MEAN(x: s_x, z_x) -> y: s_y, z_y`` with ``s_y`` calibrated on the means: NNAPI's MEAN requires
    ``s_y == s_x`` and ``z_y == z_x`` ("NNAPI requires that the input and output have the same quantization
    parameters"), so the delegate leaves every such MEAN (a LayerNorm has two) on the CPU. After: ``y: s_x,
    z_x``, read so by every consumer. A mean lies within its input's range, so nothing clips; it is
    re-rounded to the input's step (within int8 arithmetic).
    """

    name = "mean_input_scale"
    backend = "tflite"
    exact = False
    fixes = ("mean rescale",)

    def run(self, model: Any) -> int:
        sg = model.subgraphs[0]
        sites = 0
        for op, name in zip(sg.operators or [], _op_names(model)):
            if name != "MEAN":
                continue
            x, y = sg.tensors[op.inputs[0]], sg.tensors[op.outputs[0]]
            qx, qy = x.quantization, y.quantization
            if qx is None or qy is None or qx.scale is None or qy.scale is None or len(qx.scale) != 1:
                continue
            if float(qx.scale[0]) == float(qy.scale[0]) and list(qx.zeroPoint) == list(qy.zeroPoint):
                continue
            qy.scale, qy.zeroPoint = np.array(qx.scale, copy=True), np.array(qx.zeroPoint, copy=True)
            sites += 1
        return sites


class TfliteExecutor:
    """Copies ``ModelT`` objects and runs them in the LiteRT interpreter on a few samples, next to the fp32 model."""

    def __init__(self, fp32_model: Path, samples: Sequence[Sequence[np.ndarray]]) -> None:
        self.fp32_model, self.samples = fp32_model, [list(s) for s in samples]

    def copy(self, model: Any) -> Any:
        from ai_edge_litert.tools import flatbuffer_utils

        return flatbuffer_utils.read_model_from_bytearray(flatbuffer_utils.convert_object_to_bytearray(model))

    def outputs(self, model: Any) -> list[np.ndarray]:
        from ai_edge_litert.tools import flatbuffer_utils

        return self._run(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))

    def reference(self) -> list[np.ndarray]:
        return self._run(self.fp32_model.read_bytes())

    def outputs_of(self, path: Path) -> list[np.ndarray]:
        """The outputs of the .tflite file at ``path`` on the samples."""
        return self._run(Path(path).read_bytes())

    def _run(self, content: bytes) -> list[np.ndarray]:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=content, num_threads=1)
        interpreter.allocate_tensors()
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        runs = []
        for sample in self.samples:
            for detail, value in zip(inputs, sample):
                interpreter.set_tensor(detail["index"], np.asarray(value, dtype=detail["dtype"]))
            interpreter.invoke()
            runs.append([interpreter.get_tensor(d["index"]).copy() for d in outputs])
        return [np.stack([r[i] for r in runs]) for i in range(len(outputs))]


CHECK_SAMPLES = 4


def rewrite_artifact(path: Path, accelerator: str | None, precision: str,
                     calibration: Sequence[Sequence[np.ndarray]], fp32_model: Path) -> dict[str, Any]:
    """Run the accelerator's quantized passes on the .tflite at ``path`` (rewritten in place if any applied),
    checked against ``fp32_model`` on the first calibration samples; ``{"passes": [...], "notes": [...]}``."""
    from ai_edge_litert.tools import flatbuffer_utils

    from edgevit.export.quantization.passes import apply_pipeline, quantized_pipeline

    if not quantized_pipeline("tflite", accelerator, precision) or not calibration:
        return {"passes": [], "notes": []}
    model = flatbuffer_utils.read_model(str(path))
    executor = TfliteExecutor(Path(fp32_model), list(calibration)[:CHECK_SAMPLES])
    result = apply_pipeline("tflite", accelerator, precision, model, executor)
    if result.applied:
        flatbuffer_utils.write_model(result.model, str(path))
    return {"passes": result.record(), "notes": result.notes(accelerator)}
