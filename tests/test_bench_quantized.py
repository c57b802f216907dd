"""The bench on quantized artifacts: precision lists, the export cache, ratios to the same runtime's fp32,
the findings a report states, and one small model end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevit.devices.bench import BenchOptions
from edgevit.devices.harness import Measurement


# --- options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("asked, measured", [
    ("int8", ["fp32", "int8"]),  # a quantized precision brings its fp32 comparison along
    ("fp32,int8,int8", ["fp32", "int8"]),
    ("w4, fp32", ["w4", "fp32"]),
    ("bf16", ["bf16"]),
])
def test_precision_lists(asked: str, measured: list[str]) -> None:
    assert BenchOptions(precision=asked).precisions == measured


@pytest.mark.parametrize("changes, message", [
    ({"precision": "int4"}, "unknown precision 'int4'"),
    ({"precision": ","}, "--precision is empty"),
    ({"precision": "fp32", "calibration": Path("cal")}, "apply to the quantized precisions"),
    ({"precision": "fp16", "quant_scheme": "full"}, "apply to the quantized precisions"),
    ({"precision": "int8", "calibration": Path("/no/such/folder")}, "no such folder"),
    ({"precision": "int8", "quant_scheme": "everything"}, "unknown --quant-scheme 'everything'"),
    ({"precision": "int8", "targets": ["tflite"], "calibration_method": "entropy"}, "tflite cannot calibrate"),
])
def test_quantized_argument_errors(changes: dict, message: str) -> None:
    from edgevit.devices.bench import check_options
    from edgevit.errors import EdgevitError

    with pytest.raises(EdgevitError, match=message):
        check_options(BenchOptions(models=["deit_tiny"], **changes))


def test_every_cpu_runtime_here_measures_the_quantized_precisions() -> None:
    from edgevit.devices.bench import check_options

    devices = {d.name for d in check_options(BenchOptions(models=["deit_tiny"], precision="int8,w8,w4"))}
    assert {"torch:eager", "onnx:cpu", "tflite:xnnpack", "openvino:cpu"} <= devices


def test_the_cache_key_follows_the_quantization_settings_and_data(tmp_path: Path) -> None:
    from edgevit.devices.bench import cache_key, quant_settings
    from edgevit.devices.table import get_device

    data = tmp_path / "cal"
    data.mkdir()
    (data / "a.png").write_bytes(b"x")
    onnx = get_device("onnx:cpu")

    def key(opts: BenchOptions, calibration: Path | None = data) -> dict:
        return cache_key("deit_tiny", 224, onnx, "int8", "auto", None, quant_settings(opts, calibration))

    base = key(BenchOptions(precision="int8"))
    assert base == key(BenchOptions(precision="int8"))
    assert base["quantizer"]["onnxruntime"] != "unknown"
    assert base != key(BenchOptions(precision="int8", quant_scheme="full"))
    assert base != key(BenchOptions(precision="int8", calibration_method="entropy"))
    assert base == key(BenchOptions(precision="int8", calibration_method="minmax"))  # seeded: auto is minmax
    (data / "b.png").write_bytes(b"y")  # one more calibration image: another artifact
    assert base != key(BenchOptions(precision="int8"))
    assert "quantization" not in cache_key("deit_tiny", 224, onnx, "fp32", "auto")


def test_the_cache_key_follows_the_export_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass or recipe edit changes an artifact without a version bump: the key hashes the export code."""
    import edgevit.export
    from edgevit.devices import bench

    package = tmp_path / "export"
    (package / "backends").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    recipe = package / "backends" / "quantize.py"
    recipe.write_text("SAFE_OPS = ('FULLY_CONNECTED', 'BATCH_MATMUL')\n")
    monkeypatch.setattr(edgevit.export, "__file__", str(package / "__init__.py"))
    bench.export_code_fingerprint.cache_clear()
    before = bench.export_code_fingerprint()
    recipe.write_text("SAFE_OPS = ('FULLY_CONNECTED',)\n")
    bench.export_code_fingerprint.cache_clear()
    assert bench.export_code_fingerprint() != before
    monkeypatch.undo()
    bench.export_code_fingerprint.cache_clear()
    from edgevit.devices.table import get_device

    assert bench.cache_key("deit_tiny", 224, get_device("onnx:cpu"), "fp32", "auto")["export_code"] == \
        bench.export_code_fingerprint()


