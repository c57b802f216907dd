"""What each quantized precision buys and costs, in one table: accuracy drop, speed-up, size (and the goals).

Speed: one interleaved ``edgevit bench`` run of the zoo models (DeiT-Tiny at 224, MobileViT-v2-0.5 at 256:
their native sizes) on every CPU runtime here, at fp32 and each quantized precision (artifacts from the
quantization pipeline, calibrated on seeded inputs: the values decide scales, not kernels). Accuracy: the quantization table of
``benchmarks/quant_accuracy.py`` (the same backends and precisions on the two families trained on
scikit-learn's digits, since no pretrained weights or ImageNet can be downloaded here): ``--accuracy
FILE`` reuses its ``--json`` output, else the cells are run now. The two are linked by (family, backend,
precision): the drop is measured on the small trained model of the family, the speed on the full-size one.

Goals (on the machine measured, whose integer units are printed):

- the fastest int8 runtime >= 1.6x the fastest fp32 runtime with integer dot-product units
  (VNNI / AMX / Arm dotprod), >= 1.3x on an AVX2-only CPU;
- the fastest int8 runtime within 1.5x of the int8 GEMM bound measured in the same run;
- w8 never slower than the same runtime's fp32 by more than 5%.

Next to the bound goal: the *kernel floor*, the time the fastest int8 runtime spends in the model's own
matmul/conv kernels (their share of a short profiled run, ``--profile-runs``, times the unprofiled median)
over the same bound. Those kernels run at the model's small shapes, not the large square's; when the floor
alone is above the limit, no graph change can meet the goal on that runtime (the table says "kernels").

Run: ``python benchmarks/quant_tradeoff.py [--models deit_tiny,mobilevit_v2_050] [--precisions int8,w8,w4]
[--accuracy quant_accuracy.json] [--runs 40 --rounds 10] [--out DIR] [--json FILE] [--reuse-bench]``
(``--reuse-bench``: the timings of an earlier run in OUT, e.g. to redo only the accuracy step).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgevit.devices import stats  # noqa: E402
from edgevit.devices.bench import BASELINE, BenchOptions, gemm_kernels_ms, run_bench  # noqa: E402
from edgevit.devices.worker import integer_units  # noqa: E402

FAMILY = {"deit_tiny": "deit", "mobilevit_v2_050": "mobilevit_v2"}  # zoo model -> quant_models family
CPU_TARGETS = ("onnx", "tflite", "openvino")
INT8_VS_FP32 = {True: 1.6, False: 1.3}  # with / without integer dot-product units
MAX_OVER_INT8_BOUND = 1.5
W8_MIN_VS_FP32 = 0.95


def per_round(row: dict[str, Any]) -> list[list[float]]:
    """A bench row's timed runs regrouped into its interleaved rounds."""
    times, rounds, start = row["times_ms"], [], 0
    for n in row["rounds"]:
        rounds.append(times[start:start + n])
        start += n
    return rounds


def fastest(rows: list[dict[str, Any]], model: str, precision: str) -> dict[str, Any] | None:
    timed = [r for r in rows if r["model"] == model and r["precision"] == precision and r.get("summary")
             and r["device"] != BASELINE]
    return min(timed, key=lambda r: r["summary"]["median_ms"], default=None)


def kernel_floor(row: dict[str, Any], profiled: dict[str, Any] | None) -> float | None:
    """The kernel floor of a timed ``row``: its matmul/conv kernels' share of the ``profiled`` run of the same
    configuration, times ``row``'s median, over ``row``'s bound; None without a profile or a bound."""
    roof = row.get("roofline") or {}
    if not profiled or not roof.get("bound_ms"):
        return None
    kernels = gemm_kernels_ms(profiled.get("profile") or [], row["summary"]["median_ms"])
    return kernels / roof["bound_ms"] if kernels else None


def _same_configuration(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in rows if (r["model"], r["device"], r["precision"]) == (row["model"], row["device"],
                                                                                   row["precision"])), None)


