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
from edgevit.export.passes import ORDER, PASSES, default_pipeline, resolve_passes, run_pipeline
from edgevit.export.targets import TARGETS

TESTS = Path(__file__).resolve().parent


def test_every_pass_is_documented_and_placed() -> None:
    assert len(PASSES) >= 2
    for name, cls in PASSES.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        doc = (cls.__doc__ or "").strip()
        # A summary line plus a paragraph saying why (the backend limit it works around).
        assert len(doc.splitlines()) >= 3 and "why" in doc.lower(), f"{name}: docstring must say why"
        assert name in ORDER, f"{name} has no place in ORDER"
        assert any(name in default_pipeline(t.name, a.name) for t in TARGETS.values() for a in t.accelerators), name


def test_every_pass_has_its_own_tests() -> None:
    """Each pass name is exercised by a pass test file (equivalence + backend reason live there)."""
    sources = "\n".join(p.read_text() for p in TESTS.glob("test_pass_*.py"))
    missing = [n for n in PASSES if sources.count(f'"{n}"') < 2]
    assert not missing, f"passes without tests: {missing}"


def test_every_pipeline_is_registered_passes_in_order() -> None:
    """Each backend's explicit lists name registered passes, once each, in ORDER; every accelerator has one."""
    assert len(set(ORDER)) == len(ORDER) and set(ORDER) == set(PASSES)
    for t in TARGETS.values():
        for a in t.accelerators:
            names = default_pipeline(t.name, a.name)
            assert names and list(names) == sorted(names, key=ORDER.index), f"{t.name}:{a.name}"
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
    from edgevit.export.pipeline import convert as _convert
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
    assert record["applied"] == [{"name": "select_to_slice", "status": "not applicable", "sites": 0, "exact": True,
                                  "max_abs_change": None, "notes": [], "reason": None}]
    assert record["parity_cost"]["without_passes"]["status"] == "passed"
    assert record["parity_cost"]["artifact_max_abs_with_passes"] < 1e-5


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevit.cli", *args], capture_output=True, text=True)


