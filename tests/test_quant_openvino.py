"""OpenVINO quantization (NNCF): int8 safe/full, w8, w4 on a tiny seeded ViT, judged by the SQNR gate and
by what the written IR holds (where the FakeQuantizes sit, which weights are stored in low precision)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import openvino as ov  # noqa: E402

from edgevit.errors import EdgevitError  # noqa: E402
from edgevit.export.backends.openvino.quantize import DATA_MOVEMENT, IRGraph, PRECISIONS, quantize  # noqa: E402
from edgevit.export.quantization import INFO_KEYS, OPTIONAL_INFO_KEYS, QuantSpec  # noqa: E402
from edgevit.export.quantization.gate import required_sqnr_db, sqnr_db  # noqa: E402

DIM = 256  # wide enough that Linear/Conv weights dominate the IR (the .xml is ~100 kB whatever the size)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, seeded_vit) -> Path:
    from edgevit.api import export_model

    out = tmp_path_factory.mktemp("openvino_fp32")
    # conftest's seeded ViT: 4x4 patches of a 16x16 image, 2 blocks, mean-pooled head (ReduceMean before the
    # last MatMul); non-trivial LayerNorm affines and biases, so no pass can drop them
    return Path(export_model(seeded_vit(DIM), (torch.randn(1, 3, 16, 16),), target="openvino", out=out,
                             precision="fp32", passes="auto").artifact)


def images(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(count)]


CALIBRATION = [[x] for x in images(0, 32)]
HELD_OUT = images(1, 16)


def outputs(artifact: Path) -> np.ndarray:
    from edgevit.devices.runtimes import load_runner

    runner = load_runner("openvino", artifact)  # the parity session: CPU, inference precision f32
    return np.concatenate([runner.run([x])[0] for x in HELD_OUT])


def artifact_bytes(xml: Path) -> int:
    return os.path.getsize(xml) + os.path.getsize(xml.with_suffix(".bin"))


def run_quantizer(fp32: Path, tmp_path: Path, spec: QuantSpec) -> tuple[Path, dict]:
    out = tmp_path / f"{spec.precision}_{spec.scheme}_{spec.method}.xml"
    info = quantize(fp32, out, spec, CALIBRATION if spec.calibrated else [])
    assert tuple(k for k in info if k not in OPTIONAL_INFO_KEYS) == INFO_KEYS
    assert out.exists() and out.with_suffix(".bin").exists()
    return out, info


def assert_within_gate(fp32: Path, artifact: Path, info: dict, precision: str) -> float:
    n_quantized = sum(info["quantized_ops"].values())
    sqnr = sqnr_db(outputs(fp32), outputs(artifact))
    assert sqnr >= required_sqnr_db(precision, n_quantized), (sqnr, info)
    return sqnr


def same_interface(fp32: Path, artifact: Path) -> None:
    core = ov.Core()
    before, after = core.read_model(str(fp32)), core.read_model(str(artifact))
    for a, b in ((before.inputs, after.inputs), (before.outputs, after.outputs)):
        assert [(p.get_element_type(), p.get_partial_shape()) for p in a] == \
               [(p.get_element_type(), p.get_partial_shape()) for p in b]
        assert all(p.get_element_type() == ov.Type.f32 for p in b)


def quantizer_consumers(artifact: Path) -> set[str]:
    """The op types the IR's FakeQuantizes feed, looking through reshapes/transposes/slices."""
    kinds, stack = set(), []
    for node in ov.Core().read_model(str(artifact)).get_ordered_ops():
        if node.get_type_name() == "FakeQuantize":
            stack += [port.get_node() for port in node.output(0).get_target_inputs()]
    while stack:
        node = stack.pop()
        if node.get_type_name() in DATA_MOVEMENT:
            stack += [port.get_node() for out in node.outputs() for port in out.get_target_inputs()]
        else:
            kinds.add(node.get_type_name())
    return kinds


def residual_adds(artifact: Path) -> dict[str, bool]:
    """Residual Adds (both operands computed, none a constant) -> whether they consume quantized values."""
    graph = IRGraph(ov.Core().read_model(str(artifact)))
    return {node.get_friendly_name(): quantized for node, quantized in graph.op_precisions().items()
            if node.get_type_name() == "Add" and not any(graph.is_constant(graph.source(p)) for p in node.inputs())}


def test_precisions_declared():
    assert set(PRECISIONS) == {"int8", "w8", "w4"}


