"""TFLite quantization with ai-edge-quantizer: int8 safe/full, w8, w4 on a tiny seeded ViT, run in LiteRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("litert_torch")

from edgevit.api import export_model  # noqa: E402
from edgevit.devices.runtimes import load_runner  # noqa: E402
from edgevit.errors import EdgevitError  # noqa: E402
from edgevit.export.backends.tflite.coverage import _read_tflite  # noqa: E402
from edgevit.export.backends.tflite.quantize import PRECISIONS, quantize  # noqa: E402
from edgevit.export.backends.tflite.session import LiteRTSession  # noqa: E402
from edgevit.export.quantization import INFO_KEYS, OPTIONAL_INFO_KEYS, QuantSpec  # noqa: E402
from edgevit.export.quantization.gate import decisive_agreement, required_sqnr_db, sqnr_db  # noqa: E402

SHAPE = (1, 3, 16, 16)
# what a LayerNorm, the softmax, the GELU and the residual adds lower to in litert-torch's graph
TRANSFORMER_FLOAT_OPS = ("MEAN", "SQUARED_DIFFERENCE", "RSQRT", "SOFTMAX", "GELU", "ADD")


def _export(seeded_vit, tmp: Path, dim: int, depth: int) -> Path:
    # conftest's seeded ViT with a fused-qkv attention (explicit softmax and batch matmuls), no position
    # embedding and PyTorch's default initialisation
    model = seeded_vit(dim, depth, attention="qkv", pos_embed=False, perturb=False)
    return Path(export_model(model, (torch.randn(SHAPE),), target="tflite", out=tmp, precision="fp32",
                             passes="auto").artifact)


def _images(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


CALIBRATION = [[x] for x in _images(0, 32)]
HELD_OUT = _images(1, 16)


def _run(path: Path) -> np.ndarray:
    runner = load_runner("tflite", path)
    return np.concatenate([runner.run([x])[0] for x in HELD_OUT])


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, seeded_vit) -> tuple[Path, np.ndarray]:
    artifact = _export(seeded_vit, tmp_path_factory.mktemp("tiny"), dim=64, depth=2)
    return artifact, _run(artifact)


def _quantize(fp32_artifact: Path, precision: str, scheme: str = "safe") -> tuple[Path, dict]:
    out = fp32_artifact.with_name(f"{precision}_{scheme}.tflite")
    calibration = CALIBRATION if precision == "int8" else []
    info = quantize(fp32_artifact, out, QuantSpec(precision, scheme, "minmax"), calibration)
    return out, info


def _input_dtypes(path: Path, op_name: str) -> set[str]:
    """The dtypes of every runtime input of every ``op_name`` op in the written flatbuffer."""
    g = _read_tflite(path)
    return {t.dtype for op in g.ops if op.name == op_name for t in g.runtime_inputs(op)}


def _weight_dtypes(path: Path, op_name: str) -> set[str]:
    """The dtype of the constant each ``op_name`` op's weight (input 1) comes from, through a DEQUANTIZE."""
    g = _read_tflite(path)
    made_by = {o: op for op in g.ops for o in op.outputs}
    dtypes = set()
    for op in (op for op in g.ops if op.name == op_name):
        source = made_by.get(op.inputs[1])
        dtypes.add(g.t(source.inputs[0] if source is not None and source.name == "DEQUANTIZE" else op.inputs[1]).dtype)
    return dtypes


def _check_numerics(fp32: tuple[Path, np.ndarray], out: Path, info: dict, precision: str) -> float:
    ref = fp32[1]
    got = _run(out)  # the same LiteRT session type runs it: float32 in, float32 out
    assert got.dtype == np.float32 and got.shape == ref.shape
    sqnr = sqnr_db(ref, got)
    assert sqnr >= required_sqnr_db(precision, sum(info["quantized_ops"].values())), sqnr
    assert decisive_agreement(ref, got)["decisive_ok"]
    return sqnr


