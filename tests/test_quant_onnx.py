"""ONNX quantization (onnxruntime.quantization): int8 safe/full, w8, w4 on a tiny seeded ViT, judged by the SQNR
gate, by what the written graph holds and by the kernels onnxruntime's CPU provider turns it into."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgevit.errors import EdgevitError  # noqa: E402
from edgevit.export.backends.onnx.quantize import PRECISIONS, quantize  # noqa: E402
from edgevit.export.quantization import INFO_KEYS, OPTIONAL_INFO_KEYS, QuantSpec  # noqa: E402
from edgevit.export.quantization.gate import required_sqnr_db, sqnr_db  # noqa: E402

DIM = 256  # wide enough that Linear/Conv weights dominate the file (node metadata is ~100 kB whatever the size)
#: onnxruntime's integer kernels for the matrix multiplies, and its int8 kernels for everything else
INTEGER_LINEAR = {"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm"}
INTEGER_OTHER = {"QLinearSoftmax", "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool",
                 "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearReduceMean"}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, seeded_vit) -> Path:
    from edgevit.api import export_model

    out = tmp_path_factory.mktemp("onnx_fp32")
    # conftest's seeded ViT: conv patch embedding (4x4 patches of a 16x16 image), position embedding,
    # 2 blocks, mean-pooled Linear head; non-trivial LayerNorm affines and biases, so no pass can drop them
    return Path(export_model(seeded_vit(DIM), (torch.randn(1, 3, 16, 16),), target="onnx", out=out,
                             precision="fp32", passes="auto").artifact)


def images(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(count)]


CALIBRATION = [[x] for x in images(0, 32)]
HELD_OUT = images(1, 16)


def outputs(artifact: Path) -> np.ndarray:
    from edgevit.devices.runtimes import load_runner

    runner = load_runner("onnx", artifact)  # the parity session: onnxruntime's CPU provider
    return np.concatenate([runner.run([x])[0] for x in HELD_OUT])


def run_quantizer(fp32: Path, tmp_path: Path, spec: QuantSpec) -> tuple[Path, dict]:
    out = tmp_path / f"{spec.precision}_{spec.scheme}_{spec.method}.onnx"
    info = quantize(fp32, out, spec, CALIBRATION if spec.calibrated else [])
    assert tuple(k for k in info if k not in OPTIONAL_INFO_KEYS) == INFO_KEYS
    assert set(info["versions"]) == {"onnxruntime", "onnx"}
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no calibration leftovers beside the artifact
    return out, info


def assert_within_gate(fp32: Path, artifact: Path, info: dict, precision: str) -> float:
    sqnr = sqnr_db(outputs(fp32), outputs(artifact))
    assert sqnr >= required_sqnr_db(precision, sum(info["quantized_ops"].values())), (sqnr, info)
    return sqnr


def same_interface(fp32: Path, artifact: Path) -> None:
    def interface(path: Path) -> list:
        graph = onnx.load(str(path)).graph
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in list(graph.input) + list(graph.output)]

    assert interface(artifact) == interface(fp32)
    assert all(elem == TensorProto.FLOAT for _, elem, _ in interface(artifact))


def runtime_kernels(artifact: Path, tmp_path: Path) -> Counter:
    """The op types of the graph onnxruntime's CPU provider runs (after its QDQ fusions)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized" / "model.onnx")
    os.makedirs(tmp_path / "optimized")
    ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_precisions_declared():
    assert set(PRECISIONS) == {"int8", "w8", "w4"}


