"""export_model on user modules, failure paths, atomicity and converter isolation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import edgevit
from edgevit.export.backends.onnx.session import OnnxRuntimeSession
from edgevit.errors import EdgevitError, MissingBackendError, ParityError
from edgevit.export import targets as targets_mod
from edgevit.export.targets import TARGETS


class TwoHeads(nn.Module):
    """A user model that is not in the zoo, with two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.cls = nn.Linear(8, 10)
        self.box = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return self.cls(feats), self.box(feats).sigmoid()


def test_user_module_with_two_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    result = edgevit.export_model(TwoHeads(), torch.randn(1, 3, 32, 32), target="onnx", out=tmp_path)
    assert result.ok and result.artifact == tmp_path / "TwoHeads.onnx"
    assert [o.name for o in result.parity.outputs] == ["output_0", "output_1"]
    assert [o["shape"] for o in result.manifest["outputs"]] == [[1, 10], [1, 4]]
    assert result.manifest["model"]["source"] == "user"


def test_user_module_needs_example_inputs(tmp_path) -> None:
    with pytest.raises(EdgevitError, match="example_inputs are required"):
        edgevit.export_model(TwoHeads(), target="onnx", out=tmp_path)


def test_parity_failure_marks_manifest_and_raises(tmp_path, monkeypatch) -> None:
    run = OnnxRuntimeSession.run
    monkeypatch.setattr(OnnxRuntimeSession, "run", lambda self, inputs: [o + 0.1 for o in run(self, inputs)])
    with pytest.raises(ParityError) as info:
        edgevit.export_model(TwoHeads(), torch.randn(1, 3, 32, 32), target="onnx", out=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "failed" and info.value.result.manifest["status"] == "failed"


def test_no_verify_is_recorded(tmp_path) -> None:
    result = edgevit.export_model(TwoHeads(), torch.randn(1, 3, 32, 32), target="onnx", out=tmp_path, verify=False)
    assert result.parity.status == "skipped" and result.manifest["status"] == "skipped"


def test_failed_conversion_leaves_nothing_finished(tmp_path, monkeypatch) -> None:
    def half_write_then_crash(program, inputs, out, precision):
        out.write_bytes(b"partial")
        raise RuntimeError("converter blew up\nsecond line")

    module = TARGETS["onnx"].converter_module()
    monkeypatch.setattr(module, "convert", half_write_then_crash)
    (tmp_path / "manifest.json").write_text("{}")  # a previous export's manifest
    with pytest.raises(EdgevitError, match="failed: RuntimeError: converter blew up$"):
        edgevit.export_model(TwoHeads(), torch.randn(1, 3, 32, 32), target="onnx", out=tmp_path)
    # no artifact, no staging directory; what was there before (the previous manifest) is kept as it was
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert (tmp_path / "manifest.json").read_text() == "{}"


def test_missing_backend_names_the_extra(monkeypatch) -> None:
    real = targets_mod.importlib.util.find_spec
    monkeypatch.setattr(targets_mod.importlib.util, "find_spec", lambda n: None if n == "openvino" else real(n))
    with pytest.raises(MissingBackendError, match=r"pip install 'edgevit\[openvino\]'"):
        TARGETS["openvino"].check_installed()


def test_unsupported_precision_is_rejected(tmp_path) -> None:
    with pytest.raises(EdgevitError, match="does not support precision 'int4'"):
        edgevit.export_model("deit_tiny", target="onnx", out=tmp_path, precision="int4")


def test_targets_table_is_complete() -> None:
    assert list(TARGETS) == ["onnx", "coreml", "tflite", "openvino"]
    for target in TARGETS.values():
        module = target.converter_module()
        assert callable(module.convert) and module.versions()
        assert target.default_precision in target.precisions
        assert target.suffix.startswith(".")


def test_child_crash_and_hang_become_error_rows() -> None:
    from edgevit.export.isolated import run_export_child

    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    row = run_export_child(crash, "m", "onnx")
    assert row["status"] == "error" and "signal 11" in row["error"]
    row = run_export_child([sys.executable, "-c", "import time; time.sleep(30)"], "m", "tflite", timeout_s=1)
    assert row["status"] == "error" and "timed out after 1 s" in row["error"]


def test_wheel_maps_export_and_devices_into_the_package(tmp_path) -> None:
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), "-q"], check=True)
    wheel = next((tmp_path / "dist").glob("edgevit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgevit/export/targets.py" in names and "edgevit/devices/runtimes.py" in names
    assert "edgevit/export/passes/base.py" in names and "edgevit/export/pipeline.py" in names
    assert "edgevit/export/backends/coreml/passes/ane_split_heads.py" in names
    assert "edgevit/devices/worker.py" in names and "edgevit/export/backends/coreml/mil/executor.py" in names
    assert "edgevit/cli/__init__.py" in names and "edgevit/cli/__main__.py" in names  # the entry point's package
    assert not any(n.startswith(("export/", "devices/")) for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True)
    probe = ("import edgevit.export.targets as t, edgevit.devices.runtimes as r, edgevit.cli.export as c; "
             "print(t.__file__); print(r.__file__); print(c.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert all(line.startswith(str(tmp_path / "site")) for line in out.stdout.split())
