"""LiteRT `safe` int8 on XNNPACK: the ops between the matmuls join them in int8 regions, kept only when measured
harmless (export/backends/tflite/int8_region.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("litert_torch")

from edgevit.api import export_model  # noqa: E402
from edgevit.export.backends.tflite import int8_region  # noqa: E402
from edgevit.export.backends.tflite.coverage import _read_tflite  # noqa: E402
from edgevit.export.backends.tflite.quantize import SAFE_OPS, count_ops, quantize  # noqa: E402
from edgevit.export.backends.tflite.session import LiteRTSession  # noqa: E402
from edgevit.export.quantization import QuantSpec  # noqa: E402
from edgevit.export.quantization.gate import required_sqnr_db, sqnr_db  # noqa: E402

SHAPE = (1, 3, 16, 16)


class ConvChain(nn.Module):
    """conv -> SiLU -> depthwise conv -> SiLU -> conv (a MobileNet block), plus a sigmoid between two float ops
    (mean, sqrt) that no matmul touches: an island."""

    def __init__(self) -> None:
        super().__init__()
        self.expand, self.depthwise = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(nn.functional.silu(self.depthwise(nn.functional.silu(self.expand(x)))))
        return y + torch.sqrt(torch.sigmoid(y.mean((2, 3), keepdim=True)))


def _samples(seed: int, n: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(SHAPE).astype(np.float32)] for _ in range(n)]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ConvChain().eval()
    return Path(export_model(model, (torch.randn(SHAPE),), target="tflite", out=tmp_path_factory.mktemp("chain"),
                             precision="fp32", passes="auto").artifact)


def _xnnpack_int8(fp32: Path, name: str) -> tuple[Path, dict]:
    out = fp32.with_name(f"{name}.tflite")
    return out, quantize(fp32, out, QuantSpec("int8", "safe", "minmax", "xnnpack"), _samples(0, 16))


def _logistic_input_dtypes(path: Path) -> list[str]:
    g = _read_tflite(path)
    return [g.runtime_inputs(op)[0].dtype for op in g.ops if op.name == "LOGISTIC"]


def test_region_joins_the_matmuls_and_leaves_islands(fp32: Path) -> None:
    region = int8_region.int8_region(fp32, SAFE_OPS)
    counts = region.counts()
    assert counts["LOGISTIC"] == 2 and counts["MUL"] == 2  # the two SiLUs; not the island's sigmoid
    g = _read_tflite(fp32)
    assert sum(op.name == "LOGISTIC" for op in g.ops) == 3
    assert "ADD" not in counts  # residual adds stay float, as `safe` promises


def test_widened_when_it_keeps_the_accuracy(fp32: Path) -> None:
    narrow = fp32.with_name("narrow.tflite")
    quantize(fp32, narrow, QuantSpec("int8", "safe", "minmax"), _samples(0, 16))  # no accelerator: matmuls only
    out, info = _xnnpack_int8(fp32, "widened")
    record = info["int8_region"]
    assert record["kept"] == "widened", record["note"]
    assert record["sqnr_widened_db"] >= record["sqnr_matmul_only_db"] - 3.02
    assert sorted(_logistic_input_dtypes(out)) == ["FLOAT32", "INT8", "INT8"]  # the island stays float
    assert sorted(_logistic_input_dtypes(narrow)) == ["FLOAT32"] * 3
    conversions = lambda p: sum(count_ops(p)[2].values())  # noqa: E731
    assert conversions(out) < conversions(narrow)
    session = LiteRTSession({"artifact": str(out), "threads": 1, "options": {}})
    assert session.info["delegate_partitions"] == 1 and session.info["outside_delegate"] == {}
    # held-out inputs: as close to fp32 as int8 arithmetic allows for its quantized ops
    ref, got = _outputs(fp32), _outputs(out)
    assert sqnr_db(ref, got) >= required_sqnr_db("int8", sum(info["quantized_ops"].values()))


def test_rolled_back_when_it_costs_accuracy(fp32: Path, monkeypatch) -> None:
    # a ratio below 1 asks the widened artifact to be *more* accurate than matmul-only: it cannot be
    monkeypatch.setattr(int8_region, "MAX_NOISE_RATIO", 0.5)
    out, info = _xnnpack_int8(fp32, "rolled_back")
    assert info["int8_region"]["kept"] == "matmul-only"
    assert "rolled back" in info["int8_region"]["note"] and "dB lower" in info["int8_region"]["rolled_back_because"]
    assert sorted(_logistic_input_dtypes(out)) == ["FLOAT32"] * 3
    assert not list(out.parent.glob("*.widened.tflite"))  # nothing staged left behind


def test_rolled_back_when_the_widened_artifact_fails(fp32: Path, monkeypatch) -> None:
    from edgevit.export.backends.tflite import qdq_passes

    original = qdq_passes.TfliteExecutor.outputs_of

    def broken(self, path):
        if ".widened" in str(path):
            raise RuntimeError("Node number 3 (MUL) failed to prepare")
        return original(self, path)

    monkeypatch.setattr(qdq_passes.TfliteExecutor, "outputs_of", broken)
    out, info = _xnnpack_int8(fp32, "failed")
    assert info["int8_region"]["kept"] == "matmul-only"
    assert "failed to prepare" in info["int8_region"]["note"]
    assert sorted(_logistic_input_dtypes(out)) == ["FLOAT32"] * 3
    assert not list(out.parent.glob("*.widened.tflite"))


def test_rolled_back_when_the_widened_calibration_fails(fp32: Path, monkeypatch) -> None:
    from edgevit.export.backends.tflite import quantize as tflite_quantize

    real = tflite_quantize.calibrate

    def narrow_only(artifact, recipe, spec, calibration):
        if len(recipe) > len(SAFE_OPS):
            raise ValueError("Tensor x not found\nsecond line")
        return real(artifact, recipe, spec, calibration)

    monkeypatch.setattr(tflite_quantize, "calibrate", narrow_only)
    out, info = _xnnpack_int8(fp32, "calibration_failed")
    assert info["int8_region"]["kept"] == "matmul-only"
    assert info["int8_region"]["rolled_back_because"] == "calibration: ValueError: Tensor x not found"
    assert sorted(_logistic_input_dtypes(out)) == ["FLOAT32"] * 3


def test_widening_cost_rule() -> None:
    ref = [np.ones((2, 4), np.float32)]
    narrow = [ref[0] + 0.01]
    assert int8_region.widening_cost(ref, narrow, [ref[0] + 0.014]) is None  # 1.96x the error power
    assert "output 0: SQNR 40.0 -> 36.5 dB" in int8_region.widening_cost(ref, narrow, [ref[0] + 0.015])  # 2.25x
    assert "non-finite" in int8_region.widening_cost(ref, narrow, [np.full((2, 4), np.nan, np.float32)])
    assert "shape (4, 2)" in int8_region.widening_cost(ref, narrow, [np.ones((4, 2), np.float32)])
    assert int8_region.widening_cost(ref, narrow, []) == "0 outputs instead of 1"
    # each output on its own: a second output whose error grew is found though the first improved
    two = [ref[0], 2 * ref[0]]
    assert int8_region.widening_cost(two, [ref[0] + 0.01, two[1] + 0.01], [ref[0], two[1] + 0.02]).startswith(
        "output 1:")


def _outputs(path: Path) -> np.ndarray:
    from edgevit.devices.runtimes import load_runner

    runner = load_runner("tflite", path)
    return np.concatenate([runner.run(sample)[0] for sample in _samples(1, 8)])