def test_cli_passes_lists_pipelines() -> None:
    proc = _cli("passes", "--target", "onnx", "--accelerator", "nnapi", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    from edgevit.export.quantization.passes import quantized_pipeline

    # the graph passes in order, then the quantized-graph passes its int8 artifacts get (docs/placement.md)
    assert [r["name"] for r in rows] == [*default_pipeline("onnx", "nnapi"), *quantized_pipeline("onnx", "nnapi")]
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


# --- passes never make a model worse: rollback ----------------------------------------------------

from edgevit.export.passes.base import GraphPass, aten, is_op  # noqa: E402


class _Residual(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x[:, 0] + 1) * 2


class _Raises(GraphPass):
    """Test pass that raises on its first site.

    Why: a pass bug must cost only that pass.
    """

    name = "test_raises"

    def matches(self, ctx, node) -> bool:
        return is_op(node, aten.relu)

    def rewrite(self, ctx, node) -> None:
        raise IndexError("tuple index out of range")


class _WrongValues(GraphPass):
    """Test pass that turns ``add`` into ``sub`` (runs, wrong numbers).

    Why: a rewrite that moves the outputs beyond fp32 rounding is wrong.
    """

    name = "test_wrong_values"

    def matches(self, ctx, node) -> bool:
        return is_op(node, aten.add)

    def rewrite(self, ctx, node) -> None:
        ctx.replace(node, ctx.call(aten.sub.Tensor, *node.args))


class _BrokenGraph(GraphPass):
    """Test pass that views a transposed tensor (the graph no longer runs).

    Why: the stride bug strip_aliases once had.
    """

    name = "test_broken_graph"

    def matches(self, ctx, node) -> bool:
        return is_op(node, aten.mul)

    def rewrite(self, ctx, node) -> None:
        t = ctx.call(aten.t.default, node.args[0])  # same values if view were allowed on a transpose
        flat = ctx.call(aten.view.default, t, [-1])
        back = ctx.call(aten.reshape.default, flat, list(ctx.shape(t)))
        node.args = (ctx.call(aten.t.default, back), *node.args[1:])


def _data_dependent(x: torch.Tensor) -> torch.Tensor:
    return x if x.sum() > -1e30 else -x  # runs eagerly; torch.export cannot trace the branch


class _Uncapturable(GraphPass):
    """Test pass whose graph runs but cannot be captured again (a data-dependent branch).

    Why: found only when the converter needs the program.
    """

    name = "test_uncapturable"

    def matches(self, ctx, node) -> bool:
        return is_op(node, aten.relu)

    def rewrite(self, ctx, node) -> None:
        with ctx.graph.inserting_after(node):
            branch = ctx.graph.call_function(_data_dependent, (node,))
        node.replace_all_uses_with(branch, delete_user_cb=lambda user: user is not branch)


@pytest.fixture
def test_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in (_Raises, _WrongValues, _BrokenGraph, _Uncapturable):
        monkeypatch.setitem(PASSES, cls.name, cls)


@pytest.mark.parametrize("bad, reason", [("test_raises", "IndexError: tuple index out of range"),
                                         ("test_wrong_values", "moved by"),
                                         ("test_broken_graph", "the rewritten graph does not run")])
def test_a_failing_pass_is_rolled_back_and_the_others_apply(test_passes, bad: str, reason: str) -> None:
    x = torch.randn(2, 3, 4)
    result = run_pipeline(_Residual(), (x,), [bad, "select_to_slice"])
    record = {r.name: r.to_dict() for r in result.reports}
    assert record[bad]["status"] == "rolled back" and reason in record[bad]["reason"]
    assert record[bad]["sites"] == 0 and record[bad]["max_abs_change"] is None
    assert record["select_to_slice"]["status"] == "applied" and record["select_to_slice"]["sites"] == 1
    y = torch.randn(2, 3, 4)
    assert torch.equal(result.program.module()(y), _Residual()(y))
    assert not any(n.target in (aten.sub.Tensor,) for n in result.model.graph.nodes)


@pytest.mark.parametrize("bad", ["test_raises", "test_wrong_values", "test_broken_graph"])
def test_strict_passes_turn_a_rollback_into_an_error(test_passes, bad: str) -> None:
    with pytest.raises(EdgevitError, match=f"pass '{bad}' failed"):
        run_pipeline(_Residual(), (torch.randn(2, 3, 4),), [bad], strict=True)


def test_a_graph_that_cannot_be_captured_is_replayed_to_find_the_pass(test_passes) -> None:
    x = torch.randn(2, 3, 4)
    result = run_pipeline(_Residual(), (x,), ["test_uncapturable", "select_to_slice"])
    assert [r.status for r in result.reports] == ["applied", "applied"]  # runs in PyTorch: not caught yet
    program = result.program  # the capture fails, the replay rolls back the pass responsible
    record = {r.name: r for r in result.reports}
    assert record["test_uncapturable"].status == "rolled back"
    assert "cannot be captured" in record["test_uncapturable"].reason
    assert record["select_to_slice"].status == "applied"
    assert torch.equal(program.module()(x), _Residual()(x))


def test_export_falls_back_to_no_passes_when_the_converter_fails_on_the_rewrite(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A converter that cannot take what a pass wrote must not cost the model its export (--passes none
    converts, so --passes auto must too); with strict_passes it is an error."""
    import edgevit
    from edgevit.export.backends.onnx import convert as onnx_target

    real = onnx_target.convert

    def picky(program, *args):
        if any(is_op(n, aten.slice) for n in program.graph.nodes):
            raise RuntimeError("Slice is not supported by this converter")
        return real(program, *args)

    monkeypatch.setattr(onnx_target, "convert", picky)
    x = torch.randn(1, 3, 4)
    result = edgevit.export_model(_Residual(), x, target="onnx", out=tmp_path / "a", passes="select_to_slice",
                                  strict_passes=False)
    record = result.manifest["passes"]
    assert result.parity.status == "passed" and result.manifest["status"] == "passed"
    assert record["rollback"]["outcome"] == "used" and "Slice is not supported" in record["rollback"]["reason"]
    assert record["applied"][0]["status"] == "rolled back" and record["sites_total"] == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["_Residual.onnx", "manifest.json"]
    with pytest.raises(EdgevitError, match="Slice is not supported"):
        edgevit.export_model(_Residual(), x, target="onnx", out=tmp_path / "b", passes="select_to_slice",
                             strict_passes=True)


def test_cli_reports_rolled_back_passes(capsys: pytest.CaptureFixture) -> None:
    """The table counts them and a warning names each one with its reason (the export itself passed)."""
    from edgevit.cli.export import passes_cell as _passes_cell, report as _report

    record = {"pipeline": ["strip_aliases", "select_to_slice"], "sites_total": 3, "applied": [
        {"name": "strip_aliases", "status": "applied", "sites": 3, "reason": None},
        {"name": "select_to_slice", "status": "rolled back", "sites": 0,
         "reason": "the rewritten graph does not run: RuntimeError: view size (1 site(s) undone)"}]}
    manifest = {"status": "passed", "target": "onnx", "precision": "fp32", "model": {"name": "m"},
                "parity": {"outputs": []}, "passes": record}
    assert "1 rolled back" in _passes_cell(manifest)
    _report([manifest], as_json=False)
    err = capsys.readouterr().err
    assert "warning: onnx: pass select_to_slice rolled back: the rewritten graph does not run" in err
