"""What quantization costs, measured: a DeiT-style model trained on real digits, every backend.

The model is trained in the test (benchmarks/quant_models.py: deterministic, seeded, 2 threads); an fp32
top-1 below its stated level is an error, not a pass. Goals (benchmarks/quant_accuracy.py): int8 top-1
drop <= 1.0 point and w8 <= 0.5 against the fp32 model on 497 held-out images, both <= 0.30x the fp32
artifact; every artifact also passes the export's SQNR gate. CI runs int8 and w8 on every backend; the
rest of the table (w4) runs with --full-quant.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmark code, not the package
import quant_accuracy  # noqa: E402
import quant_models  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]
CI_CELLS = [(t, p) for t in ("onnx", "coreml", "tflite", "openvino") for p in ("int8", "w8")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return quant_models.trained("deit", tmp_path_factory.mktemp("digits"))


CELLS = [pytest.param(t, p, id=f"{t}-{p}", marks=() if (t, p) in CI_CELLS else (pytest.mark.full_quant,))
         for t in quant_accuracy.TARGETS for p in quant_accuracy.PRECISIONS]


@pytest.mark.parametrize("target, precision", CELLS)
def test_deit_quantized_within_goals(trained: tuple, tmp_path: Path, target: str, precision: str) -> None:
    model, folders, fp32_top1 = trained
    assert fp32_top1 >= quant_models.MIN_TOP1["deit"]  # trained() raises below it: a broken run is an error
    row = quant_accuracy.run_cell(model, "deit", folders, target, precision, tmp_path)
    if quant_accuracy.known_failure(row) == "size":  # still missed, by the amount the docstring explains
        assert [f for f in row["goal_failures"] if not f.startswith("size")] == [], row["goal_failures"]
        assert 0.30 < row["size_ratio"] < 0.40, row["size_ratio"]
    else:
        assert not row["goal_failures"], f"deit {target} {precision}: {row['goal_failures']}"


def with_outlier_channels(model: torch.nn.Module, channels: tuple[int, ...] = (5, 77, 150),
                          factor: float = 30.0) -> torch.nn.Module:
    """The same function with a few LayerNorm output channels ``factor`` times larger, as trained ViTs have:
    each norm's weight and bias scaled, the next Linear's input columns divided (exact up to rounding)."""
    stressed = copy.deepcopy(model)
    with torch.no_grad():
        for block in stressed.blocks:
            for norm, linear in ((block.norm1, block.attn.qkv), (block.norm2, block.mlp.fc1)):
                norm.weight[list(channels)] *= factor
                norm.bias[list(channels)] *= factor
                linear.weight[:, list(channels)] /= factor
    return stressed


def test_outlier_channels_cost_the_full_scheme_more_than_the_safe_preset(trained: tuple, tmp_path: Path) -> None:
    """Per-tensor int8 spends its levels on the outliers: both schemes quantize the Linear inputs where they sit
    (SQNR falls ~13 dB from the unstressed model's for safe, ~10 dB for full); full adds the noise of the
    norms, softmax and residual adds on top. Measured (2026-12-04): safe -0.2 points / 20.7 dB, full +1.0 point /
    17.9 dB; unstressed: safe 34.1 dB, full 28.1 dB. The SQNR is what is compared: the top-1 drops differ by one
    or two of the ~500 held-out digits and their order flips between trainings (2026-12-05, a CI run: safe -0.4,
    full -0.6 points), so only the safe preset's drop is held to its goal."""
    model, folders, fp32_top1 = trained
    stressed = with_outlier_channels(model)
    assert quant_models.top1(stressed, folders["eval"], 32) == pytest.approx(fp32_top1, abs=0.25)  # same function
    safe = quant_accuracy.run_cell(stressed, "deit", folders, "onnx", "int8", tmp_path / "safe", scheme="safe")
    full = quant_accuracy.run_cell(stressed, "deit", folders, "onnx", "int8", tmp_path / "full", scheme="full")
    assert safe["drop"] <= quant_accuracy.GOALS["int8"]["max_drop"], safe
    assert full["sqnr_db"] < safe["sqnr_db"], (full["sqnr_db"], safe["sqnr_db"])
