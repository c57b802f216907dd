"""int8 in the bench worker: the runtimes' integer GEMM probes, int8 CPU units, the precision quantized
artifacts compute in, and profiles split by kind (int8 / convert / float).

Small and fast: GEMMs of n=256 or less on one thread, models of two 32-wide MatMuls."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevit.devices import worker

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgevit.export.backends.onnx import session as onnx_session  # noqa: E402

WIDTH = 32
X = np.random.default_rng(1).standard_normal((4, WIDTH)).astype(np.float32)


# --- the GEMM probes --------------------------------------------------------------------------------

def exact_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) @ b.astype(np.int64)


@pytest.mark.parametrize("types", onnx_session.INT8_GEMM_TYPES)
def test_onnxruntime_probe_runs_an_exact_integer_matmul(types):
    probe = worker.SESSIONS[onnx_session.INT8_GEMM]({"threads": 1, "options": {"n": 128, "types": types}})
    expected = {"runtime": "gemm", "precision": "int8", "n": 128, "flop": 2 * 128 ** 3, "threads": 1, "types": types}
    assert {key: probe.info[key] for key in expected} == expected and "native" in probe.info
    assert f"MatMulInteger {types[:2]} x {types[2:]}" in probe.info["engine"]
    (y,) = probe.run([])
    assert y.dtype == np.int32  # MatMulInteger's int32 accumulator, bit-exact against numpy
    assert np.array_equal(y, exact_product(probe.a, probe.b))
    assert probe.compute_precision([]) == "int8" and probe.profile() == []


def test_onnxruntime_probe_keeps_the_fastest_types():
    probe = worker.SESSIONS[onnx_session.INT8_GEMM]({"threads": 1, "options": {"n": 256}})
    timed = probe.info["candidates_gops"]
    assert set(timed) == set(onnx_session.INT8_GEMM_TYPES) and probe.info["candidates_n"] == 256
    assert probe.info["types"] == max(timed, key=timed.get)
    with pytest.raises(ValueError, match="u8s8"):
        worker.SESSIONS[onnx_session.INT8_GEMM]({"threads": 1, "options": {"n": 64, "types": "s4s4"}})


def test_openvino_probe_runs_an_int8_kernel():
    pytest.importorskip("openvino")
    from edgevit.export.backends.openvino import session as ov_session

    probe = worker.SESSIONS[ov_session.INT8_GEMM]({"threads": 1, "options": {"n": 256}})
    info = probe.info
    assert (info["runtime"], info["precision"], info["n"], info["flop"], info["threads"]) == \
        ("gemm", "int8", 256, 2 * 256 ** 3, 1)
    assert ov_session.exec_precision(info["exec_type"]) == "int8" and info["exec_type"] in info["engine"]
    y = probe.run([])
    assert np.array_equal(y.astype(np.int64), exact_product(probe.a, probe.b))  # < 2^24: exact in f32
    assert probe.compute_precision([]) == "int8"


def test_probe_shrinks_n_to_the_call_budget():
    # 256^3 ops take far more than 1 ns: scaled cubically, every n > 256 is over budget
    probe = worker.SESSIONS[onnx_session.INT8_GEMM]({"threads": 1, "options": {"n": 1024, "max_call_s": 1e-9}})
    assert probe.info["n"] == 256
    # 1 ms at 256, scaled by (n / 256)^3: 2048 -> 512 ms, 1792 -> 343 ms, 1536 -> 216 ms
    assert onnx_session._gemm_size(1e-3, 256, 2048, 1.0) == 2048
    assert onnx_session._gemm_size(1e-3, 256, 2048, 0.25) == 1536
    assert onnx_session._gemm_size(1e-3, 256, 200, 1e-9) == 200  # n_max below the probe size: kept


def test_bundled_worker_runs_the_probe(tmp_path):
    from edgevit.devices.worker_bundle import bundle

    script = bundle(tmp_path / "worker.py")
    config = {"runtime": onnx_session.INT8_GEMM, "threads": 1, "options": {"n": 64}, "runs": 2, "warmup": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, str(script), "run", str(tmp_path / "config.json"), str(tmp_path / "out.json")],
                   check=True, timeout=120, capture_output=True)
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["ok"] and len(result["times_ms"]) == 2
    assert result["info"]["precision"] == result["info"]["compute_precision"] == "int8"


def test_the_float_probe_points_int8_to_the_runtime_probes():
    with pytest.raises(ValueError, match="gemm-int8:onnxruntime"):
        worker.GemmSession({"threads": 1, "options": {"n": 64, "precision": "int8"}})


# --- int8 units in the CPU flags --------------------------------------------------------------------

VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma f16c\n"
DOTPROD = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics fphp asimdhp asimddp\n"
NEON = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


def test_native_int8_units_from_cpuinfo():
    assert [worker.native_units("int8", text) for text in (VNNI, AVX2, DOTPROD, NEON)] == [True, False, True, False]
    assert worker.native_units("int8", "") is False  # flags unknown: no units shown
    assert set(worker.INTEGER_UNIT_FLAGS) <= set(worker.CPU_FLAGS)  # the devices table records them


def test_integer_units_for_the_report():
    assert worker.integer_units(["avx2", "amx_int8", "avx512_vnni"]) == ["avx512_vnni", "amx_int8"]
    assert worker.integer_units_text(["avx2", "avx512_vnni"]) == "avx512_vnni"
    assert worker.integer_units_text(["avx2", "fma"]) == "none (AVX2 only: int8 runs on 16-bit multiply-adds)"
    assert worker.integer_units_text(["asimd"]).startswith("none (NEON")
    assert worker.integer_units_text(["asimd", "asimddp", "i8mm"]) == "asimddp, i8mm"
    assert worker.integer_units_text(None) == "unknown (no CPU flags)"


# --- profiles by kind -------------------------------------------------------------------------------

def test_top_ops_folds_the_tail_per_kind():
    totals = {"QLinearMatMul": 8.0, "Tanh": 4.0, "QuantizeLinear": 2.0, "Add": 1.0, "DequantizeLinear": 0.5}
    counts = dict.fromkeys(totals, 2)
    kinds = {"QLinearMatMul": "int8", "QuantizeLinear": "convert", "DequantizeLinear": "convert"}
    rows = worker.top_ops(totals, counts, runs=2, limit=2, kinds=kinds)
    assert [(r["op"], r["kind"], r["ms_per_run"]) for r in rows] == [
        ("QLinearMatMul", "int8", 4.0), ("Tanh", "float", 2.0),
        ("(other convert ops)", "convert", 1.25), ("(other float ops)", "float", 0.5)]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert worker.profile_kinds(rows) == {"int8": 4.0, "float": 2.5, "convert": 1.25}
    assert worker.profile_kinds([{"op": "x", "ms_per_run": 1.0}]) == {"float": 1.0}  # rows from before kinds


def test_top_ops_marks_and_folds_matmul_kernels_apart():
    totals = {"QLinearMatMul": 8.0, "Tanh": 4.0, "QLinearConv": 2.0, "Add": 1.0}
    rows = worker.top_ops(totals, dict.fromkeys(totals, 1), runs=1, limit=1,
                          kinds={"QLinearMatMul": "int8", "QLinearConv": "int8"}, gemms={"QLinearMatMul", "QLinearConv"})
    assert [(r["op"], r["gemm"], r["ms_per_run"]) for r in rows] == [
        ("QLinearMatMul", True, 8.0), ("(other float ops)", False, 5.0), ("(other int8 matmul/conv ops)", True, 2.0)]


def test_every_copy_of_top_ops_is_the_same():
    """The session modules are self-contained (bundled into the worker), so each carries top_ops: one text."""
    import inspect

    from edgevit.export.backends.onnx import session as onnx_session

    copies = [inspect.getsource(worker.top_ops), inspect.getsource(onnx_session.top_ops)]
    if importlib.util.find_spec("openvino"):
        from edgevit.export.backends.openvino import session as openvino_session

        copies.append(inspect.getsource(openvino_session.top_ops))
    assert len(set(copies)) == 1


def test_gemm_kernels_against_the_bound():
    from edgevit.devices.bench import gemm_kernels_ms

    profile = [{"op": "Conv", "ms_per_run": 3.0, "gemm": True}, {"op": "Add", "ms_per_run": 1.0, "gemm": False}]
    assert gemm_kernels_ms(profile, median_ms=8.0) == pytest.approx(6.0)  # 3/4 of the profiled time
    assert gemm_kernels_ms([{"op": "Conv", "ms_per_run": 3.0}], 8.0) is None  # a profile without the mark
    assert gemm_kernels_ms([], 8.0) is None


def test_openvino_kinds():
    pytest.importorskip("openvino")
    from edgevit.export.backends.openvino.session import op_kind

    assert op_kind("FullyConnected", "brgemm_avx512_I8") == op_kind("MatMul", "brgemm_avx512_amx_u8") == "int8"
    assert op_kind("Reorder", "jit_uni_I8") == op_kind("FakeQuantize", "jit_avx512_f32") == "convert"
    assert op_kind("FullyConnectedCompressed", "brgemm_avx512_f32") == op_kind("MVN", "jit_avx512_bf16") == "float"


# --- what quantized onnx artifacts compute in ---------------------------------------------------------

def two_matmuls(path: Path) -> Path:
    """X[4, 32] -> MatMul -> Tanh -> MatMul -> Y: Tanh has no integer kernel in onnxruntime, so it stays float."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 4, f"W{i}")
               for i in (1, 2)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W1"], ["H"]), helper.make_node("Tanh", ["H"], ["T"]),
         helper.make_node("MatMul", ["T", "W2"], ["Y"])], "two_matmuls",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, WIDTH])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, WIDTH])], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class Samples:
    """onnxruntime's CalibrationDataReader protocol over 8 seeded batches."""

    def __init__(self) -> None:
        rng = np.random.default_rng(2)
        self.batches = iter([{"X": rng.standard_normal((4, WIDTH)).astype(np.float32)} for _ in range(8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    folder = tmp_path_factory.mktemp("qdq")
    out = folder / "qdq.onnx"
    quantize_static(str(two_matmuls(folder / "fp32.onnx")), str(out), Samples(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return out


@pytest.fixture(scope="module")
def nbits_model(tmp_path_factory) -> Path:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    folder = tmp_path_factory.mktemp("nbits")
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, bits=4,
                                          quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(two_matmuls(folder / "fp32.onnx"))), algo_config=config)
    quantizer.process()
    out = folder / "w4.onnx"
    onnx.save(quantizer.model.model, str(out))
    return out


def session(path: Path, profile: bool = False) -> onnx_session.OnnxRuntimeSession:
    return onnx_session.OnnxRuntimeSession({"artifact": str(path), "threads": 1, "profile": profile})


def test_qdq_model_profiles_by_kind(qdq_model):
    s = session(qdq_model, profile=True)
    for _ in range(3):
        s.run([X])
    kinds = {row["op"]: row["kind"] for row in s.profile()}
    # both MatMuls fuse with their Q/DQ pairs into integer kernels; the float Tanh reads a DequantizeLinear
    # and feeds a QuantizeLinear; the graph output is dequantized
    assert kinds["QLinearMatMul"] == "int8"
    assert kinds["QuantizeLinear"] == kinds["DequantizeLinear"] == "convert"
    assert kinds["Tanh"] == "float"
    assert set(kinds.values()) == {"int8", "convert", "float"}


def test_qdq_model_computes_in_int8(qdq_model):
    s = session(qdq_model)
    s.run([X])
    assert s.info["precision"] == "int8 (QDQ)"
    assert s.compute_precision([X]) == "int8" and s.info["matmul_precisions"] == {"int8": 2}


def test_matmulnbits_model_computes_in_fp32(nbits_model, tmp_path):
    s = session(nbits_model)
    s.run([X])
    assert s.info["precision"] == "w4 (MatMulNBits)"
    assert s.compute_precision([X]) == "fp32" and s.info["matmul_precisions"] == {"fp32": 2}
    # accuracy_level 4 makes MatMulNBits quantize its activations: an integer kernel
    model = onnx.load(str(nbits_model))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            node.attribute.append(helper.make_attribute("accuracy_level", 4))
    onnx.save(model, str(tmp_path / "w4_int8.onnx"))
    s = session(tmp_path / "w4_int8.onnx")
    assert s.compute_precision([X]) == "int8" and onnx_session.op_kind("MatMulNBits", s.nbits_int8) == "int8"


def test_fp32_model_stays_on_the_fast_path(tmp_path):
    s = session(two_matmuls(tmp_path / "fp32.onnx"))
    assert s.info["precision"] == s.compute_precision([X]) == "fp32" and "matmul_precisions" not in s.info


# --- what OpenVINO IRs compute in -----------------------------------------------------------------------

def ov_linear(path: Path, activations_quantized: bool) -> Path:
    """X[4, 32] -> [FakeQuantize] -> MatMul(i8 weights * per-channel scale, transposed): NNCF's int8 Linear,
    or without the FakeQuantize its compressed-weight (w8) Linear."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([4, WIDTH], ov.Type.f32, name="X")
    weights = ops.multiply(ops.convert(ops.constant(rng.integers(-127, 128, (WIDTH, WIDTH)).astype(np.int8)),
                                       ov.Type.f32), ops.constant(np.full((WIDTH, 1), 0.01, np.float32)))
    if activations_quantized:
        low, high = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        x_in = ops.fake_quantize(x, low, high, low, high, 256)
    else:
        x_in = x
    ov.save_model(ov.Model([ops.matmul(x_in, weights, False, True)], [x], "linear"), str(path))
    return path


def test_openvino_int8_ir_computes_in_int8(tmp_path):
    pytest.importorskip("openvino")
    from edgevit.export.backends.openvino.session import OpenVINOSession

    s = OpenVINOSession({"artifact": str(ov_linear(tmp_path / "int8.xml", True)), "threads": 1, "profile": True})
    s.run([X])
    assert s.compute_precision([X]) == "int8" and s.info["matmul_precisions"] == {"int8": 1}
    assert "int8" in {row["kind"] for row in s.profile()}
    w8 = OpenVINOSession({"artifact": str(ov_linear(tmp_path / "w8.xml", False)), "threads": 1})
    assert w8.compute_precision([X]) == "fp32" and w8.info["compressed_weights"] == {"i8": 1}
