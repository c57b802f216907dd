"""edgevit sweep: the cells of the flags, the local executor (a crash and a hang cost their cells only; Ctrl-C
stops scheduling and writes the partial results) and the Ray executor on a real two-node local cluster (cells
spread over the nodes, the device cell on the node that advertises the device, the local executor's results).

Exports are real: tiny seeded models of tests/check_project/models.py on onnxruntime and OpenVINO."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from edgevit.errors import EdgevitError  # noqa: E402
from edgevit.sweep import plan_cells  # noqa: E402

MODELS = Path(__file__).parent / "check_project" / "models.py"
EDGEVIT = [sys.executable, "-m", "edgevit.cli"]


@pytest.fixture()
def here(tmp_path: Path) -> Path:
    shutil.copy(MODELS, tmp_path / "models.py")
    return tmp_path


def sweep(where: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEVIT, "sweep", *args], cwd=where, capture_output=True, text=True, timeout=timeout)


def rows(where: Path, out: str = "sweep") -> dict[str, dict]:
    return {r["cell"]: r for r in json.loads((where / out / "sweep.json").read_text())["rows"]}


# --- the cells ---------------------------------------------------------------------------------------------

def test_cells_are_the_cross_product_with_accelerators_and_bench_devices() -> None:
    cells = plan_cells(["deit_tiny"], ["onnx", "openvino"], ["fp32", "int8"], ["onnx:nnapi"], ["onnx:cpu"])
    assert [(c.id, c.bench) for c in cells] == [
        ("deit_tiny/onnx:nnapi/fp32", ()), ("deit_tiny/onnx:nnapi/int8", ()),
        ("deit_tiny/openvino/fp32", ()), ("deit_tiny/openvino/int8", ())]
    cells = plan_cells(["deit_tiny"], ["onnx", "tflite"], ["fp32"], ["onnx:cpu", "onnx:nnapi"], ["onnx:cpu"])
    assert [(c.id, c.bench, c.cost) for c in cells] == [
        ("deit_tiny/onnx:cpu/fp32", ("onnx:cpu",), 1), ("deit_tiny/onnx:nnapi/fp32", (), 1),
        ("deit_tiny/tflite/fp32", (), 2)]  # only the default pipeline's artifact is what onnx:cpu runs
    cells = plan_cells(["deit_tiny"], ["onnx", "tflite"], ["int8"], [], ["adb:R58M123", "onnx:cpu"])
    assert [(c.id, c.bench, c.cost) for c in cells] == [  # a remote machine: every target's runtime it has
        ("deit_tiny/onnx/int8", ("adb:R58M123", "onnx:cpu"), 2), ("deit_tiny/tflite/int8", ("adb:R58M123",), 3)]


@pytest.mark.parametrize("args, message", [
    (["-m", "deit_tinny", "-t", "onnx"], "unknown model 'deit_tinny'"),
    (["-m", "deit_tiny", "-t", "onx"], "unknown target 'onx'"),
    (["-m", "deit_tiny", "-t", "onnx", "--bench", "openvino:cpu"], "--bench: 'openvino:cpu' runs none of --targets"),
    (["-m", "deit_tiny", "-t", "onnx", "--executor", "spark"], "unknown --executor 'spark'"),
    (["-m", "deit_tiny", "-t", "onnx", "--address", "1.2.3.4:6379"], "--address/--shared-dir apply to --executor ray"),
])
def test_bad_flags_are_one_line_and_exit_2_before_any_cell(tmp_path: Path, args: list[str], message: str) -> None:
    run = sweep(tmp_path, *args)
    assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "sweep" / "sweep.json").exists()


def test_plan_errors_name_the_flag() -> None:
    with pytest.raises(EdgevitError, match="--accelerators: 'tflite:gpu' is not target:accelerator"):
        plan_cells(["deit_tiny"], ["onnx"], ["fp32"], ["tflite:gpu"], [])


# --- local executor -----------------------------------------------------------------------------------------

def test_a_crash_and_a_hang_cost_their_cells_only_and_a_rerun_measures_only_what_changed(here: Path) -> None:
    args = ["-m", "models:tiny_mlp,models:flaky", "--input-shape", "1,16", "-t", "onnx,openvino", "-j", "2",
            "--timeout", "30"]
    run = sweep(here, *args)
    assert run.returncode == 1, run.stderr
    got = rows(here)
    assert list(got) == ["models:tiny_mlp/onnx/fp32", "models:tiny_mlp/openvino/fp32", "models:flaky/onnx/fp32",
                         "models:flaky/openvino/fp32"]
    assert got["models:tiny_mlp/onnx/fp32"]["status"] == got["models:tiny_mlp/openvino/fp32"]["status"] == "passed"
    crashed, hung = got["models:flaky/onnx/fp32"], got["models:flaky/openvino/fp32"]
    assert crashed["status"] == "error" and "exited with code 3" in crashed["reason"], crashed
    assert hung["status"] == "timeout" and hung["reason"] == "timed out after 30 s", hung
    assert "2/4 cells passed" in run.stdout
    csv = (here / "sweep" / "sweep.csv").read_text().splitlines()
    assert len(csv) == 5 and csv[0].startswith("cell,model,target")
    assert not [p for p in (here / "sweep" / "cache").iterdir() if p.name.startswith(".export-")]  # no staging left
    again = sweep(here, "-m", "models:tiny_mlp", "--input-shape", "1,16", "-t", "onnx,openvino")
    assert again.returncode == 0, again.stderr
    assert all(r["cached"] for r in rows(here).values())  # the export cache: nothing converted again


def test_ctrl_c_stops_scheduling_lets_the_running_cell_finish_and_writes_partial_results(here: Path) -> None:
    proc = subprocess.Popen([*EDGEVIT, "sweep", "-m", "models:slow,models:tiny_mlp", "--input-shape", "1,16",
                             "-t", "onnx", "-j", "1"], cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not _export_child_running(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches the sweep (its children have their own session)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    document = json.loads((here / "sweep" / "sweep.json").read_text())
    assert document["complete"] is False
    assert [(r["cell"], r["status"]) for r in document["rows"]] == [
        ("models:slow/onnx/fp32", "passed"), ("models:tiny_mlp/onnx/fp32", "not run")]
    assert "PARTIAL" in (here / "sweep" / "report.md").read_text()


def _export_child_running(pid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == pid and b"--in-process" in cmdline:
                return True
    return False


# --- Ray executor -------------------------------------------------------------------------------------------

@pytest.fixture()
def cluster(tmp_path: Path):
    """A head node (1 CPU) and a second node (1 CPU) advertising the device onnx:cpu, both on 127.0.0.1."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    if ray_bin is None:
        pytest.skip("Ray is not installed (the [ray] extra)")
    port = "6391"
    common = ["--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env)
    try:
        subprocess.run([ray_bin, "start", "--head", "--port", port, "--include-dashboard", "false", *common],
                       check=True, capture_output=True, env=env, timeout=120)
        subprocess.run([ray_bin, "start", "--address", f"127.0.0.1:{port}", "--resources", '{"onnx:cpu": 1}',
                        *common], check=True, capture_output=True, env=env, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_ray_spreads_cells_puts_the_device_cell_on_its_node_and_matches_the_local_executor(here: Path,
                                                                                          cluster: str) -> None:
    listed = subprocess.run([*EDGEVIT, "devices", "--cluster", "--address", cluster, "--json"], capture_output=True,
                            text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert sorted(n["resources"].get("onnx:cpu", 0) for n in json.loads(listed.stdout)["nodes"]) == [0, 1]
    args = ["-m", "models:tiny_mlp,models:erf_split", "--input-shape", "1,16", "-t", "onnx,openvino",
            "--bench", "onnx:cpu"]
    local = sweep(here, *args, "-j", "2", "--out", "local")
    assert local.returncode == 0, local.stderr
    distributed = sweep(here, *args, "--executor", "ray", "--address", cluster, "--out", "ray")
    assert distributed.returncode == 0, distributed.stdout[-3000:] + distributed.stderr[-3000:]
    document = json.loads((here / "ray" / "sweep.json").read_text())
    nodes = {n["id"]: n for n in document["cluster"]["nodes"]}
    assert len(nodes) == 2
    got, expected = rows(here, "ray"), rows(here, "local")
    assert {r["node"] for r in got.values()} == set(nodes)  # both nodes ran cells
    for cell, row in got.items():
        if row["bench"]:
            assert nodes[row["node"]]["resources"] == {"onnx:cpu": 1.0}, row  # only where the device is
        assert (row["status"], row["max_abs_err"], row["size_bytes"]) == (
            expected[cell]["status"], expected[cell]["max_abs_err"], expected[cell]["size_bytes"])
        assert Path(row["artifact"]).is_file() and Path(row["artifact"]).is_relative_to(here / "ray")  # returned