@pytest.mark.parametrize("method", ["percentile", "minmax"])
def test_int8_safe_quantizes_only_matmul_and_conv(fp32, tmp_path, method):
    artifact, info = run_quantizer(fp32, tmp_path, QuantSpec("int8", "safe", method))
    same_interface(fp32, artifact)
    assert_within_gate(fp32, artifact, info, "int8")
    # every FakeQuantize feeds a MatMul or Convolution, nothing else
    assert quantizer_consumers(artifact) == {"MatMul", "Convolution"}
    # the patch conv, 2 x (qkv, out, fc1, fc2), head, and the 2 Q.K^T MatMuls; A.V stays float (NNCF pattern)
    assert info["quantized_ops"] == {"Convolution": 1, "MatMul": 11}
    assert info["float_ops"]["MatMul"] == 2
    for kind, count in {"MVN": 5, "Softmax": 2, "Gelu": 2}.items():
        assert info["float_ops"][kind] == count
    adds = residual_adds(artifact)
    assert len(adds) == 4 and not any(adds.values())
    assert ("min/max" if method == "minmax" else "quantiles") in info["activations"]


def test_int8_full_quantizes_norms_and_residuals(fp32, tmp_path):
    artifact, info = run_quantizer(fp32, tmp_path, QuantSpec("int8", "full"))
    same_interface(fp32, artifact)
    assert_within_gate(fp32, artifact, info, "int8")
    assert {"Add", "MVN", "MatMul", "Convolution"} <= quantizer_consumers(artifact)
    assert info["quantized_ops"]["MVN"] == 5 and info["quantized_ops"]["MatMul"] == 13
    adds = residual_adds(artifact)
    assert len(adds) == 4 and all(adds.values())
    # NNCF has no int8 Softmax/Gelu: they stay float even under "full"
    assert info["float_ops"]["Softmax"] == 2 and info["float_ops"]["Gelu"] == 2


def test_int8_errors(fp32, tmp_path):
    with pytest.raises(EdgevitError, match="entropy") as error:
        quantize(fp32, tmp_path / "q.xml", QuantSpec("int8", "safe", "entropy"), CALIBRATION)
    assert "\n" not in str(error.value)
    with pytest.raises(EdgevitError, match="calibration"):
        quantize(fp32, tmp_path / "q.xml", QuantSpec("int8"), [])


def test_w8_compresses_matmul_and_conv_weights(fp32, tmp_path):
    artifact, info = run_quantizer(fp32, tmp_path, QuantSpec("w8"))
    same_interface(fp32, artifact)
    assert_within_gate(fp32, artifact, info, "w8")
    assert info["quantized_ops"] == {"Convolution": 1, "MatMul": 9} and info["activations"] == "float"
    assert "Convolution i8 x1" in " ".join(info["notes"])
    assert "FakeQuantize" not in {n.get_type_name() for n in ov.Core().read_model(str(artifact)).get_ordered_ops()}
    assert artifact_bytes(artifact) <= 0.30 * artifact_bytes(fp32)


def test_w4_blocks_of_32(fp32, tmp_path):
    artifact, info = run_quantizer(fp32, tmp_path, QuantSpec("w4"))
    same_interface(fp32, artifact)
    assert_within_gate(fp32, artifact, info, "w4")
    assert info["quantized_ops"] == {"Convolution": 1, "MatMul": 9}
    notes = " ".join(info["notes"])
    assert "MatMul i4 x9" in notes and "Convolution u8 x1" in notes  # NNCF keeps convolutions 8-bit
    assert artifact_bytes(artifact) <= 0.20 * artifact_bytes(fp32)


def test_w4_sends_indivisible_layers_to_int8(tmp_path):
    """A MatMul with 48 input channels has no block of 32: NNCF's int8 backup, not an error or float."""
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([1, 48], np.float32, name="x")
    hidden = ops.matmul(x, ops.constant(rng.standard_normal((64, 48)).astype(np.float32)), False, True)
    logits = ops.matmul(hidden, ops.constant(rng.standard_normal((10, 64)).astype(np.float32)), False, True)
    fp32 = tmp_path / "mlp.xml"
    ov.save_model(ov.Model([logits], [x]), str(fp32), compress_to_fp16=False)
    info = quantize(fp32, tmp_path / "mlp_w4.xml", QuantSpec("w4"), [])
    assert info["quantized_ops"] == {"MatMul": 2}
    assert "MatMul i4 x1, MatMul u8 x1" in " ".join(info["notes"])
