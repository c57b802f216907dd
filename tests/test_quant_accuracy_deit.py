"""What quantization costs, measured: a DeiT-style model trained on real digits, every backend.

The model is trained in the test (benchmarks/quant_models.py: deterministic, seeded, 2 threads); an fp32
top-1 below its stated level is an error, not a pass. Goals (benchmarks/quant_accuracy.py): int8 top-1
drop <= 1.0 point and w8 <= 0.5 against the fp32 model on 497 held-out images, both <= 0.30x the fp32
artifact; every artifact also passes the export's SQNR gate. CI runs int8 and w8 on every backend; the
rest of the table (w4) runs with --full-quant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmark code, not the package
import quant_accuracy  # noqa: E402
import quant_models  # noqa: E402

pytestmark = pytest.mark.slow
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
    assert not row["goal_failures"], f"deit {target} {precision}: {row['goal_failures']}"
