"""edgevit check: the project file, cells judged against their budgets, the baseline and its regressions, the
reports (JUnit, markdown, results.json), the Python assertion and the pytest plugin.

The exports are real (tiny seeded models of tests/check_project/models.py on onnxruntime, seconds each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from edgevit.check import load_project  # noqa: E402
from edgevit.check.baseline import PARITY_FACTOR, differences  # noqa: E402
from edgevit.check.project import ProjectError  # noqa: E402
from edgevit.check.run import CellResult  # noqa: E402

PROJECT = Path(__file__).parent / "check_project"
EDGEVIT = [sys.executable, "-m", "edgevit.cli"]


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A copy of the test project (its models module beside its project file, as a user's would be)."""
    where = tmp_path / "project"
    shutil.copytree(PROJECT, where, ignore=shutil.ignore_patterns("__pycache__"))
    return where


def check(where: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"} | (env or {})
    return subprocess.run([*EDGEVIT, "check", *args], cwd=where, capture_output=True, text=True, timeout=900,
                          env=environment)


def add(where: Path, text: str) -> None:
    with open(where / "edgevit.toml", "a") as fh:
        fh.write(text)


# --- the project file -------------------------------------------------------------------------------------

def test_the_test_project_has_two_cells_with_their_budgets() -> None:
    project = load_project(PROJECT / "edgevit.toml")
    assert [c.id for c in project.cells] == ["mlp/onnx:nnapi/fp32", "mlp-cpu/onnx/fp32"]
    nnapi, cpu = project.cells
    assert nnapi.budgets.coverage.max_partitions == 1 and nnapi.budgets.coverage.min_nodes_percent == 100
    assert cpu.budgets.coverage is None and cpu.budgets.max_size_mb == 1
    assert nnapi.input_shape == (1, 16) and nnapi.source == "edgevit.toml:7: models[1]"


def test_cells_are_the_cross_product_and_global_budgets_apply(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.edgevit]\nmax_size_mb = 50\n[tool.edgevit.coverage]\n'
        '"onnx:nnapi" = { max_partitions = 2 }\n\n[[tool.edgevit.models]]\nmodel = "deit_tiny"\n'
        'targets = ["onnx", "tflite"]\nprecisions = ["fp32", "int8"]\naccelerators = ["onnx:nnapi", "onnx:cpu"]\n'
        'max_size_mb = 30\n')
    cells = {c.id: c for c in load_project(tmp_path / "pyproject.toml").cells}
    assert list(cells) == ["deit_tiny/onnx:nnapi/fp32", "deit_tiny/onnx:cpu/fp32", "deit_tiny/onnx:nnapi/int8",
                           "deit_tiny/onnx:cpu/int8", "deit_tiny/tflite/fp32", "deit_tiny/tflite/int8"]
    assert cells["deit_tiny/onnx:nnapi/int8"].budgets.coverage.max_partitions == 2  # the project's
    assert cells["deit_tiny/onnx:cpu/fp32"].budgets.coverage is None  # no budget for that accelerator
    assert {c.budgets.max_size_mb for c in cells.values()} == {30.0}  # the entry's over the project's
    assert cells["deit_tiny/onnx:nnapi/fp32"].slug == "deit_tiny-onnx-nnapi-fp32"  # a folder name CI uploads take


def test_entry_keys_apply_where_they_mean_something(tmp_path: Path) -> None:
    """calibration only to the int8 cells, a latency budget only to its device's target, passes as a list."""
    (tmp_path / "edgevit.toml").write_text(
        '[[models]]\nmodel = "deit_tiny"\ntargets = ["onnx", "tflite"]\nprecisions = ["fp32", "int8"]\n'
        'calibration = "photos"\npasses = ["strip_aliases", "fuse_gelu"]\n'
        'latency = { device = "tflite:xnnpack", max_ms = 20 }\n')
    cells = {c.id: c for c in load_project(tmp_path / "edgevit.toml").cells}
    assert {i: c.calibration for i, c in cells.items()} == {
        "deit_tiny/onnx/fp32": None, "deit_tiny/onnx/int8": "photos", "deit_tiny/tflite/fp32": None,
        "deit_tiny/tflite/int8": "photos"}
    assert {i for i, c in cells.items() if c.budgets.latency} == {"deit_tiny/tflite/fp32", "deit_tiny/tflite/int8"}
    assert {c.passes for c in cells.values()} == {"strip_aliases,fuse_gelu"}


