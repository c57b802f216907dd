"""ViT (Dosovitskiy et al., arXiv 2010.11929) and DeiT (Touvron et al., arXiv 2012.12877).

Pre-norm encoder blocks, learned 1-D position embedding, class token, exact (erf) GELU, LayerNorm eps
1e-6 (DeiT/timm). Key layout equals timm's ``VisionTransformer`` so ``deit_*``/``vit_*`` checkpoints load
as they are.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from edgevit.models.layers import Mlp, MultiHeadSelfAttention, init_transformer_weights
from edgevit.registry import ModelInfo, register_model

_VIT_PAPER = "An Image is Worth 16x16 Words (arXiv 2010.11929)"
_DEIT_PAPER = "Training data-efficient image transformers (arXiv 2012.12877)"


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a stride-p convolution, flattened to (B, N, D)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Class-token ViT classifier for square ``img_size`` inputs."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        block_layer: Callable[[int, int, float], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        block_layer = block_layer or Block  # variants (DeepViT) swap the block, keep the rest
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch size {patch_size}")
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[block_layer(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        init_transformer_weights(self, self.pos_embed, self.cls_token)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])


def _vit_variant(name: str, paper: str, dim: int, depth: int, heads: int, std: tuple, aliases=()) -> None:
    info = ModelInfo(
        name=name,
        family="vit",
        paper=paper,
        input_size=224,
        input_multiple=16,
        mean=(0.5, 0.5, 0.5) if std == (0.5, 0.5, 0.5) else (0.485, 0.456, 0.406),
        std=std,
        aliases=aliases,
        extra={"embed_dim": dim, "depth": depth, "num_heads": heads, "patch_size": 16},
    )

    @register_model(info)
    def build(img_size: int = 224, num_classes: int = 1000) -> VisionTransformer:
        return VisionTransformer(img_size, 16, dim, depth, heads, num_classes=num_classes)


_IMAGENET_STD = (0.229, 0.224, 0.225)
_vit_variant("deit_tiny", _DEIT_PAPER, 192, 12, 3, _IMAGENET_STD, aliases=("deit_tiny_patch16_224",))
_vit_variant("deit_small", _DEIT_PAPER, 384, 12, 6, _IMAGENET_STD, aliases=("deit_small_patch16_224",))
# augreg ViT weights use mean = std = 0.5 (reference section 1.4).
_vit_variant("vit_base_patch16", _VIT_PAPER, 768, 12, 12, (0.5, 0.5, 0.5), aliases=("vit_base_patch16_224",))
