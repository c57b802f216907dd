"""The parity matrix: deit_tiny and mobilevit_v2_050 x four targets, run in each runtime.

Core ML: verified by the MIL reference executor (fp32 and fp16 modes) everywhere, and on macOS also
by Core ML's own prediction; the cell must pass in both cases.
"""

from __future__ import annotations

import json
import platform

import pytest

from edgevit.export.manifest import sha256_of
from edgevit.export.parity import TOLERANCES
from edgevit.export.targets import TARGETS

pytestmark = pytest.mark.slow
# The matrix: both models at their native input sizes, every target at its default precision.
MATRIX_MODELS = ("deit_tiny", "mobilevit_v2_050")
CELLS = [(m, t) for m in MATRIX_MODELS for t in TARGETS]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], object]:
    """(model, target) -> ExportResult, or the exception its export raised (so every cell reports)."""
    from edgevit.api import export_model

    root = tmp_path_factory.mktemp("matrix")
    results: dict[tuple[str, str], object] = {}
    for model, target in CELLS:
        try:
            results[model, target] = export_model(model, target=target, out=root / model / target)
        except Exception as exc:  # recorded, asserted per cell
            results[model, target] = exc
    return results


@pytest.mark.parametrize("model,target", CELLS)
def test_cell_exports_and_passes_parity(matrix, model: str, target: str) -> None:
    result = matrix[model, target]
    assert not isinstance(result, Exception), f"{model} -> {target}: {result}"
    parity = result.parity
    assert parity.status == "passed", parity.to_dict()
    if target == "coreml":
        checks = {c["check"]: c for c in parity.checks}
        assert parity.runtime["structural_check"]["ok"]
        assert {"reference executor, fp32 mode", "reference executor, fp16 mode"} <= set(checks)
        assert all(c["status"] == "passed" for c in checks.values()), checks
        assert parity.verification.startswith("verified (reference executor, fp32 and fp16")
        assert ("Core ML prediction" in parity.verification) == (platform.system() == "Darwin")
    tol = TOLERANCES[parity.precision]
    for out in parity.outputs:
        assert out.max_abs_err <= tol.max_abs_rel_to_peak * out.peak
        assert out.cosine >= tol.min_cosine
        assert out.top1_agreement == 1.0


@pytest.mark.parametrize("model,target", CELLS)
def test_cell_manifest(matrix, model: str, target: str) -> None:
    result = matrix[model, target]
    assert not isinstance(result, Exception), f"{model} -> {target}: {result}"
    on_disk = json.loads(result.manifest_path.read_text())
    assert on_disk == json.loads(json.dumps(result.manifest))
    assert on_disk["model"]["name"] == model and on_disk["target"] == target
    assert on_disk["precision"] == TARGETS[target].default_precision
    assert on_disk["artifact"]["sha256"] == sha256_of(result.artifact)
    assert on_disk["inputs"][0]["shape"][2] in (224, 256)
    assert on_disk["status"] == result.parity.status
    versions = on_disk["versions"]
    assert versions["torch"].startswith("2.") and versions["edgevit"] and versions["python"]
    assert all(v for v in versions.values())
    passes = on_disk["passes"]
    assert on_disk["accelerator"] == TARGETS[target].default_accelerator
    assert passes["requested"] == "auto" and passes["pipeline"] == list(TARGETS[target].passes)
    assert [r["name"] for r in passes["applied"]] == passes["pipeline"]
    assert passes["sites_total"] == sum(r["sites"] for r in passes["applied"])
    # Exact passes keep the graph within fp32 rounding of the model (the artifact bound is 1e-4 of the peak).
    assert passes["parity_cost"]["graph_max_abs_change"] <= 1e-5
    # Only finished files are left: the artifact (and its companions) plus the manifest.
    names = sorted(p.name for p in result.manifest_path.parent.iterdir())
    assert names == sorted([*on_disk["artifact"]["files"], "manifest.json"])
    if target == "openvino":
        assert sorted(on_disk["artifact"]["files"]) == [f"{model}.bin", f"{model}.xml"]


@pytest.mark.parametrize("target", ["onnx", "tflite", "openvino"])
def test_fp16_exports_pass_fp16_tolerance(tmp_path, target: str) -> None:
    from edgevit.api import export_model

    result = export_model("mobilevit_v2_050", target=target, out=tmp_path, precision="fp16")
    assert result.parity.status == "passed", result.parity.to_dict()
    fp32_bound = TOLERANCES["fp32"].max_abs_rel_to_peak * result.parity.outputs[0].peak
    # fp16 storage must show up in the error (else the artifact was not really fp16).
    assert result.parity.outputs[0].max_abs_err > fp32_bound / 100
    if target == "openvino":
        assert result.parity.runtime["inference_precision_reported"].endswith("f32")


@pytest.mark.parametrize("model,sites", [("deit_tiny", 12), ("mobilevit_v2_050", 0)])
def test_coreml_attention_runs_per_head(matrix, model: str, sites: int) -> None:
    """ane_split_heads: deit_tiny's 12 batched attentions become per-head einsums (3 heads each),
    so ``inspect``'s ANE layout hint has nothing left to flag; MobileViT v2's separable attention
    has no (B, H, S, S) softmax to split."""
    from edgevit.export.backends.coreml.coverage import coreml_coverage

    result = matrix[model, "coreml"]
    assert not isinstance(result, Exception), f"{model} -> coreml: {result}"
    applied = {r["name"]: r for r in result.manifest["passes"]["applied"]}
    assert applied["ane_split_heads"]["sites"] == sites
    assert not [n for n in coreml_coverage(result.artifact).notes if n.startswith("batched attention")]


def test_inspect_coreml_prints_the_fp16_range_report(matrix, monkeypatch) -> None:
    """`edgevit inspect -t coreml` wiring, in-process on the matrix's deit_tiny package (no re-export)."""
    from typer.testing import CliRunner

    import edgevit.cli as cli
    import edgevit.cli.inspect as cli_inspect

    result = matrix["deit_tiny", "coreml"]
    assert not isinstance(result, Exception), result
    row = {**result.manifest, "artifact_path": str(result.artifact)}
    monkeypatch.setattr(cli_inspect, "export_isolated", lambda *args, **kwargs: [row])
    out = CliRunner().invoke(cli.app, ["inspect", "deit_tiny", "--target", "coreml"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "fp16 range (MIL reference executor" in out.output
    assert int(out.output.split("op outputs checked")[0].split()[-1]) > 500  # deit_tiny: ~650 float outputs
    as_json = CliRunner().invoke(cli.app, ["inspect", "deit_tiny", "--target", "coreml", "--json"])
    report = json.loads(as_json.output)["accelerators"][0]["fp16_range"]
    assert report["rules"]["loss_tolerance"] == 1e-2 and isinstance(report["issues"], list)


@pytest.mark.parametrize("model", MATRIX_MODELS)
def test_coreml_executor_agrees_with_onnxruntime(matrix, executor_vs_onnxruntime, model: str) -> None:
    """Cross-check of the default (fp16) Core ML package: the executor's fp32 mode vs onnxruntime on
    the matrix's ONNX artifact of the same model, at the fp16 bound (the package's weights are fp16).
    The fp32-bound cross-check of every family is in test_zoo_matrix.py."""
    coreml, onnx = matrix[model, "coreml"], matrix[model, "onnx"]
    assert not isinstance(coreml, Exception) and not isinstance(onnx, Exception)
    report = executor_vs_onnxruntime(coreml.artifact, onnx.artifact, "fp16", seed=3)
    assert report.status == "passed", report.to_dict()
