"""GLNet / GLMix (reference section 6): shapes, counts, key layout, and the exact-equivalence checks of
section 13 (averaging-matrix slot pool == adaptive_avg_pool2d; rank-4 attention == nn.MultiheadAttention;
a whole GLMix block == a direct restatement of section 6.1 with the reference's ops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import edgevit
from edgevit.models.glnet import (
    GLMixBlock,
    MHSABlockNCHW,
    PackedMultiheadAttention,
    SlotPool,
    adaptive_avg_pool2d_matmul,
    adaptive_pool_matrix,
)

# Reference section 6.3 (measured params / GMACs @224).
SPEC = {
    "glnet_stl": (30.3e6, 4.35),
    "glnet_stl_paramslot": (30.5e6, 4.35),
    "glnet_4g": (27.0e6, 4.48),
    "glnet_9g": (60.0e6, 9.59),
    "glnet_16g": (106.1e6, 16.6),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_params_and_macs_match_spec(name: str) -> None:
    info = edgevit.model_info(name)
    params, gmacs = SPEC[name]
    assert info.params == pytest.approx(params, rel=0.01)
    # The constant-matrix slot pool adds ~0.3% matmul MACs the reference's (uncounted) pooling did not.
    assert info.macs / 1e9 == pytest.approx(gmacs, rel=0.01)
    assert info.family == "glnet" and info.input_size == 224 and info.input_multiple == 32


def test_glnet_4g_exact_counts() -> None:
    info = edgevit.model_info("glnet_4g")
    assert info.params / 1e6 == pytest.approx(27.00, abs=0.01)
    assert info.macs / 1e9 == pytest.approx(4.48, abs=0.025)


@pytest.mark.parametrize("name", ["glnet_4g", "glnet_stl"])
def test_forward_shapes(name: str) -> None:
    torch.manual_seed(0)
    model = edgevit.create_model(name, img_size=64, num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [56, 28, 14, 7, 4])
def test_averaging_matrix_equals_adaptive_avg_pool2d(size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, size, size, dtype=torch.float64)
    p = adaptive_pool_matrix(size, 8, torch.float64)
    torch.testing.assert_close(adaptive_avg_pool2d_matmul(x, p, p), F.adaptive_avg_pool2d(x, 8), rtol=0, atol=1e-12)
    x32 = x.float()
    p32 = adaptive_pool_matrix(size, 8)
    torch.testing.assert_close(adaptive_avg_pool2d_matmul(x32, p32, p32), F.adaptive_avg_pool2d(x32, 8),
                               rtol=1e-6, atol=1e-6)


def test_averaging_matrix_rows_are_pytorch_bins() -> None:
    # 14 -> 8: bins overlap (non-integer ratio); each row sums to 1 over [floor(i n/o), ceil((i+1) n/o)).
    p = adaptive_pool_matrix(14, 8)
    assert torch.allclose(p.sum(1), torch.ones(8))
    assert p[0].nonzero().flatten().tolist() == [0, 1]
    assert p[1].nonzero().flatten().tolist() == [1, 2, 3]


def test_slot_pool_native_and_other_sizes() -> None:
    torch.manual_seed(0)
    pool = SlotPool(8, feat_size=28)
    for size in (28, 20):  # native buffers, then matrices built for another input size
        x = torch.randn(1, 8, size, size)
        ref = F.adaptive_avg_pool2d(x, 8).permute(0, 2, 3, 1).flatten(1, 2)
        torch.testing.assert_close(pool(x), ref, rtol=1e-6, atol=1e-6)
    assert not pool.state_dict()  # constants, not checkpoint keys


def test_rank4_attention_equals_nn_multihead_attention() -> None:
    torch.manual_seed(0)
    ours = PackedMultiheadAttention(64, 2).eval()
    ref = nn.MultiheadAttention(64, 2, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # same keys: in_proj_weight/bias, out_proj.*
    x = torch.randn(2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


class _RefGLMix(nn.Module):
    """Section 6.1 restated with the reference's ops (adaptive pool, nn.MultiheadAttention)."""

    def __init__(self, block: GLMixBlock, dim: int, heads: int) -> None:
        super().__init__()
        self.b = block
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mha.load_state_dict(block.relation_mha.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.b
        s0 = F.adaptive_avg_pool2d(x, 8).permute(0, 2, 3, 1).flatten(1, 2)
        x = x + b.pos_conv(x)
        xn = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), b.norm1.weight, b.norm1.bias, 1e-6).permute(0, 3, 1, 2)
        f = xn.permute(0, 2, 3, 1).flatten(1, 2)
        logits = F.normalize(s0, dim=-1) @ (b.slot_scale * F.normalize(f, dim=-1).transpose(-1, -2))
        slots = torch.softmax(logits, -1) @ f
        slots = self.mha(slots, slots, slots, need_weights=False)[0]
        g = (torch.softmax(logits.transpose(-1, -2), -1) @ slots).permute(0, 2, 1).reshape_as(x)
        x = x + b.ls1(g + b.feature_conv(xn))
        return x + b.ls2(b.mlp(b.norm2(x)))


