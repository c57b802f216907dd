"""The latency harness: statistics, interleaving, process isolation, the remote protocol, reports.

Fast tests use the worker's ``fake`` runtime (sleeps; crashes or hangs where told) and a two-node
ONNX graph built here; one slow test runs a small zoo model through every runtime of this machine.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevit.devices import stats
from edgevit.devices.harness import Config, Protocol, measure
from edgevit.devices.remote import LoopbackTransport, RemoteHost, RemoteSpec

FAST = Protocol(runs=6, rounds=3, warmup=1, gap_s=0.0, load_timeout_s=60, run_timeout_s=60)


def fake(label: str, **options) -> Config:
    return Config(label, {"runtime": "fake", "threads": 1, "options": {"ms": 1.0, **options}}, {"device": label})


# --- statistics ------------------------------------------------------------------------------------

def test_summary_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    times = list(rng.gamma(4.0, 2.0, size=101))
    s = stats.summarize(times, batch=2)
    assert s.runs == 101 and s.min_ms == min(times) and s.median_ms == statistics.median(times)
    assert s.p90_ms == pytest.approx(np.percentile(times, 90)) and s.p99_ms == pytest.approx(np.percentile(times, 99))
    assert s.mean_ms == pytest.approx(np.mean(times)) and s.std_ms == pytest.approx(np.std(times, ddof=1))
    assert s.throughput_per_s == pytest.approx(2 * 1000 / np.mean(times))
    with pytest.raises(ValueError):
        stats.summarize([])


def test_interleaved_ratio_and_spread() -> None:
    eager = [[10.0, 10.0, 10.0], [12.0, 12.0, 12.0], [11.0, 11.0, 11.0]]
    fast = [[5.0, 5.0, 5.0], [4.0, 4.0, 4.0], [5.5, 5.5, 5.5]]
    r = stats.interleaved_ratio(eager, fast)
    assert r.rounds == 3
    assert r.median == pytest.approx(11.0 / 5.0)  # overall medians
    assert (r.low, r.high) == (pytest.approx(2.0), pytest.approx(3.0))  # per-round 2.0, 3.0, 2.0


def test_repeatability_flags_more_than_ten_percent() -> None:
    steady = stats.repeatability([[10.0, 10.1], [10.2, 9.9], [10.0, 10.3], [10.1, 10.0]])
    assert steady is not None and not steady.noisy and steady.ratio < 1.1
    drifting = stats.repeatability([[10.0, 10.0], [10.0, 10.0], [12.0, 12.0], [12.0, 12.0]])
    assert drifting is not None and drifting.noisy and drifting.ratio == pytest.approx(1.2)
    assert stats.repeatability([[1.0]]) is None


def test_median_interval_ranks_are_the_binomial_order_statistics() -> None:
    # P(Binom(10, 1/2) <= 1) = 11/1024 <= 2.5 % < P(<= 2) = 56/1024: the interval is [x2, x9].
    assert stats.median_interval_ranks(10) == 2
    assert stats.median_interval_ranks(8) == 1  # 1/256 <= 2.5 % < 9/256: the extremes
    assert stats.median_interval_ranks(20) == 6  # the textbook value for n = 20
    assert stats.median_interval_ranks(5) is None  # 2/32 > 2.5 %: no 95 % interval from 5 samples


def test_repeatability_flags_scattered_rounds_even_without_drift() -> None:
    # Alternating fast/slow rounds: both halves have the same median, but the round medians scatter
    # by 30 %, so a re-run may land far from this one's median.
    scattered = stats.repeatability([[10.0, 10.0], [13.0, 13.0], [13.0, 13.0], [10.0, 10.0]] * 3)
    assert scattered is not None and scattered.ratio == pytest.approx(1.0)
    assert scattered.interval_ratio == pytest.approx(1.3) and scattered.noisy
    # The same scatter in one outlier round stays inside [x2, x9]: not noisy.
    one_outlier = stats.repeatability([[10.0, 10.1]] * 9 + [[13.0, 13.0]])
    assert one_outlier is not None and one_outlier.interval_ratio < 1.02 and not one_outlier.noisy
    # Fewer than 6 rounds: no interval, drift alone decides.
    short = stats.repeatability([[10.0], [13.0], [10.0], [13.0]])
    assert short is not None and short.interval_ratio is None and not short.noisy


# --- the harness with fake runtimes ---------------------------------------------------------------

def test_measure_interleaves_rounds_in_alternating_order() -> None:
    notes: list[str] = []
    results = measure([fake("A"), fake("B"), fake("C")], FAST, notes.append)
    rounds = [n.split(": ")[1] for n in notes if n.startswith("round")]
    assert rounds == ["A", "B", "C", "C", "B", "A", "A", "B", "C"]  # A B C / C B A / A B C
    for m in results:
        assert m.status == "ok" and [len(r) for r in m.rounds] == [2, 2, 2]
        assert all(t >= 1.0 for t in m.times_ms)  # each fake inference sleeps 1 ms
        assert m.load_ms is not None and m.first_ms is not None and m.peak_rss_mb > 1
        assert m.info["runtime"] == "fake" and m.info["threads"] == 1


@pytest.mark.parametrize("where, status", [("load", "crashed"), ("first", "crashed"), ("run:4", "crashed")])
def test_a_crashing_worker_is_recorded_and_the_others_finish(where: str, status: str) -> None:
    results = measure([fake("ok1"), fake("bad", crash=where), fake("ok2")], FAST)
    ok1, bad, ok2 = results
    assert bad.status == status and "exit code 3" in bad.detail
    assert ok1.ok and ok2.ok and len(ok1.times_ms) == len(ok2.times_ms) == 6


def test_a_hanging_worker_is_killed_at_the_timeout() -> None:
    protocol = Protocol(runs=4, rounds=2, warmup=0, block_warmup=0, load_timeout_s=60, run_timeout_s=2)
    ok, hung = measure([fake("ok"), fake("hung", hang="run:3")], protocol)
    assert hung.status == "timeout" and "within 2 s" in hung.detail
    assert ok.ok and len(ok.times_ms) == 4


def test_a_worker_error_is_one_line() -> None:
    (bad,) = measure([Config("x", {"runtime": "nope"})], FAST)
    assert bad.status == "error" and bad.detail.startswith("ValueError: unknown runtime 'nope'")


def test_a_time_budget_stops_the_timed_runs_early() -> None:
    protocol = Protocol(runs=1000, rounds=2, warmup=0, block_warmup=0, budget_s=0.2, load_timeout_s=60,
                        run_timeout_s=60)
    (m,) = measure([fake("slow", ms=20.0)], protocol)
    # 0.1 s per round: a block stops after the first run that crosses it (~5-6 runs of 20 ms)
    assert m.ok and len(m.rounds) == 2 and all(2 <= len(r) <= 8 for r in m.rounds)


def test_block_warmup_runs_untimed_for_its_time() -> None:
    import time

    from edgevit.devices.worker import Worker

    class Clocked:  # records when each inference starts
        def __init__(self) -> None:
            self.starts: list[float] = []

        def run(self, inputs: list) -> list:
            self.starts.append(time.perf_counter())
            time.sleep(0.002)
            return []

    worker, session = Worker(), Clocked()
    worker.session = session
    assert len(worker.run(2, warmup=3)["times_ms"]) == 2 and len(session.starts) == 5  # by count alone
    session.starts.clear()
    t0 = time.perf_counter()
    assert len(worker.run(2, warmup=1, warmup_s=0.05)["times_ms"]) == 2
    assert len(session.starts) >= 4 and session.starts[-2] - t0 >= 0.05  # the timed runs start after 50 ms


def test_profile_is_collected_on_request() -> None:
    config = fake("p")
    config.worker["profile"] = True
    (m,) = measure([config], FAST)
    assert m.profile and m.profile[0]["op"] == "Sleep" and m.profile[0]["share"] == 1.0


# --- the remote protocol over the loopback transport ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """y = relu(x @ W): two nodes, made with onnx.helper (no exporter involved)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("tiny")
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, root / "tiny.onnx")
    np.savez(root / "inputs.npz", np.ones((1, 64), np.float32))
    return root / "tiny.onnx", root / "inputs.npz"


