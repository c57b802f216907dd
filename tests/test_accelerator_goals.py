"""The accelerator goals on the two default zoo models, measured with the vendors' checkers.

With ``--passes auto`` an export for the NNAPI or Core ML execution provider is one partition with every
node supported by onnxruntime's usability checker, and a TFLite export for the GPU delegate has no
tensor above rank 4 and nothing the delegate rejects; parity still holds (fp32 bound). Without passes the
same checkers find the splits (the reason the pipelines exist). The whole zoo is measured by
``benchmarks/coverage_matrix.py`` (too slow for CI).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgevit.api import export_model
from edgevit.export.coverage import coverage, render

pytestmark = pytest.mark.slow

CASES = [
    ("deit_tiny", "onnx", "nnapi"),
    ("deit_tiny", "onnx", "coreml"),
    # deit_tiny on the TFLite GPU delegate is whole without passes too (benchmarks/coverage_matrix.py)
    ("mobilevit_v2_050", "onnx", "nnapi"),
    ("mobilevit_v2_050", "onnx", "coreml"),
    ("mobilevit_v2_050", "tflite", "gpu"),
]


@pytest.mark.parametrize("model,target,accelerator", CASES)
def test_auto_passes_land_whole_on_the_accelerator(tmp_path: Path, model: str, target: str, accelerator: str) -> None:
    result = export_model(model, target=target, accelerator=accelerator, out=tmp_path, latency_runs=0)
    assert result.parity.status == "passed", result.parity.detail
    cov = coverage(result.artifact, target, accelerator)
    assert cov.whole, render(cov)
    assert cov.partitions == 1 and cov.supported == cov.nodes


@pytest.mark.parametrize("model,target,accelerator", [("deit_tiny", "onnx", "nnapi"), ("mobilevit_v2_050", "onnx", "coreml")])
def test_without_passes_the_checker_splits_the_graph(tmp_path: Path, model: str, target: str, accelerator: str) -> None:
    result = export_model(model, target=target, accelerator=accelerator, out=tmp_path, passes="none", verify=False)
    cov = coverage(result.artifact, target, accelerator)
    assert not cov.whole and cov.partitions > 1
