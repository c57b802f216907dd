"""Zoo-wide export matrix: the smallest model of every family x four targets, against KNOWN_FAILURES.

The two default families (vit, mobilevit_v2) are covered by test_export_matrix.py and are not repeated.
With ``pytest --full-zoo`` every registered model (all variants, vit and mobilevit_v2 included) also
gets its ONNX and Core ML cells (marker ``full_zoo``; ~1 h here, so not in the 30-minute CI run: the
nightly workflow runs it). Each Core ML cell records its checks as junit properties.
A cell listed in KNOWN_FAILURES must still fail (strict), so a fix forces the table to shrink. Listed
cells run in a child process with a short budget, because converters that fail here may hang or crash;
a fix that makes such a cell pass but slower than the budget still shows as an expected failure.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import edgevit
from edgevit.export.known_failures import KNOWN_FAILURES
from edgevit.export.targets import TARGETS
from edgevit.registry import model_info

pytestmark = pytest.mark.slow
COVERED_ELSEWHERE = {"vit", "mobilevit_v2"}
KNOWN_FAILURE_BUDGET_S = 90


def _smallest_per_family() -> list[str]:
    best: dict[str, tuple[int, str]] = {}
    for name in edgevit.list_models():
        info = model_info(name)
        if info.family not in COVERED_ELSEWHERE and (info.family not in best or info.params < best[info.family][0]):
            best[info.family] = (info.params, name)
    return sorted(name for _, name in best.values())


CELLS = [(m, t) for m in _smallest_per_family() for t in TARGETS]


def test_known_failures_name_real_cells() -> None:
    for model, target in KNOWN_FAILURES:
        assert model in edgevit.list_models() and target in TARGETS


def check_cell(tmp_path, model: str, target: str, cross_check, on_result=None) -> None:
    """One cell: exports and passes parity (or still fails as KNOWN_FAILURES says). ``cross_check`` is the
    executor_vs_onnxruntime fixture; ``on_result(result)`` sees the export before any assertion."""
    info = model_info(model)
    expected = "passed"  # Core ML too: the MIL reference executor verifies it on Linux
    reason = KNOWN_FAILURES.get((model, target))
    if reason:
        status = _status_in_child(model, target, tmp_path, info.test_input_size)
        if status != expected:
            pytest.xfail(f"known failure ({status}): {reason}")
        pytest.fail(f"{model} -> {target} now gives '{status}': remove it from KNOWN_FAILURES")
    # Core ML at fp32 here, so the reference executor is held to the fp32 bound (its fp16 mode runs too);
    # the default fp16 Core ML export is covered by test_export_matrix.py.
    precision = "fp32" if target == "coreml" else None
    result = edgevit.export_model(model, target=target, out=tmp_path, input_size=info.test_input_size,
                                  precision=precision)
    if on_result:
        on_result(result)
    assert result.parity.status == expected, result.parity.to_dict()
    assert result.manifest["passes"]["parity_cost"]["graph_max_abs_change"] <= 1e-4 * _peak(result)
    if target == "onnx":
        _ONNX_ARTIFACTS[model] = result.artifact
    if target == "coreml":
        # the executor's fp32 run vs onnxruntime on this model's ONNX artifact, at the fp32 bound
        onnx_artifact = _ONNX_ARTIFACTS.get(model)
        if onnx_artifact is None:  # no onnx cell ran in this process: convert the raw capture (no passes, quick)
            onnx_artifact = edgevit.export_model(model, target="onnx", out=tmp_path / "onnx", verify=False,
                                                 input_size=info.test_input_size, passes="none").artifact
        report = cross_check(result.artifact, onnx_artifact, result.manifest["precision"], seed=7)
        assert report.status == "passed", report.to_dict()
    if target == "tflite":  # the rank passes are in every pipeline: no tensor above rank 4 (GPU/NNAPI limit)
        from edgevit.export.backends.tflite.coverage import tflite_coverage

        ranks = [p for p in tflite_coverage(result.artifact, "gpu").problems if p.startswith("rank>")]
        assert not ranks, ranks


# One class per model: with --dist loadscope each class is a unit of work, so the cells spread over the
# xdist workers, and a model's cells run in one process in table order (onnx first), so the Core ML
# cell cross-checks against the ONNX artifact the onnx cell just made instead of exporting another.
MODELS = sorted({m for m, _ in CELLS})
_ONNX_ARTIFACTS: dict[str, object] = {}  # model -> ONNX artifact exported by this process's onnx cell


def _model_class(model: str, targets: list[str], prefix: str = "Test") -> type:
    class ModelCells:
        @pytest.mark.parametrize("target", targets)
        def test_cell(self, tmp_path, record_property, executor_vs_onnxruntime, target: str) -> None:
            # read by `benchmarks/coreml_reference.py --from-junit` to print the zoo table; recorded before
            # the assertions, so a failing model is a failed row, not a missing one
            info = model_info(model)
            record_property("model", model)
            record_property("target", target)
            record_property("input_size", info.test_input_size or info.input_size)
            check_cell(tmp_path, model, target, executor_vs_onnxruntime,
                       on_result=_recorder(record_property) if target == "coreml" else None)

    ModelCells.__name__ = ModelCells.__qualname__ = prefix + "".join(p.capitalize() for p in model.split("_"))
    return ModelCells


def _recorder(record_property):
    def record(result) -> None:
        import json

        record_property("coreml_checks", json.dumps(result.parity.checks))
        record_property("fp16_range_ops", len((result.parity.fp16_range or {}).get("issues", [])))

    return record


# Generated from the targets table, so a new target gets its cells without an edit here.
for _model in MODELS:
    _cls = _model_class(_model, list(TARGETS))
    globals()[_cls.__name__] = _cls

# --full-zoo: every registered model's ONNX and Core ML cells (onnx first: the Core ML cell cross-checks it)
for _model in edgevit.list_models():
    _cls = pytest.mark.full_zoo(_model_class(_model, ["onnx", "coreml"], prefix="TestFullZoo"))
    globals()[_cls.__name__] = _cls


def _peak(result) -> float:
    """The largest output magnitude PyTorch produced (what the fp32 parity bound is relative to)."""
    outputs = result.parity.outputs or []
    return max((o.peak for o in outputs), default=1.0)


def _status_in_child(model: str, target: str, out, input_size: int | None) -> str:
    cmd = [sys.executable, "-m", "edgevit.cli", "export", model, "--target", target, "--out", str(out),
           "--latency-runs", "0", "--in-process"] + (["--input-size", str(input_size)] if input_size else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=KNOWN_FAILURE_BUDGET_S)
    except subprocess.TimeoutExpired:
        return f"no result within {KNOWN_FAILURE_BUDGET_S} s"
    if proc.returncode != 0:
        return f"exit code {proc.returncode}"
    import json

    return json.loads(proc.stdout)[0]["status"]


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_navit_packed_forward_exports_with_integer_inputs(tmp_path, target: str) -> None:
    """Non-image inputs (patches + int32 positions and image ids) and a (1, images, classes) output."""
    import torch

    from edgevit.models.navit import NaViTPacked, pack_images

    torch.manual_seed(0)
    model = edgevit.create_model("navit_tiny").eval()
    images = [torch.rand(3, 64, 96), torch.rand(3, 128, 32), torch.rand(3, 48, 48)]
    packed = pack_images(images, 16, seq_len=64, max_images=3)
    result = edgevit.export_model(NaViTPacked(model, max_images=3), packed.tensors(), target=target, out=tmp_path)
    assert result.parity.status == "passed", result.parity.to_dict()
    dtypes = [i["dtype"] for i in result.manifest["inputs"]]
    assert dtypes[0] == "float32" and all(d.startswith("int") for d in dtypes[1:])
    assert result.manifest["outputs"][0]["shape"] == [1, 3, 1000]