def loopback_host(tmp_path: Path) -> RemoteHost:
    """The remote protocol to this machine through ``sh`` (no ssh): a fresh process, a clean environment."""
    spec = RemoteSpec("lo", "loopback", "", python=sys.executable, workdir=str(tmp_path / "remote"))
    return RemoteHost(spec, LoopbackTransport(spec))


def test_remote_protocol_measures_a_pushed_artifact_interleaved(tmp_path: Path, tiny_onnx) -> None:
    artifact, inputs = tiny_onnx
    with loopback_host(tmp_path) as host:
        facts = host.open()
        assert facts["remote"] == "loopback" and "version" in facts["packages"]["onnxruntime"]
        host.push({"a0/tiny.onnx": artifact, "inputs/x.npz": inputs})
        config = {"runtime": "onnxruntime", "artifact": "a0/tiny.onnx", "inputs": "inputs/x.npz", "threads": 1,
                  "options": {"providers": ["CPUExecutionProvider"]}}
        seen: list[str] = []
        a, b = measure([Config("a", config), Config("b", config)], FAST, seen.append, host.spawn)
        workdir = Path(host.dir)
        assert workdir.is_dir() and (workdir / "pids").read_text().count("\n") == 2  # one worker each
    assert a.status == b.status == "ok", (a.detail, b.detail)
    assert len(a.times_ms) == FAST.runs and a.info["runtime"] == "onnxruntime" and a.platform["protocol"] == 1
    rounds = [m.split(": ")[1] for m in seen if m.startswith("round")]
    assert rounds == ["a", "b", "b", "a", "a", "b"]  # interleaved, order alternating per round
    assert not workdir.exists()  # closed: the run's directory is gone


