"""Accelerator coverage of the zoo before and after the pass pipelines.

For each model: ``edgevit inspect`` with ``--passes none`` (one export checked by every accelerator of
the target) and with ``--passes auto`` for each accelerator of interest (its own pipeline). Prints a
markdown table and writes JSON with tool versions.

    python benchmarks/coverage_matrix.py [--models deit_tiny,...] [--json results/coverage.json]

Default models: the smallest model of every zoo family plus deit_tiny and mobilevit_v2_050.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ACCELERATORS = {"onnx": ("nnapi", "coreml"), "tflite": ("gpu",)}


def default_models() -> list[str]:
    import edgevit
    from edgevit.registry import model_info

    best: dict[str, tuple[int, str]] = {}
    for name in edgevit.list_models():
        info = model_info(name)
        if info.family not in best or info.params < best[info.family][0]:
            best[info.family] = (info.params, name)
    return sorted({n for _, n in best.values()} | {"deit_tiny", "mobilevit_v2_050"})


def inspect(model: str, target: str, passes: str, accelerator: str | None) -> dict:
    from edgevit.registry import model_info

    size = model_info(model).test_input_size
    cmd = [sys.executable, "-m", "edgevit.cli", "inspect", model, "-t", target, "--passes", passes, "--json"]
    cmd += ["-a", accelerator] if accelerator else []
    cmd += ["--input-size", str(size)] if size else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {r["accelerator"]: r for r in json.loads(proc.stdout)["accelerators"]}


def cell(row: dict | None) -> str:
    if not row or "coverage" not in row:
        return f"error: {row.get('error') if row else 'missing'}"
    c = row["coverage"]
    unsupported = ", ".join(f"{k} x{v}" for k, v in c["unsupported"].items())
    problems = "; ".join(p.split(":")[0] for p in c["problems"])
    detail = " ".join(x for x in (unsupported, problems and f"[{problems}]") if x)
    return f"{c['partitions']} part, {c['percent']:.1f}%" + (f" ({detail})" if detail else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated zoo names")
    parser.add_argument("--targets", default="onnx,tflite", help="comma-separated: onnx, tflite")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args()
    models = args.models.split(",") if args.models else default_models()
    results: dict = {}
    for model in models:
        for target in args.targets.split(","):
            accs = ACCELERATORS[target]
            before = inspect(model, target, "none", None)
            for acc in accs:
                after = inspect(model, target, "auto", acc)
                results[f"{model}|{target}:{acc}"] = {"none": before.get(acc, before), "auto": after.get(acc, after)}
                print(f"| {model} | {target}:{acc} | {cell(before.get(acc, before))} | "
                      f"{cell(after.get(acc, after))} |", flush=True)
    if args.json:
        from edgevit.export.manifest import host_info
        from edgevit.export.targets import TARGETS

        versions = host_info()
        for t in TARGETS.values():
            versions |= t.converter_module().versions()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"versions": versions, "results": results}, indent=1))


if __name__ == "__main__":
    main()
