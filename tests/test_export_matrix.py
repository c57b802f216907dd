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
    from edgevit.devices.coverage import coreml_coverage

    result = matrix[model, "coreml"]
    assert not isinstance(result, Exception), f"{model} -> coreml: {result}"
    applied = {r["name"]: r for r in result.manifest["passes"]["applied"]}
    assert applied["ane_split_heads"]["sites"] == sites
    assert not [n for n in coreml_coverage(result.artifact).notes if n.startswith("batched attention")]