@pytest.mark.parametrize("options, detail", [({"crash": "first"}, "worker exit code 3 on loopback"),
                                             ({"sigkill": "run:3"}, "killed by SIGKILL on loopback (the device's out-of-memory")])
def test_remote_worker_death_is_explained(tmp_path: Path, options: dict, detail: str) -> None:
    with loopback_host(tmp_path) as host:
        host.open()
        dead, alive = measure([fake("dead", **options), fake("alive")], FAST, spawn=host.spawn)
    assert dead.status == "crashed" and detail in dead.detail, dead.detail
    assert alive.status == "ok" and len(alive.times_ms) == FAST.runs


def test_remote_hang_times_out_and_leaves_no_worker(tmp_path: Path) -> None:
    with loopback_host(tmp_path) as host:
        host.open()
        protocol = Protocol(runs=4, rounds=2, warmup=0, gap_s=0.0, run_timeout_s=2)
        (m,) = measure([fake("h", hang="run:2")], protocol, spawn=host.spawn)
        pid = int((Path(host.dir) / "pids").read_text().split()[0])
    assert m.status == "timeout"
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_remote_without_python_or_numpy_is_one_line(tmp_path: Path) -> None:
    from edgevit.devices.remote import RemoteError

    spec = RemoteSpec("lo", "loopback", "", python=str(tmp_path / "no-python"), workdir=str(tmp_path / "r"))
    with pytest.raises(RemoteError, match="no python at") as info, RemoteHost(spec, LoopbackTransport(spec)) as host:
        host.open()
    assert info.value.kind == "no-python" and not list((tmp_path / "r").iterdir())


