"""What quantization costs on real labelled images: family x backend x precision (the trained-model table).

Trains the two small zoo-family models of :mod:`quant_models` on scikit-learn's digits, exports each to
every backend at int8 (calibrated on the ``calibration`` folder), w8 and w4 with edgevit's own
pipeline (``export_model(..., calibration=DIR, evaluation=DIR)``: the artifact runs in its own runtime,
Core ML in the MIL reference executor on Linux) and tabulates fp32 top-1, quantized top-1, the drop
with its 95% interval, agreement, SQNR and the size ratio, against the goals:

- int8: top-1 drop <= 1.0 point, artifact <= 0.30x fp32;
- w8: drop <= 0.5 point, artifact <= 0.30x fp32;
- w4: reported (no goal).

Run: ``python benchmarks/quant_accuracy.py [--families deit,mobilevit_v2] [--targets onnx,...]
[--precisions int8,w8,w4] [--json out.json]``. The tests (tests/test_quant_accuracy.py) run cells of
the same table through :func:`run_cell` and assert the same goals.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_models  # noqa: E402

GOALS: dict[str, dict[str, float | None]] = {
    "int8": {"max_drop": 1.0, "max_size_ratio": 0.30},
    "w8": {"max_drop": 0.5, "max_size_ratio": 0.30},
    "w4": {"max_drop": None, "max_size_ratio": None},
}
#: cells that miss a goal for a reason measured and understood; the tests assert they still miss it (so a fix
#: is noticed) and that nothing else fails. MobileViT-v2-0.5 with 10 classes: 1.1M weights in 9571 output
#: channels of small convolutions; the per-channel metadata alone (int8 weights + fp32 scale + bias per channel)
#: puts the floor at 0.276x (0.293x with TFLite's int64 zero points), and each op's graph structure (and for int8
#: the quantize/dequantize pair per activation) adds ~0.1-0.3 MB that a 4.5 MB fp32 model does not amortise.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {
    ("mobilevit_v2", "onnx", "int8"): "size",
    ("mobilevit_v2", "coreml", "int8"): "size",
    ("mobilevit_v2", "tflite", "int8"): "size",
    ("mobilevit_v2", "tflite", "w8"): "size",
    ("mobilevit_v2", "openvino", "int8"): "size",
    ("mobilevit_v2", "openvino", "w8"): "size",
}
TARGETS = ("onnx", "coreml", "tflite", "openvino")
PRECISIONS = ("int8", "w8", "w4")


def run_cell(model: torch.nn.Module, family: str, folders: dict[str, Path], target: str, precision: str,
             out: Path, scheme: str = "safe") -> dict[str, Any]:
    """Export one cell with calibration and evaluation; its table row (the export's own verdict included)."""
    from edgevit.api import export_model
    from edgevit.errors import ParityError

    size = quant_models.CONFIGS[family].size
    start = time.perf_counter()
    try:
        result = export_model(
            model, (torch.zeros(1, 3, size, size),), target=target, out=out, precision=precision, name=family,
            calibration=folders["calibration"] if precision == "int8" else None, evaluation=folders["eval"],
            quant_scheme=scheme, mean=quant_models.MEAN, std=quant_models.STD, crop_pct=1.0, max_drop=100.0)
    except ParityError as exc:  # the gate failed: the row still has every number
        result = exc.result
    q, acc = result.quantization, result.accuracy
    row = {
        "family": family, "target": target, "precision": precision, "scheme": scheme, "status": result.parity.status,
        "detail": result.parity.detail, "fp32_top1": acc["fp32_top1"], "top1": acc["top1"],
        "drop": acc["top1_drop"], "drop_ci95": acc["top1_drop_ci95"], "agreement": acc["top1_agreement"],
        "sqnr_db": acc["sqnr_db"], "size_ratio": q["size_ratio"], "bytes": q["bytes"], "fp32_bytes": q["fp32_bytes"],
        "float_ops": q["float_ops"], "tool": q["tool"], "seconds": round(time.perf_counter() - start, 1),
    }
    row["goal_failures"] = goal_failures(row)
    return row


def known_failure(row: dict[str, Any]) -> str | None:
    """The goal a cell is known to miss (:data:`KNOWN_FAILURES`), or None."""
    return KNOWN_FAILURES.get((row["family"], row["target"], row["precision"]))


def goal_failures(row: dict[str, Any]) -> list[str]:
    """Why a row misses its precision's goals (empty: within them)."""
    goal, failures = GOALS[row["precision"]], []
    if row["status"] != "passed":
        failures.append(f"gate: {row['detail']}")
    if goal["max_drop"] is not None and row["drop"] > goal["max_drop"]:
        failures.append(f"top-1 drop {row['drop']:.2f} > {goal['max_drop']}")
    if goal["max_size_ratio"] is not None and row["size_ratio"] > goal["max_size_ratio"]:
        failures.append(f"size {row['size_ratio']:.3f}x > {goal['max_size_ratio']}x")
    return failures


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| family | backend | precision | fp32 top-1 | quantized top-1 | drop [95% CI] | agreement | SQNR dB "
             "| size vs fp32 | goals |", "|" + "---|" * 10]
    for r in rows:
        ci = f"[{r['drop_ci95'][0]:+.2f}, {r['drop_ci95'][1]:+.2f}]"
        goals = "ok" if not r["goal_failures"] else "; ".join(r["goal_failures"])
        goals += " (known)" if known_failure(r) else ""
        lines.append(f"| {r['family']} | {r['target']} | {r['precision']}{'' if r['scheme'] == 'safe' else ' ' + r['scheme']} "
                     f"| {r['fp32_top1']:.2f} | {r['top1']:.2f} | {r['drop']:+.2f} {ci} | {r['agreement']:.3f} "
                     f"| {r['sqnr_db']:.1f} | {r['size_ratio']:.3f} | {goals} |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    names = ("torch", "onnxruntime", "nncf", "openvino", "ai-edge-quantizer", "ai-edge-litert", "litert-torch",
             "coremltools", "scikit-learn")
    return {n: version(n) for n in names} | {"python": platform.python_version(), "machine": platform.machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(quant_models.CONFIGS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--json", type=Path, help="also write the rows (with tool versions) here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            model, folders, accuracy = quant_models.trained(family, Path(tmp))
            print(f"{family}: fp32 top-1 {accuracy:.2f}% on {len(list(folders['eval'].rglob('*.png')))} images",
                  file=sys.stderr, flush=True)
            for target in args.targets.split(","):
                for precision in args.precisions.split(","):
                    rows.append(run_cell(model, family, folders, target, precision, Path(tmp) / "out"))
                    r = rows[-1]
                    print(f"  {target} {precision}: {r['top1']:.2f} (drop {r['drop']:+.2f}), size {r['size_ratio']:.3f}, "
                          f"{r['seconds']} s", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"versions": versions(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
