"""EfficientViT-M (architectures.md section 4): counts, window partition, bias index, BN fold, key mapping."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import edgevit
from edgevit.models.efficientvit import (
    ConvNorm,
    LocalWindowAttention,
    NormLinear,
    attention_bias_index,
    checkpoint_filter,
    window_partition,
    window_reverse,
)
from edgevit.registry import model_info

# (params in millions, GMACs at 224), measured on timm (section 4.2; m0 to 4 digits from section 13).
REFERENCE = {
    "efficientvit_m0": (2.349, 0.079),
    "efficientvit_m1": (2.98, 0.167),
    "efficientvit_m2": (4.19, 0.201),
    "efficientvit_m3": (6.90, 0.263),
    "efficientvit_m4": (8.80, 0.299),
    "efficientvit_m5": (12.47, 0.522),
}


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affines and bias tables (the reference zero-inits several BN gammas)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if hasattr(m, "attention_biases"):
                m.attention_biases.copy_(torch.randn(m.attention_biases.shape, generator=g))
    return model


def test_family_lists_the_six_variants() -> None:
    assert edgevit.list_models("efficientvit") == sorted(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_count(name: str) -> None:
    assert model_info(name).params / 1e6 == pytest.approx(REFERENCE[name][0], rel=0.01)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_macs(name: str) -> None:
    assert model_info(name).macs / 1e9 == pytest.approx(REFERENCE[name][1], rel=0.02)


def test_metadata() -> None:
    info = model_info("efficientvit_m0")
    assert (info.family, info.input_size, info.input_multiple) == ("efficientvit", 224, 16)
    assert info.mean == (0.485, 0.456, 0.406) and "2305.07027" in info.paper
    assert info.checkpoint_filter is checkpoint_filter


@pytest.mark.parametrize("size", [224, 160])  # 160: 10x10 stage-1 map, padded to 2x2 windows of 7
def test_forward_shape(size: int) -> None:
    model = edgevit.create_model("efficientvit_m0", img_size=size, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, size, size)).shape == (1, 5)


@pytest.mark.parametrize("shape", [(2, 3, 14, 14), (1, 4, 21, 14)])
def test_window_partition_equals_rank6_reference(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    b, c, h, w = shape
    nh, nw = h // 7, w // 7
    # Official form: BHWC, view (B, nH, 7, nW, 7, C) -- rank 6 -- transpose, merge windows into the batch.
    ref = x.permute(0, 2, 3, 1).reshape(b, nh, 7, nw, 7, c).transpose(2, 3).reshape(b * nh * nw, 7, 7, c)
    ref = ref.permute(0, 3, 1, 2)
    windows = window_partition(x, 7)
    assert torch.equal(windows, ref)
    back = ref.permute(0, 2, 3, 1).reshape(b, nh, nw, 7, 7, c).transpose(2, 3).reshape(b, h, w, c)
    assert torch.equal(window_reverse(windows, 7, (h, w)), back.permute(0, 3, 1, 2))
    assert torch.equal(window_reverse(windows, 7, (h, w)), x)


def test_padded_window_attention_matches_reference_form() -> None:
    torch.manual_seed(0)
    layer = _randomise(LocalWindowAttention(32, 16, 2, resolution=10, kernels=(5, 5))).eval()
    x = torch.randn(1, 32, 10, 10)
    # Reference: pad bottom/right in BHWC, rank-6 partition, attention per window, reverse, crop.
    t = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, 4, 0, 4))
    t = t.reshape(1, 2, 7, 2, 7, 32).transpose(2, 3).reshape(4, 7, 7, 32).permute(0, 3, 1, 2)
    with torch.no_grad():
        t = layer.attn(t)
        ref = t.permute(0, 2, 3, 1).reshape(1, 2, 2, 7, 7, 32).transpose(2, 3).reshape(1, 14, 14, 32)
        torch.testing.assert_close(layer(x), ref[:, :10, :10].permute(0, 3, 1, 2))


@pytest.mark.parametrize("resolution", [4, 7])
def test_bias_index_equals_offset_dictionary(resolution: int) -> None:
    # LeViT/official construction: number the offsets (|dr|, |dc|) in order of first appearance.
    points = list(itertools.product(range(resolution), range(resolution)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1, p2 in itertools.product(points, points):
        off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
        idxs.append(offsets.setdefault(off, len(offsets)))
    ref = torch.tensor(idxs).reshape(len(points), len(points))
    assert len(offsets) == resolution**2
    assert torch.equal(attention_bias_index(resolution), ref)


def test_bias_gather_equals_advanced_indexing() -> None:
    attn = _randomise(edgevit.create_model("efficientvit_m0")).stages[2].blocks[0].mixer.m.attn
    assert attn.attention_biases.shape == (4, 16)  # 4x4 map: whole-map attention, 16 offsets
    assert torch.equal(attn.attention_bias(), attn.attention_biases[:, attn.attention_bias_idxs])


def _fold_bn(model: nn.Module) -> nn.Module:
    """Fold every Conv+BN into a biased conv and the head's BN1d into its Linear (the deployment form)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ConvNorm):
                conv, bn = m.conv, m.bn
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                  conv.padding, groups=conv.groups, bias=True)
                fused.weight.copy_(conv.weight * scale[:, None, None, None])
                fused.bias.copy_(bn.bias - bn.running_mean * scale)
                m.conv, m.bn = fused, nn.Identity()
            elif isinstance(m, NormLinear):
                bn, lin = m.bn, m.linear
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                shift = bn.bias - bn.running_mean * scale
                lin.bias.copy_(lin.bias + lin.weight @ shift)
                lin.weight.copy_(lin.weight * scale[None, :])
                m.bn = nn.Identity()
    return model


