"""fold_constant_gathers: exact folding of constant subgraphs, its guards, and the Gather it removes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgevit.export.capture import capture
from edgevit.export.passes import run_pipeline
from edgevit.export.targets import get_target

GATHERS = ("index.Tensor", "index_select", "gather")


def _ops(program: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def _relative_index(resolution: int) -> torch.Tensor:
    """The LeViT/EfficientViT (N, N) bias index: offset (|dr|, |dc|) -> |dr| * resolution + |dc|."""
    pos = torch.arange(resolution * resolution)
    row, col = pos // resolution, pos % resolution
    return (row[:, None] - row[None, :]).abs() * resolution + (col[:, None] - col[None, :]).abs()


class _BiasedAttention(nn.Module):
    """Attention logits plus a gathered relative-position bias, in the three spellings models use."""

    def __init__(self, heads: int, resolution: int, spelling: str) -> None:
        super().__init__()
        n = resolution * resolution
        self.spelling = spelling
        self.attention_biases = nn.Parameter(torch.randn(heads, n))
        self.register_buffer("attention_bias_idxs", _relative_index(resolution), persistent=False)

    def bias(self) -> torch.Tensor:
        idx = self.attention_bias_idxs
        heads, n = self.attention_biases.shape[0], idx.shape[0]
        if self.spelling == "index":  # timm: attention_biases[:, attention_bias_idxs]
            return self.attention_biases[:, idx]
        if self.spelling == "index_select":
            return self.attention_biases.index_select(1, idx.reshape(-1)).reshape(heads, n, n)
        table = self.attention_biases.unsqueeze(1).expand(heads, n, -1)  # torch.gather spelling
        return torch.gather(table, 2, idx.unsqueeze(0).expand(heads, n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, heads, N, N) logits
        return (x + self.bias()).softmax(-1)


@pytest.mark.parametrize("spelling", ["index", "index_select", "gather"])
@pytest.mark.parametrize("heads,resolution", [(1, 2), (4, 3), (2, 7)])
def test_fold_bias_gather_is_exact(spelling: str, heads: int, resolution: int) -> None:
    torch.manual_seed(0)
    model = _BiasedAttention(heads, resolution, spelling).eval()
    n = resolution * resolution
    x = torch.randn(2, heads, n, n)
    result = run_pipeline(model, (x,), ["fold_constant_gathers"])
    assert result.reports[0].sites == 1
    assert not any(g in op for op in _ops(result.program) for g in GATHERS)
    assert result.max_abs_change == 0.0
    y = torch.randn(2, heads, n, n)
    assert torch.equal(result.program.module()(y), model(y))
    # the parameter and index table that only fed the fold are not carried into the artifact
    names = set(result.program.state_dict) | set(result.program.constants)
    assert not any("attention_bias" in k for k in names), names


class _Chains(nn.Module):
    """Constant chains (reshape/transpose/arithmetic/factories) next to a parameter also used live."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6))
        self.scale = nn.Parameter(torch.randn(6))
        self.register_buffer("table", torch.randn(3, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_t = self.w.t() * self.scale.exp()  # a constant weight transform
        pos = self.table.reshape(6, 6).transpose(0, 1) + torch.arange(6.0)
        # elementwise consumers only: a matmul may pick another kernel for the contiguous folded
        # copy of a transposed view and re-associate its sums (exact up to fp32 rounding, not bitwise)
        return x * w_t + pos + x * self.w  # self.w is also read by a live node


def test_fold_chains_and_keeps_live_parameters() -> None:
    model = _Chains().eval()
    x = torch.randn(2, 6, 6)
    result = run_pipeline(model, (x,), ["fold_constant_gathers"])
    assert result.reports[0].sites == 2
    ops = _ops(result.program)
    assert not any(o.startswith(("aten.t.", "aten.exp", "aten.arange", "aten.transpose")) for o in ops), ops
    assert "w" in result.program.state_dict  # still read by x * w
    y = torch.randn(2, 6, 6)
    assert torch.equal(result.program.module()(y), model(y))


class _NotConstant(nn.Module):
    """Sites the pass must leave alone: a live index, an expand too large to store, a mutated buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))
        self.register_buffer("small", torch.randn(4, 1))
        self.register_buffer("count", torch.zeros(4))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        live = self.table[idx]  # the index depends on an input
        big = self.small.expand(4, 70000)  # 1.1 MB computed from 16 bytes: stays an expand
        self.count.add_(1.0)  # a buffer written at run time: reads of it are not constants
        out = live.sum(0) + (x + big).sum(1) + self.count.reshape(4, 1).sum(1)
        return out, self.small.t()  # a bare constant output stays an op (converters trip on it)


def test_fold_leaves_non_constant_sites() -> None:
    model = _NotConstant().eval()
    inputs = (torch.randn(4, 1), torch.tensor([1, 3, 3]))
    result = run_pipeline(model, inputs, ["fold_constant_gathers"])
    assert result.reports[0].sites == 0
    ops = _ops(result.program)
    assert {"aten.index.Tensor", "aten.expand.default", "aten.reshape.default", "aten.t.default"} <= set(ops), ops


def test_fold_stores_the_small_end_of_a_large_chain() -> None:
    """``table.reshape(...).expand(huge) + x``: the reshape is stored, the 4 MB expand stays computed;
    a reduction of the same expand is small, so it is stored whole."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.randn(16))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            big = self.table.reshape(16, 1).expand(16, 65536)
            return x + big, x + big.sum(1, keepdim=True)

    model, x = Model(), torch.randn(16, 65536)
    result = run_pipeline(model, (x,), ["fold_constant_gathers"])
    assert result.reports[0].sites == 2
    ops = _ops(result.program)
    assert ops.count("aten.expand.default") == 1, ops
    assert "aten.sum.dim_IntList" not in ops and "aten.reshape.default" not in ops, ops
    for got, want in zip(result.program.module()(x), model(x)):
        assert torch.equal(got, want)


def _tflite_ops(path: Path) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    return [op["op_name"] for op in Interpreter(str(path))._get_ops_details()]  # noqa: SLF001


def test_fold_reason_tflite_keeps_gather_nd_and_broadcast_to(tmp_path: Path) -> None:
    """The ``torch.gather`` spelling of a bias lookup is not folded by the TFLite converter: the
    artifact keeps BROADCAST_TO + SELECT_V2 + GATHER_ND, none of which the XNNPACK delegate handles
    (backends.md 4.3) and BROADCAST_TO not the GPU delegate (4.4). Folded, only ADD + SOFTMAX remain.
    (ONNX, Core ML and the other spellings are folded by the converters or by ORT at load.)"""
    model = _BiasedAttention(8, 14, "gather").eval()
    x = torch.randn(1, 8, 196, 196)
    convert = get_target("tflite").converter_module().convert
    convert(capture(model, (x,)), (x,), tmp_path / "before.tflite", "fp32")
    before = set(_tflite_ops(tmp_path / "before.tflite"))
    assert {"GATHER_ND", "BROADCAST_TO"} <= before, before
    result = run_pipeline(model, (x,), ["fold_constant_gathers"])
    convert(result.program, (x,), tmp_path / "after.tflite", "fp32")
    assert sorted(_tflite_ops(tmp_path / "after.tflite")) == ["ADD", "SOFTMAX"]