@pytest.mark.parametrize("size", [14, 28])
def test_glmix_block_equals_reference_restatement(size: int) -> None:
    torch.manual_seed(0)
    block = GLMixBlock(64, 2, feat_size=size, mlp_ratio=3, cpe_ks=3, mlp_dw=True, layerscale=0.5).eval()
    for name, p in block.named_parameters():  # non-trivial norms / biases so every term matters
        if name.endswith("weight") and p.dim() == 1:
            nn.init.uniform_(p, 0.5, 1.5)
        elif name != "slot_scale":
            nn.init.normal_(p, std=0.2)
    ref = _RefGLMix(block, 64, 2).eval()
    x = torch.randn(2, 64, size, size)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref(x), rtol=1e-5, atol=1e-5)


def test_blocks_export_at_rank_4_without_adaptive_pool() -> None:
    torch.manual_seed(0)
    for block, x in ((GLMixBlock(64, 2, feat_size=14, cpe_ks=3, mlp_dw=True), torch.randn(1, 64, 14, 14)),
                     (MHSABlockNCHW(64, 2, cpe_ks=3, mlp_dw=True), torch.randn(1, 64, 7, 7))):
        graph = torch.export.export(block.eval(), (x,), strict=False).graph
        ranks = [len(n.meta["val"].shape) for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        assert max(ranks) <= 4
        assert not [n for n in graph.nodes if "adaptive" in str(n.target)]
        softmaxes = [n for n in graph.nodes if "softmax" in str(n.target)]
        assert all(n.args[1] in (-1, len(n.meta["val"].shape) - 1) for n in softmaxes)


def test_key_layout_is_the_official_one() -> None:
    keys = set(edgevit.create_model("glnet_4g", img_size=64).state_dict())
    for key in ("downsample_layers.0.1.weight", "downsample_layers.0.5.running_var", "downsample_layers.3.0.weight",
                "stages.0.blocks.0.slot_scale", "stages.0.blocks.0.pos_conv.weight", "stages.0.blocks.0.norm1.weight",
                "stages.0.blocks.0.relation_mha.in_proj_weight", "stages.0.blocks.0.relation_mha.in_proj_bias",
                "stages.0.blocks.0.relation_mha.out_proj.weight", "stages.0.blocks.0.feature_conv.1.weight",
                "stages.0.blocks.0.mlp.1.weight", "stages.0.blocks.0.mlp.3.bias",
                "stages.2.blocks.1.mha_op.in_proj_weight",
                "stages.3.blocks.3.mlp.0.weight", "norm.running_mean", "head.weight"):
        assert key in keys, key
    stl = set(edgevit.create_model("glnet_stl", img_size=64).state_dict())
    for key in ("downsample_layers.0.0.weight", "downsample_layers.1.0.running_var", "downsample_layers.1.1.weight",
                "stages.3.blocks.1.mha_op.out_proj.bias", "stages.3.blocks.1.mlp.2.weight",
                "stages.2.blocks.5.norm2.bias"):
        assert key in stl, key
    g16 = edgevit.create_model("glnet_16g", img_size=64).state_dict()
    assert g16["stages.0.blocks.0.ls1.gamma"].shape == (1, 128, 1, 1)
    assert g16["stages.3.blocks.0.ls1.gamma"].shape == (1024,)


def test_checkpoint_in_official_layout_loads(tmp_path) -> None:
    torch.manual_seed(0)
    src = edgevit.create_model("glnet_stl", img_size=64).eval()
    path = tmp_path / "glnet_stl.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = edgevit.create_model("glnet_stl", img_size=64, weights=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x))
