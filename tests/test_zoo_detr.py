"""DETR (spec section 9): shapes, counts, sine encoding, attention and whole-model parity with the
official formulation (``nn.MultiheadAttention``, sequence-first, -inf key padding), key layout, loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import edgevit
from edgevit.models.detr import (
    DETR,
    BasicBlock,
    FrozenBatchNorm2d,
    MultiheadAttention,
    ResNetBody,
    sine_position_encoding,
)
from edgevit.registry import count_macs, model_info


def _reference_sine(mask: torch.Tensor, f: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """The official PositionEmbeddingSine(normalize=True) as spec 9.1 states it (rank-5 stack form)."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(f, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / f)
    px, py = x[:, :, :, None] / dim_t, y[:, :, :, None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def _small_detr(img_size: int = 64) -> DETR:
    torch.manual_seed(0)
    model = DETR(ResNetBody(BasicBlock, (1, 1, 1, 1)), img_size=img_size, num_classes=5, num_queries=7,
                 dim=64, num_heads=8, ffn=96, enc_layers=2, dec_layers=2)
    with torch.no_grad():  # non-trivial frozen statistics, so the BN formula is exercised
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_shapes_and_box_range() -> None:
    torch.manual_seed(0)
    model = edgevit.create_model("detr_r18", img_size=128).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 128))
    assert list(out) == ["pred_logits", "pred_boxes"]
    assert out["pred_logits"].shape == (2, 100, 92) and out["pred_boxes"].shape == (2, 100, 4)
    assert 0 <= out["pred_boxes"].min() and out["pred_boxes"].max() <= 1


def test_param_and_mac_counts() -> None:
    info = model_info("detr_r50")
    assert info.params == pytest.approx(41.52e6, rel=0.01)  # spec 9.2 / 13 (frozen BN are buffers)
    assert (info.input_size, info.input_multiple, info.test_input_size) == (800, 32, 320)
    with torch.device("meta"):
        meta = edgevit.registry._REGISTRY["detr_r50"].build(img_size=800).eval()
    macs = count_macs(meta, torch.empty(1, 3, 800, 1199, device="meta"))
    assert macs / 1e9 == pytest.approx(91, rel=0.02)  # spec 9.2: 91 GMACs at 800x1199
    assert model_info("detr_r18").params < info.params


def test_precomputed_encoding_equals_formula() -> None:
    model = edgevit.create_model("detr_r18", img_size=320)
    side = 320 // 32
    ref = _reference_sine(torch.zeros(1, side, side, dtype=torch.bool))
    assert model.pos_cache.shape == (1, 256, side, side)
    torch.testing.assert_close(model.pos_cache, ref, rtol=0, atol=0)
    assert "pos_cache" not in model.state_dict()  # not part of the official layout


def test_rank4_sine_equals_stack_form_with_padding() -> None:
    mask = torch.zeros(2, 6, 9, dtype=torch.bool)
    mask[0, 4:, :] = True
    mask[1, :, 7:] = True
    torch.testing.assert_close(sine_position_encoding(mask), _reference_sine(mask), rtol=0, atol=0)


def test_frozen_bn_equals_batchnorm_eval() -> None:
    frozen, bn = FrozenBatchNorm2d(8), nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)


def test_attention_equals_nn_multihead_attention() -> None:
    torch.manual_seed(0)
    ours = MultiheadAttention(64, 8)
    nn.init.xavier_uniform_(ours.in_proj_weight)
    nn.init.normal_(ours.in_proj_bias, std=0.1)
    ref = nn.MultiheadAttention(64, 8)
    ref.load_state_dict(ours.state_dict())  # same key layout as the official checkpoint
    q, k, v = torch.randn(2, 5, 64), torch.randn(2, 11, 64), torch.randn(2, 11, 64)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 8:] = True
    bias = pad[:, None, None, :].float() * -1e4
    expect = ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), key_padding_mask=pad)[0].transpose(0, 1)
    torch.testing.assert_close(ours(q, k, v, bias), expect, rtol=1e-5, atol=1e-5)