def test_a_pyproject_with_only_the_devices_table_is_not_a_check_project(tmp_path: Path) -> None:
    from edgevit.check import find_project

    (tmp_path / "pyproject.toml").write_text('[tool.edgevit.devices.phone]\nremote = "adb:1234"\n')
    with pytest.raises(ProjectError, match="no project file"):
        find_project(None, tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.edgevit.devices.phone]\nremote = "adb:1234"\n\n'
                                             '[[tool.edgevit.models]]\nmodel = "deit_tiny"\ntargets = ["onnx"]\n')
    assert [c.id for c in load_project(find_project(None, tmp_path)).cells] == ["deit_tiny/onnx/fp32"]


@pytest.mark.parametrize("text, message", [
    ("[[tool.edgevit.models]]\nmodel = \"deit_tiny\"\ntargets = [\"onx\"]\n",
     "edgevit.toml:3: models[1].targets: unknown target 'onx'"),
    ("[[tool.edgevit.models]]\nmodel = \"deit_tiny\"\ntargets = [\"onnx\"]\ncolour = 1\n",
     "edgevit.toml:4: models[1].colour: unknown key"),
    ("[tool.edgevit]\njobs = 0\n[[tool.edgevit.models]]\nmodel = \"deit_tiny\"\ntargets = [\"onnx\"]\n",
     "edgevit.toml:2: jobs: must be a whole number >= 1"),
    ("[[tool.edgevit.models]]\nmodel = \"deit_tiny\"\ntargets = [\"onnx\"]\naccelerators = [\"tflite:gpu\"]\n",
     "edgevit.toml:4: models[1].accelerators: 'tflite:gpu': tflite is not among this entry's targets"),
    ("[[tool.edgevit.models]]\nmodel = \"deit_tiny\"\ntargets = [\"onnx\"]\n"
     "[tool.edgevit.models.coverage]\n\"onnx:nnapi\" = { max_partitions = 0 }\n",
     "models[1].coverage.\"onnx:nnapi\".max_partitions: must be a whole number >= 1"),
    ("[[tool.edgevit.models]]\nmodel = \"deit_tiny\"\ntargets = [\"onnx\"\n", "not valid TOML"),
    ("[tool.edgevit]\ntargets = [\"onnx\"]\n", "models: needs at least one [[models]] entry"),
    ("[[models]]\nmodel = \"deit_tiny\"\ntargets = [\"onnx\"]\ncalibration = \"photos\"\n",
     "edgevit.toml:4: models[1].calibration: applies to int8 cells; this entry has none"),
])
def test_a_bad_project_file_is_one_line_naming_the_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "edgevit.toml").write_text(text)
    with pytest.raises(ProjectError, match=None) as error:
        load_project(tmp_path / "edgevit.toml")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_cli_exits_2_with_one_line_on_a_bad_project_file_before_any_export(tmp_path: Path) -> None:
    (tmp_path / "edgevit.toml").write_text("[[tool.edgevit.models]]\nmodel = \"deit_tinny\"\ntargets = [\"onnx\"]\n")
    run = check(tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().startswith("error: edgevit.toml:2: models[1]: unknown model 'deit_tinny'")
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "edgevit-check").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    run = check(empty)
    assert run.returncode == 2 and "no project file" in run.stderr


def test_print_extras(tmp_path: Path) -> None:
    (tmp_path / "edgevit.toml").write_text("[[tool.edgevit.models]]\nmodel = \"deit_tiny\"\n"
                                           "targets = [\"openvino\", \"onnx\"]\n")
    run = check(tmp_path, "--print-extras")
    assert run.returncode == 0 and run.stdout.strip() == "onnx,openvino"


# --- running cells ----------------------------------------------------------------------------------------

