"""fold_scale_into_linear: the attention scale moves into the q columns of qkv, exactly; nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgevit.export.passes import run_pipeline


class _Attention(nn.Module):
    def __init__(self, scale: float, on_logits: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.scale, self.on_logits = scale, on_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, 5, 16), 2 heads of 8
        q, k, v = (t.reshape(1, 5, 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, dim=-1))
        logits = (q @ k.transpose(-2, -1)) * self.scale if self.on_logits else (q * self.scale) @ k.transpose(-2, -1)
        return logits.softmax(-1) @ v


def _fold(model: nn.Module, *shapes: tuple[int, ...]):
    torch.manual_seed(0)
    x = tuple(torch.randn(s) for s in shapes)
    result = run_pipeline(model.eval(), x, ["fold_scale_into_linear"])
    muls = [n for n in result.program.graph.nodes if str(n.target) == "aten.mul.Tensor"]
    return result, x, muls


@pytest.mark.parametrize("on_logits", [False, True])
def test_power_of_two_scale_folds_bit_exactly(on_logits: bool) -> None:
    torch.manual_seed(0)
    model = _Attention(0.125, on_logits)  # head_dim 64's 1/8
    result, _, muls = _fold(model, (1, 5, 16))
    assert [(r.name, r.sites, r.max_abs_change) for r in result.reports] == [("fold_scale_into_linear", 1, 0.0)]
    assert muls == []
    y = torch.randn(1, 5, 16)
    with torch.no_grad():
        assert torch.equal(result.program.module()(y), model(y))
    weights = [t for name, t in result.model.named_buffers() if "scaled_weight" in name]
    assert len(weights) == 1
    torch.testing.assert_close(weights[0], torch.cat([model.qkv.weight[:16] * 0.125, model.qkv.weight[16:]]),
                               rtol=0, atol=0)


def test_other_scales_fold_within_one_rounding() -> None:
    torch.manual_seed(0)
    model = _Attention(8**-0.5, on_logits=False)
    result, _, muls = _fold(model, (1, 5, 16))
    assert result.reports[0].sites == 1 and muls == []
    y = torch.randn(1, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.program.module()(y), model(y), rtol=0, atol=1e-6)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.fc(x)
        z = self.fc(x + 1)
        overlapping = (z[..., :6] * 2.0, z[..., 4:])  # columns 4:6 reach two readers
        return y * 3.0, y.relu(), x.softmax(-1) * 2.0, *overlapping


def test_scales_other_readers_see_are_left_alone() -> None:
    result, _, muls = _fold(_Shared(), (2, 8))
    assert result.reports[0].sites == 0 and len(muls) == 3