def test_seeded_calibration_is_a_npz_the_quantization_step_reads(tmp_path: Path) -> None:
    import torch

    from edgevit.export.quantization.data import calibration_set, load_npz_inputs, write_seeded_calibration

    example = [torch.zeros(1, 3, 8, 8)]
    samples = [(torch.full((1, 3, 8, 8), float(k)),) for k in range(16)]
    path = write_seeded_calibration(example, samples, tmp_path / "cal.npz")
    (stacked,) = load_npz_inputs(path)
    assert stacked.shape == (16, 1, 3, 8, 8) and not list(tmp_path.glob(".*"))
    calib = calibration_set(path, example, None)
    assert len(calib.samples) == 14 and len(calib.heldout) == 2  # every 8th held out
    assert float(calib.heldout[0][0].mean()) == 7.0 and calib.record["images"] == 16


def test_a_malformed_calibration_npz_is_one_line(tmp_path: Path) -> None:
    from edgevit.errors import EdgevitError
    from edgevit.export.quantization.data import load_npz_inputs

    bad = tmp_path / "bad.npz"
    np.savez(bad, np.zeros(3), np.zeros(4))  # two inputs with different sample counts
    with pytest.raises(EdgevitError, match="one array per input"):
        load_npz_inputs(bad)
    with pytest.raises(EdgevitError, match="no such file"):
        load_npz_inputs(tmp_path / "missing.npz")


# --- rows and findings ----------------------------------------------------------------------------------

def timed(device: str, precision: str, ms: float, **meta) -> Measurement:
    m = Measurement(f"{device} {precision}", {"model": "m", "device": device, "precision": precision,
                                              "macs": 10**9, "batch": 1, **meta}, status="ok")
    m.rounds = [[ms, ms], [ms * 1.1, ms * 1.1], [ms * 0.9, ms * 0.9]]
    return m


def test_quantized_rows_get_the_ratio_to_their_own_runtimes_fp32() -> None:
    from edgevit.devices.bench import _rows

    rows = {(r["device"], r["precision"]): r for r in _rows([
        timed("torch:eager", "fp32", 40.0), timed("onnx:cpu", "fp32", 20.0), timed("onnx:cpu", "int8", 8.0),
        timed("openvino:cpu", "int8", 5.0), timed("onnx:cpu", "w8", 25.0)], {})}
    assert rows[("onnx:cpu", "int8")]["speedup_vs_fp32"]["median"] == pytest.approx(2.5)
    assert rows[("onnx:cpu", "w8")]["speedup_vs_fp32"]["median"] == pytest.approx(0.8)
    assert rows[("onnx:cpu", "int8")]["speedup_vs_eager"]["median"] == pytest.approx(5.0)
    assert "speedup_vs_fp32" not in rows[("openvino:cpu", "int8")]  # no fp32 row of that runtime in the run
    assert "speedup_vs_fp32" not in rows[("onnx:cpu", "fp32")]


def test_int8_rows_meet_the_fastest_int8_gemm_bound() -> None:
    from edgevit.devices.bench import _rows, gemm_bounds

    bounds = gemm_bounds([{"precision": "int8", "gflops": 300.0}, {"precision": "int8", "gflops": 500.0},
                          {"precision": "fp32", "gflops": 100.0}, {"precision": "int8", "status": "error"}])
    assert bounds == {"int8": 500.0, "fp32": 100.0}
    m = timed("onnx:cpu", "int8", 8.0)
    m.info = {"compute_precision": "int8"}
    (row,) = _rows([m], bounds)
    assert row["roofline"]["precision"] == "int8" and row["roofline"]["bound_ms"] == pytest.approx(4.0)


