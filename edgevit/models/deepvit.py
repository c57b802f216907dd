"""DeepViT (Zhou et al., arXiv 2103.11886): deeper ViTs through Re-attention.

A plain pre-norm ViT (LayerNorm eps 1e-6, fused ``qkv`` with bias, exact-GELU MLP of ratio 3) whose
attention maps are mixed across heads before they weight the values (reference section 7.1):

    A  = softmax(q k^T * hd^-0.5)                       (B, h, N, N)
    A' = BatchNorm2d_h(Conv1x1_{h->h}(A)) * s            heads as channels; A' is not re-normalised
    out = proj(merge_heads(A' v))

Structure and key names follow the official repository (``zhoudaquan/dvit_repo``,
``models/deep_vision_transformer.py`` and ``models/layers.py: ReAttention``): ``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.i.{norm1, attn.{qkv, reatten_matrix, var_norm, proj}, norm2,
mlp.{fc1, fc2}}``, ``norm``, ``head`` -- so its checkpoints load without a key mapping.

Registered: the "basic recipe" models DeepViT-16/24/32 (``deepvit_patch16_224_re_attn_{16,24,32}b``:
D=384, 12 heads, every block re-attends, s = 1). The CNN-stem ``deepvit_S``/``deepvit_L`` (partial
re-attention, ``transform_scale``, residual ``scale_adjustment``) are not registered.

Export note (reference section 0.1): the faithful BatchNorm on attention maps is kept. In eval mode it
is a per-head affine, so Conv1x1 + BN folds exactly into one (h x h) head-mixing matmul plus bias over a
(B, h, N*N) view; that fold is left to the later op-substitution pass (tests/test_zoo_deepvit.py checks
the folded form against this one).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from edgevit.models.layers import Mlp, MultiHeadSelfAttention
from edgevit.models.vit import VisionTransformer
from edgevit.registry import ModelInfo, register_model

_PAPER = "DeepViT: Towards Deeper Vision Transformer (arXiv 2103.11886)"


class ReAttention(MultiHeadSelfAttention):
    """Multi-head self-attention with a learnable head-mixing matrix and BatchNorm on the maps.

    ``qkv``/``proj`` and the rank-4 head split come from ``layers.MultiHeadSelfAttention`` (q, k, v are
    sliced from the fused output instead of the reference's (B, N, 3, h, hd) rank-5 pattern).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, transform_scale: bool = False) -> None:
        super().__init__(dim, num_heads, qkv_bias)
        # s of section 7.1: the official ``reatten_scale`` (head_dim^-0.5 only with transform_scale).
        self.reatten_scale = self.scale if transform_scale else 1.0
        # Theta of the paper: a 1x1 convolution over the head axis, with bias (official layers.py).
        self.reatten_matrix = nn.Conv2d(num_heads, num_heads, 1)
        # The official Norm(.) is BatchNorm over (B, N, N) per head.
        self.var_norm = nn.BatchNorm2d(num_heads)

    def reattend(self, attn: torch.Tensor) -> torch.Tensor:
        """Re-attention of softmax maps (B, h, N, N): BN(Conv1x1(A)) * s, heads as channels."""
        return self.var_norm(self.reatten_matrix(attn)) * self.reatten_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        # Scale after the product, as the official ReAttention does.
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        attn = self.reattend(attn)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm block with re-attention: x + ReAttn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, transform_scale: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReAttention(dim, num_heads, transform_scale=transform_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DeepVisionTransformer(VisionTransformer):
    """Class-token ViT whose every block uses re-attention (DeepViT-16/24/32 of the official code).

    Everything but the block is the ViT of vit.py (same keys, init and forward), as in the official code.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 12,
        mlp_ratio: float = 3.0,
        num_classes: int = 1000,
        transform_scale: bool = False,
    ) -> None:
        block = partial(Block, transform_scale=transform_scale)
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, num_classes, block)


def _register(depth: int) -> None:
    info = ModelInfo(
        name=f"deepvit_{depth}",
        family="deepvit",
        paper=_PAPER,
        input_size=224,
        input_multiple=16,
        # The basic-recipe models were trained DeiT-style: ImageNet mean/std (registry default).
        aliases=(f"deepvit_patch16_224_re_attn_{depth}b",),
        # 24-48 M parameters and 5-10 GMACs at 224: the CI export matrix uses 112 (50 tokens).
        test_input_size=112,
        extra={"embed_dim": 384, "depth": depth, "num_heads": 12, "mlp_ratio": 3.0, "patch_size": 16,
               "reattention_blocks": "all"},
    )

    @register_model(info)
    def build(img_size: int = 224, num_classes: int = 1000) -> DeepVisionTransformer:
        return DeepVisionTransformer(img_size, 16, 384, depth, 12, 3.0, num_classes=num_classes)


for _depth in (16, 24, 32):
    _register(_depth)
