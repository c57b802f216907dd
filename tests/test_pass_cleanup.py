"""strip_aliases and select_to_slice: equivalence, and the backend failures they remove."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgevit.devices.coverage import onnx_ep_coverage
from edgevit.export.capture import capture
from edgevit.export.passes import run_pipeline
from edgevit.export.targets import get_target


def _ops(program: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


class _Aliases(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten.alias.default(x)
        z = nn.functional.dropout(x.detach().clone(), 0.5, training=False)
        return y * 2 + z.contiguous()


class _ClassTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, 0], x.select(-1, -2) * 3


def test_strip_aliases_is_exact() -> None:
    x = torch.randn(2, 3, 5)
    result = run_pipeline(_Aliases(), (x,), ["strip_aliases"])
    assert result.reports[0].sites >= 3
    assert not any(op.split(".")[1] in ("alias", "detach", "clone") for op in _ops(result.program) if "aten." in op)
    y = torch.randn(2, 3, 5)
    assert torch.equal(result.program.module()(y), _Aliases()(y))


@pytest.mark.parametrize("shape", [(1, 7, 16), (2, 5, 3, 4)])
def test_select_to_slice_is_exact(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    result = run_pipeline(_ClassTokens(), (x,), ["select_to_slice"])
    assert result.reports[0].sites == 2
    assert not any("select" in op for op in _ops(result.program))
    y = torch.randn(shape)
    for got, want in zip(result.program.module()(y), _ClassTokens()(y)):
        assert torch.equal(got, want)


def test_strip_aliases_reason_coreml_rejects_alias(tmp_path: Path) -> None:
    """coremltools has no converter for ``alias`` nodes: 'Unsupported fx node alias'."""
    x = torch.randn(1, 4, 8, 8)
    convert = get_target("coreml").converter_module().convert
    with pytest.raises(NotImplementedError, match="alias"):
        convert(capture(_Aliases(), (x,)), (x,), tmp_path / "before.mlpackage", "fp16")
    result = run_pipeline(_Aliases(), (x,), ["strip_aliases"])
    convert(result.program, (x,), tmp_path / "after.mlpackage", "fp16")
    assert (tmp_path / "after.mlpackage").is_dir()


def test_select_to_slice_reason_coreml_ep_partition(tmp_path: Path) -> None:
    """``select`` exports as ONNX Gather, which the Core ML EP lacks: the graph splits around it."""
    model = nn.Sequential(nn.Linear(16, 16), _Head())
    x = torch.randn(1, 7, 16)
    convert = get_target("onnx").converter_module().convert
    convert(capture(model, (x,)), (x,), tmp_path / "before.onnx", "fp32")
    before = onnx_ep_coverage(tmp_path / "before.onnx", "coreml")
    assert before.unsupported.get("Gather", 0) >= 1 and not before.whole
    result = run_pipeline(model, (x,), ["select_to_slice"])
    convert(result.program, (x,), tmp_path / "after.onnx", "fp32")
    after = onnx_ep_coverage(tmp_path / "after.onnx", "coreml")
    assert after.unsupported == {} and after.whole, after


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[:, 0])
