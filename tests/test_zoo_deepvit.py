"""DeepViT (architectures.md section 7): counts, re-attention equations, the BN fold, key layout, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import edgevit
from edgevit.models.deepvit import DeepVisionTransformer, ReAttention
from edgevit.registry import model_info
from edgevit.weights import load_weights

# (params in millions, GMACs @224) of the official code, random init (section 7.2).
REFERENCE = {"deepvit_16": (24.43, 5.27), "deepvit_24": (36.26, 7.88), "deepvit_32": (48.10, 10.49)}


def _randomise_bn(attn: ReAttention) -> None:
    """Non-trivial BN statistics and affine, as a trained checkpoint has."""
    bn = attn.var_norm
    with torch.no_grad():
        bn.running_mean.uniform_(-0.05, 0.05)
        bn.running_var.uniform_(0.01, 0.1)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.1, 0.1)


def _folded_head_mixing(attn: ReAttention, maps: torch.Tensor) -> torch.Tensor:
    """Section 7.1 inference fold: A'[g] = sum_h W'[g, h] A[h] + b'[g], one matmul over a (B, h, N*N) view."""
    bn, conv = attn.var_norm, attn.reatten_matrix
    inv_std = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = inv_std[:, None] * conv.weight[:, :, 0, 0] * attn.reatten_scale
    bias = ((conv.bias - bn.running_mean) * inv_std + bn.bias) * attn.reatten_scale
    b, h, n, m = maps.shape
    return (weight @ maps.reshape(b, h, n * m) + bias[:, None]).reshape(b, h, n, m)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_params_and_macs_match_the_official_code(name: str) -> None:
    params_m, gmacs = REFERENCE[name]
    info = model_info(name)
    assert info.params / 1e6 == pytest.approx(params_m, rel=0.01)
    assert info.macs / 1e9 == pytest.approx(gmacs, rel=0.01)
    assert info.family == "deepvit" and "2103.11886" in info.paper


def test_forward_shape_and_alias() -> None:
    assert edgevit.list_models("deepvit") == ["deepvit_16", "deepvit_24", "deepvit_32"]
    model = edgevit.create_model("deepvit_patch16_224_re_attn_16b", img_size=32, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("transform_scale", [False, True])
def test_bn_folded_head_mixing_equals_conv1x1_bn(transform_scale: bool) -> None:
    torch.manual_seed(0)
    attn = ReAttention(48, num_heads=4, transform_scale=transform_scale).eval()
    _randomise_bn(attn)
    maps = torch.randn(2, 4, 9, 9).softmax(dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(_folded_head_mixing(attn, maps), attn.reattend(maps), rtol=1e-5, atol=1e-6)
        # ... and is a drop-in replacement for the whole attention layer.
        x = torch.randn(2, 9, 48)
        reference = attn(x)
        attn.reattend = lambda a: _folded_head_mixing(attn, a)  # type: ignore[method-assign]
        torch.testing.assert_close(attn(x), reference, rtol=1e-5, atol=1e-6)


def test_reattention_matches_the_paper_on_the_fused_qkv_layout() -> None:
    # Norm(Theta^T softmax(QK^T / sqrt(d))) V with the official (B, N, 3, h, hd) qkv split (rank 5).
    torch.manual_seed(0)
    attn = ReAttention(48, num_heads=4).eval()
    _randomise_bn(attn)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 7, 3, 4, 12).permute(2, 0, 3, 1, 4)
        maps = (q @ k.transpose(-2, -1) / 12**0.5).softmax(dim=-1)
        theta = attn.reatten_matrix.weight[:, :, 0, 0]
        mixed = (theta @ maps.reshape(2, 4, 49)).reshape(2, 4, 7, 7) + attn.reatten_matrix.bias[:, None, None]
        bn = attn.var_norm
        normed = F.batch_norm(mixed, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        ref = attn.proj((normed @ v).transpose(1, 2).reshape(2, 7, 48))
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_attention_maps_are_not_renormalised() -> None:
    torch.manual_seed(0)
    attn = ReAttention(48, num_heads=4).eval()
    _randomise_bn(attn)
    rows = attn.reattend(torch.randn(1, 4, 5, 5).softmax(dim=-1)).sum(-1)
    assert not torch.allclose(rows, torch.ones_like(rows), atol=1e-3)


def test_tensors_stay_rank_4(max_rank) -> None:
    model = DeepVisionTransformer(img_size=32, embed_dim=48, depth=2, num_heads=4, num_classes=10).eval()
    assert max_rank(model, torch.rand(1, 3, 32, 32)) <= 4


def test_official_key_layout() -> None:
    keys = set(DeepVisionTransformer(img_size=32, embed_dim=48, depth=2, num_heads=4).state_dict())
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.norm1.weight",
                "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias", "blocks.1.attn.reatten_matrix.weight",
                "blocks.1.attn.reatten_matrix.bias", "blocks.1.attn.var_norm.weight",
                "blocks.1.attn.var_norm.running_var", "blocks.1.attn.proj.bias", "blocks.1.mlp.fc1.weight",
                "blocks.1.mlp.fc2.bias", "norm.weight", "head.weight"):
        assert key in keys


def test_safetensors_checkpoint_loads(tmp_path) -> None:
    # A reduced-width model keeps the file small; the layout is the registered models' one.
    torch.manual_seed(1)
    source = DeepVisionTransformer(img_size=32, embed_dim=48, depth=2, num_heads=4, num_classes=10)
    for block in source.blocks:
        _randomise_bn(block.attn)
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "deepvit.safetensors"))
    model = load_weights(DeepVisionTransformer(img_size=32, embed_dim=48, depth=2, num_heads=4, num_classes=10),
                         tmp_path / "deepvit.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source.eval()(x))
