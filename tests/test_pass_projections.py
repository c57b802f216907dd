"""split_fused_projection: a Linear read only as column ranges becomes one Linear per range, exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.export.passes import run_pipeline
from edgevit.export.targets import get_target


def _ops(result, name: str) -> list:
    return [n for n in result.program.graph.nodes if n.op == "call_function" and str(n.target) == name]


def _split(model: nn.Module, *shapes: tuple[int, ...]):
    torch.manual_seed(0)
    return run_pipeline(model.eval(), tuple(torch.randn(s) for s in shapes), ["split_fused_projection"])


class _QKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, 5, 16), 2 heads of 8
        q, k, v = (t.reshape(1, 5, 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, dim=-1))
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_a_split_qkv_projection_becomes_three_linears_with_the_same_values() -> None:
    model = _QKV()
    result = _split(model, (1, 5, 16))
    assert [(r.name, r.sites, r.exact) for r in result.reports] == [("split_fused_projection", 1, True)]
    linears = _ops(result, "aten.linear.default")
    assert [tuple(n.meta["val"].shape) for n in linears] == [(1, 5, 16)] * 3
    assert _ops(result, "aten.split_with_sizes.default") == _ops(result, "aten.split.Tensor") == []
    weights = sorted((t for name, t in result.model.named_buffers() if "projection_weight" in name),
                     key=lambda t: float(t.sum()))
    expected = sorted(model.qkv.weight.detach().split(16), key=lambda t: float(t.sum()))
    assert all(torch.equal(a, b) for a, b in zip(weights, expected, strict=True))
    y = torch.randn(1, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.program.module()(y), model(y), rtol=0, atol=1e-6)


class _Slices(nn.Module):
    """Two disjoint column slices (columns 4:6 are read by nobody) of a bias-free Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y[..., :4].relu() + y[..., 6:]


def test_disjoint_slices_become_linears_and_unread_columns_are_not_computed() -> None:
    model = _Slices()
    result = _split(model, (3, 8))
    assert result.reports[0].sites == 1
    assert sorted(tuple(n.meta["val"].shape) for n in _ops(result, "aten.linear.default")) == [(3, 4), (3, 4)]
    assert _ops(result, "aten.slice.Tensor") == []
    y = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.program.module()(y), model(y), rtol=0, atol=1e-6)


class _Untouchable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.fc(x)
        whole_reader = (a[..., :4] + 1, a.sum(-1))  # one reader takes every column
        b = self.fc(x + 1)
        overlapping = (b[..., :6] * 2, b[..., 4:])  # columns 4:6 reach two readers
        c = F.linear(x, w)
        dynamic_weight = c.split(4, dim=-1)  # the weight is an input, not a constant
        d = self.fc(x - 1)
        other_dim = d.split(1, dim=0)  # rows, not columns
        return *whole_reader, *overlapping, *dynamic_weight, *other_dim


def test_linears_with_other_readers_overlaps_dynamic_weights_or_row_splits_are_left_alone() -> None:
    result = _split(_Untouchable(), (2, 8), (8, 8))
    assert result.reports[0].sites == 0
    assert len(_ops(result, "aten.linear.default")) == 4


def test_the_pass_is_only_where_it_was_measured_faster() -> None:
    assert "split_fused_projection" in get_target("tflite").pipeline("xnnpack")
    assert "split_fused_projection" in get_target("openvino").pipeline("cpu")
    for target, accelerator in (("onnx", "cpu"), ("coreml", None), ("tflite", "gpu"), ("openvino", "npu")):
        assert "split_fused_projection" not in get_target(target).pipeline(accelerator)


# --- split_fused_conv_projection: MobileViT-v2's 1x1-conv qkv, split along channels ------------------------

class _ConvQKV(nn.Module):
    """MobileViT-v2's linear attention projection: one 1x1 conv, split [1, d, d] along channels."""

    def __init__(self, dim: int = 8, kernel: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.qkv = nn.Conv2d(dim, 1 + 2 * dim, kernel, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split([1, self.dim, self.dim], dim=1)
        scores = q.softmax(dim=-1)
        return (k * scores).sum(-1, keepdim=True).relu() * v


def test_a_channel_split_1x1_conv_becomes_one_conv_per_range_with_the_same_values() -> None:
    model = _ConvQKV().eval()
    torch.manual_seed(0)
    result = run_pipeline(model, (torch.randn(1, 8, 2, 6),), ["split_fused_conv_projection"])
    assert [(r.name, r.sites, r.exact) for r in result.reports] == [("split_fused_conv_projection", 1, True)]
    convs = _ops(result, "aten.conv2d.default")
    assert sorted(tuple(n.meta["val"].shape) for n in convs) == [(1, 1, 2, 6), (1, 8, 2, 6), (1, 8, 2, 6)]
    assert _ops(result, "aten.split_with_sizes.default") == _ops(result, "aten.split.Tensor") == []
    y = torch.randn(1, 8, 2, 6)
    with torch.no_grad():
        torch.testing.assert_close(result.program.module()(y), model(y), rtol=0, atol=1e-6)


def test_convs_that_are_not_pointwise_or_are_split_along_space_are_left_alone() -> None:
    class _Rows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            top, bottom = self.conv(x).split(2, dim=2)  # rows, not channels
            return top * bottom

    for model, shape in ((_ConvQKV(kernel=3, padding=1), (1, 8, 4, 4)), (_Rows(), (1, 4, 4, 4))):
        result = run_pipeline(model.eval(), (torch.randn(shape),), ["split_fused_conv_projection"])
        assert [r.sites for r in result.reports] == [0]


def test_the_conv_split_is_in_the_openvino_cpu_pipeline_only() -> None:
    assert "split_fused_conv_projection" in get_target("openvino").pipeline("cpu")
    for target, accelerator in (("tflite", "xnnpack"), ("onnx", "cpu"), ("openvino", "npu"), ("coreml", "ane")):
        assert "split_fused_conv_projection" not in get_target(target).pipeline(accelerator)
