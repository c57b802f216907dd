"""Hardening of the Python API: degenerate parity, valid JSON, one-line errors, quiet converters."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

import edgevit
from edgevit.cli.export import exit_code
from edgevit.errors import EdgevitError, ParityError
from edgevit.export.manifest import to_json, write_json_atomic
from edgevit.export.parity import DEGENERATE_DETAIL, TOLERANCES, compare, compare_output
from edgevit.weights import load_weights


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Zeros(nn.Module):
    """All-zero outputs: zero weights and bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class EmptyOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :0]


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0]


# --- item 5: degenerate outputs ---------------------------------------------------------------------------

def test_identical_zero_outputs_pass() -> None:
    zeros = np.zeros((3, 10), np.float32)
    p = compare_output("y", zeros, zeros.copy(), TOLERANCES["fp32"])
    assert p.passed and p.cosine == 1.0 and p.max_abs_err == 0.0 and not p.degenerate
    assert compare([[zeros]], [[zeros.copy()]], ["y"], "fp32").status == "passed"


def test_zero_or_denormal_reference_that_differs_is_degenerate() -> None:
    for ref in (np.zeros((2, 8), np.float32), np.full((2, 8), 1e-40, np.float32)):
        out = ref + np.float32(1e-41)
        report = compare([[ref]], [[out]], ["y"], "fp32")
        assert report.status == "degenerate" and not report.passed
        assert DEGENERATE_DETAIL in report.detail
        assert report.detail.startswith("output 'y': reference output is degenerate: parity cannot judge this "
                                        'model; load trained weights (or init="exercise")')
    # a real failure on another output still fails
    good, bad = np.ones((1, 8), np.float32), np.full((1, 8), 2.0, np.float32)
    zero, tiny = np.zeros((1, 8), np.float32), np.full((1, 8), 1e-41, np.float32)
    assert compare([[good, zero]], [[bad, tiny]], ["a", "b"], "fp32").status == "failed"
    assert exit_code([{"status": "degenerate"}]) == 1 and exit_code([{"status": "passed"}]) == 0


@pytest.mark.parametrize("target", ["onnx", "coreml"])
def test_all_zero_model_exports_and_passes(tmp_path, target) -> None:
    if target == "coreml":
        pytest.importorskip("coremltools")
    result = edgevit.export_model(Zeros(), torch.randn(2, 4), target=target, out=tmp_path)
    assert result.ok and result.parity.status == "passed"
    assert result.manifest["parity"]["outputs"][0]["max_abs_err"] == 0.0
    assert result.manifest["parity"]["outputs"][0]["cosine"] == 1.0


# --- item 6: valid JSON, checkpoints with NaN/Inf or integer tensors ------------------------------------

