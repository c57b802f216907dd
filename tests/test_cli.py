"""The command line: every bad-input case gives one line, exit code 2, no traceback, no files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import edgevit

EDGEVIT = [sys.executable, "-m", "edgevit.cli"]


def run(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEVIT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def run_patched(tmp_path, sitecustomize: str, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI with a sitecustomize module (patching the process at start-up) on PYTHONPATH."""
    hook = tmp_path / "hook" / "sitecustomize.py"
    hook.parent.mkdir()
    hook.write_text(sitecustomize)
    return run(*args, env={**os.environ, "PYTHONPATH": str(hook.parent)})


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"edgevit {edgevit.__version__}"


def test_models_json_lists_counts() -> None:
    proc = run("models", "--json")
    assert proc.returncode == 0
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["deit_tiny"]["params"] == 5_717_416
    assert rows["mobilevit_v2_100"]["macs"] > 1.8e9
    assert set(rows["deit_tiny"]) >= {"family", "paper", "input_size", "mean", "std", "params", "macs"}


def test_targets_json_is_the_table() -> None:
    from edgevit.export.targets import TARGETS

    rows = json.loads(run("targets", "--json").stdout)
    assert [r["name"] for r in rows] == list(TARGETS)
    assert {r["name"]: r["suffix"] for r in rows}["coreml"] == ".mlpackage"


@pytest.mark.parametrize(
    "args,message",
    [
        (["deit_tny", "--target", "onnx"], "error: unknown model 'deit_tny'; did you mean deit_tiny"),
        (["deit_tiny", "--target", "onx"], "error: unknown target 'onx'; choose one of: onnx, coreml, tflite, openvino"),
        (["deit_tiny", "--target", "onnx", "--input-size", "250"],
         "error: input size 250 is not a positive multiple of 16, which deit_tiny needs; try 224"),
        (["mobilevit_v2_050", "--target", "tflite", "--input-size", "224"],
         "error: input size 224 is not a positive multiple of 64"),
        (["deit_tiny", "--target", "onnx", "--precision", "int4"], "error: unknown precision 'int4'"),
    ],
)
def test_bad_input_one_line_exit_2_no_files(tmp_path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    proc = run("export", *args, "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


def test_unwritable_output_directory(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run("export", "deit_tiny", "--target", "onnx", "--out", str(blocker / "sub"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: cannot write to output directory '{blocker / 'sub'}': Not a directory"


def test_missing_backend_package(tmp_path) -> None:
    # 'openvino' made unfindable by a meta-path hook, as if it were not installed.
    hide = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'openvino' or name.startswith('openvino.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    proc = run_patched(tmp_path, hide, "export", "deit_tiny", "--target", "openvino", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: target 'openvino' needs the Python package 'openvino': pip install 'edgevit[openvino]'"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_export_coreml_with_no_other_flag(tmp_path) -> None:
    proc = run("export", "mobilevit_v2", "--target", "coreml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "verified (reference executor, fp32 and fp16" in proc.stdout
    manifest = json.loads((tmp_path / "exports/mobilevit_v2_100/coreml/manifest.json").read_text())
    assert manifest["precision"] == "fp16" and (tmp_path / "exports/mobilevit_v2_100/coreml/mobilevit_v2_100.mlpackage").is_dir()


@pytest.mark.slow
def test_export_json_and_parity_failure_exit_code(tmp_path) -> None:
    small = ("--input-size", "64")  # the CLI's behaviour does not depend on the size; 12x fewer MACs
    proc = run("export", "deit_tiny", "--target", "onnx", "--out", str(tmp_path / "ok"), "--json", "--latency-runs", "3",
               *small)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)[0]
    assert manifest["status"] == "passed" and manifest["parity"]["median_ms"] > 0
    # onnxruntime's outputs corrupted by 1%: parity must fail with exit code 1.
    corrupt = (
        "from edgevit.export.backends.onnx.session import OnnxRuntimeSession as S\n"
        "_run = S.run\n"
        "S.run = lambda self, x: [o * 1.01 for o in _run(self, x)]\n"
    )
    proc = run_patched(tmp_path, corrupt, "export", "deit_tiny", "--target", "onnx", "--out", str(tmp_path / "bad"),
                       *small)
    assert proc.returncode == 1
    assert "failed" in proc.stdout and "parity failed for onnx" in proc.stderr
    assert json.loads((tmp_path / "bad/manifest.json").read_text())["status"] == "failed"

