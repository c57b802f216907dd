"""The pure parts of the benchmark scripts (their measurements are too slow for CI): how
``speedup_ceiling.py --repeat`` summarises repeated runs and how ``latency_goals.py`` judges and reports."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ratio(median: float) -> dict[str, float]:
    return {"median": median, "low": median - 0.3, "high": median + 0.3, "rounds": 12}


def _ceiling_row(device: str, ms: float, achieved: float, matmul: float) -> dict:
    return {"device": device, "model_ms": ms, "achieved": _ratio(achieved),
            "linear_ceiling": _ratio(matmul + 0.5), "matmul_ceiling": _ratio(matmul)}


def test_spread_over_repeats_gives_min_median_max_and_runs_at_goal() -> None:
    ceiling = _load("speedup_ceiling")
    repeats = [
        [_ceiling_row("torch:eager", 30.0, 1.0, 1.5), _ceiling_row("tflite:xnnpack", 15.0, 2.0, 2.4)],
        [_ceiling_row("torch:eager", 40.0, 1.0, 1.4), _ceiling_row("tflite:xnnpack", 20.0, 1.6, 2.1)],
        [_ceiling_row("torch:eager", 34.0, 1.0, 1.6), _ceiling_row("tflite:xnnpack", 18.0, 1.9, 2.2),
         {"device": "onnx:cpu"}],  # crashed in its only run: no figures, never at the goal
    ]
    by = {e["device"]: e for e in ceiling.spread(repeats, goal=2.0)}
    tfl = by["tflite:xnnpack"]
    assert tfl["runs"] == 3
    assert tfl["model_ms"] == {"min": 15.0, "median": 18.0, "max": 20.0}
    assert tfl["achieved"] == {"min": 1.6, "median": 1.9, "max": 2.0}
    assert tfl["matmul_ceiling"] == {"min": 2.1, "median": 2.2, "max": 2.4}
    assert tfl["at_goal"] == 1  # 2.0 reaches a 2x goal; 1.9 and 1.6 do not
    assert by["torch:eager"]["model_ms"]["median"] == 34.0
    assert by["onnx:cpu"] == {"device": "onnx:cpu", "runs": 1, "at_goal": 0}
    assert ceiling.spread(repeats, goal=1.5)[1]["at_goal"] == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--repeat", "0"], "error: --repeat must be at least 1, not 0"),
    (["--goal", "-1"], "error: --goal must be a positive speed-up, not -1"),
])
def test_bad_repeat_or_goal_is_a_one_line_error(args, message) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "speedup_ceiling.py"), *args],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [message]


def _bench_row(model: str, device: str, ms: float, speedup: float | None = None) -> dict:
    row = {"model": model, "device": device, "summary": {"median_ms": ms},
           "roofline": {"median_over_bound": 1.0, "bound_ms": ms, "gemm_gflops": 130.0},
           "repeatability": {"noisy": False}}
    return row | ({"speedup_vs_eager": _ratio(speedup)} if speedup else {})


def _bench(eager_ms: float, fastest_ms: float) -> dict:
    rows = []
    for model in ("deit_tiny", "mobilevit_v2_050"):
        rows += [_bench_row(model, "torch:eager", eager_ms),
                 _bench_row(model, "tflite:xnnpack", fastest_ms, eager_ms / fastest_ms),
                 _bench_row(model, "onnx:cpu", fastest_ms * 1.5, eager_ms / fastest_ms / 1.5)]
    return {"rows": rows}


@pytest.mark.parametrize(("second_eager", "ok"), [(40.0, True), (36.0, False)])
def test_the_speed_goal_holds_only_if_both_runs_reach_it_and_shows_both_medians(second_eager, ok) -> None:
    goals = _load("latency_goals").goals(_bench(40.0, 20.0), _bench(second_eager, 20.0))
    deit = next(c for c in goals if c["goal"].startswith("deit_tiny: fastest runtime"))
    assert deit["ok"] is ok
    assert "run 1: tflite:xnnpack 2.00x [1.70-2.30] (20.00 vs eager 40.00 ms)" in deit["figure"]
    assert f"(20.00 vs eager {second_eager:.2f} ms)" in deit["figure"]


def _quant_row(model: str, device: str, precision: str, ms: float, **extra) -> dict:
    return {"model": model, "device": device, "precision": precision, "status": "ok", "summary": {"median_ms": ms},
            "times_ms": [ms, ms, ms * 1.1, ms * 1.1], "rounds": [2, 2], **extra}


def test_quant_tradeoff_judges_the_goals_on_the_fastest_runtimes_and_links_accuracy() -> None:
    tradeoff = _load("quant_tradeoff")
    rows = [_quant_row("deit_tiny", "torch:eager", "fp32", 50.0),
            _quant_row("deit_tiny", "onnx:cpu", "fp32", 20.0, artifact_bytes=4000),
            _quant_row("deit_tiny", "openvino:cpu", "fp32", 16.0, artifact_bytes=4000),
            _quant_row("deit_tiny", "onnx:cpu", "int8", 12.0, artifact_bytes=1100,
                       roofline={"precision": "int8", "median_over_bound": 1.4}),
            _quant_row("deit_tiny", "openvino:cpu", "int8", 9.0, artifact_bytes=1000,
                       roofline={"precision": "int8", "median_over_bound": 1.6}),
            _quant_row("deit_tiny", "onnx:cpu", "w8", 21.0, speedup_vs_fp32=_ratio(0.94))]
    vnni = {"rows": rows, "hosts": [{"machine": {"cpu_flags": ["avx2", "avx512_vnni"]}}]}
    ratio, bound, w8 = tradeoff.goals(vnni, ["deit_tiny"])
    assert ratio["goal"] == "fastest int8 (openvino:cpu) vs fastest fp32 (openvino:cpu)"
    assert ratio["value"] == pytest.approx(16.8 / 9.45) and ratio["limit"] == ">= 1.6" and ratio["ok"]  # medians
    assert bound["value"] == 1.6 and not bound["ok"]  # the fastest int8 runtime's bound, not the best one's
    assert w8["goal"] == "w8 vs fp32 on onnx:cpu" and not w8["ok"]  # 0.94 < 0.95
    avx2 = {"rows": rows, "hosts": [{"machine": {"cpu_flags": ["avx2"]}}]}
    assert tradeoff.goals(avx2, ["deit_tiny"])[0]["limit"] == ">= 1.3"
    accuracy = [{"family": "deit", "target": "openvino", "precision": "int8", "drop": 0.2, "drop_ci95": [0.0, 0.6],
                 "sqnr_db": 33.0}]
    linked = {(r["runtime"], r["precision"]): r for r in tradeoff.tradeoff_rows(vnni, accuracy)}
    assert ("torch:eager", "fp32") not in linked
    assert linked[("openvino:cpu", "int8")]["drop"] == 0.2 and linked[("onnx:cpu", "int8")]["drop"] is None
    assert linked[("openvino:cpu", "int8")]["size_ratio"] == pytest.approx(0.25)
    table = tradeoff.markdown(list(linked.values()), tradeoff.goals(vnni, ["deit_tiny"]))
    assert "| deit_tiny | openvino:cpu | int8 | +0.20 [+0.00, +0.60] |" in table and "| NO |" in table


def test_quant_tradeoff_kernel_floor_from_a_separate_profiled_run() -> None:
    """The bound goal carries the kernel floor: the profiled run's matmul/conv share times the timed median,
    over the timed row's bound."""
    tradeoff = _load("quant_tradeoff")
    timed = [_quant_row("deit_tiny", "openvino:cpu", "fp32", 16.0),
             _quant_row("deit_tiny", "openvino:cpu", "int8", 9.0,
                        roofline={"precision": "int8", "median_over_bound": 2.5, "bound_ms": 3.6})]
    profile = [{"op": "FullyConnected (brgemm_avx512_I8)", "ms_per_run": 6.0, "gemm": True},
               {"op": "MVN (jit_avx512_f32)", "ms_per_run": 2.0, "gemm": False}]
    profiled = {"rows": [_quant_row("deit_tiny", "openvino:cpu", "int8", 12.0, profile=profile)]}
    vnni = {"rows": timed, "hosts": [{"machine": {"cpu_flags": ["avx512_vnni"]}}]}
    bound = tradeoff.goals(vnni, ["deit_tiny"], profiled)[1]
    assert bound["kernel_floor"] == pytest.approx(0.75 * 9.0 / 3.6)  # share 6/8 of the timed median
    assert "kernels alone: 1.88x (kernels: above the limit)" in tradeoff.markdown([], [bound])
    assert tradeoff.goals(vnni, ["deit_tiny"])[1]["kernel_floor"] is None  # no profiled run, no floor