def test_nonfinite_floats_become_null_with_a_reason(tmp_path) -> None:
    data = {"parity": {"max_abs_err": float("nan"), "cosine": np.float32("inf"), "peak": 1.5,
                       "errors": [1.0, float("-inf")]}}
    text = to_json([data])
    assert "NaN" not in text and "Infinity" not in text
    decoded = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    parity = decoded[0]["parity"]
    assert parity["max_abs_err"] is None and parity["cosine"] is None and parity["errors"] == [1.0, None]
    assert parity["nonfinite"] == {"max_abs_err": "nan", "cosine": "inf", "errors[1]": "-inf"}
    write_json_atomic(tmp_path / "manifest.json", data)
    on_disk = json.loads((tmp_path / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert on_disk["parity"]["nonfinite"]["max_abs_err"] == "nan"


def test_checkpoint_with_nan_or_integer_tensor_is_refused(tmp_path) -> None:
    state = Tiny().state_dict()
    state["fc.weight"][1, 2] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(EdgevitError, match=r"tensor\(s\) with NaN/Inf values: fc.weight \(1 NaN\)"):
        load_weights(Tiny(), tmp_path / "nan.pt")
    state = Tiny().state_dict()
    state["fc.bias"] = torch.tensor([1, 2, 3])
    torch.save(state, tmp_path / "int.pt")
    with pytest.raises(EdgevitError, match=r"integer tensor\(s\) where the model has floats: fc.bias int64 vs float32"):
        load_weights(Tiny(), tmp_path / "int.pt")


class NaNOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


@pytest.mark.parametrize("target", ["onnx", "coreml"])
def test_nan_outputs_give_a_valid_manifest(tmp_path, target) -> None:
    if target == "coreml":
        pytest.importorskip("coremltools")
    result = edgevit.export_model(NaNOutput(), torch.randn(2, 4), target=target, out=tmp_path)
    assert result.parity.status == "degenerate" and not result.ok
    assert "reference output has NaN/Inf values" in result.parity.detail
    manifest = json.loads(result.manifest_path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    output = manifest["parity"]["outputs"][0]
    assert manifest["status"] == "degenerate"
    assert output["max_abs_err"] is None and output["nonfinite"]["max_abs_err"] == "nan"


# --- item 7: every rejected input is an EdgevitError saying what to change ------------------------------

@pytest.mark.parametrize(("model", "inputs", "message"), [
    (lambda: Tiny().to(torch.bfloat16), lambda: torch.randn(2, 4),
     r"Tiny has torch.bfloat16 weights \('fc.weight' and 1 more\): .*call model.float\(\)"),
    (lambda: Tiny().half(), lambda: torch.randn(2, 4), r"Tiny has torch.float16 weights .*call model.float\(\)"),
    (Tiny, lambda: torch.randn(2, 4, dtype=torch.bfloat16), r"example input 0 is torch.bfloat16: .*\.float\(\)"),
    (Tiny, lambda: torch.randn(0, 4), r"example input 0 has shape \[0, 4\], with no elements: .*batch size >= 1"),
    (Tiny, lambda: [[1.0, 2.0, 3.0, 4.0]], r"example input 0 is a list, not a torch.Tensor: .*torch.tensor"),
    (Tiny, lambda: np.zeros((2, 4), np.float32), r"got a numpy.ndarray: convert it with torch.from_numpy"),
    (Tiny, list, r"non-empty list/tuple of tensors, got an empty list"),
    (Tiny, lambda: {"x": torch.randn(2, 4)}, r"got a dict: pass the tensors as a tuple"),
], ids=["bf16-weights", "fp16-weights", "bf16-input", "empty-batch", "list-input", "numpy-input", "no-inputs",
        "dict-input"])
def test_rejected_inputs_are_edgevit_errors(tmp_path, model, inputs, message) -> None:
    with pytest.raises(EdgevitError, match=message) as info:
        edgevit.export_model(model(), inputs(), target="onnx", out=tmp_path)
    assert type(info.value) is EdgevitError


def test_empty_output_is_an_edgevit_error(tmp_path) -> None:
    with pytest.raises(EdgevitError, match=r"output 'output_0' is empty \(shape \[2, 0\]\): every output needs"):
        edgevit.export_model(EmptyOutput(), torch.randn(2, 4), target="onnx", out=tmp_path)


def test_data_dependent_output_shape_is_an_edgevit_error(tmp_path) -> None:
    with pytest.raises(EdgevitError, match=r"output 'output_0' has a data-dependent shape .*torch.where") as info:
        edgevit.export_model(DataDependent(), torch.randn(2, 4), target="onnx", out=tmp_path)
    assert not isinstance(info.value, ParityError)


# --- item 10: converters' output goes to logging -------------------------------------------------------

def test_tflite_export_prints_nothing_and_logs_the_converter_output(tmp_path, capfd, caplog) -> None:
    pytest.importorskip("litert_torch")
    caplog.set_level(logging.DEBUG, logger="edgevit.converters")
    capfd.readouterr()
    result = edgevit.export_model(Tiny(), torch.randn(2, 4), target="tflite", out=tmp_path)
    out, err = capfd.readouterr()
    assert result.ok
    assert out == ""
    assert "LiteRT-Torch" not in err and "XNNPACK" not in err
    converter_records = [r for r in caplog.records if r.name == "edgevit.converters"]
    assert any("LiteRT-Torch Convert" in r.getMessage() for r in converter_records)
    assert all(r.levelno == logging.DEBUG for r in converter_records)


def test_verbose_shows_the_converter_output(tmp_path, capfd) -> None:
    pytest.importorskip("litert_torch")
    edgevit.export_model(Tiny(), torch.randn(2, 4), target="tflite", out=tmp_path, verbose=True)
    out, err = capfd.readouterr()
    assert out == "" and "LiteRT-Torch Convert" in err


def test_api_refuses_a_zero_or_negative_input_size(tmp_path) -> None:
    """``input_size=0`` used to be replaced by the model's own size (an artifact of another shape)."""
    import edgevit
    from edgevit.errors import EdgevitError

    for size in (0, -16):
        with pytest.raises(EdgevitError, match=f"--input-size {size} is not a positive size"):
            edgevit.export_model("deit_tiny", target="onnx", out=tmp_path / str(size), input_size=size)
    assert not any(tmp_path.iterdir())
