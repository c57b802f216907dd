"""The pass framework: registry rules, pipelines from the targets table, CLI/API plumbing, manifests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from edgevit.errors import EdgevitError
from edgevit.export.passes import PASSES, default_pipeline, resolve_passes, run_pipeline, wants
from edgevit.export.targets import TARGETS

TESTS = Path(__file__).resolve().parent


def test_every_pass_is_documented_and_placed() -> None:
    assert len(PASSES) >= 2
    for name, cls in PASSES.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        doc = (cls.__doc__ or "").strip()
        # A summary line plus a paragraph saying why (the backend limit it works around).
        assert len(doc.splitlines()) >= 3 and "why" in doc.lower(), f"{name}: docstring must say why"
        assert cls.wanted_by, f"{name} is in no pipeline"
        assert any(wants(cls, t.name, a.name) for t in TARGETS.values() for a in t.accelerators), name


def test_every_pass_has_its_own_tests() -> None:
    """Each pass name is exercised by a pass test file (equivalence + backend reason live there)."""
    sources = "\n".join(p.read_text() for p in TESTS.glob("test_pass_*.py"))
    missing = [n for n in PASSES if sources.count(f'"{n}"') < 2]
    assert not missing, f"passes without tests: {missing}"


def test_pipelines_follow_wanted_by_and_order() -> None:
    for t in TARGETS.values():
        for a in t.accelerators:
            names = default_pipeline(t.name, a.name)
            assert list(names) == sorted(names, key=lambda n: (PASSES[n].order, n))
            assert all(wants(PASSES[n], t.name, a.name) for n in names)
    assert TARGETS["onnx"].passes == default_pipeline("onnx", "cpu")


def test_resolve_passes_specs() -> None:
    assert resolve_passes("none", "onnx", "cpu") == ()
    assert resolve_passes("auto", "onnx", "cpu") == default_pipeline("onnx", "cpu")
    assert resolve_passes("select_to_slice,strip_aliases", "onnx", "cpu") == ("strip_aliases", "select_to_slice")
    with pytest.raises(EdgevitError, match="unknown pass 'select_to_slise'.*select_to_slice"):
        resolve_passes("select_to_slise", "onnx", "cpu")
    with pytest.raises(EdgevitError, match="accelerator 'tpu'"):
        TARGETS["onnx"].accelerator("tpu")


class _ClassToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] * 2 + x.detach()[:, -1]


def test_run_pipeline_reports_sites_and_change() -> None:
    x = torch.randn(1, 5, 8)
    result = run_pipeline(_ClassToken(), (x,), ["strip_aliases", "select_to_slice"], [(torch.randn(1, 5, 8),)])
    sites = {r.name: r.sites for r in result.reports}
    assert sites == {"strip_aliases": 1, "select_to_slice": 2}
    assert result.max_abs_change == 0.0
    ops = {str(n.target) for n in result.program.graph.nodes if n.op == "call_function"}
    assert not any("select" in o or "detach" in o or "alias" in o for o in ops), ops
    y = torch.randn(1, 5, 8)
    assert torch.equal(result.program.module()(y), _ClassToken()(y))


def test_the_rewritten_graph_is_captured_once_and_only_for_converters_that_need_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """litert-torch exports the module it is given (targets table: converter_input "module"), so the
    rewritten graph is handed over uncaptured; a converter of programs gets it captured, once."""
    import dataclasses
    from types import SimpleNamespace

    import edgevit.export.capture as capture_module
    from edgevit.api import _convert
    from edgevit.export.targets import Target

    real, captures = capture_module.capture, []
    monkeypatch.setattr(capture_module, "capture", lambda *a: captures.append(1) or real(*a))
    x = torch.randn(1, 5, 8)
    result = run_pipeline(_ClassToken(), (x,), ["strip_aliases", "select_to_slice"])
    assert len(captures) == 1  # the model's; the rewritten graph is not captured yet
    handed: list[object] = []
    monkeypatch.setattr(Target, "converter_module", lambda self: SimpleNamespace(convert=lambda src, *a: handed.append(src)))
    assert TARGETS["tflite"].converter_input == "module"
    _convert(TARGETS["tflite"], result, (x,), Path("unused.tflite"), "fp32")
    assert handed[-1] is result.model and len(captures) == 1
    for _ in range(2):
        _convert(dataclasses.replace(TARGETS["tflite"], converter_input="program"), result, (x,), Path("u"), "fp32")
    assert isinstance(handed[-1], torch.export.ExportedProgram) and handed[-1] is handed[-2] and len(captures) == 2


def test_manifest_records_the_pipeline(tmp_path: Path) -> None:
    from edgevit.api import export_model

    model = nn.Sequential(nn.Linear(8, 4), nn.Flatten(0, -1))
    result = export_model(model, (torch.randn(2, 8),), target="onnx", out=tmp_path, name="tiny",
                          passes="select_to_slice", compare_without_passes=True)
    record = json.loads(result.manifest_path.read_text())["passes"]
    assert record["requested"] == "select_to_slice" and record["pipeline"] == ["select_to_slice"]
    assert record["applied"] == [{"name": "select_to_slice", "sites": 0, "exact": True,
                                  "max_abs_change": None, "notes": []}]
    assert record["parity_cost"]["without_passes"]["status"] == "passed"
    assert record["parity_cost"]["artifact_max_abs_with_passes"] < 1e-5


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevit.cli", *args], capture_output=True, text=True)


def test_cli_passes_lists_pipelines() -> None:
    proc = _cli("passes", "--target", "onnx", "--accelerator", "nnapi", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == list(default_pipeline("onnx", "nnapi"))
    assert all("onnx:nnapi" in r["pipelines"] for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (("passes", "--accelerator", "gpu"), "--accelerator needs --target"),
        (("passes", "--target", "tflite", "--accelerator", "ane"), "no accelerator 'ane'"),
        (("export", "deit_tiny", "-t", "onnx", "--passes", "bogus"), "unknown pass 'bogus'"),
        (("export", "deit_tiny", "-t", "all", "-a", "nnapi"), "--accelerator applies to one target"),
        (("export", "deit_tiny", "-t", "onnx", "-a", "gpu"), "no accelerator 'gpu'"),
    ],
)
def test_cli_pass_argument_errors_are_one_line(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    proc = _cli(*args, *(("--out", str(tmp_path / "o")) if args[0] == "export" else ()))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_module_passes_run_before_capture_and_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ModulePass (a module swap, for rewrites a graph pass cannot express) goes through the same
    registry, runs on a copy of the model before capture, and is reported like a graph pass."""
    from edgevit.export.passes import ModulePass

    class SwapReLU(ModulePass):
        """ReLU modules -> ReLU6 (a stand-in swap; the test inputs stay below 6).

        Why: exercises the module-pass path of the framework.
        """

        name = "test_swap_relu"
        wanted_by = ("onnx:cpu",)

        def apply(self, model: nn.Module) -> int:
            swapped = 0
            for parent in model.modules():
                for child_name, child in parent.named_children():
                    if isinstance(child, nn.ReLU):
                        setattr(parent, child_name, nn.ReLU6())
                        swapped += 1
            return swapped

    monkeypatch.setitem(PASSES, SwapReLU.name, SwapReLU)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    x = torch.rand(3, 4)
    result = run_pipeline(model, (x,), ["test_swap_relu", "select_to_slice"])
    assert [(r.name, r.sites) for r in result.reports] == [("test_swap_relu", 2), ("select_to_slice", 0)]
    assert isinstance(model[1], nn.ReLU)  # the caller's model is untouched
    ops = {str(n.target) for n in result.program.graph.nodes if n.op == "call_function"}
    assert any("hardtanh" in o for o in ops), ops
    assert result.max_abs_change == 0.0