@pytest.mark.parametrize("method", ["percentile", "minmax"])
def test_int8_safe_runs_only_the_linear_ops_in_int8(fp32, tmp_path, method):
    artifact, info = run_quantizer(fp32, tmp_path, QuantSpec("int8", "safe", method))
    same_interface(fp32, artifact)
    assert_within_gate(fp32, artifact, info, "int8")
    # patch conv; 2 x (qkv, fc1, fc2 MatMuls + Q.K^T, A.V); out-projections and head as Gemm
    assert info["quantized_ops"] == {"Conv": 1, "Gemm": 3, "MatMul": 10}
    assert {k: info["float_ops"].get(k) for k in ("LayerNormalization", "Softmax", "Erf", "Add")} == \
           {"LayerNormalization": 5, "Softmax": 2, "Erf": 2, "Add": 7}  # Add: 4 residual, pos, 2 in GELU
    kernels = runtime_kernels(artifact, tmp_path)
    assert kernels["QLinearConv"] == 1 and kernels["QGemm"] == 3
    assert kernels["QLinearMatMul"] + kernels["MatMulIntegerToFloat"] == 10
    assert kernels["Softmax"] == 2  # float, although it sits between two int8 MatMuls
    assert not set(kernels) & (INTEGER_OTHER | {"MatMul", "Gemm", "Conv", "FusedMatMul"})
    graph = onnx.load(str(artifact)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    assert producers[graph.output[0].name] == "Gemm"  # the logits are not rounded to int8
    assert ("min/max" if method == "minmax" else "99.999th percentile") in info["activations"]


def test_int8_full_quantizes_norms_softmax_and_residuals(fp32, tmp_path):
    artifact, info = run_quantizer(fp32, tmp_path, QuantSpec("int8", "full"))
    same_interface(fp32, artifact)
    assert_within_gate(fp32, artifact, info, "int8")
    quantized = info["quantized_ops"]
    assert quantized["LayerNormalization"] == 5 and quantized["Softmax"] == 2 and quantized["Add"] == 13
    assert quantized["MatMul"] == 10 and quantized["Gemm"] == 3 and quantized["Conv"] == 1
    assert info["float_ops"] == {"Div": 2, "Erf": 2}  # the GELU's erf: onnxruntime has no quantizer for it
    kernels = runtime_kernels(artifact, tmp_path)
    assert kernels["QLinearSoftmax"] == 2 and kernels["QLinearMatMul"] == 10


@pytest.mark.slow  # onnxruntime's KL search is pure Python: ~1 s per calibrated tensor
def test_int8_entropy_searches_a_threshold(fp32, tmp_path):
    entropy, info = run_quantizer(fp32, tmp_path, QuantSpec("int8", "safe", "entropy"))
    assert_within_gate(fp32, entropy, info, "int8")
    assert "KL-divergence" in info["activations"]
    minmax = tmp_path / "minmax.onnx"
    quantize(fp32, minmax, QuantSpec("int8", "safe", "minmax"), CALIBRATION)

    def scales(path: Path) -> list[float]:
        graph = onnx.load(str(path)).graph
        values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        return [float(values[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear"]

    # a real KL search clips some ranges below min/max (quantize_static's own entropy run would not)
    assert len(scales(entropy)) == len(scales(minmax))
    assert any(e < 0.99 * m for e, m in zip(scales(entropy), scales(minmax)))


def test_int8_errors(fp32, tmp_path):
    with pytest.raises(EdgevitError, match="calibration") as error:
        quantize(fp32, tmp_path / "q.onnx", QuantSpec("int8"), [])
    assert "\n" not in str(error.value)
    with pytest.raises(EdgevitError, match="2 inputs; the model takes 1"):
        quantize(fp32, tmp_path / "q.onnx", QuantSpec("int8"), [[HELD_OUT[0], HELD_OUT[1]]])


def test_w8_compresses_linear_and_conv_weights(fp32, tmp_path):
    artifact, info = run_quantizer(fp32, tmp_path, QuantSpec("w8"))
    same_interface(fp32, artifact)
    assert_within_gate(fp32, artifact, info, "w8")
    assert info["quantized_ops"] == {"Conv": 1, "MatMulNBits": 9} and info["activations"].startswith("float in the graph")
    assert info["float_ops"]["MatMul"] == 4  # attention's activation x activation products
    graph = onnx.load(str(artifact)).graph
    assert "QuantizeLinear" not in {n.op_type for n in graph.node}
    assert {helper.get_attribute_value(a) for n in graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"} == {8}
    # level 4: onnxruntime's int8 kernel (level 0, an fp32 GEMM on dequantized blocks, is slower than fp32)
    assert {helper.get_attribute_value(a) for n in graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "accuracy_level"} == {4}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    unpack = next(n for n in graph.node if n.output[0] == conv.input[1])
    stored = {i.name: i for i in graph.initializer}[unpack.input[0]]
    assert unpack.op_type == "DequantizeLinear" and stored.data_type == TensorProto.INT8
    assert [a.i for a in unpack.attribute if a.name == "axis"] == [0] and stored.dims[0] == DIM  # per channel
    assert os.path.getsize(artifact) <= 0.30 * os.path.getsize(fp32)


def test_w4_blocks_of_32_and_float_conv(fp32, tmp_path):
    artifact, info = run_quantizer(fp32, tmp_path, QuantSpec("w4"))
    same_interface(fp32, artifact)
    assert_within_gate(fp32, artifact, info, "w4")
    assert info["quantized_ops"] == {"MatMulNBits": 9} and info["float_ops"]["Conv"] == 1
    assert "Conv weights stay float" in " ".join(info["notes"])
    nbits = [{a.name: a.i for a in n.attribute} for n in onnx.load(str(artifact)).graph.node
             if n.op_type == "MatMulNBits"]
    assert {(a["bits"], a["block_size"]) for a in nbits} == {(4, 32)}
    assert os.path.getsize(artifact) <= 0.22 * os.path.getsize(fp32)


def test_weight_only_on_a_conv_only_graph(tmp_path):
    """w8 takes Conv weights (graph edit); w4 has nothing it can take there: a one-line error."""
    weight = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(weight, "w")])
    fp32 = tmp_path / "conv.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save_model(model, str(fp32))
    info = quantize(fp32, tmp_path / "w8.onnx", QuantSpec("w8"), [])
    assert info["quantized_ops"] == {"Conv": 1}
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref, out = (ort.InferenceSession(str(p)).run(None, {"x": x})[0] for p in (fp32, tmp_path / "w8.onnx"))
    assert sqnr_db(ref, out) >= required_sqnr_db("w8", 1)
    with pytest.raises(EdgevitError, match="quantized nothing") as error:
        quantize(fp32, tmp_path / "w4.onnx", QuantSpec("w4"), [])
    assert "\n" not in str(error.value)


def test_w8_conv_weights_fold_to_float_constants_at_load(tmp_path):
    """A w8 artifact's DequantizeLinear(int8 constant) stays in the graph onnxruntime runs unless QDQ handling is
    off; the session (bench and parity) loads weight-only artifacts with it off, so the Convs get float constant
    weights (pre-packable) and compute what the unfolded graph computes, up to summation order."""
    from edgevit.export.backends.onnx.session import FOLD_WEIGHTS_CONFIG, OnnxRuntimeSession, session_config

    def conv(weight: np.ndarray, name: str) -> Path:
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])],
            [numpy_helper.from_array(weight, "w")])
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
                        str(tmp_path / name))
        return tmp_path / name

    weight = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    fp32 = conv(weight, "conv.onnx")
    info = quantize(fp32, tmp_path / "w8.onnx", QuantSpec("w8"), [])
    assert info["session_config"] == FOLD_WEIGHTS_CONFIG
    assert session_config("int8 (QDQ)") == {} and session_config("w4 (MatMulNBits)") == {}

    def ran(config: dict[str, str]) -> Counter:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"opt{len(config)}.onnx")
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        ort.InferenceSession(str(tmp_path / "w8.onnx"), options, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)

    assert ran({})["DequantizeLinear"] == 1 and ran(FOLD_WEIGHTS_CONFIG)["DequantizeLinear"] == 0
    session = OnnxRuntimeSession.for_parity(str(tmp_path / "w8.onnx"), threads=1)
    assert session.info["session_config"] == FOLD_WEIGHTS_CONFIG
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 8)).astype(np.float32)
    folded = session.run([x])[0]
    unfolded = ort.InferenceSession(str(tmp_path / "w8.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # the same products summed in another order: each output sums 72 terms, so |diff| <= 2 * 72 eps sum|x w|
    # (a dequantized weight is within half a step, max|w| / 254 per output channel, of the float one)
    bounding = np.abs(weight) + np.abs(weight).max(axis=(1, 2, 3), keepdims=True) / 254
    magnitude = ort.InferenceSession(str(conv(bounding, "abs.onnx")),
                                     providers=["CPUExecutionProvider"]).run(None, {"x": np.abs(x)})[0]
    bound = 2 * 72 * np.finfo(np.float32).eps * magnitude
    assert np.all(np.abs(folded - unfolded) <= bound)


def test_int8_full_leaves_instance_norm_float_when_the_tool_refuses_it():
    """onnxruntime 1.31 raises "shared mode is not supported for weight" on MobileViT v2's InstanceNormalization
    (its GroupNorm(1)); `full` then quantizes every other op of the tool's list and says what it left float.
    Any other error of the tool still surfaces."""
    from edgevit.export.backends.onnx.quantize import _run_full_registry

    calls: list[list[str] | None] = []

    def refusing(types):
        calls.append(types)
        if types is None:
            raise ValueError("Quantization parameter shared mode is not supported for weight yet")

    note = _run_full_registry(refusing)
    assert calls[0] is None and len(calls) == 2
    assert "InstanceNormalization" not in calls[1] and {"Conv", "MatMul", "Add", "Softmax"} <= set(calls[1])
    assert note is not None and "InstanceNormalization left float" in note

    calls.clear()
    assert _run_full_registry(lambda types: calls.append(types)) is None and calls == [None]

    def broken(types):
        raise ValueError("something else")

    with pytest.raises(ValueError, match="something else"):
        _run_full_registry(broken)