def _result(rows: list[dict], flags: list[str]) -> dict:
    host = {"name": "local", "address": "local", "status": "ok", "machine": {"cpu_flags": flags}}
    return {"rows": rows, "hosts": [host]}


def test_a_slower_quantized_row_is_stated_with_the_reasons_that_apply() -> None:
    from edgevit.devices.report import finding_lines

    slow_int8 = {"model": "m", "device": "onnx:cpu", "precision": "int8", "host": "local",
                 "speedup_vs_fp32": {"median": 0.8, "low": 0.7, "high": 0.9},
                 "runtime_info": {"compute_precision": "int8"}, "quantization": {"float_ops": {"Softmax": 12}},
                 "profile": [{"op": "MatMulInteger", "kind": "int8", "ms_per_run": 1.0},
                             {"op": "DequantizeLinear", "kind": "convert", "ms_per_run": 3.0}]}
    fast = slow_int8 | {"device": "openvino:cpu", "speedup_vs_fp32": {"median": 2.0, "low": 1.9, "high": 2.1}}
    slow_w8 = {"model": "m", "device": "onnx:cpu", "precision": "w8", "host": "local",
               "speedup_vs_fp32": {"median": 0.5, "low": 0.4, "high": 0.6}, "runtime_info": {"compute_precision": "fp32"}}
    avx2 = finding_lines(_result([slow_int8, fast, slow_w8], ["avx2", "fma"]))
    assert len(avx2) == 2 and avx2[0].startswith("int8 slower than fp32 here: m on onnx:cpu 0.80x [0.70-0.90]")
    assert "no integer dot-product units" in avx2[0] and "12 compute op(s) left in float" in avx2[0]
    assert "profile: 75% convert, 25% int8" in avx2[0]
    assert avx2[1].startswith("w8 slower than fp32 here") and "the matmuls run in float" in avx2[1]
    vnni = finding_lines(_result([slow_int8], ["avx2", "avx512_vnni"]))
    assert "no integer dot-product units" not in vnni[0]
    unexplained = finding_lines(_result([{k: v for k, v in slow_int8.items() if k not in ("quantization", "profile")}],
                                        ["avx512_vnni"]))
    assert "re-run with --profile" in unexplained[0]


def test_the_machine_line_names_its_integer_units() -> None:
    from edgevit.devices.report import machine_lines

    host = {"name": "local", "address": "local", "status": "ok",
            "machine": {"cpu": "c", "cores": 2, "system": "Linux", "machine": "x86_64", "python": "3.11",
                        "cpu_flags": ["avx2", "avx512_vnni"]}}
    assert machine_lines({"hosts": [host]})[0].endswith("integer dot-product units: avx512_vnni")
    host["machine"]["cpu_flags"] = ["avx2"]
    assert "integer dot-product units: none" in machine_lines({"hosts": [host]})[0]


