"""Core ML artifacts verified on Linux, with the MIL reference executor.

    python benchmarks/coreml_reference.py [--models all|a,b] [--precision fp32] [--json out.json]
    python benchmarks/coreml_reference.py --from-junit zoo.xml   # the table of a `pytest --full-zoo` run

1. Every zoo model (default: all of them, at their CI input size) is exported to Core ML in a child
   process (a converter crash or hang costs one row) and verified by `edgevit export`'s parity: the
   reference executor in fp32 and fp16 modes against PyTorch. Prints the table of max errors
   (relative to the output peak) per model and mode, and the fp16 range report's op count.
2. The executor's speed on MobileViT-v2-0.5 at 256 (goal: under 2 s per inference on this machine):
   median of ``--runs`` runs in fp32 and fp16 mode after one warm-up, in this process.

Exit code 0 when every row verified and the speed goal holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def verify_rows(models: list[str], precision: str, out: Path) -> list[dict]:
    from edgevit.export.isolated import export_in_child
    from edgevit.export.options import ExportOptions
    from edgevit.registry import model_info

    rows = []
    for model in models:
        size = model_info(model).test_input_size
        options = ExportOptions(precision=precision, latency_runs=0, input_size=size or None)
        start = time.perf_counter()
        manifest = export_in_child(model, "coreml", out / model, options, timeout_s=1200)
        row = {"model": model, "input_size": size or model_info(model).input_size,
               "seconds": round(time.perf_counter() - start, 1), "status": manifest["status"]}
        parity = manifest.get("parity") or {}
        row["verification"] = parity.get("verification") or manifest.get("error") or parity.get("detail")
        row.update(check_columns(parity.get("checks") or []))
        rng = parity.get("fp16_range") or {}
        row["fp16_range_issues"] = len(rng.get("issues", [])) if rng else None
        row["fp16_range_top"] = [f"{i['op_type']} {i['op']}: {', '.join(i['reasons'])}" for i in rng.get("issues", [])[:3]]
        row["versions"] = manifest.get("versions")
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def check_columns(checks: list[dict]) -> dict:
    """The table's columns from a parity report's checks (reference executor fp32/fp16 modes, Core ML)."""
    row = {}
    for check in checks:
        mode = "fp32" if "fp32 mode" in check["check"] else "fp16" if "fp16 mode" in check["check"] else "coreml"
        row[f"{mode}_err_over_peak"] = check["max_err_over_peak"]
        row[f"{mode}_cosine"] = check["cosine"]
        row[f"{mode}_status"] = check["status"]
    return row


def rows_from_junit(path: Path) -> list[dict]:
    """The table from a `pytest --full-zoo --junitxml` run: the Core ML cells record their checks."""
    import xml.etree.ElementTree as ET

    rows = []
    for case in ET.parse(path).iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if props.get("target") != "coreml":
            continue
        failed = case.find("failure") is not None or case.find("error") is not None
        status = "failed" if failed else "known failure" if case.find("skipped") is not None else "passed"
        ops = props.get("fp16_range_ops")
        row = {"model": props["model"], "input_size": int(props["input_size"]), "status": status,
               "seconds": round(float(case.get("time", 0)), 1), "fp16_range_issues": None if ops is None else int(ops)}
        row.update(check_columns(json.loads(props.get("coreml_checks") or "null") or []))
        rows.append(row)
    return rows


def _fmt(v, spec=".1e") -> str:
    return "-" if v is None else format(v, spec)


def _line(r: dict) -> str:
    return (f"| {r['model']} | {r['input_size']} | {r['status']} | {_fmt(r.get('fp32_err_over_peak'))} | "
            f"{_fmt(r.get('fp16_err_over_peak'))} | {_fmt(r.get('fp16_cosine'), '.6f')} | "
            f"{_fmt(r.get('fp16_range_issues'), 'd')} | {r['seconds']} |")


def executor_speed(runs: int) -> dict:
    import numpy as np

    from edgevit.api import export_model
    from edgevit.export.backends.coreml.mil import MILExecutor, load_program

    with tempfile.TemporaryDirectory() as tmp:
        result = export_model("mobilevit_v2_050", target="coreml", out=tmp, precision="fp16", verify=False)
        program = load_program(result.artifact)
        x = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
        timing = {}
        for mode in ("fp32", "fp16"):
            executor = MILExecutor(program, mode)
            executor.run([x])
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                executor.run([x])
                times.append(time.perf_counter() - start)
            timing[mode] = {"median_s": statistics.median(times), "min_s": min(times), "runs": runs}
        timing["ops"] = len(program.steps)
        return timing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-junit", type=Path, metavar="XML",
                        help="print the table from `pytest --full-zoo --junitxml XML` instead of exporting")
    args = parser.parse_args()
    import edgevit

    models = edgevit.list_models() if args.models == "all" else args.models.split(",")
    print("| model | input | status | fp32 mode err/peak | fp16 mode err/peak | fp16 cosine | fp16 range ops | s |")
    print("|---|---|---|---|---|---|---|---|")
    if args.from_junit:
        rows = sorted(rows_from_junit(args.from_junit), key=lambda r: r["model"])
        for row in rows:
            print(_line(row))
        if not rows:
            print(f"error: no Core ML cell recorded its checks in {args.from_junit}", file=sys.stderr)
            return 1
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = verify_rows(models, args.precision, Path(tmp))
    speed = None if args.skip_speed or args.from_junit else executor_speed(args.runs)
    if speed:
        print(f"\nexecutor on mobilevit_v2_050 @256 ({speed['ops']} ops): fp32 mode median {speed['fp32']['median_s']:.2f} s, "
              f"fp16 mode median {speed['fp16']['median_s']:.2f} s (goal < 2 s)")
    ok = all(r["status"] == "passed" for r in rows) and (speed is None or speed["fp32"]["median_s"] < 2.0)
    if args.json:
        from edgevit.devices.worker import package_version

        versions = {p: package_version(p) for p in ("edgevit", "torch", "coremltools", "numpy")}
        args.json.write_text(json.dumps({"rows": rows, "speed": speed, "versions": versions}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
