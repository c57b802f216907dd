"""``edgevit inspect --precision int8``: the checkers on quantized artifacts, and the quantized-graph passes each
accelerator's artifacts get, on conftest's tiny seeded ViT (quantized in-process, one thread) and, for the
command line, a small deit_tiny."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevit.export.coverage import coverage
from edgevit.export.quantization import QuantSpec

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SHAPE = (1, 3, 16, 16)
CALIBRATION = [[x] for x in np.random.default_rng(0).standard_normal((8, *SHAPE)).astype(np.float32)]
EDGEVIT = [sys.executable, "-m", "edgevit.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEVIT, *args], capture_output=True, text=True, timeout=600)


def _spec(scheme: str, accelerator: str) -> QuantSpec:
    """The spec the quantization step hands a backend: the scheme, and the accelerator the export is for."""
    spec = QuantSpec("int8", scheme, "minmax")
    object.__setattr__(spec, "accelerator", accelerator)
    return spec


def _fp32(seeded_vit, tmp: Path, target: str, accelerator: str) -> Path:
    from edgevit.api import export_model

    model = seeded_vit(64, 2, attention="qkv")  # explicit softmax attention, LayerNorm, GELU, mean-pooled head
    return Path(export_model(model, (torch.randn(SHAPE),), target=target, out=tmp, precision="fp32",
                             accelerator=accelerator, verify=False).artifact)


# --- the command line --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--quant-scheme", "full"], "--quant-scheme/--calibration-method apply to --precision int8, not fp32"),
    (["--precision", "w8", "--calibration", "x.npz"], "apply to --precision int8, not w8"),
    (["--precision", "int8", "--quant-scheme", "most"], "unknown --quant-scheme 'most'"),
    (["--precision", "int8", "--calibration-method", "entropy", "-t", "coreml"],
     "coreml cannot calibrate int8 activations by entropy"),
    (["--precision", "int4"], "does not support precision 'int4'"),
    (["--calibration", "x.npz"], "--calibration/--eval apply to the quantized precisions"),
])
def test_bad_combinations_are_one_line_errors(args: list[str], message: str) -> None:
    target = [] if "-t" in args else ["-t", "onnx"]
    proc = _cli("inspect", "deit_tiny", *target, *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_int8_without_data_calibrates_on_seeded_inputs_and_reports_float_ops() -> None:
    proc = _cli("inspect", "deit_tiny", "-t", "openvino", "-a", "npu", "--input-size", "32", "--precision", "int8",
                "--quant-scheme", "full", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {k: report[k] for k in ("precision", "quant_scheme", "calibration", "calibration_method")} == \
        {"precision": "int8", "quant_scheme": "full", "calibration": "seeded", "calibration_method": "minmax"}
    (row,) = report["accelerators"]
    # NNCF's full preset quantizes every MatMul/Convolution input: the placement rule finds nothing to say
    assert not any(p.startswith("fq placement") for p in row["coverage"]["problems"])
    # what NNCF leaves float: each block's LayerNorm bias Add (after MVN), GELU and softmax, and the position add
    assert row["quantization"]["float_ops"] == {"Add": 26, "Gelu": 12, "Softmax": 12}
    assert "int8 placement rules" in row["coverage"]["checker"]


# --- ONNX: the NNAPI EP's QDQ rules and passes ----------------------------------------------------------------


def test_onnx_nnapi_full_int8_is_whole_after_the_qdq_passes(seeded_vit, tmp_path: Path) -> None:
    from edgevit.export.backends.onnx.quantize import quantize

    fp32 = _fp32(seeded_vit, tmp_path / "fp32", "onnx", "nnapi")
    plain, info_plain = tmp_path / "plain.onnx", None
    info_plain = quantize(fp32, plain, QuantSpec("int8", "full", "minmax"), CALIBRATION)
    before = coverage(plain, "onnx", "nnapi")
    keys = {p.split(":")[0] for p in before.problems}
    assert {"int8 qdq", "per-channel", "qdq unit"} <= keys and before.partitions > 1
    assert "passes" not in info_plain  # no accelerator, no pipeline: the tool's graph as it wrote it

    out = tmp_path / "nnapi.onnx"
    info = quantize(fp32, out, _spec("full", "nnapi"), CALIBRATION)
    after = coverage(out, "onnx", "nnapi")
    assert after.whole and after.partitions == 1 and after.supported == after.nodes
    status = {p["name"]: p["status"] for p in info["passes"]}
    assert {status[n] for n in ("nnapi_float_units", "per_tensor_weights", "uint8_activations")} == {"applied"}
    assert all(s in ("applied", "not applicable", "rolled back") for s in status.values())
    # every kept pass left the artifact within int8 arithmetic of the one before (the runner's rule)
    assert all(p["sqnr_after_db"] is not None for p in info["passes"] if p["status"] == "applied")


# --- TFLite: the full-integer rules ------------------------------------------------------------------------------


def test_tflite_nnapi_flags_float_ops_but_not_the_float_interface(seeded_vit, tmp_path: Path) -> None:
    from edgevit.export.backends.tflite.coverage import _is_boundary_conversion, _read_tflite
    from edgevit.export.backends.tflite.quantize import quantize

    fp32 = _fp32(seeded_vit, tmp_path / "fp32", "tflite", "nnapi")
    safe = tmp_path / "safe.tflite"
    info = quantize(fp32, safe, _spec("safe", "nnapi"), CALIBRATION)
    cov = coverage(safe, "tflite", "nnapi")
    flagged = {p.split(": ")[1].split(" x")[0]: int(p.split(" x")[1].split(" ")[0])
               for p in cov.problems if p.startswith("float op: ")}
    # the safe scheme leaves the norms, softmax and GELU pieces float: every one the quantizer counts is flagged
    assert info["float_ops"] and all(flagged.get(op) == n for op, n in info["float_ops"].items())
    g = _read_tflite(safe)
    # the DEQUANTIZE of the logits is the model's float output: the only conversion not flagged (the input's
    # layout TRANSPOSE runs in float before its QUANTIZE, so that one is an interior conversion)
    assert [op.name for op in g.ops if _is_boundary_conversion(g, op)] == ["DEQUANTIZE"]
    assert flagged["DEQUANTIZE"] == sum(op.name == "DEQUANTIZE" for op in g.ops) - 1
    assert flagged["QUANTIZE"] == sum(op.name == "QUANTIZE" for op in g.ops)


def test_tflite_mean_input_scale(seeded_vit, tmp_path: Path) -> None:
    """What the pass writes (each MEAN's output encoded like its input, the model still runs), and what the
    runner decides on this ViT: its LayerNorms' means and variances at the input's scale cost more than int8
    arithmetic allows, so the pass is rolled back and the checker still names the MEANs."""
    from ai_edge_litert.tools import flatbuffer_utils

    from edgevit.export.backends.tflite.qdq_passes import MeanInputScale, TfliteExecutor
    from edgevit.export.backends.tflite.quantize import quantize

    fp32 = _fp32(seeded_vit, tmp_path / "fp32", "tflite", "nnapi")
    plain, out = tmp_path / "plain.tflite", tmp_path / "nnapi.tflite"
    quantize(fp32, plain, QuantSpec("int8", "full", "minmax"), CALIBRATION)
    means = [p for p in coverage(plain, "tflite", "nnapi").problems if p.startswith("mean rescale: MEAN")]
    assert means
    model = flatbuffer_utils.read_model(str(plain))
    sites = MeanInputScale().run(model)
    assert f"mean rescale: MEAN x{sites} " in means[0]
    rewritten = tmp_path / "rewritten.tflite"
    flatbuffer_utils.write_model(model, str(rewritten))
    assert not any(p.startswith("mean rescale") for p in coverage(rewritten, "tflite", "nnapi").problems)
    assert all(np.isfinite(o).all() for o in TfliteExecutor(fp32, CALIBRATION[:2]).outputs(model))

    info = quantize(fp32, out, _spec("full", "nnapi"), CALIBRATION)
    (report,) = info["passes"]
    assert report["name"] == "mean_input_scale" and report["status"] == "rolled back" and report["numeric"]
    assert report["sqnr_after_db"] < report["sqnr_before_db"] - 10  # far more than int8 noise on 11 tensors
    assert means == [p for p in coverage(out, "tflite", "nnapi").problems if p.startswith("mean rescale")]


# --- OpenVINO: FakeQuantize placement for the NPU -----------------------------------------------------------------


def test_openvino_npu_placement_rule_finds_safe_schemes_float_matmuls(seeded_vit, tmp_path: Path) -> None:
    from edgevit.export.backends.openvino.quantize import quantize

    fp32 = _fp32(seeded_vit, tmp_path / "fp32", "openvino", "npu")
    for scheme in ("safe", "full"):
        out = tmp_path / f"{scheme}.xml"
        quantize(fp32, out, QuantSpec("int8", scheme, "minmax"), CALIBRATION)
        cov = coverage(out, "openvino", "npu")
        placement = [p for p in cov.problems if p.startswith("fq placement")]
        if scheme == "safe":  # NNCF's transformer preset keeps the softmax float: A.V reads a float operand
            assert placement == ["fq placement: MatMul x2 (an input is not quantized: the NPU computes it in fp16, "
                                 "not int8)"]
        else:
            assert placement == []
        assert any(n.startswith("compute ops left float") for n in cov.notes)