def goals(result: dict[str, Any], models: list[str], profiled: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each goal per model: the figure, the limit, whether it holds (the bound goal with its kernel floor, from
    the ``profiled`` run when there is one)."""
    flags = result["hosts"][0]["machine"]["cpu_flags"] if result.get("hosts") else []
    units = bool(integer_units(flags))
    rows, out = result["rows"], []
    for model in models:
        f32, i8 = fastest(rows, model, "fp32"), fastest(rows, model, "int8")
        if f32 and i8:
            ratio = stats.interleaved_ratio(per_round(f32), per_round(i8))
            need = INT8_VS_FP32[units]
            out.append({"model": model, "goal": f"fastest int8 ({i8['device']}) vs fastest fp32 ({f32['device']})",
                        "value": ratio.median, "spread": [ratio.low, ratio.high], "limit": f">= {need}",
                        "ok": ratio.median >= need})
            bound = (i8.get("roofline") or {}).get("median_over_bound")
            floor = kernel_floor(i8, _same_configuration(profiled["rows"], i8) if profiled else None)
            out.append({"model": model, "goal": f"fastest int8 ({i8['device']}) median / int8 GEMM bound",
                        "value": bound, "limit": f"<= {MAX_OVER_INT8_BOUND}", "kernel_floor": floor,
                        "ok": bound is not None and i8["roofline"]["precision"] == "int8"
                        and bound <= MAX_OVER_INT8_BOUND})
        for r in rows:
            if r["model"] == model and r["precision"] == "w8" and r.get("speedup_vs_fp32"):
                s = r["speedup_vs_fp32"]
                out.append({"model": model, "goal": f"w8 vs fp32 on {r['device']}", "value": s["median"],
                            "spread": [s["low"], s["high"]], "limit": f">= {W8_MIN_VS_FP32}",
                            "ok": s["median"] >= W8_MIN_VS_FP32})
    return out


def accuracy_rows(path: Path | None, models: list[str], precisions: list[str], scheme: str) -> list[dict[str, Any]]:
    """The trained-model quantization table: read from quant_accuracy.py's --json (or this script's, which
    keeps the cells it ran under "accuracy"), else run its cells now."""
    if path is not None:
        document = json.loads(path.read_text())
        return document.get("accuracy") or document["rows"]
    import quant_accuracy
    import quant_models

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in dict.fromkeys(FAMILY[m] for m in models if m in FAMILY):
            model, folders, _ = quant_models.trained(family, Path(tmp))
            for target in CPU_TARGETS:
                for precision in precisions:
                    rows.append(quant_accuracy.run_cell(model, family, folders, target, precision, Path(tmp) / "out",
                                                        scheme if precision == "int8" else "safe"))
                    print(f"accuracy {family} {target} {precision}: drop {rows[-1]['drop']:+.2f}", file=sys.stderr)
    return rows


def tradeoff_rows(result: dict[str, Any], accuracy: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, runtime, precision): speed from the bench, drop from the trained family's cell."""
    by_cell = {(a["family"], a["target"], a["precision"]): a for a in accuracy
               if a["precision"] != "int8" or a.get("scheme", "safe") == result.get("options", {}).get("quant_scheme", "safe")}
    fp32_bytes = {(r["model"], r["device"]): r.get("artifact_bytes") for r in result["rows"] if r["precision"] == "fp32"}
    out = []
    for r in result["rows"]:
        if r["device"] == BASELINE:
            continue
        target = r["device"].split(":")[0]
        acc = by_cell.get((FAMILY.get(r["model"]), target, r["precision"]))
        base = fp32_bytes.get((r["model"], r["device"]))
        out.append({
            "model": r["model"], "runtime": r["device"], "precision": r["precision"], "status": r["status"],
            "median_ms": (r.get("summary") or {}).get("median_ms"), "speedup_vs_fp32": r.get("speedup_vs_fp32"),
            "median_over_bound": (r.get("roofline") or {}).get("median_over_bound"),
            "bound_precision": (r.get("roofline") or {}).get("precision"),
            "size_ratio": r["artifact_bytes"] / base if base and r.get("artifact_bytes") else None,
            "peak_rss_mb": r.get("peak_rss_mb"), "float_ops": (r.get("quantization") or {}).get("float_ops"),
            "drop": acc["drop"] if acc else None, "drop_ci95": acc["drop_ci95"] if acc else None,
            "sqnr_db": acc["sqnr_db"] if acc else None,
        })
    return out