def test_int8_safe_quantizes_only_matmuls(fp32) -> None:
    out, info = _quantize(fp32[0], "int8", "safe")
    assert tuple(k for k in info if k not in OPTIONAL_INFO_KEYS) == INFO_KEYS
    assert info["quantized_ops"] == {"CONV_2D": 1, "FULLY_CONNECTED": 9}
    assert set(TRANSFORMER_FLOAT_OPS) <= set(info["float_ops"])
    for op in ("FULLY_CONNECTED", "CONV_2D"):
        assert _input_dtypes(out, op) == {"INT8"}, op
    for op in (*TRANSFORMER_FLOAT_OPS, "BATCH_MATMUL"):  # attention's activation x activation matmuls: float
        assert _input_dtypes(out, op) == {"FLOAT32"}, op
    # so XNNPACK takes the whole graph: it has no int8 kernel for a matmul of two activations
    session = LiteRTSession({"artifact": str(out), "threads": 1, "options": {}})
    assert session.info["delegate_partitions"] == 1 and session.info["outside_delegate"] == {}
    assert info["activations"].startswith("int8 per-tensor") and "min/max" in info["activations"]
    assert _check_numerics(fp32, out, info, "int8") > 25  # measured 30.7 dB


def test_int8_full_quantizes_transformer_ops(fp32) -> None:
    out, info = _quantize(fp32[0], "int8", "full")
    assert set(TRANSFORMER_FLOAT_OPS) <= set(info["quantized_ops"])
    assert info["float_ops"] == {}
    for op in TRANSFORMER_FLOAT_OPS:
        assert _input_dtypes(out, op) == {"INT8"}, op
    _check_numerics(fp32, out, info, "int8")


@pytest.mark.parametrize("precision, bits", [("w8", "INT8"), ("w4", "INT4")])
def test_weight_only(fp32, precision: str, bits: str) -> None:
    out, info = _quantize(fp32[0], precision)
    assert info["quantized_ops"] == {"CONV_2D": 1, "FULLY_CONNECTED": 9}
    assert info["activations"] == "float"
    for op in ("FULLY_CONNECTED", "CONV_2D"):  # the patch-embedding conv is compressed too
        assert _weight_dtypes(out, op) == {bits}, op
        assert _input_dtypes(out, op) == {"FLOAT32"}, op
    assert "BATCH_MATMUL" in info["float_ops"]  # activation x activation: no weights to quantize
    _check_numerics(fp32, out, info, precision)


def test_weight_only_sizes(tmp_path, seeded_vit) -> None:
    """A model whose file is mostly Linear/Conv weights (at dim 64, tensor names weigh as much as the int8
    weights): w8 <= 0.30x of fp32, w4 smaller still."""
    fp32_artifact = _export(seeded_vit, tmp_path, dim=256, depth=1)
    sizes = {p: _quantize(fp32_artifact, p)[0].stat().st_size / fp32_artifact.stat().st_size for p in ("w8", "w4")}
    assert sizes["w8"] <= 0.30, sizes
    assert sizes["w4"] < 0.75 * sizes["w8"], sizes


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_calibration_methods_the_quantizer_lacks(fp32, tmp_path, method: str) -> None:
    with pytest.raises(EdgevitError) as err:
        quantize(fp32[0], tmp_path / "q.tflite", QuantSpec("int8", "safe", method), CALIBRATION)
    assert str(err.value) == (f"ai-edge-quantizer calibrates int8 activation ranges by min/max only: "
                              f"--calibration-method {method} is not available for tflite; use minmax")
    assert not (tmp_path / "q.tflite").exists()


def test_int8_needs_calibration(fp32, tmp_path) -> None:
    with pytest.raises(EdgevitError, match="needs calibration samples") as err:
        quantize(fp32[0], tmp_path / "q.tflite", QuantSpec("int8", method="minmax"), [])
    assert "\n" not in str(err.value)
    with pytest.raises(EdgevitError, match="must hold the model's 1 input"):
        quantize(fp32[0], tmp_path / "q.tflite", QuantSpec("int8", method="minmax"), [[HELD_OUT[0]] * 2])


def test_precisions_table() -> None:
    assert set(PRECISIONS) == {"int8", "w8", "w4"}
    assert all(isinstance(v, str) and "\n" not in v for v in PRECISIONS.values())