def test_worker_file_needs_no_edgevit(tmp_path: Path, tiny_onnx) -> None:
    """The pushed worker (the bundle: devices/worker.py + the backends' session modules) imports only the
    standard library, numpy and the runtime it measures, and runs where edgevit is not importable."""
    from edgevit.devices.worker import SESSIONS
    from edgevit.devices.worker_bundle import bundle

    pytest.importorskip("onnxruntime")
    worker = bundle(tmp_path / "worker.py")
    source = worker.read_text()
    top_level = [ln for ln in source.splitlines() if ln.startswith(("import ", "from "))]
    assert not [ln for ln in top_level if "edgevit" in ln], top_level
    artifact, inputs = tiny_onnx
    configs = {"fake": {"runtime": "fake", "runs": 3, "warmup": 0},
               "ort": {"runtime": "onnxruntime", "artifact": str(artifact), "inputs": str(inputs), "threads": 1,
                       "runs": 3, "warmup": 0}}
    for name, config in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        # -I: isolated mode (no script directory, PYTHONPATH or user site); and edgevit made unimportable
        proc = subprocess.run([sys.executable, "-I", "-c", "import runpy, sys; sys.modules['edgevit'] = None; "
                               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                               str(worker), "run", f"{name}.json", f"{name}.out.json"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((tmp_path / f"{name}.out.json").read_text())["ok"]
    probe = subprocess.run([sys.executable, "-I", str(worker), "probe"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    facts = json.loads(probe.stdout)
    assert "version" in facts["packages"]["onnxruntime"] and "providers" in facts["onnxruntime"]
    bundled = subprocess.run([sys.executable, "-I", "-c", "import runpy, sys; print(sorted(runpy.run_path(sys.argv[1])"
                              "['SESSIONS']))", str(worker)], capture_output=True, text=True, timeout=60)
    assert bundled.stdout.strip() == str(sorted(SESSIONS)), bundled.stderr


def test_edgevit_source_zip_builds_a_zoo_model_without_the_installed_package(tmp_path: Path) -> None:
    """PyTorch eager on a remote: the model code travels as a zip that imports on its own."""
    from edgevit.devices.remote import source_zip

    zipped = source_zip(tmp_path / "edgevit-src.zip")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import edgevit.export.subject as subject; "
            "assert subject.__file__.startswith(sys.argv[1]), subject.__file__; "
            "s = subject.prepare_subject('deit_tiny', None, 32, None, 0); print(tuple(s.model(*s.example_inputs).shape))")
    proc = subprocess.run([sys.executable, "-c", code, str(zipped)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(1, 1000)"


# --- the devices table ------------------------------------------------------------------------------

def test_devices_table_rows_point_at_the_targets_table() -> None:
    from edgevit.devices.table import BASELINE, DEVICES
    from edgevit.devices.worker import SESSIONS
    from edgevit.export.targets import TARGETS

    assert BASELINE in DEVICES and DEVICES[BASELINE].target is None
    for d in DEVICES.values():
        assert d.runtime in SESSIONS
        if d.target is not None:
            target = TARGETS[d.target]
            target.accelerator(d.accelerator)  # a real accelerator row: its pipeline is the export's
            assert {p for p, _ in d.precisions.values() if p} <= set(target.precisions)
        reason = d.unavailable_reason()
        assert reason is None or (reason and "\n" not in reason)
    names = {f"{t}:{u}" for t in ("onnx",) for u in ("cpu", "xnnpack", "coreml", "nnapi")}
    names |= {"tflite:xnnpack", "tflite:gpu", "tflite:nnapi", "openvino:cpu", "openvino:gpu", "openvino:npu",
              "coreml:all", "coreml:cpu", "coreml:cpu_and_ne", "coreml:cpu_and_gpu"}
    assert names <= set(DEVICES)


def test_resolve_cpu_devices_and_errors() -> None:
    import platform

    from edgevit.devices.table import resolve_devices
    from edgevit.errors import EdgevitError

    cpu = resolve_devices("cpu")
    assert cpu[0].name == "torch:eager" and all(d.available and d.on_cpu for d in cpu)
    if platform.system() == "Linux":
        with pytest.raises(EdgevitError, match="coreml:all' is not available here: Core ML prediction needs macOS"):
            resolve_devices("coreml:all")
    with pytest.raises(EdgevitError, match="unknown device 'tpu'"):
        resolve_devices("tpu")
    only_onnx = resolve_devices("cpu", ["onnx"])
    assert {d.target for d in only_onnx} <= {None, "onnx"}


# --- reduced precision: the bound of what the runtime computed in ------------------------------------

def test_gemm_size_shrinks_until_one_call_fits_the_time_limit() -> None:
    from edgevit.devices.worker import gemm_size

    def sleeper(seconds_at_256: float):
        import time

        return lambda n: (lambda: time.sleep(seconds_at_256 * (n / 256) ** 3))

    assert gemm_size(sleeper(1e-4), 2048, 0.25) == 2048  # 2048 estimated at 0.05 s
    assert gemm_size(sleeper(0.01), 2048, 0.25) == 512  # 768 would be 0.27 s
    assert gemm_size(sleeper(0.1), 2048, 0.05) == 256  # never below the probe size
    assert gemm_size(sleeper(0.1), 128, 0.05) == 128  # a limit below the probe is kept as is


def test_gemm_probe_in_bf16_reports_its_size_and_precision() -> None:
    from edgevit.devices.worker import GemmSession

    gemm = GemmSession({"threads": 1, "options": {"n": 1024, "precision": "bf16", "max_call_s": 0.05}})
    n = gemm.info["n"]
    assert n % 256 == 0 and 256 <= n <= 1024 and gemm.info["flop"] == 2 * n ** 3
    assert gemm.compute_precision([]) == "bf16" and gemm.run([]).shape == (n, n)


@pytest.mark.parametrize("cpuinfo, precision, native", [
    ("flags\t\t: fpu sse avx2 fma f16c\n", "bf16", False),
    ("flags\t\t: fpu avx512f avx512_bf16 amx_bf16\n", "bf16", True),
    ("flags\t\t: fpu avx512f avx512_fp16\n", "fp16", True),
    ("Features\t: fp asimd fphp asimdhp bf16\n", "fp16", True),
    ("Features\t: fp asimd\n", "bf16", False),
    ("", "fp32", True),
])
def test_native_units_read_from_the_cpu_flags(cpuinfo: str, precision: str, native: bool) -> None:
    from edgevit.devices.worker import native_units

    assert native_units(precision, cpuinfo) is native


def test_roofline_uses_the_bound_of_the_precision_the_runtime_computed_in() -> None:
    from edgevit.devices.bench import _rows
    from edgevit.devices.report import bound_text, flat_row

    configs = [fake(label, precision="bf16", compute_precision=computed) for label, computed in
               (("upcast", "fp32"), ("native", "bf16"), ("half", "fp16"), ("silent", "unknown"))]
    for c in configs:
        c.meta |= {"precision": "bf16", "macs": 1_000_000_000, "batch": 1}
    rows = {r["device"]: r for r in _rows(measure(configs, FAST), {"fp32": 100.0, "bf16": 4.0})}
    upcast, native = rows["upcast"]["roofline"], rows["native"]["roofline"]
    assert upcast["precision"] == "fp32" and upcast["bound_ms"] == pytest.approx(20.0)  # 2 GFLOP at 100 GFLOP/s
    assert native["precision"] == "bf16" and native["bound_ms"] == pytest.approx(500.0)
    assert rows["half"]["roofline"] == {"precision": "fp16", "note": "no bound: no fp16 GEMM measured in this run"}
    assert "does not say" in rows["silent"]["roofline"]["note"]
    assert bound_text(flat_row(rows["upcast"])).endswith("x (fp32)")
    assert bound_text(flat_row(rows["native"])).endswith("x") and bound_text(flat_row(rows["half"])) == "-"


def test_onnxruntime_matmul_precision_is_read_from_the_kernels(tmp_path: Path) -> None:
    """An fp16 graph whose MatMul is fed through a Cast to float runs its matmul in fp32; a graph
    without a matrix multiply says nothing."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edgevit.export.backends.onnx.session import _ort_matmul_precision

    w = numpy_helper.from_array(np.ones((8, 8), np.float16), "W")
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["W"], ["wf"], to=TensorProto.FLOAT)]
    cases = {"fp32": nodes + [helper.make_node("MatMul", ["xf", "wf"], ["y"])],
             "unknown": nodes + [helper.make_node("Add", ["xf", "wf"], ["y"])]}
    for expected, graph_nodes in cases.items():
        graph = helper.make_graph(graph_nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, tmp_path / f"{expected}.onnx")
        feeds = {"x": np.ones((8, 8), np.float16)}
        assert _ort_matmul_precision(str(tmp_path / f"{expected}.onnx"), ["CPUExecutionProvider"], 1, feeds) == expected


# --- report writers -------------------------------------------------------------------------------

def synthetic_result() -> dict:
    def row(device, median, speedup=None):
        r = {"model": "deit_tiny", "device": device, "precision": "fp32", "status": "ok", "detail": "",
             "params": 5_717_416, "macs": 1_258_000_000, "batch": 1, "load_ms": 100.0, "first_ms": 30.0,
             "summary": stats.summarize([median, median * 1.1, median * 0.95]).to_dict(),
             "repeatability": {"noisy": False}, "runtime_info": {"threads": 2, "precision": "f32"},
             "peak_rss_mb": 300.0, "gmacs_per_s": 1.258e9 / median / 1e6,
             "roofline": {"bound_ms": 12.9, "median_over_bound": median / 12.9}, "profile": []}
        if speedup:
            r["speedup_vs_eager"] = {"median": speedup, "low": speedup - 0.1, "high": speedup + 0.1, "rounds": 4}
        return r

    failed = {"model": "deit_tiny", "device": "tflite:xnnpack", "precision": "fp32", "status": "crashed",
              "detail": "worker killed by signal 11"}
    return {"created": "2026-11-21T00:00:00+00:00", "machine": {"cpu": "test cpu", "cores": 2, "system": "Linux"},
            "versions": {"edgevit": "0.1.0"}, "gemm": [{"precision": "fp32", "status": "ok", "n": 2048, "threads": 2,
                                                         "engine": "torch", "gflops": 194.0, "best_gflops": 200.0}],
            "rows": [row("torch:eager", 40.0), row("onnx:cpu", 18.0, 2.2), failed]}


def test_report_writers(tmp_path: Path) -> None:
    from edgevit.devices.report import CSV_FIELDS, write_all

    result = synthetic_result()
    paths = write_all(result, tmp_path, tmp_path / "copy.json")
    assert json.loads(paths["json"].read_text()) == json.loads((tmp_path / "copy.json").read_text())
    rows = list(csv.DictReader(paths["csv"].open()))
    assert list(rows[0]) == CSV_FIELDS and len(rows) == 3
    assert rows[1]["device"] == "onnx:cpu" and float(rows[1]["speedup_vs_eager"]) == 2.2
    assert rows[2]["status"] == "crashed" and rows[2]["median_ms"] == ""
    md = paths["markdown"].read_text()
    assert "| deit_tiny | onnx:cpu |" in md and "2.20x [2.10-2.30]" in md and "crashed: worker killed" in md
    assert "194.0 GFLOP/s" in md
    if paths["png"] is not None:
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![latency against MACs]" in md
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


# --- the CLI ----------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevit.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("changes, message", [
    ({"precision": "int4"}, "unknown precision 'int4'"),
    ({"device": "coreml:all"}, "not available here"),
    ({"device": "warp-drive"}, "unknown device 'warp-drive'"),
    ({"models": ["resnet9000"]}, "resnet9000"),
    ({"runs": 0}, "--runs and --rounds must be >= 1"),
    ({"budget_s": -1.0}, "--budget must be > 0"),
    ({"passes": "no_such_pass"}, "no_such_pass"),
    ({"device": "openvino:cpu", "targets": ["onnx"], "precision": "bf16"}, "no runtime on 'openvino:cpu' measures bf16"),
])
def test_bench_argument_errors(changes: dict, message: str) -> None:
    from edgevit.devices.bench import BenchOptions, check_options
    from edgevit.errors import EdgevitError

    if changes.get("device") == "coreml:all" and sys.platform == "darwin":
        pytest.skip("Core ML runs on macOS")
    with pytest.raises(EdgevitError, match=message):
        check_options(BenchOptions(**changes))


def test_bench_cli_error_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    proc = run_cli("bench", "--out", str(tmp_path / "b"), "--precision", "int4")
    assert proc.returncode == 2 and "unknown precision 'int4'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_devices_json() -> None:
    proc = run_cli("devices", "--json")
    result = json.loads(proc.stdout)
    rows = result["devices"]
    assert proc.returncode == 0 and {r["device"] for r in rows} >= {"torch:eager", "onnx:cpu", "openvino:npu"}
    assert all(r["available"] == (r["reason"] is None) and r["host"] == "local" for r in rows)
    (machine,) = result["machines"]
    assert machine["name"] == "local" and machine["facts"]["cpu"]["cores"] >= 1


# --- one small real model through every runtime here ---------------------------------------------------

@pytest.mark.slow
def test_bench_runs_a_small_model_on_every_cpu_runtime_and_caches_exports(tmp_path: Path) -> None:
    args = ["bench", "--models", "deit_tiny", "--input-size", "64", "--runs", "4", "--rounds", "2", "--warmup", "1",
            "--out", str(tmp_path / "b"), "--json", str(tmp_path / "r.json")]
    first = run_cli(*args, "--profile")
    assert first.returncode == 0, first.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    rows = {r["device"]: r for r in result["rows"]}
    assert {"torch:eager", "onnx:cpu", "tflite:xnnpack", "openvino:cpu"} <= set(rows)
    for device, row in rows.items():
        assert row["status"] == "ok" and row["summary"]["runs"] == 4, (device, row.get("detail"))
        assert row["runtime_info"]["threads"] >= 1 and row["runtime_info"]["precision"]
        assert row["runtime_info"]["compute_precision"] == row["roofline"]["precision"] == "fp32", device
        if device != "torch:eager":
            assert row["export_cached"] is False and row["parity"] == "passed"
            assert row["speedup_vs_eager"]["rounds"] == 2 and row["roofline"]["bound_ms"] > 0
    assert rows["openvino:cpu"]["runtime_info"]["precision"] == "f32"
    assert rows["onnx:cpu"]["profile"] and rows["openvino:cpu"]["profile"] and rows["torch:eager"]["profile"]
    assert result["gemm"][0]["gflops"] > 1 and result["versions"]["torch"].startswith("2.")
    for name in ("bench.json", "bench.csv", "report.md"):
        assert (tmp_path / "b" / name).exists()
    again = run_cli(*args, "--no-roofline", "--targets", "onnx")
    assert again.returncode == 0, again.stderr[-2000:]
    rows = {r["device"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert set(rows) == {"torch:eager", "onnx:cpu"} and rows["onnx:cpu"]["export_cached"] is True


# --- a remote machine's devices, decided from its facts ------------------------------------------------

def remote_facts(**packages: dict) -> dict:
    import copy

    from edgevit.devices.table import local_facts

    facts = copy.deepcopy(local_facts()) | {"remote": "ssh:pi@board", "name": "pi"}
    facts["packages"] |= packages
    return facts


def test_remote_devices_list_missing_runtimes_without_failing_the_cpu_set() -> None:
    from edgevit.devices.bench import BenchOptions, _remote_devices

    spec = RemoteSpec("pi", "ssh", "pi@board")
    facts = remote_facts(onnxruntime={"missing": True}, torch={"missing": True})
    devices, absent = _remote_devices(spec, BenchOptions(device="cpu"), facts)
    names = {d.name for d in devices}
    assert "onnx:cpu" not in names and "torch:eager" not in names and "openvino:cpu" in names
    reasons = {d.name: (reason, requested) for d, reason, requested in absent}
    assert set(reasons) == {"torch:eager", "onnx:cpu"}  # one row per missing runtime, not onnx:xnnpack too
    assert "pip install onnxruntime for" in reasons["onnx:cpu"][0] and reasons["onnx:cpu"][1] is False
    _, named = _remote_devices(spec, BenchOptions(device="onnx:cpu"), facts)
    assert [(d.name, requested) for d, _, requested in named] == [("onnx:cpu", True)]  # asked for: a failure


def test_broken_runtime_on_a_remote_says_so() -> None:
    from edgevit.devices.table import DEVICES

    facts = remote_facts(openvino={"error": "ImportError: libtbb.so.12: cannot open shared object file"})
    assert "openvino is installed but does not import: ImportError: libtbb" in DEVICES["openvino:cpu"].unavailable_reason(facts)


def test_without_eager_the_ratio_is_against_the_fastest_runtime() -> None:
    from edgevit.devices.bench import _rows
    from edgevit.devices.harness import Measurement
    from edgevit.devices.report import speedup_text

    def timed(device: str, ms: float) -> Measurement:
        m = Measurement(device, {"device": device, "precision": "fp32", "macs": 10**9, "batch": 1}, status="ok")
        m.rounds = [[ms, ms], [ms * 1.1, ms * 1.1]]
        return m

    rows = {r["device"]: r for r in _rows([timed("onnx:cpu", 20.0), timed("tflite:xnnpack", 10.0)], {})}
    assert rows["onnx:cpu"]["baseline"] == "tflite:xnnpack" and "speedup_vs_eager" not in rows["onnx:cpu"]
    assert rows["onnx:cpu"]["speedup_vs_baseline"]["median"] == pytest.approx(0.5)
    assert speedup_text(rows["onnx:cpu"]).endswith("vs tflite:xnnpack")
    assert speedup_text(rows["tflite:xnnpack"]) == "1.00x (baseline)"