def _x(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]], goal_rows: list[dict[str, Any]]) -> str:
    lines = ["| model | runtime | precision | top-1 drop [95% CI] (trained family) | median ms | vs fp32 [spread] "
             "| median / bound | size vs fp32 | peak RSS MB |", "|" + "---|" * 9]
    for r in rows:
        s = r["speedup_vs_fp32"]
        speed = f"{s['median']:.2f}x [{s['low']:.2f}-{s['high']:.2f}]" if s else ("1.00x" if r["precision"] == "fp32" else "-")
        drop = (f"{r['drop']:+.2f} [{r['drop_ci95'][0]:+.2f}, {r['drop_ci95'][1]:+.2f}]" if r["drop"] is not None
                else ("0 (reference)" if r["precision"] == "fp32" else "-"))
        bound = _x(r["median_over_bound"]) + (f"x ({r['bound_precision']})" if r["median_over_bound"] else "")
        lines.append(f"| {r['model']} | {r['runtime']} | {r['precision']} | {drop} | {_x(r['median_ms'])} | {speed} "
                     f"| {bound} | {_x(r['size_ratio'], '.3f')} | {_x(r['peak_rss_mb'], '.0f')} |")
    lines += ["", "| model | goal | value | limit | holds |", "|---|---|---|---|---|"]
    for g in goal_rows:
        spread = f" [{g['spread'][0]:.2f}-{g['spread'][1]:.2f}]" if g.get("spread") else ""
        floor = g.get("kernel_floor")
        note = (f"; its matmul/conv kernels alone: {floor:.2f}x" + (" (kernels: above the limit)"
                                                                  if floor > MAX_OVER_INT8_BOUND else "")) if floor else ""
        lines.append(f"| {g['model']} | {g['goal']} | {_x(g['value'])}{spread}{note} | {g['limit']} | "
                     f"{'yes' if g['ok'] else 'NO'} |")
    return "\n".join(lines)


def _measure(opts: BenchOptions, args: argparse.Namespace, models: list[str],
             precisions: list[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The interleaved timed run, then (for int8) a separate short profiled run: profiling slows runs down."""
    progress = lambda msg, n: print(msg, file=sys.stderr, flush=True) if n == 0 else None  # noqa: E731
    result = run_bench(opts, progress)
    if not (args.profile_runs and "int8" in precisions):
        return result, None
    return result, run_bench(BenchOptions(models=models, precision="int8", targets=list(CPU_TARGETS),
                                          runs=args.profile_runs, rounds=2, out=args.out / "profile", profile=True,
                                          roofline=False, quant_scheme=args.quant_scheme, cache=args.out / "cache"),
                             progress)


def _earlier_bench(out: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The results an earlier run of this script wrote to OUT (a one-line error if there are none)."""
    if not (out / "bench.json").is_file():
        print(f"error: --reuse-bench: no {out / 'bench.json'}; run once without it first", file=sys.stderr)
        sys.exit(2)
    profile = out / "profile" / "bench.json"
    return json.loads((out / "bench.json").read_text()), json.loads(profile.read_text()) if profile.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(FAMILY))
    parser.add_argument("--precisions", default="int8,w8,w4")
    parser.add_argument("--accuracy", type=Path, help="quant_accuracy.py --json output (or this script's) to reuse")
    parser.add_argument("--quant-scheme", default="safe", help="int8 scheme: safe or full (integer-only)")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--profile-runs", type=int, default=12,
                        help="runs of the short profiled bench for the kernel floor (0: skip it)")
    parser.add_argument("--out", type=Path, default=Path("bench-quant"))
    parser.add_argument("--json", type=Path, help="also write the table, goals and bench result here")
    parser.add_argument("--reuse-bench", action="store_true",
                        help="take the timings from OUT/bench.json (and OUT/profile/bench.json) of an earlier run "
                             "instead of measuring again")
    args = parser.parse_args()
    # fp32 is always measured (the reference every ratio is to): a list that names it means the same
    models, precisions = args.models.split(","), [p for p in args.precisions.split(",") if p != "fp32"]
    opts = BenchOptions(models=models, precision=",".join(["fp32", *precisions]), targets=list(CPU_TARGETS),
                        runs=args.runs, rounds=args.rounds, out=args.out, quant_scheme=args.quant_scheme)
    from edgevit.devices.report import finding_lines, gemm_lines, machine_lines, write_all

    if args.reuse_bench:
        result, profiled = _earlier_bench(args.out)
    else:
        result, profiled = _measure(opts, args, models, precisions)
        write_all(result, args.out)
        if profiled is not None:
            write_all(profiled, args.out / "profile")  # the per-op profiles behind the kernel floor
    accuracy = accuracy_rows(args.accuracy, models, precisions, args.quant_scheme)
    rows = tradeoff_rows(result, accuracy)
    goal_rows = goals(result, models, profiled)
    print("\n".join(machine_lines(result) + gemm_lines(result)))
    print(markdown(rows, goal_rows))
    print("\n".join(finding_lines(result)))
    if args.json:
        args.json.write_text(json.dumps({"versions": result["versions"], "machine": result["machine"], "rows": rows,
                                         "goals": goal_rows, "gemm": result["gemm"], "accuracy": accuracy,
                                         "scheme": args.quant_scheme}, indent=1, default=str))


if __name__ == "__main__":
    main()
