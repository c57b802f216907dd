"""sink_slices: each commuting rule is exact, stops where rows are still needed, and DeiT-Tiny's last
block computes only its class token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgevit.export.passes import run_pipeline
from edgevit.registry import count_macs, create_model


def _run(model: nn.Module, *shapes: tuple[int, ...]) -> tuple[object, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    x = tuple(torch.randn(s) for s in shapes)
    result = run_pipeline(model.eval(), x, ["select_to_slice", "sink_slices"])
    return result, x


def _sites(result) -> int:
    return {r.name: r.sites for r in result.reports}["sink_slices"]


def _shapes(result, op: str) -> list[tuple[int, ...]]:
    return [tuple(n.meta["val"].shape) for n in result.program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith(op)]


def _assert_same(result, model: nn.Module, x: tuple[torch.Tensor, ...]) -> None:
    y = tuple(torch.randn_like(t) for t in x)
    with torch.no_grad():
        got, want = result.program.module()(*y), model(*y)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # fp32 re-association only


class _RowWise(nn.Module):
    """Broadcast operands, LayerNorm, Linear, GELU, softmax over features, permute, reshape, mean."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.randn(8))
        self.gate = nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (2, 6, 8)
        y = nn.functional.gelu(self.fc(self.norm(x * self.gate + self.bias)))
        y = y.softmax(-1).permute(0, 2, 1).reshape(2, 2, 4, 6).mean(1)  # (2, 4, 6)
        return y[:, :, 1:3] * 2.0


def test_rowwise_ops_compute_only_the_kept_rows() -> None:
    model = _RowWise()
    result, x = _run(model, (2, 6, 8))
    assert _sites(result) == 9  # mean, reshape, permute, softmax, gelu, linear, layer_norm, add, mul
    assert _shapes(result, "aten.linear") == [(2, 2, 8)]
    assert _shapes(result, "aten.layer_norm") == [(2, 2, 8)]
    _assert_same(result, model, x)


class _Attention(nn.Module):
    """A fused qkv projection split three ways; the caller keeps two query rows."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(12, 36)
        self.proj = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, 7, 12), 3 heads of 4
        q, k, v = self.qkv(x).split(12, dim=-1)
        q, k, v = (t.reshape(1, 7, 3, 4).transpose(1, 2) for t in (q, k, v))
        out = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(1, 7, 12))[:, 2:4]


def test_attention_keeps_every_key_and_value_and_cuts_the_queries() -> None:
    model = _Attention()
    result, x = _run(model, (1, 7, 12))
    assert _shapes(result, "aten.linear") == [(1, 7, 36), (1, 2, 12)]  # qkv whole: keys and values need all
    assert _shapes(result, "aten.matmul") == [(1, 3, 2, 7), (1, 3, 2, 4)]
    assert _shapes(result, "aten.softmax") == [(1, 3, 2, 7)]
    _assert_same(result, model, x)


class _Stops(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # x: (2, 6, 8)
        y = x.exp()
        merged = x.reshape(6, 2, 8)[0:2]  # dim 0 of (6, 2, 8) has 6 = size of x dim 1, but starts at 0
        over_softmax = (x * 3).softmax(1)[:, :2]  # normalised over the cut dim
        return y[:, :2], y.sum(), merged, over_softmax


def test_slices_stop_where_rows_are_still_needed() -> None:
    model = _Stops()
    result, x = _run(model, (2, 6, 8))
    assert _sites(result) == 0
    assert _shapes(result, "aten.exp") == [(2, 6, 8)]
    _assert_same(result, model, x)


class _TwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, 5, 8)
        y = self.fc(x)
        return y[:, :1] + y.relu()[:, :1]  # two reads of the same row merge into one


def test_identical_slices_of_one_producer_are_merged_and_moved() -> None:
    model = _TwoReaders()
    result, x = _run(model, (1, 5, 8))
    assert _shapes(result, "aten.linear") == [(1, 1, 8)]
    _assert_same(result, model, x)


class _CatAndBatchMatmul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # a: (4, 3, 5), b: (1, 5, 2)
        return torch.cat([a @ b, (a * 2) @ b], dim=-1)[1:3]


def test_batch_dims_cut_both_operands_unless_they_broadcast() -> None:
    model = _CatAndBatchMatmul()
    result, x = _run(model, (4, 3, 5), (1, 5, 2))
    assert _shapes(result, "aten.matmul") == [(2, 3, 2), (2, 3, 2)]
    _assert_same(result, model, x)


@pytest.mark.parametrize("name", ["deit_tiny"])
def test_deit_tiny_last_block_runs_for_the_class_token_only(name: str) -> None:
    """DeiT-Tiny reads token 0 of its last block: the cut saves exactly that block's other 196 rows of
    proj + fc1 + fc2 (196 x 331,776 MACs) and 196 query rows of both attention matmuls (2 x 196 x 197 x
    192) = 79,855,104 of its 1,253,683,200 MACs."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    result = run_pipeline(model, (x,), ["select_to_slice", "sink_slices"], [(torch.randn(1, 3, 224, 224),)])
    before, after = count_macs(model, x), count_macs(result.program.module(), x)
    assert before == 1_253_683_200
    assert before - after == 196 * 331_776 + 2 * 196 * 197 * 192 == 79_855_104
    assert result.max_abs_change < 1e-5  # outputs ~1: fp32 re-association over 12 blocks
