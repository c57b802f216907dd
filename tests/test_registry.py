"""Registry behaviour and each zoo model's parameter/MAC targets (the published configurations)."""

from __future__ import annotations

import pytest
import torch

import edgevit
from edgevit.errors import EdgevitError
from edgevit.registry import check_input_size, model_info, resolve_name

# (params in millions, GMACs at the native size), measured on the reference implementations
# (architectures.md sections 1.1, 3.1 and 13).
REFERENCE = {
    "deit_tiny": (5.717, 1.254),
    "deit_small": (22.05, 4.60),
    "vit_base_patch16": (86.57, 17.56),
    "mobilevit_v2_050": (1.37, 0.47),
    "mobilevit_v2_075": (2.87, 1.03),
    "mobilevit_v2_100": (4.902, 1.812),
    "mobilevit_v2_125": (7.48, 2.82),
    "mobilevit_v2_150": (10.60, 4.04),
    "mobilevit_v2_175": (14.25, 5.49),
    "mobilevit_v2_200": (18.45, 7.16),
}


def test_zoo_lists_every_issue_model() -> None:
    assert set(REFERENCE) <= set(edgevit.list_models())
    assert edgevit.list_models("vit") == ["deit_small", "deit_tiny", "vit_base_patch16"]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_count_within_one_percent(name: str) -> None:
    params_m, _ = REFERENCE[name]
    assert model_info(name).params / 1e6 == pytest.approx(params_m, rel=0.01)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_macs_match_reference(name: str) -> None:
    # The reference rounds GMACs to 2 decimals (0.47 for 0.4646), hence 2% rather than 1%.
    _, gmacs = REFERENCE[name]
    assert model_info(name).macs / 1e9 == pytest.approx(gmacs, rel=0.02)


def test_meta_counts_equal_a_real_instance() -> None:
    model = edgevit.create_model("mobilevit_v2_050")
    assert sum(p.numel() for p in model.parameters()) == model_info("mobilevit_v2_050").params


def test_aliases_resolve() -> None:
    assert resolve_name("mobilevit_v2") == "mobilevit_v2_100"
    assert resolve_name("mobilevitv2_050") == "mobilevit_v2_050"
    assert resolve_name("deit_tiny_patch16_224") == "deit_tiny"


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(EdgevitError, match="unknown model 'mobilevit_v2_05'; did you mean ") as info:
        edgevit.create_model("mobilevit_v2_05")
    assert "mobilevit_v2_050" in str(info.value)


def test_metadata() -> None:
    deit = model_info("deit_tiny")
    assert (deit.family, deit.input_size, deit.input_multiple) == ("vit", 224, 16)
    assert deit.mean == (0.485, 0.456, 0.406) and "2012.12877" in deit.paper
    mv2 = model_info("mobilevit_v2")
    assert (mv2.name, mv2.input_size, mv2.mean, mv2.std) == ("mobilevit_v2_100", 256, (0, 0, 0), (1, 1, 1))
    assert model_info("deit_tiny", 384).macs > deit.macs  # counts follow the input size


@pytest.mark.parametrize("name,size", [("deit_tiny", 224), ("mobilevit_v2_050", 256)])
def test_forward_shapes(name: str, size: int) -> None:
    model = edgevit.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 10)


def test_vit_other_resolution_builds_matching_position_table() -> None:
    model = edgevit.create_model("deit_tiny", img_size=128).eval()
    assert model.pos_embed.shape == (1, (128 // 16) ** 2 + 1, 192)
    assert model(torch.rand(1, 3, 128, 128)).shape == (1, 1000)


def test_input_size_checks() -> None:
    assert check_input_size(model_info("deit_tiny"), 384) == 384
    with pytest.raises(EdgevitError, match="multiple of 64"):
        check_input_size(model_info("mobilevit_v2_050"), 224)
