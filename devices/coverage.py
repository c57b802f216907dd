"""Accelerator coverage: how much of an artifact each accelerator would run, judged by vendor checkers.

``edgevit inspect`` prints these; pass tests use them to show the partition a pass removes.
"""

from __future__ import annotations

import collections
import logging
import pathlib
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Coverage:
    """One accelerator's verdict on one artifact."""

    accelerator: str
    checker: str
    nodes: int
    supported: int
    partitions: int
    unsupported: dict[str, int] = field(default_factory=dict)  # op -> count of unsupported nodes
    problems: list[str] = field(default_factory=list)  # rule violations that are not an op type
    fixes: dict[str, list[str]] = field(default_factory=dict)  # op or problem -> passes that remove it

    @property
    def percent(self) -> float:
        return 100.0 * self.supported / self.nodes if self.nodes else 100.0

    @property
    def whole(self) -> bool:
        return self.partitions == 1 and self.supported == self.nodes and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"percent": round(self.percent, 2), "whole": self.whole}


_ORT_EPS = {
    "nnapi": ("NNAPI", None),
    "coreml": ("CoreML MLProgram", "coreml_supported_mlprogram_ops.md"),
}


def onnx_ep_coverage(path: str | pathlib.Path, accelerator: str) -> Coverage:
    """onnxruntime's mobile usability checker for the NNAPI or Core ML (MLProgram) execution provider.

    Like ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``, the model is first
    optimised to the BASIC level (what an ORT-format conversion does), then partitioned with fixed
    input shapes required.
    """
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import optimize_model

    label, config = _ORT_EPS[accelerator]
    path = pathlib.Path(path)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        optimised = pathlib.Path(tmp) / path.name
        optimize_model(path, optimised, use_external_initializers=True)
        model = uc.ModelProtoWithShapeInfo(optimised).model_with_shape_info
        if config is None:
            info = uc.check_nnapi_partitions(model, require_fixed_input_sizes=True)
        else:
            info = uc.check_coreml_partitions(model, True, config)
        checker = uc._SupportedOpsChecker(  # noqa: SLF001 - the same op table the checker used
            pathlib.Path(uc.__file__).parent / (config or "nnapi_supported_ops.md")
        )
        counts = collections.Counter(
            n.op_type for n in model.graph.node if not checker.is_op_supported(n)
        )
    problems = [f"rank above the EP limit: {op}" for op in sorted(info.ops_with_unsupported_rank)]
    if info.nodes_unsupported_due_to_dynamic_input:
        problems.append(f"{info.nodes_unsupported_due_to_dynamic_input} nodes with dynamic input shapes")
    return Coverage(
        accelerator=f"onnx:{accelerator}",
        checker=f"onnxruntime usability checker ({label})",
        nodes=info.num_nodes,
        supported=info.num_supported_nodes,
        partitions=info.num_partitions,
        unsupported=dict(sorted(counts.items())),
        problems=problems,
    )
