"""NaViT (spec section 8): shapes, counts, packed == one-image-at-a-time, exportable packed wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import edgevit
from edgevit.models.navit import MASK_VALUE, NaViTPacked, pack_images, patchify

# Images of different sizes and aspect ratios (sides multiples of p=16).
SIZES = [(64, 96), (128, 32), (48, 48), (16, 80), (96, 64)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return edgevit.create_model("navit_tiny").eval()


def _images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(3, h, w, generator=gen) for h, w in SIZES]


def test_single_image_shapes_any_aspect_ratio(model) -> None:
    with torch.no_grad():
        assert model(torch.rand(2, 3, 224, 224)).shape == (2, 1000)
        assert model(torch.rand(1, 3, 64, 160)).shape == (1, 1000)


def test_param_and_mac_counts() -> None:
    # No NaViT-specific sizes exist (spec 8.1b): ViT-Ti/S minus the 1-D table and class token, plus two
    # factorised 64-row tables -- within 1% of DeiT-Ti's 5.717 M / 1.254 GMACs (spec 13).
    tiny, small = edgevit.model_info("navit_tiny"), edgevit.model_info("navit_small")
    assert tiny.params == pytest.approx(5.717e6, rel=0.01)
    assert tiny.params == edgevit.model_info("deit_tiny").params - 197 * 192 - 192 + 2 * 64 * 192
    assert small.params == edgevit.model_info("deit_small").params - 197 * 384 - 384 + 2 * 64 * 384
    assert tiny.macs / 1e9 == pytest.approx(1.254, rel=0.02)
    assert (tiny.input_size, tiny.input_multiple, tiny.family) == (224, 16, "navit")


@pytest.mark.parametrize("seq_len", [None, 40])
def test_packed_equals_each_image_alone(model, seq_len) -> None:
    images = _images()
    with torch.no_grad():
        alone = torch.cat([model(img.unsqueeze(0)) for img in images])
        packed = model.forward_packed(images, seq_len=seq_len)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_packing_layout_and_padding() -> None:
    packed = pack_images(_images(), 16, seq_len=40)
    lengths = [(h // 16) * (w // 16) for h, w in SIZES]  # 24, 16, 9, 5, 24
    assert packed.patches.shape == (2, 40, 3 * 16 * 16) and packed.max_images == 3
    assert packed.index == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]  # greedy: 24+16 | 9+5+24 (+2 pad)
    assert (packed.image_ids == -1).sum() == 2 * 40 - sum(lengths)
    assert packed.rows[0, :24].tolist() == [r for r in range(4) for _ in range(6)]
    assert packed.cols[0, :6].tolist() == list(range(6))


def test_other_images_do_not_leak(model) -> None:
    images = _images()
    changed = [images[0], torch.randn_like(images[1]) * 5, *images[2:]]
    with torch.no_grad():
        a = model.forward_packed(images)
        b = model.forward_packed(changed)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    assert not torch.allclose(a[1], b[1])


def test_patch_linear_equals_conv_and_position_gather_equals_slices(model) -> None:
    img = torch.randn(3, 48, 80)
    patches, rows, cols = patchify(img, 16)
    conv = model.patch_embed(img.unsqueeze(0))[0]
    torch.testing.assert_close(model.patch_embed.linear(patches), conv, rtol=0, atol=1e-5)
    sliced = (model.pos_embed_h[:3].unsqueeze(1) + model.pos_embed_w[:5].unsqueeze(0)).reshape(15, -1)
    assert torch.equal(F.embedding(rows, model.pos_embed_h) + F.embedding(cols, model.pos_embed_w), sliced)


def test_mask_is_finite_in_fp16() -> None:
    assert torch.isfinite(torch.tensor(MASK_VALUE, dtype=torch.float16))
    assert torch.exp(torch.tensor(MASK_VALUE + 100.0)) == 0  # a masked score contributes exactly 0


def test_packed_wrapper_is_captured_by_torch_export(model) -> None:
    images = _images()[:3]
    packed = pack_images(images, 16, seq_len=64, max_images=3)
    wrapper = NaViTPacked(model, max_images=3).eval()
    with torch.no_grad():
        program = torch.export.export(wrapper, packed.tensors(), strict=False)
        out = program.module()(*packed.tensors())
        alone = torch.cat([model(img.unsqueeze(0)) for img in images])
    assert out.shape == (1, 3, 1000)
    torch.testing.assert_close(out[0], alone, rtol=0, atol=1e-5)


def test_checkpoint_round_trip_and_timm_style_keys(tmp_path) -> None:
    torch.manual_seed(3)
    state = {k: v.clone() for k, v in edgevit.create_model("navit_tiny").state_dict().items()}
    for key in ("patch_embed.proj.weight", "pos_embed_h", "pos_embed_w", "blocks.0.attn.qkv.weight",
                "blocks.11.mlp.fc2.bias", "norm.weight", "head.bias"):
        assert key in state
    save_file(state, str(tmp_path / "navit.safetensors"))
    loaded = edgevit.create_model("navit_tiny", weights=tmp_path / "navit.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
