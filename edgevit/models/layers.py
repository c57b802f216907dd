"""Small building blocks shared across families (the timm habit: one layer, many models).

Module and parameter names follow timm's layouts so published state dicts load without mapping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10% (MobileNet rule)."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < round_limit * value:
        new_value += divisor
    return new_value


def init_transformer_weights(model: nn.Module, *tokens: nn.Parameter) -> None:
    """DeiT/timm init: truncated-normal(0.02) for ``tokens`` and Linear weights, zero Linear biases.

    Matters for random-weight parity: realistic activation scales keep the comparison meaningful.
    A no-op on the meta device (parameter counting builds models there).
    """
    if any(t.is_meta for t in tokens):
        return
    for token in tokens:
        nn.init.trunc_normal_(token, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Mlp(nn.Module):
    """Token MLP: Linear -> activation -> Linear (ViT/DeiT FFN)."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvMlp(nn.Module):
    """Channel MLP as 1x1 convolutions on NCHW (MobileViT v2 FFN)."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear (timm key layout).

    The fused output is *sliced* into q, k, v and each is reshaped to (B, heads, N, head_dim), so no
    tensor exceeds rank 4 -- the reference's mitigation for the (B, N, 3, H, hd) rank-5 pattern that
    TFLite GPU, NNAPI and the ANE reject. The maths is the paper's: softmax(q k^T / sqrt(hd)) v.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class PackedMultiheadAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameters and keys, computed at rank <= 4.

    ``in_proj_weight`` (3C, C) / ``in_proj_bias`` (3C,) hold [q; k; v]; ``out_proj`` is a Linear. The
    fused projection is sliced into q, k, v, each reshaped (B, N, H, hd) -> (B, H, N, hd), so no tensor
    exceeds rank 4 (reference section 0.1). Maths as PyTorch's: softmax(q k^T / sqrt(hd)) v, with
    ``dropout`` on the attention weights in training, as ``nn.MultiheadAttention``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's init: xavier-uniform packed projection, zero biases.
        if self.in_proj_weight.is_meta:
            return
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(c, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.out_proj(out)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + optional activation; keys ``conv.*``, ``bn.*`` as in timm."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act_layer: type[nn.Module] | None = nn.SiLU,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer() if act_layer is not None else nn.Identity()


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group: per-sample normalisation over (C, H, W), as MobileViT v2 uses."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(1, num_channels, eps=eps)


def bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (ml-cvnets' choice for non-divisible feature maps)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
