"""A model written in other people's style converts on all four targets through the Python API.

What a user's own model code must get through: einops-style rearranges (rank-6 view/permute chains), ``nn.MultiheadAttention``,
timm-style fused-QKV rank-5 reshapes and explicit ``expand_as`` broadcasting -- patterns the zoo avoids
by construction -- all go through ``--passes auto`` and pass parity (Core ML: the MIL reference executor).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgevit.api import export_model
from edgevit.export.targets import TARGETS


def rearrange_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """einops ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)`` spelled out: a rank-6 view and permute."""
    b, c, hh, ww = x.shape
    x = x.view(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (hh // p) * (ww // p), p * p * c)


class TimmStyleAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # the rank-5 pattern of timm's Attention
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class OtherStyleViT(nn.Module):
    def __init__(self, dim: int = 32, patch: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch * 3, dim)
        self.gate = nn.Parameter(torch.randn(1, 1, dim))
        self.mha = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.attn = TimmStyleAttention(dim, 4)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(rearrange_patches(x, self.patch))
        t = t * self.gate.expand_as(t)  # explicit broadcast, as some code bases write it
        t = t + self.mha(t, t, t, need_weights=False)[0]
        t = t + self.attn(self.norm(t))
        t = t + self.mlp(self.norm(t))
        return self.head(t.mean(dim=1))


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_other_style_model_converts_with_auto_passes(target: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = OtherStyleViT().eval()
    x = torch.randn(1, 3, 32, 32)
    # Core ML at fp32: the reference executor is then held to the fp32 bound like the other runtimes
    result = export_model(model, x, target=target, out=tmp_path, name="other_style",
                          precision="fp32" if target == "coreml" else None)
    assert result.parity.status == "passed", result.parity.detail
    record = result.manifest["passes"]
    applied = {r["name"]: r["sites"] for r in record["applied"]}
    assert applied.get("lower_rank", 0) >= 2  # the rank-6 rearrange and the rank-5 QKV split
    assert record["parity_cost"]["graph_max_abs_change"] <= 1e-5
