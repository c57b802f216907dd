"""Layer-level equivalences: the implementation's forms against the papers' reference forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import edgevit
from edgevit.models.layers import MultiHeadSelfAttention
from edgevit.models.mobilevit_v2 import LinearSelfAttention, fold_patches, unfold_patches


def test_unfold_equals_im2col_and_one_hot_conv() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 16)
    b, c, h, w = x.shape
    ours = unfold_patches(x, 2)
    im2col = F.unfold(x, kernel_size=2, stride=2).reshape(b, c, 4, -1)  # ml-cvnets' PyTorch path
    one_hot = torch.eye(4).reshape(4, 1, 2, 2).repeat(c, 1, 1, 1)  # ml-cvnets' Core ML path
    conv = F.conv2d(x, one_hot, stride=2, groups=c).reshape(b, c, 4, -1)
    assert torch.equal(ours, im2col)
    assert torch.equal(ours, conv)


def test_fold_inverts_unfold_and_equals_col2im() -> None:
    x = torch.randn(1, 5, 8, 6)
    patches = unfold_patches(x, 2)
    assert torch.equal(fold_patches(patches, 2, (8, 6)), x)
    col2im = F.fold(patches.reshape(1, 5 * 4, -1), output_size=(8, 6), kernel_size=2, stride=2)
    assert torch.equal(fold_patches(patches, 2, (8, 6)), col2im)


def test_rank4_attention_equals_sdpa_on_fused_qkv() -> None:
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(48, num_heads=3).eval()
    x = torch.randn(2, 7, 48)
    # The reference (timm) layout: qkv -> (B, N, 3, H, hd) -> (3, B, H, N, hd), rank 5.
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 3, 16).permute(2, 0, 3, 1, 4)
    ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 7, 48))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_separable_attention_matches_paper_equation() -> None:
    torch.manual_seed(0)
    layer = LinearSelfAttention(6).eval()
    x = torch.randn(1, 6, 4, 9)
    qkv = layer.qkv_proj(x)
    q, k, v = qkv[:, :1], qkv[:, 1:7], qkv[:, 7:]
    scores = torch.exp(q) / torch.exp(q).sum(-1, keepdim=True)
    context = (k * scores).sum(-1, keepdim=True).expand_as(v)
    torch.testing.assert_close(layer(x), layer.out_proj(torch.relu(v) * context))


def test_mobilevit_v2_resizes_maps_the_patch_does_not_divide() -> None:
    model = edgevit.create_model("mobilevit_v2_050").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 1000)  # 7x7 maps at the last stage


def test_vit_key_layout_is_timm_compatible() -> None:
    keys = set(edgevit.create_model("deit_tiny").state_dict())
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                "blocks.11.mlp.fc2.bias", "norm.weight", "head.bias"):
        assert key in keys


def test_mobilevit_v2_key_layout_is_timm_compatible() -> None:
    keys = set(edgevit.create_model("mobilevit_v2_050").state_dict())
    for key in ("stem.conv.weight", "stem.bn.running_var", "stages.0.0.conv1_1x1.conv.weight",
                "stages.2.1.conv_kxk.bn.weight", "stages.2.1.conv_1x1.weight",
                "stages.2.1.transformer.0.attn.qkv_proj.weight", "stages.4.1.transformer.2.mlp.fc2.bias",
                "stages.4.1.norm.weight", "stages.4.1.conv_proj.conv.weight", "head.fc.weight"):
        assert key in keys