def test_the_project_passes_and_writes_its_reports(project: Path, tmp_path: Path) -> None:
    summary = tmp_path / "step_summary.md"
    run = check(project, "--jobs", "2", env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2/2 cells passed" in run.stdout and "no baseline at" in run.stdout
    out = project / "edgevit-check"
    suite = ET.parse(out / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "0", "0")
    assert {(c.get("classname"), c.get("name")) for c in suite} == {("mlp", "onnx:nnapi/fp32"), ("mlp-cpu", "onnx/fp32")}
    results = json.loads((out / "results.json").read_text())
    nnapi = next(c for c in results["cells"] if c["cell"] == "mlp/onnx:nnapi/fp32")
    coverage = nnapi["record"]["coverage"]
    assert coverage["partitions"] == 1 and coverage["supported"] == coverage["nodes"]
    assert sum(coverage["ops_on_accelerator"].values()) == coverage["nodes"]
    assert "onnxruntime" in results["versions"]
    assert "| ✅ | `mlp/onnx:nnapi/fp32` | passed |" in (out / "summary.md").read_text()
    assert summary.read_text() == (out / "summary.md").read_text() + "\n"  # the CI job page got it too


def test_a_parity_break_and_a_split_partition_fail_with_the_cell_and_reason(project: Path) -> None:
    add(project, '\n[[tool.edgevit.models]]\nmodel = "models:erf_split"\nid = "split"\ninput_shape = [1, 16]\n'
                 'accelerators = ["onnx:nnapi"]\n[tool.edgevit.models.coverage]\n'
                 '"onnx:nnapi" = { max_partitions = 1 }\n'
                 '\n[[tool.edgevit.models]]\nmodel = "models:fp16_overflow"\nid = "overflow"\n'
                 'input_shape = [1, 16]\ntargets = ["coreml"]\nprecisions = ["fp16"]\n')
    run = check(project, "--jobs", "2", "--json")
    assert run.returncode == 1, run.stderr
    cells = {c["cell"]: c for c in json.loads(run.stdout)["cells"]}
    assert list(cells) == ["mlp/onnx:nnapi/fp32", "mlp-cpu/onnx/fp32", "split/onnx:nnapi/fp32",
                           "overflow/coreml/fp16"]  # the project's order, whatever order they finished in
    split, overflow = cells["split/onnx:nnapi/fp32"], cells["overflow/coreml/fp16"]
    assert split["status"] == "failed" and split["reasons"] == [
        "onnx:nnapi: 2 partitions > budget 1 (refused: Erf x1)"]
    assert overflow["status"] == "failed" and overflow["reasons"][0].startswith("parity ")
    assert cells["mlp-cpu/onnx/fp32"]["ok"] and cells["mlp/onnx:nnapi/fp32"]["ok"]
    suite = ET.parse(project / "edgevit-check" / "junit.xml").getroot()
    failure = suite.find("testcase[@classname='split']/failure")
    assert failure is not None and failure.get("message") == split["reasons"][0]


def test_a_disabled_pass_is_a_regression_against_the_baseline(project: Path) -> None:
    from edgevit.export.passes import resolve_passes

    (project / "edgevit.toml").write_text(
        '[[tool.edgevit.models]]\nmodel = "models:tiny_mlp"\nid = "mlp"\ninput_shape = [1, 16]\n'
        'targets = ["onnx"]\naccelerators = ["onnx:nnapi"]\n')
    first = check(project, "--update-baseline")
    assert first.returncode == 0, first.stderr
    lock = json.loads((project / "edgevit.lock.json").read_text())
    assert lock["cells"]["mlp/onnx:nnapi/fp32"]["coverage"]["partitions"] == 1
    pipeline = [p for p in resolve_passes("auto", "onnx", "nnapi") if p != "decompose_layer_norm"]
    text = (project / "edgevit.toml").read_text() + f'passes = "{",".join(pipeline)}"\n'
    (project / "edgevit.toml").write_text(text)
    second = check(project, "--json")
    assert second.returncode == 1, second.stderr
    cell = json.loads(second.stdout)["cells"][0]
    assert cell["status"] == "passed" and not cell["ok"]  # within its budgets (it has none), but regressed
    partitions = [r for r in cell["regressions"] if "partitions on the accelerator (baseline 1)" in r]
    assert partitions and int(partitions[0].split()[0]) > 1, cell
    assert json.loads((project / "edgevit.lock.json").read_text()) == lock  # comparing never rewrites it


# --- regressions, unit ------------------------------------------------------------------------------------

def _result(status: str = "passed", err: float = 1e-6, size: int = 1000, partitions: int = 1, supported: int = 10,
            ops: dict | None = None, versions: dict | None = None) -> CellResult:
    cell = load_project(PROJECT / "edgevit.toml").cells[0]
    record = {"parity": {"max_abs_err": err, "peak": 1.0}, "size_bytes": size,
              "coverage": {"partitions": partitions, "supported": supported, "nodes": 10,
                           "ops_on_accelerator": ops or {"MatMul": 2}},
              "versions": versions or {"onnxruntime": "1.31.1"}}
    return CellResult(cell, status, record=record)


def _base(r: CellResult) -> dict:
    return {"status": r.status, **r.record}


def test_regressions_and_improvements_follow_the_thresholds() -> None:
    base = _base(_result())
    assert differences(base, _result(err=PARITY_FACTOR * 1e-6 * 0.99)) == ([], [])
    worse, _ = differences(base, _result(err=PARITY_FACTOR * 1e-6 * 1.01))
    assert worse == ["parity max abs error 1.01e-05 > 10x the baseline's 1e-06"]
    assert differences(base, _result(size=1050)) == ([], [])  # +5% is allowed
    assert differences(base, _result(size=1051))[0][0].startswith("artifact 0.00 MB, +5% over")
    assert differences(base, _result(partitions=2, supported=9))[0] == [
        "2 partitions on the accelerator (baseline 1)", "9 nodes on the accelerator (baseline 10)"]
    assert differences(base, _result(ops={"MatMul": 2, "Erf": 1}))[0] == [
        "new op type(s) on the accelerator: Erf"]
    assert differences(base, _result(status="failed"))[0] == ["passed in the baseline, now failed"]
    worse, better = differences(_base(_result(status="failed", size=2000)), _result())
    assert worse == [] and better == ["failed in the baseline, now passed", "artifact 0.00 MB (baseline 0.00 MB)"]


def test_an_exact_baseline_is_floored_at_one_float32_step() -> None:
    """A baseline error of 0 (bit-exact) would make any rounding 'more than 10x': the floor is one float32
    rounding step of the output's peak, so 10 steps is still fine and 11 is not."""
    base = _base(_result(err=0.0))
    assert differences(base, _result(err=10 * 2.0 ** -23)) == ([], [])
    assert differences(base, _result(err=11 * 2.0 ** -23))[0]


def test_changed_tool_versions_are_named_next_to_each_regression() -> None:
    from edgevit.check.baseline import compare

    now = _result(partitions=2, versions={"onnxruntime": "1.32.0", "platform": "elsewhere"})
    compare([now], {"cells": {now.cell.id: _base(_result(versions={"onnxruntime": "1.31.1"}))}})
    assert now.regressions == ["2 partitions on the accelerator (baseline 1) [changed: onnxruntime 1.31.1 -> 1.32.0]"]


# --- Python assertion and pytest plugin ------------------------------------------------------------------

def test_assert_exports_passes_and_fails_with_the_one_line_reason(project: Path) -> None:
    import torch

    sys.path.insert(0, str(project))
    try:
        import models
    finally:
        sys.path.remove(str(project))
    from edgevit.testing import assert_exports

    x = (torch.randn(1, 16),)
    results = assert_exports(models.tiny_mlp(), x, targets="onnx", name="mlp",
                             coverage={"onnx:nnapi": {"max_partitions": 1, "min_nodes_percent": 100}})
    assert [r.cell.id for r in results] == ["mlp/onnx:nnapi/fp32"] and results[0].ok
    with pytest.raises(AssertionError) as error:
        assert_exports(models.erf_split(), x, targets="onnx", name="split",
                       coverage={"onnx:nnapi": {"max_partitions": 1}})
    assert str(error.value) == "split/onnx:nnapi/fp32: onnx:nnapi: 2 partitions > budget 1 (refused: Erf x1)"


def test_the_pytest_plugin_exports_once_per_cell_and_applies_the_baseline(tmp_path: Path) -> None:
    """A user's test session (its own folder, the plugin loaded by its entry point): two tests share one export;
    --edgevit-update-baseline writes the lock, and a later session fails on a regression against it."""
    shutil.copy(PROJECT / "models.py", tmp_path / "models.py")
    (tmp_path / "test_user.py").write_text("""
import torch
import models

def call(edgevit_exports):
    return edgevit_exports(models.tiny_mlp(), (torch.randn(1, 16),), targets="onnx", name="mlp",
                           coverage={"onnx:nnapi": {"max_partitions": 1}})

def test_first(edgevit_exports):
    call(edgevit_exports)

def test_second_reuses_it(edgevit_exports):
    before = edgevit_exports.results["mlp/onnx:nnapi/fp32"]
    assert call(edgevit_exports)[0] is before  # cached: not exported again
""")
    lock = tmp_path / "edgevit.lock.json"

    def session(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                               "--edgevit-baseline", str(lock), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)

    written = session("--edgevit-update-baseline")
    assert written.returncode == 0 and "2 passed" in written.stdout, written.stdout[-2000:]
    document = json.loads(lock.read_text())
    assert list(document["cells"]) == ["mlp/onnx:nnapi/fp32"]
    document["cells"]["mlp/onnx:nnapi/fp32"]["size_bytes"] //= 2  # as if the baseline's artifact was half the size
    lock.write_text(json.dumps(document))
    compared = session()
    assert compared.returncode == 1 and "2 failed" in compared.stdout, compared.stdout[-2000:]
    assert "AssertionError: mlp/onnx:nnapi/fp32: artifact" in compared.stdout
    assert "+100% over the baseline's" in compared.stdout


def _children(pid: int) -> list[int]:
    """The PIDs whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_running_cells_and_leaves_no_children_or_results(project: Path) -> None:
    import signal
    import time

    (project / "edgevit.toml").write_text(
        '[[tool.edgevit.models]]\nmodel = "models:hang"\ninput_shape = [1, 16]\ntargets = ["onnx"]\n'
        'accelerators = ["onnx:cpu", "onnx:nnapi"]\n')
    proc = subprocess.Popen([*EDGEVIT, "check", "--jobs", "2"], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:  # both cells' export children started
        time.sleep(0.5)
    children = _children(proc.pid)
    assert len(children) == 2, proc.communicate(timeout=5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)  # stopped, and reaped
    out = project / "edgevit-check"
    assert not (out / "results.json").exists() and not (out / "junit.xml").exists()  # nothing looks finished
    assert not list(out.glob("cells/*/*"))  # no half-written artifacts or staging folders


def test_the_repositorys_own_project_passes_against_its_committed_baseline(tmp_path: Path) -> None:
    """Dogfood: edgevit.toml at the root of the repository (what its check workflow runs), compared with the
    edgevit.lock.json committed beside it."""
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([*EDGEVIT, "check", "--project", str(root / "edgevit.toml"), "--out", str(tmp_path),
                          "--json"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    document = json.loads(run.stdout)
    assert document["baseline"] == str(root / "edgevit.lock.json")
    assert [c["cell"] for c in document["cells"]] == ["deit_tiny/onnx:nnapi/fp32", "mobilevit_v2_050/openvino/fp32"]
    assert all(c["ok"] and not c["regressions"] for c in document["cells"])


def test_a_latency_budget_is_measured_with_the_bench_protocol_and_judged(project: Path) -> None:
    (project / "edgevit.toml").write_text(
        '[[models]]\nmodel = "models:tiny_mlp"\nid = "mlp"\ninput_shape = [1, 16]\ntargets = ["onnx"]\n'
        'latency = { device = "onnx:cpu", max_ms = 0.0001 }\n')  # 100 ns: no runtime call is that fast
    run = check(project, "--json")
    assert run.returncode == 1, run.stderr
    cell = json.loads(run.stdout)["cells"][0]
    latency = cell["record"]["latency"]
    assert latency["device"] == "onnx:cpu" and latency["median_ms"] > 0.0001
    assert cell["status"] == "failed" and cell["reasons"] == [
        f"latency on onnx:cpu: median {latency['median_ms']:.2f} ms > budget 0.0001 ms"]