# --- end to end ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_int8_and_w8_on_onnxruntime_end_to_end(tmp_path: Path) -> None:
    out, report = tmp_path / "b", tmp_path / "r.json"
    args = [sys.executable, "-m", "edgevit.cli", "bench", "--models", "deit_tiny", "--input-size", "64",
            "--targets", "onnx", "--precision", "int8,w8", "--runs", "4", "--rounds", "2", "--warmup", "1",
            "--out", str(out), "--json", str(report)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(report.read_text())
    rows = {(r["device"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("torch:eager", "fp32"), ("onnx:cpu", "fp32"), ("onnx:cpu", "int8"), ("onnx:cpu", "w8")}
    fp32, int8, w8 = rows[("onnx:cpu", "fp32")], rows[("onnx:cpu", "int8")], rows[("onnx:cpu", "w8")]
    assert all(r["status"] == "ok" for r in rows.values())
    assert int8["speedup_vs_fp32"]["rounds"] == 2 and w8["speedup_vs_fp32"]["rounds"] == 2
    assert int8["artifact_bytes"] < 0.35 * fp32["artifact_bytes"]  # int8 weights: a quarter, plus scales
    assert int8["quantization"]["calibration"]["images"] == 32  # the seeded calibration
    assert int8["runtime_info"]["compute_precision"] == int8["roofline"]["precision"] == "int8"
    assert any(g["precision"] == "int8" and g.get("gflops") for g in result["gemm"])
    assert list(out.glob("inputs/calibration-deit_tiny-64-seeded32.npz"))
    assert "vs fp32 (same runtime)" in (out / "report.md").read_text()


def test_onnxruntime_names_its_dequantized_conv_weights_when_w8_is_slower() -> None:
    from edgevit.devices.report import slower_reasons

    row = {"device": "onnx:cpu", "precision": "w8", "runtime_info": {"compute_precision": "mixed"},
           "quantization": {"quantized_ops": {"Conv": 45, "MatMulNBits": 12}}}
    assert any("45 Conv weight(s) behind DequantizeLinear" in r for r in slower_reasons(row, ["avx512_vnni"]))
    assert not any("DequantizeLinear" in r for r in slower_reasons(row | {"device": "openvino:cpu"}, ["avx2"]))
    folded = row | {"runtime_info": {"compute_precision": "mixed",
                                     "session_config": {"session.disable_quant_qdq": "1"}}}
    assert not any("DequantizeLinear" in r for r in slower_reasons(folded, ["avx512_vnni"]))


def test_litert_names_the_ops_xnnpack_leaves_out(tmp_path: Path) -> None:
    """A GroupNorm lowers with BROADCAST_TO, which XNNPACK does not take: the session counts the delegate's
    partitions and the ops between them; a slow LiteRT row is explained with them, a whole graph is not."""
    import torch
    from torch import nn

    from edgevit.devices.report import slower_reasons
    from edgevit.export.backends.tflite.session import LiteRTSession
    from edgevit.export.capture import capture
    from edgevit.export.targets import get_target

    x = torch.randn(1, 3, 8, 8)
    convert = get_target("tflite").converter_module().convert
    split, whole = tmp_path / "split.tflite", tmp_path / "whole.tflite"
    torch.manual_seed(0)
    convert(capture(nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(1, 8), nn.Conv2d(8, 8, 1)).eval(), (x,)),
            (x,), split, "fp32")
    convert(capture(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval(), (x,)), (x,), whole,
            "fp32")
    info = LiteRTSession({"artifact": str(split), "threads": 1, "options": {}}).info
    assert info["outside_delegate"] == {"BROADCAST_TO": 2} and info["delegate_partitions"] == 2
    assert LiteRTSession({"artifact": str(whole), "threads": 1, "options": {}}).info["outside_delegate"] == {}
    assert "delegate_partitions" not in LiteRTSession({"artifact": str(whole), "threads": 1,
                                                       "options": {"delegate": "none"}}).info
    row = {"device": "tflite:xnnpack", "precision": "int8", "runtime_info": info}
    assert ("XNNPACK takes the graph in 2 pieces; between them LiteRT's own kernels run 2 op(s) (BROADCAST_TO x2)"
            in slower_reasons(row, ["avx512_vnni"]))


@pytest.mark.parametrize("median, low, high, slower", [
    (0.80, 0.70, 0.90, True),  # every round slower
    (0.93, 0.60, 1.40, True),  # more than 5 % slower in the median
    (0.97, 0.64, 1.51, False),  # within the run's noise: not stated
    (1.20, 1.10, 1.30, False),
])
def test_only_a_clearly_slower_row_is_stated(median: float, low: float, high: float, slower: bool) -> None:
    from edgevit.devices.report import clearly_slower

    assert clearly_slower({"median": median, "low": low, "high": high}) is slower


def test_seeded_calibration_uses_minmax_unless_a_method_is_asked_for(tmp_path: Path) -> None:
    from edgevit.devices.bench import calibration_method

    assert calibration_method(BenchOptions(precision="int8")) == "minmax"
    assert calibration_method(BenchOptions(precision="int8", calibration_method="entropy")) == "entropy"
    assert calibration_method(BenchOptions(precision="int8", calibration=tmp_path)) == "auto"  # the backend's
