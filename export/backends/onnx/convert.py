"""ONNX target: torch.onnx's dynamo exporter on the captured program; fp16 by graph conversion."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import onnx

OPSET = 18


def convert(program: torch.export.ExportedProgram, example_inputs: tuple, out: Path, precision: str) -> Path:
    """Write ``out`` (.onnx, weights embedded) from ``program``; ``precision`` is fp32 or fp16."""
    import onnx

    onnx_program = torch.onnx.export(program, example_inputs, dynamo=True, opset_version=OPSET, verbose=False)
    model = _without_debug_text(onnx_program.model_proto)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # fp32 inputs/outputs keep the interface identical to the fp32 artifact; casts sit at the edges.
        model = _topologically_sorted(convert_float_to_float16(model, keep_io_types=True))
    onnx.save_model(model, str(out))
    onnx.checker.check_model(str(out))
    return out


def _without_debug_text(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Drop the exporter's per-node debug records (stack traces with this machine's source paths, fx node
    text): 0.1-1 MB per file that no runtime reads, and no artifact should carry local paths."""
    def strip(graph: "onnx.GraphProto") -> None:
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.g.node:
                    strip(attr.g)
                for sub in attr.graphs:
                    strip(sub)

    strip(model.graph)
    for function in model.functions:
        for node in function.node:
            node.doc_string = ""
            del node.metadata_props[:]
    return model


def _topologically_sorted(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """The float16 converter appends its input casts after their consumers; ONNX requires node order."""
    import onnx_ir
    from onnx_ir.passes.common import TopologicalSortPass

    ir_model = onnx_ir.from_proto(model)
    TopologicalSortPass()(ir_model)
    return onnx_ir.to_proto(ir_model)


def versions() -> dict[str, str]:
    names = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime")
    return {name: version(name) for name in names} | {"opset": str(OPSET)}
