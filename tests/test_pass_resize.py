"""nearest_downsample_slice: equivalence per resize flavour, and the TFLite parity failure it removes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgevit
from edgevit.errors import ParityError
from edgevit.export.passes import run_pipeline


class _Shrink(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, **self.kwargs) * 1


CASES = [
    ({"scale_factor": 0.5, "mode": "nearest"}, (1, 3, 8, 12)),
    ({"size": (2, 4), "mode": "nearest"}, (2, 3, 8, 12)),  # by size: steps 4 and 3
    ({"scale_factor": 0.25, "mode": "nearest-exact"}, (1, 2, 8, 8)),  # reads pixels 2, 6: offset 2
    ({"size": 4, "mode": "nearest"}, (1, 3, 12)),  # 1-D
    ({"size": (4, 12), "mode": "nearest"}, (1, 3, 8, 12)),  # one axis only
]


@pytest.mark.parametrize("kwargs, shape", CASES)
def test_nearest_downsample_slice_is_exact(kwargs: dict, shape: tuple[int, ...]) -> None:
    model, x = _Shrink(**kwargs), torch.randn(shape)
    result = run_pipeline(model, (x,), ["nearest_downsample_slice"], strict=True)
    ops = [str(n.target) for n in result.model.graph.nodes if n.op == "call_function"]
    assert result.reports[0].sites == 1 and not any("upsample" in op for op in ops), ops
    y = torch.randn(shape)
    assert torch.equal(result.model(y), model(y))


@pytest.mark.parametrize("kwargs, shape", [({"scale_factor": 2.0, "mode": "nearest"}, (1, 2, 4, 4)),
                                           ({"size": (3, 3), "mode": "nearest"}, (1, 2, 8, 8)),  # 8/3: no step
                                           ({"scale_factor": 0.5, "mode": "bilinear"}, (1, 2, 8, 8))])
def test_nearest_downsample_slice_leaves_other_resizes(kwargs: dict, shape: tuple[int, ...]) -> None:
    result = run_pipeline(_Shrink(**kwargs), (torch.randn(shape),), ["nearest_downsample_slice"], strict=True)
    assert result.reports[0].sites == 0


@pytest.mark.slow
def test_nearest_downsample_slice_reason_tflite_reads_other_pixels(tmp_path: Path) -> None:
    """LiteRT's RESIZE_NEAREST_NEIGHBOR shrinks by reading other pixels than PyTorch: parity fails
    without the pass and passes with it."""
    model, x = _Shrink(scale_factor=0.5, mode="nearest"), torch.randn(1, 4, 16, 16)
    with pytest.raises(ParityError):
        edgevit.export_model(model, x, target="tflite", out=tmp_path / "none", passes="none")
    result = edgevit.export_model(model, x, target="tflite", out=tmp_path / "auto", strict_passes=True)
    assert result.parity.status == "passed" and result.parity.worst("max_abs_err") == 0.0
    sites = {r["name"]: r["sites"] for r in result.manifest["passes"]["applied"]}
    assert sites["nearest_downsample_slice"] == 1
