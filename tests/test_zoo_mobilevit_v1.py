"""MobileViT v1 (architectures.md section 2): sizes, counts, unfold/fold forms, timm key layout, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import edgevit
from edgevit.models.mobilevit_v1 import MobileVitBlock, fold_tokens, unfold_tokens
from edgevit.registry import model_info

# (params in millions, GMACs at 256), measured on timm (section 2.1; mobilevit_s from section 13).
REFERENCE = {
    "mobilevit_xxs": (1.27, 0.41),
    "mobilevit_xs": (2.32, 1.03),
    "mobilevit_s": (5.579, 2.001),
}


def test_family_lists_the_three_variants() -> None:
    assert edgevit.list_models("mobilevit_v1") == sorted(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_count(name: str) -> None:
    assert model_info(name).params / 1e6 == pytest.approx(REFERENCE[name][0], rel=0.01)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_macs(name: str) -> None:
    # The reference rounds to 2 decimals (0.41 for 0.407), hence 2%.
    assert model_info(name).macs / 1e9 == pytest.approx(REFERENCE[name][1], rel=0.02)


def test_metadata() -> None:
    info = model_info("mobilevit_xxs")
    assert (info.family, info.input_size, info.input_multiple) == ("mobilevit_v1", 256, 64)
    assert info.mean == (0, 0, 0) and info.std == (1, 1, 1) and "2110.02178" in info.paper


@pytest.mark.parametrize("size", [128, 96])  # 96: 3x3 last map, the patch-resize branch
def test_forward_shape(size: int) -> None:
    model = edgevit.create_model("mobilevit_xxs", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (1, 3, 6, 10)])
def test_unfold_equals_im2col(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    b, c, h, w = shape
    # ml-cvnets' PyTorch path: im2col (B, C*P, N) viewed as (B, C, P, N) -> one (N, C) sequence per (b, p).
    ref = F.unfold(x, kernel_size=2, stride=2).reshape(b, c, 4, -1).permute(0, 2, 3, 1).reshape(b * 4, -1, c)
    assert torch.equal(unfold_tokens(x, 2), ref)


def test_unfold_token_semantics() -> None:
    # Sequence (b, p) holds, for every patch n (row-major), the pixel at offset p inside that patch.
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = unfold_tokens(x, 2)
    b, p, n = 1, 3, 4  # offset p = (1, 1); patch n = (row 1, col 1)
    assert torch.equal(tokens[b * 4 + p, n], x[b, :, 2 * 1 + 1, 2 * 1 + 1])


@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (1, 3, 6, 10)])
def test_fold_inverts_unfold_and_equals_col2im(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    b, c, h, w = shape
    tokens = unfold_tokens(x, 2)
    assert torch.equal(fold_tokens(tokens, 2, (h, w)), x)
    cols = tokens.reshape(b, 4, -1, c).permute(0, 3, 1, 2).reshape(b, c * 4, -1)
    assert torch.equal(fold_tokens(tokens, 2, (h, w)), F.fold(cols, (h, w), kernel_size=2, stride=2))


def test_block_fuses_by_concatenation_without_residual() -> None:
    torch.manual_seed(0)
    block = MobileVitBlock(8, 16, depth=1).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        local = block.conv_1x1(block.conv_kxk(x))
        glob = fold_tokens(block.norm(block.transformer(unfold_tokens(local, 2))), 2, (6, 6))
        ref = block.conv_fusion(torch.cat((x, block.conv_proj(glob)), dim=1))
        torch.testing.assert_close(block(x), ref)


def test_transformer_layer_norm_and_mlp_follow_timm() -> None:
    layer = edgevit.create_model("mobilevit_xxs").stages[2][1].transformer[0]
    assert layer.norm1.eps == 1e-5 and isinstance(layer.mlp.act, torch.nn.SiLU)
    assert layer.mlp.fc1.out_features == 2 * 64 and layer.attn.num_heads == 4


def test_key_layout_is_timm_compatible() -> None:
    state = edgevit.create_model("mobilevit_xxs").state_dict()
    assert len(state) == 311  # timm mobilevit_xxs state dict, incl. BN buffers
    for key in ("stem.conv.weight", "stem.bn.running_var", "stages.0.0.conv1_1x1.conv.weight",
                "stages.1.2.conv3_1x1.bn.bias", "stages.2.0.conv2_kxk.conv.weight",
                "stages.2.1.conv_kxk.bn.weight", "stages.2.1.conv_1x1.weight",
                "stages.2.1.transformer.1.attn.qkv.weight", "stages.3.1.transformer.3.attn.proj.bias",
                "stages.4.1.transformer.2.mlp.fc2.bias", "stages.4.1.transformer.0.norm2.weight",
                "stages.4.1.norm.weight", "stages.4.1.conv_proj.conv.weight", "stages.4.1.conv_fusion.bn.weight",
                "final_conv.conv.weight", "head.fc.weight"):
        assert key in state, key
    assert state["stages.2.1.conv_fusion.conv.weight"].shape == (48, 96, 3, 3)
    assert state["final_conv.conv.weight"].shape == (320, 80, 1, 1)


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    source = edgevit.create_model("mobilevit_xxs").eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    model = edgevit.create_model("mobilevit_xxs", weights=tmp_path / "w.safetensors").eval()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    source.load_state_dict(state)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
