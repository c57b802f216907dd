"""MobileViT v2 (Mehta & Rastegari, arXiv 2206.02680): separable self-attention, width 0.5 ... 2.0.

Structure and key layout follow ml-cvnets / timm ``mobilevitv2_*`` (ByobNet naming: ``stem``,
``stages.i.j``, ``conv1_1x1/conv2_kxk/conv3_1x1``, ``conv_kxk``, ``conv_1x1``, ``transformer.k``,
``norm``, ``conv_proj``, ``head.fc``) so published checkpoints load without mapping.
Input: RGB in [0, 1], no mean/std normalisation, native size 256.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.models.layers import ConvMlp, ConvNormAct, GroupNorm1, bilinear_resize, make_divisible
from edgevit.registry import ModelInfo, register_model

_PAPER = "Separable Self-attention for Mobile Vision Transformers (arXiv 2206.02680)"
WIDTHS = {"050": 0.5, "075": 0.75, "100": 1.0, "125": 1.25, "150": 1.5, "175": 1.75, "200": 2.0}


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + SiLU, 3x3 depth-wise (stride s) + SiLU, 1x1 linear projection."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: float = 2.0) -> None:
        super().__init__()
        mid = make_divisible(in_chs * expand_ratio)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride=stride, groups=mid)
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, act_layer=None)
        self.has_shortcut = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        return out + x if self.has_shortcut else out


class LinearSelfAttention(nn.Module):
    """Separable self-attention on (B, d, P, N): one context vector per pixel position, O(N) cost.

    q (1 channel) is soft-maxed over the N patches; the context vector sum_N(k * softmax(q)) gates
    ReLU(v) by broadcasting (rank-matched, no ``expand_as``).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.qkv_proj = nn.Conv2d(dim, 1 + 2 * dim, 1)
        self.out_proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv_proj(x).split([1, self.dim, self.dim], dim=1)
        context_scores = query.softmax(dim=-1)
        context_vector = (key * context_scores).sum(dim=-1, keepdim=True)
        return self.out_proj(F.relu(value) * context_vector)


class LinearTransformerBlock(nn.Module):
    """Pre-norm block with GroupNorm(1) norms: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.attn = LinearSelfAttention(dim)
        self.norm2 = GroupNorm1(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def unfold_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, P, N), P = patch**2 pixels per patch, N patches; H, W divisible by patch.

    Equal, element for element, to ml-cvnets' ``F.unfold(x, patch, stride=patch).reshape(B, C, P, N)``
    (im2col) and to its Core ML path (grouped conv with one-hot kernels): ``pixel_unshuffle`` orders
    channels c*P + p exactly like im2col. tests/test_models.py asserts the equality.
    """
    b, c, h, w = x.shape
    return F.pixel_unshuffle(x, patch).reshape(b, c, patch * patch, (h // patch) * (w // patch))


def fold_patches(x: torch.Tensor, patch: int, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`unfold_patches`: ml-cvnets' Core ML fold (reshape + ``pixel_shuffle``)."""
    b, c, p, _ = x.shape
    return F.pixel_shuffle(x.reshape(b, c * p, size[0] // patch, size[1] // patch), patch)


class MobileVitV2Block(nn.Module):
    """Local DW-conv + 1x1, unfold to (B, d, P, N), L linear-attention blocks, fold, 1x1 projection + BN."""

    def __init__(self, chs: int, transformer_dim: int, depth: int, patch_size: int = 2) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv_kxk = ConvNormAct(chs, chs, 3, groups=chs)
        self.conv_1x1 = nn.Conv2d(chs, transformer_dim, 1, bias=False)
        self.transformer = nn.Sequential(*[LinearTransformerBlock(transformer_dim) for _ in range(depth)])
        self.norm = GroupNorm1(transformer_dim)
        self.conv_proj = ConvNormAct(transformer_dim, chs, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_1x1(self.conv_kxk(x))
        h, w = x.shape[-2:]
        p = self.patch_size
        padded = (math.ceil(h / p) * p, math.ceil(w / p) * p)
        if padded != (h, w):  # ml-cvnets resizes feature maps that the patch does not divide
            x = bilinear_resize(x, padded)
        x = self.norm(self.transformer(unfold_patches(x, p)))
        x = fold_patches(x, p, padded)
        if padded != (h, w):
            x = bilinear_resize(x, (h, w))
        return self.conv_proj(x)


class ClassifierHead(nn.Module):
    """Global average pool + Linear (``head.fc`` as in timm)."""

    def __init__(self, in_chs: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_chs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class MobileViTv2(nn.Module):
    """MobileViT v2 classifier at width multiplier ``width``."""

    def __init__(self, width: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        chs = [int(c * width) for c in (64, 128, 256, 384, 512)]
        depths = (2, 4, 3)
        stem = int(32 * width)
        self.stem = ConvNormAct(3, stem, 3, stride=2)
        stages = [
            nn.Sequential(InvertedResidual(stem, chs[0], 1)),
            nn.Sequential(InvertedResidual(chs[0], chs[1], 2), InvertedResidual(chs[1], chs[1], 1)),
        ]
        for i, depth in enumerate(depths, start=2):
            stages.append(
                nn.Sequential(
                    InvertedResidual(chs[i - 1], chs[i], 2),
                    MobileVitV2Block(chs[i], make_divisible(chs[i] * 0.5), depth),
                )
            )
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(chs[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _register(suffix: str, width: float) -> None:
    names = (f"mobilevitv2_{suffix}",) + (("mobilevit_v2",) if suffix == "100" else ())
    info = ModelInfo(
        name=f"mobilevit_v2_{suffix}",
        family="mobilevit_v2",
        paper=_PAPER,
        input_size=256,
        # five stride-2 stages (/32) and the 2x2 patches of the last block: 64 divides every map exactly
        input_multiple=64,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        aliases=names,
        extra={"width": width},
    )

    @register_model(info)
    def build(img_size: int = 256, num_classes: int = 1000) -> MobileViTv2:
        return MobileViTv2(width, num_classes=num_classes)


for _suffix, _width in WIDTHS.items():
    _register(_suffix, _width)
