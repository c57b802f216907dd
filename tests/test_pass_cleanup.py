"""strip_aliases and select_to_slice: equivalence, and the backend failures they remove."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgevit.export.backends.onnx.coverage import onnx_ep_coverage
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


# --- strip_aliases keeps ATen semantics: strides and aliasing, not only values ------------------------

class _ContiguousView(nn.Module):
    """The Hugging Face MobileViT / Swin idiom: a transpose made contiguous, then viewed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.transpose(1, 2).contiguous().view(b, c * n) * 2


class _LayoutThroughElementwise(nn.Module):
    """The copy's layout reaches the view through an add (element-wise ops keep their input's strides)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 1).contiguous() + 1
        return y.view(y.shape[0], -1)


class _ChannelsLastView(nn.Module):
    """``to(memory_format=channels_last)`` (a same-dtype ``to``) makes the NHWC permute viewable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return y.view(y.shape[0], -1, y.shape[-1])


class _CloneThenInPlace(nn.Module):
    """The clone protects ``t`` from the in-place add: removing it would change ``t``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x * 2
        y = t.clone()
        y.add_(1)
        return t + y


class _SourceWrittenAfterClone(nn.Module):
    """The clone keeps ``t``'s old values while ``t`` is changed in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x * 2
        y = t.clone()
        t.mul_(3)
        return t - y


class _StridedRead(nn.Module):
    """``as_strided`` reads memory as laid out: its input's copy decides what it reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(0, 1).contiguous()
        return y.as_strided((2, 3), (1, 2)) * 1


def _rewritten(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, int, list[str]]:
    result = run_pipeline(model, (x,), ["strip_aliases"], strict=True)
    ops = [str(n.target) for n in result.model.graph.nodes if n.op == "call_function"]
    return result.model, result.reports[0].sites, ops


@pytest.mark.parametrize("model, shape", [(_ContiguousView(), (2, 5, 4)), (_LayoutThroughElementwise(), (2, 3, 4)),
                                          (_ChannelsLastView(), (2, 3, 4, 5))])
def test_strip_aliases_turns_dependent_views_into_reshape(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Used to fail: the removed copy left a non-contiguous input to ``view`` ("view size is not
    compatible with input tensor's size and stride"), for every backend."""
    x = torch.randn(shape)
    gm, sites, ops = _rewritten(model, x)
    assert sites >= 1 and "aten.view.default" not in ops and "aten.reshape.default" in ops
    assert not any(op in ops for op in ("aten.contiguous.default", "aten._to_copy.default", "aten.to.dtype_layout"))
    y = torch.randn(shape)
    assert torch.equal(gm(y), model(y))


@pytest.mark.parametrize("model", [_CloneThenInPlace(), _SourceWrittenAfterClone(), _StridedRead()])
def test_strip_aliases_keeps_copies_that_matter(model: nn.Module) -> None:
    """Used to change the values: a clone removed before an in-place op (or with its source written
    later) made the write land on the other tensor; a removed copy changed what ``as_strided`` read."""
    x = torch.randn(3, 2)
    gm, sites, ops = _rewritten(model, x)
    assert sites == 0 and ("aten.clone.default" in ops or "aten.contiguous.default" in ops)
    y = torch.randn(3, 2)
    assert torch.equal(gm(y), model(y))