def test_bn_folded_model_equals_unfolded() -> None:
    model = _randomise(edgevit.create_model("efficientvit_m0")).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        folded = _fold_bn(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), ref, rtol=0, atol=1e-4)


def test_key_layout_is_timm_compatible() -> None:
    state = edgevit.create_model("efficientvit_m0").state_dict()
    assert len(state) == 693  # timm efficientvit_m0 state dict (no attention_bias_idxs)
    assert not any(k.endswith("attention_bias_idxs") for k in state)
    for key in ("patch_embed.conv1.conv.weight", "patch_embed.conv4.bn.running_var",
                "stages.0.blocks.0.dw0.m.conv.weight", "stages.0.blocks.0.ffn0.m.pw2.bn.weight",
                "stages.0.blocks.0.mixer.m.attn.attention_biases", "stages.0.blocks.0.mixer.m.attn.qkvs.3.conv.weight",
                "stages.0.blocks.0.mixer.m.attn.dws.0.bn.bias", "stages.0.blocks.0.mixer.m.attn.proj.1.conv.weight",
                "stages.1.downsample.res1.0.m.conv.weight", "stages.1.downsample.res1.1.m.pw1.conv.weight",
                "stages.1.downsample.patchmerge.se.fc1.bias", "stages.2.downsample.patchmerge.conv3.bn.weight",
                "stages.2.downsample.res2.1.m.pw2.conv.weight", "stages.2.blocks.2.ffn1.m.pw1.bn.bias",
                "head.bn.running_mean", "head.linear.weight"):
        assert key in state, key
    assert state["stages.0.blocks.0.mixer.m.attn.attention_biases"].shape == (4, 49)
    assert state["stages.1.downsample.patchmerge.se.fc1.weight"].shape == (64, 256, 1, 1)


def _timm_to_official(key: str) -> str:
    """Independent inverse of the filter (section 4.4 renames), used to write an official-layout file."""
    parts = key.split(".")
    if parts[0] == "patch_embed":
        parts[1] = str(2 * (int(parts[1][-1]) - 1))
    elif parts[0] == "stages":
        stage = int(parts[1])
        if parts[2] == "downsample":
            index = {"res1": 0, "patchmerge": 1, "res2": 2}[parts[3]]
        else:
            index = int(parts[3]) + (3 if stage > 0 else 0)
        parts = [f"blocks{stage + 1}", str(index)] + parts[4:]
    return ".".join({"conv": "c", "linear": "l"}.get(p, p) for p in parts)


def _official_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {_timm_to_official(k): v.clone() for k, v in model.state_dict().items()}
    for name, buf in model.named_buffers():
        if name.endswith("attention_bias_idxs"):  # the official repo keeps the index in its state dict
            state[_timm_to_official(name)] = buf.clone()
    return state


def test_official_layout_names() -> None:
    state = _official_state(edgevit.create_model("efficientvit_m0"))
    for key in ("patch_embed.0.c.weight", "patch_embed.6.bn.weight", "blocks1.0.mixer.m.attn.qkvs.0.c.weight",
                "blocks1.0.mixer.m.attn.attention_bias_idxs", "blocks2.0.0.m.c.weight",
                "blocks2.1.conv1.c.weight", "blocks2.1.se.fc2.bias", "blocks2.2.1.m.pw2.bn.bias",
                "blocks2.3.mixer.m.attn.proj.1.c.weight", "blocks3.5.ffn1.m.pw1.c.weight", "head.l.weight"):
        assert key in state, key
    assert not any(re.search(r"\.(conv|linear)\.", k) for k in state)


def test_official_checkpoint_loads_through_the_filter(tmp_path) -> None:
    source = _randomise(edgevit.create_model("efficientvit_m0"), seed=3).eval()
    save_file(_official_state(source), str(tmp_path / "official.safetensors"))
    model = edgevit.create_model("efficientvit_m0", weights=tmp_path / "official.safetensors").eval()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_timm_checkpoint_loads_unchanged(tmp_path) -> None:
    source = _randomise(edgevit.create_model("efficientvit_m0"), seed=4)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "timm.safetensors"))
    model = edgevit.create_model("efficientvit_m0", weights=tmp_path / "timm.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
