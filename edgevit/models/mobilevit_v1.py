"""MobileViT v1 (Mehta & Rastegari, arXiv 2110.02178, ICLR 2022): XXS / XS / S.

MobileNetV2 stages, then three MobileViT blocks that unfold the feature map into 2x2 patches, run
standard pre-norm transformers over the (B*P, N, d) sequences (one sequence per pixel offset inside a
patch), fold back and fuse with the block input by concatenation + 3x3 conv (reference section 2).
Key layout mirrors timm's ByobNet ``mobilevit_*`` (``stem``, ``stages.i.j.conv1_1x1/conv2_kxk/
conv3_1x1``, ``conv_kxk``, ``conv_1x1``, ``transformer.k``, ``norm``, ``conv_proj``, ``conv_fusion``,
``final_conv``, ``head.fc``) so ``.cvnets_in1k`` checkpoints load without mapping.
Input: RGB in [0, 1], no mean/std normalisation, native size 256 (section 2.6: the legacy cvnets
weights may expect BGR -- check when porting).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.models.layers import ConvNormAct, Mlp, MultiHeadSelfAttention
from edgevit.models.mobilevit_v2 import ClassifierHead, InvertedResidual
from edgevit.registry import ModelInfo, register_model

_PAPER = "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer (arXiv 2110.02178)"

# Section 2.1 variant table: MV2 expansion, stage channels C1..C5, transformer dims d3..d5, final conv.
VARIANTS: dict[str, dict] = {
    "xxs": {"expand": 2.0, "chs": (16, 24, 48, 64, 80), "dims": (64, 80, 96), "final": 320},
    "xs": {"expand": 4.0, "chs": (32, 48, 64, 80, 96), "dims": (96, 120, 144), "final": 384},
    "s": {"expand": 4.0, "chs": (32, 64, 96, 128, 160), "dims": (144, 192, 240), "final": 640},
}
DEPTHS = (2, 4, 3)  # transformer layers in the three MobileViT blocks
NUM_HEADS = 4
PATCH = 2


def unfold_tokens(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*P, N, C): one sequence per pixel offset p inside a patch, tokens = patches.

    Rank-4 reshape/transpose chain of section 2.2 step 2 (no im2col, no rank-6 permute). Token order is
    row-major over patches and sequence order is (b, p) with p = row*patch + col, identical to
    ``F.unfold(x, patch, stride=patch)`` viewed as (B, C, P, N) -- tests assert the equality.
    """
    b, c, h, w = x.shape
    nh, nw, area = h // patch, w // patch, patch * patch
    x = x.reshape(b * c * nh, patch, nw, patch).transpose(1, 2)  # (B*C*nh, nw, ph, pw)
    x = x.reshape(b, c, nh * nw, area).transpose(1, 3)  # (B, P, N, C)
    return x.reshape(b * area, nh * nw, c)


def fold_tokens(x: torch.Tensor, patch: int, size: tuple[int, int]) -> torch.Tensor:
    """Exact inverse of :func:`unfold_tokens`: (B*P, N, C) -> (B, C, H, W), ranks <= 4."""
    bp, n, c = x.shape
    area = patch * patch
    b, (h, w) = bp // area, size
    nh, nw = h // patch, w // patch
    x = x.reshape(b, area, n, c).transpose(1, 3)  # (B, C, N, P)
    x = x.reshape(b * c * nh, nw, patch, patch).transpose(1, 2)  # (B*C*nh, ph, nw, pw)
    return x.reshape(b, c, h, w)


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer: x + MHSA(LN(x)), x + MLP(LN(x)); LN eps 1e-5, SiLU MLP d -> 2d -> d."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileVitBlock(nn.Module):
    """Local 3x3 conv + 1x1 to d, unfold, L transformer layers + LN, fold, 1x1 back to C, concat-fuse.

    Section 2.2: the fusion is ``conv3x3(concat[x, x_global])`` with no residual add.
    """

    def __init__(self, chs: int, transformer_dim: int, depth: int, num_heads: int = NUM_HEADS,
                 patch_size: int = PATCH) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv_kxk = ConvNormAct(chs, chs, 3)
        self.conv_1x1 = nn.Conv2d(chs, transformer_dim, 1, bias=False)
        self.transformer = nn.Sequential(*[TransformerBlock(transformer_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(transformer_dim)
        self.conv_proj = ConvNormAct(transformer_dim, chs, 1)
        self.conv_fusion = ConvNormAct(2 * chs, chs, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        h, w = x.shape[-2:]
        p = self.patch_size
        padded = (math.ceil(h / p) * p, math.ceil(w / p) * p)
        if padded != (h, w):  # ml-cvnets v1 resizes maps the patch does not divide (align_corners=False)
            x = F.interpolate(x, size=padded, mode="bilinear", align_corners=False)
        x = self.norm(self.transformer(unfold_tokens(x, p)))
        x = fold_tokens(x, p, padded)
        if padded != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = self.conv_proj(x)
        return self.conv_fusion(torch.cat((shortcut, x), dim=1))


class MobileViT(nn.Module):
    """MobileViT v1 classifier: stem, 2 MV2 stages, 3 (MV2 s2 + MobileViT block) stages, 1x1 exp, head."""

    def __init__(self, variant: str = "s", num_classes: int = 1000) -> None:
        super().__init__()
        cfg = VARIANTS[variant]
        expand, chs, dims = cfg["expand"], cfg["chs"], cfg["dims"]
        self.stem = ConvNormAct(3, 16, 3, stride=2)
        stages = [
            nn.Sequential(InvertedResidual(16, chs[0], 1, expand)),
            nn.Sequential(*[InvertedResidual(chs[0] if j == 0 else chs[1], chs[1], 2 if j == 0 else 1, expand)
                            for j in range(3)]),
        ]
        for i, (dim, depth) in enumerate(zip(dims, DEPTHS), start=2):
            stages.append(nn.Sequential(
                InvertedResidual(chs[i - 1], chs[i], 2, expand),
                MobileVitBlock(chs[i], dim, depth),
            ))
        self.stages = nn.Sequential(*stages)
        self.final_conv = ConvNormAct(chs[-1], cfg["final"], 1)
        self.head = ClassifierHead(cfg["final"], num_classes)  # dropout 0.1 in training only
        self._init_weights()

    def _init_weights(self) -> None:
        # ByobNet-style init (conv: normal, fan-out; linear: small normal) so random-weight parity tests
        # see realistic activation scales; loaded checkpoints overwrite it.
        if self.head.fc.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _register(variant: str) -> None:
    cfg = VARIANTS[variant]
    info = ModelInfo(
        name=f"mobilevit_{variant}",
        family="mobilevit_v1",
        paper=_PAPER,
        input_size=256,
        # five stride-2 stages (/32) and the 2x2 patches of the last block: 64 divides every map exactly
        input_multiple=64,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        aliases=(f"mobilevit_v1_{variant}",),
        extra={"channels": cfg["chs"], "transformer_dims": cfg["dims"], "depths": DEPTHS,
               "expand_ratio": cfg["expand"], "num_heads": NUM_HEADS, "patch_size": PATCH},
    )

    @register_model(info)
    def build(img_size: int = 256, num_classes: int = 1000) -> MobileViT:
        return MobileViT(variant, num_classes=num_classes)


for _variant in VARIANTS:
    _register(_variant)