def _official_forward(model: DETR, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spec 9.1 equations, sequence-first, with nn.MultiheadAttention and -inf key padding."""
    def mha(layer: MultiheadAttention) -> nn.MultiheadAttention:
        m = nn.MultiheadAttention(layer.dim, layer.num_heads).eval()
        m.load_state_dict(layer.state_dict())
        return m

    feat = model.backbone(x)
    m = F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
    pos = _reference_sine(m, model.num_pos_feats).flatten(2).permute(2, 0, 1)
    src = model.input_proj(feat).flatten(2).permute(2, 0, 1)
    kpm = m.flatten(1)
    for layer in model.transformer.encoder.layers:
        src2 = mha(layer.self_attn)(src + pos, src + pos, src, key_padding_mask=kpm)[0]
        src = layer.norm1(src + src2)
        src = layer.norm2(src + layer.linear2(F.relu(layer.linear1(src))))
    query_pos = model.query_embed.weight.unsqueeze(1).repeat(1, x.shape[0], 1)
    tgt = torch.zeros_like(query_pos)
    for layer in model.transformer.decoder.layers:
        tgt = layer.norm1(tgt + mha(layer.self_attn)(tgt + query_pos, tgt + query_pos, tgt)[0])
        tgt2 = mha(layer.multihead_attn)(tgt + query_pos, src + pos, src, key_padding_mask=kpm)[0]
        tgt = layer.norm2(tgt + tgt2)
        tgt = layer.norm3(tgt + layer.linear2(F.relu(layer.linear1(tgt))))
    hs = model.transformer.decoder.norm(tgt).transpose(0, 1)
    return {"pred_logits": model.class_embed(hs), "pred_boxes": model.bbox_embed(hs).sigmoid()}


@pytest.mark.parametrize("padded", [False, True])
def test_model_equals_official_formulation(padded: bool) -> None:
    model = _small_detr(64)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    if padded:
        mask[1, :, 32:] = True  # second image is 64x32, zero-padded on the right (NestedTensor)
        x[1, :, :, 32:] = 0
        assert F.interpolate(mask[None].float(), size=(2, 2))[0, 1, :, 1].all()  # a padded feature column
    with torch.no_grad():
        ours = model(x, mask) if padded else model(x)
        ref = _official_forward(model, x, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-5)


# Official checkpoint keys (spec 9.4), spelled out independently of the model code.
OFFICIAL_KEYS = [
    "backbone.0.body.conv1.weight", "backbone.0.body.bn1.running_var", "backbone.0.body.layer1.0.conv3.weight",
    "backbone.0.body.layer1.0.downsample.0.weight", "backbone.0.body.layer4.2.bn3.bias",
    "backbone.0.body.layer2.0.downsample.1.running_mean", "input_proj.weight", "input_proj.bias",
    "query_embed.weight", "transformer.encoder.layers.0.self_attn.in_proj_weight",
    "transformer.encoder.layers.5.self_attn.in_proj_bias", "transformer.encoder.layers.3.self_attn.out_proj.weight",
    "transformer.encoder.layers.0.linear1.weight", "transformer.encoder.layers.0.linear2.bias",
    "transformer.encoder.layers.0.norm1.weight", "transformer.encoder.layers.0.norm2.bias",
    "transformer.decoder.layers.0.self_attn.in_proj_weight", "transformer.decoder.layers.5.multihead_attn.in_proj_bias",
    "transformer.decoder.layers.2.multihead_attn.out_proj.bias", "transformer.decoder.layers.0.norm3.weight",
    "transformer.decoder.norm.weight", "class_embed.weight", "class_embed.bias", "bbox_embed.layers.0.weight",
    "bbox_embed.layers.2.bias",
]


def test_official_key_layout_and_shapes() -> None:
    with torch.device("meta"):
        state = edgevit.registry._REGISTRY["detr_r50"].build().state_dict()
    assert all(k in state for k in OFFICIAL_KEYS)
    assert not any(k.startswith(("transformer.encoder.norm", "backbone.0.body.fc")) for k in state)
    assert state["transformer.encoder.layers.0.self_attn.in_proj_weight"].shape == (768, 256)
    assert state["query_embed.weight"].shape == (100, 256) and state["class_embed.weight"].shape == (92, 256)
    assert state["input_proj.weight"].shape == (256, 2048, 1, 1)


def test_checkpoint_through_filter(tmp_path) -> None:
    torch.manual_seed(5)
    state = {k: v.clone() for k, v in edgevit.create_model("detr_r18", img_size=128).state_dict().items()}
    published = dict(state)
    for k in [k for k in state if k.endswith(".running_var")]:  # torchvision-trained backbones carry these
        published[k.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(0)
    save_file(published, str(tmp_path / "detr.safetensors"))
    loaded = edgevit.create_model("detr_r18", img_size=128, weights=tmp_path / "detr.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
