"""Quantization's data, metrics and argument errors (no backend conversion: fast)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgevit.api import export_model
from edgevit.errors import EdgevitError
from edgevit.export.quantization import QuantSpec
from edgevit.export.quantization.accuracy import accuracy_report, drop_interval, topk_hits
from edgevit.export.quantization.data import (
    Preprocessing,
    calibration_set,
    evaluation_set,
    load_image,
    preprocessing_for,
    scan_folder,
)
from edgevit.export.quantization.gate import decisive_agreement, quantizer_sqnr_db, required_sqnr_db, sqnr_db


def _write_images(folder: Path, n: int, size: int = 20, mode: str = "RGB", seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


class TinyClassifier(torch.nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 4, 4)
        self.head = torch.nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


# --- the gate's arithmetic ---------------------------------------------------------------------------

def test_one_quantizer_sqnr_is_the_uniform_noise_formula() -> None:
    # 8-bit symmetric, crest factor 1 (a full-scale square wave): 10 log10(12 * 127^2) = 52.87 dB
    assert quantizer_sqnr_db(8, 1.0) == pytest.approx(52.87, abs=0.01)
    # each halving of the crest factor's headroom costs 6.02 dB
    assert quantizer_sqnr_db(8, 2.0) == pytest.approx(52.87 - 6.02, abs=0.01)


def test_required_sqnr_falls_10db_per_decade_of_quantized_ops_and_never_below_zero() -> None:
    for precision in ("int8", "w8"):
        assert required_sqnr_db(precision, 10) - required_sqnr_db(precision, 100) == pytest.approx(10.0)
    assert required_sqnr_db("int8", 10) < required_sqnr_db("w8", 10)  # activations add noise
    assert required_sqnr_db("w4", 10_000) == 0.0


def test_sqnr_of_known_noise() -> None:
    ref = np.ones(1000, dtype=np.float32)
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # error 0.1 of the signal's amplitude


def test_decisive_agreement_ignores_near_ties_but_catches_clear_flips() -> None:
    ref = np.array([[10.0, 0.0, 0.0], [1.0, 1.001, 0.0]] * 50)
    near_tie_flipped = ref.copy()
    near_tie_flipped[1::2] = [1.001, 1.0, 0.0]
    result = decisive_agreement(ref, near_tie_flipped)
    assert result["agreement"] == 0.5 and result["decisive_ok"]
    clear_flipped = ref.copy()
    clear_flipped[0] = [0.0, 10.0, 0.0]
    assert not decisive_agreement(ref, clear_flipped)["decisive_ok"]


def test_accuracy_report_and_bootstrap_interval() -> None:
    labels = np.arange(200) % 4
    ref = np.eye(4)[labels] * 5
    out = ref.copy()
    out[:10] = np.eye(4)[(labels[:10] + 1) % 4] * 5  # 10 of 200 now wrong: 5 points
    report = accuracy_report(ref, out, labels)
    assert report["fp32_top1"] == 100.0 and report["top1"] == 95.0 and report["top1_drop"] == pytest.approx(5.0)
    low, high = report["top1_drop_ci95"]
    assert 1.0 < low < 5.0 < high < 9.0
    assert report["top1_agreement"] == 0.95
    assert drop_interval(np.ones(50, bool), np.ones(50, bool)) == (0.0, 0.0)
    assert topk_hits(ref, labels, 5).all()  # k beyond the class count is every class


# --- preprocessing and folders -------------------------------------------------------------------------

def test_preprocessing_resizes_crops_and_normalises(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 20:60] = 255  # a white centre band, as wide as the crop
    Image.fromarray(pixels).save(path)
    prep = Preprocessing((20, 20), 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=1.0)
    x = load_image(path, prep, "--calibration")
    assert x.shape == (3, 20, 20) and x.dtype == np.float32
    assert x[:, :, 2:18].min() == pytest.approx(2.0)  # (1 - 0.5) / 0.25 in the centre


def test_folders_flat_and_labelled(tmp_path: Path) -> None:
    _write_images(tmp_path / "flat", 3)
    _write_images(tmp_path / "flat" / "sub", 2, seed=1)
    assert len(scan_folder(tmp_path / "flat", "--calibration", labelled=False).files) == 5
    for label in ("cat", "dog"):
        _write_images(tmp_path / "labelled" / label, 2)
    found = scan_folder(tmp_path / "labelled", "--eval", labelled=True)
    assert found.classes == ["cat", "dog"] and found.labels == [0, 0, 1, 1]


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("empty", "no images found"),
    ("not-labelled", "no class sub-folders"),
])
def test_bad_folders_are_one_line_errors(tmp_path: Path, case: str, message: str) -> None:
    folder = tmp_path / "data"
    if case == "empty":
        folder.mkdir()
    if case == "not-labelled":
        _write_images(folder, 2)
    with pytest.raises(EdgevitError, match=message):
        scan_folder(folder, "--eval" if case == "not-labelled" else "--calibration",
                    labelled=case == "not-labelled")


def test_calibration_holds_out_every_eighth_sample_and_warns_under_32(tmp_path: Path, caplog) -> None:
    example = (torch.zeros(1, 3, 8, 8),)
    prep = preprocessing_for(example, (0.5,), (0.5,), 1.0, "test", "--calibration")
    _write_images(tmp_path / "cal", 16, size=8)
    found = calibration_set(tmp_path / "cal", example, prep)
    assert len(found.samples) == 14 and len(found.heldout) == 2
    assert found.record["images"] == 16 and "warning" in found.record
    assert "only 16 calibration images" in caplog.text
    tensors = calibration_set([torch.randn(1, 3, 8, 8) for _ in range(40)], example, None)
    assert len(tensors.samples) == 35 and len(tensors.heldout) == 5 and "warning" not in tensors.record


def test_evaluation_from_tensors_checks_labels() -> None:
    example = (torch.zeros(1, 3, 8, 8),)
    found = evaluation_set([(torch.randn(1, 3, 8, 8), 2)], example, None, num_classes=3)
    assert found.labels.tolist() == [2]
    with pytest.raises(EdgevitError, match=r"labels must be in \[0, 3\)"):
        evaluation_set([(torch.randn(1, 3, 8, 8), 3)], example, None, num_classes=3)
    with pytest.raises(EdgevitError, match="differ from the model's inputs"):
        evaluation_set([(torch.randn(1, 3, 9, 9), 0)], example, None, num_classes=3)


def test_spec_rejects_unknown_names() -> None:
    with pytest.raises(EdgevitError, match="quant-scheme"):
        QuantSpec("int8", scheme="everything")
    with pytest.raises(EdgevitError, match="calibration-method"):
        QuantSpec("int8", method="guess")


# --- export_model's errors, before any conversion ------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("no-calibration", "needs calibration data: --calibration DIR"),
    ("grey", "grey-scale image"),
    ("unreadable", "cannot read"),
    ("eval-classes", "2 class folders, but the model outputs 3 scores"),
    ("fp32-with-calibration", "apply to the quantized precisions"),
    ("method-the-tool-lacks", "cannot calibrate int8 activations by entropy"),
])
def test_export_refuses_bad_quantization_input(tmp_path: Path, case: str, message: str) -> None:
    cal = tmp_path / "cal"
    _write_images(cal, 4, mode="L" if case == "grey" else "RGB")
    if case == "unreadable":
        (cal / "broken.png").write_bytes(b"not a png")
    ev = tmp_path / "eval"
    for label in ("a", "b"):
        _write_images(ev / label, 1)
    kwargs = {
        "no-calibration": {"precision": "int8"},
        "grey": {"precision": "int8", "calibration": cal},
        "unreadable": {"precision": "int8", "calibration": cal},
        "eval-classes": {"precision": "w8", "evaluation": ev},
        "fp32-with-calibration": {"precision": "fp32", "calibration": cal},
        "method-the-tool-lacks": {"precision": "int8", "calibration": cal, "calibration_method": "entropy",
                                  "target": "tflite"},
    }[case]
    kwargs.setdefault("target", "onnx")
    out = tmp_path / "out"
    with pytest.raises(EdgevitError, match=message):
        export_model(TinyClassifier(), (torch.randn(1, 3, 16, 16),), out=out, **kwargs)
    assert not out.exists()  # nothing left behind


def test_cli_int8_without_calibration_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgevit.cli", "export", "deit_tiny", "--target", "onnx",
                           "--precision", "int8", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--calibration" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_empty_calibration_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "cal").mkdir()
    proc = subprocess.run([sys.executable, "-m", "edgevit.cli", "export", "deit_tiny", "--target", "all",
                           "--precision", "int8", "--calibration", str(tmp_path / "cal"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no images found" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_int8_export_prints_the_quantized_table_and_the_few_images_warning(tmp_path: Path) -> None:
    """The whole CLI path once: calibration folder -> export child -> quantized table + manifest."""
    proc, manifest = _cli_int8_export(tmp_path, "onnx", images=20)
    assert "quantized vs fp32" in proc.stdout and "stayed float:" in proc.stdout
    assert "only 20 calibration images" in proc.stderr
    q = manifest["quantization"]
    assert manifest["precision"] == "int8" and manifest["status"] == "passed"
    assert q["calibration"]["images"] == 20 and q["calibration"]["held_out"] == 2  # every 8th of 20 samples
    assert q["method"] == "percentile" and q["scheme"] == "safe"  # "auto" resolved to onnxruntime's default
    assert q["size_ratio"] < 0.35 and q["gate"]["outputs"][0]["sqnr_db"] >= q["gate"]["required_sqnr_db"]
    assert "LayerNormalization" in q["float_ops"]  # the safe preset keeps the norms float


@pytest.mark.slow
def test_cli_tflite_int8_export_says_which_int8_region_it_kept(tmp_path: Path) -> None:
    """LiteRT `safe` int8 on XNNPACK: the manifest records the widening decision and the CLI prints it."""
    proc, manifest = _cli_int8_export(tmp_path, "tflite", images=32)
    region = manifest["quantization"]["int8_region"]
    assert region["kept"] in ("widened", "matmul-only") and region["ops"]
    assert f"tflite int8: {region['note']}" in " ".join(proc.stdout.split())  # soft-wrapped by the console


def _cli_int8_export(tmp_path: Path, target: str, images: int) -> tuple[subprocess.CompletedProcess, dict]:
    """`edgevit export deit_tiny --precision int8` at 32 px, calibrated on ``images`` written images: the
    finished process (asserted successful) and the manifest."""
    import json

    _write_images(tmp_path / "cal", images, size=40)
    proc = subprocess.run([sys.executable, "-m", "edgevit.cli", "export", "deit_tiny", "--target", target,
                           "--precision", "int8", "--calibration", str(tmp_path / "cal"), "--input-size", "32",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads((tmp_path / "out" / "manifest.json").read_text())
