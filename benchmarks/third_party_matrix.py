"""Third-party model code x every target, with --passes auto and --passes none: the table of outcomes.

    python benchmarks/third_party_matrix.py [--models hf_vit,hf_swin|all] [--targets onnx,...|all] [--json out.json]

Builds each model of the corpus in ``tests/test_third_party.py`` (transformers' ViT, DeiT with teacher,
MobileViT, MobileViT-v2, Swin from small configs, plus other code bases' idioms), exports it through the
public API as a user would (``init="exercise"``, passes not strict: a pass that fails is rolled back and
reported), once with the target's pipeline and once without passes, and prints per cell: status, the
worst error relative to the output peak, the rolled-back passes (if any), and whether ``auto`` converts
wherever ``none`` does. Tool versions head the table. Exit 0 when every cell passes with ``auto`` and
``auto`` never fails where ``none`` converts, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _corpus() -> Any:
    """The corpus module of the test suite (one definition of the models for tests and this table)."""
    spec = importlib.util.spec_from_file_location("third_party_corpus", ROOT / "tests" / "test_third_party.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _attempt(corpus: Any, name: str, target: str, out: Path, passes: str) -> dict[str, Any]:
    from edgevit.errors import EdgevitError, ParityError

    start = time.perf_counter()
    try:
        manifest = corpus._export(name, target, out, passes=passes, strict=False).manifest
    except ParityError as exc:
        manifest = exc.result.manifest
    except EdgevitError as exc:
        return {"status": "error", "error": str(exc), "seconds": round(time.perf_counter() - start, 1)}
    outputs = manifest["parity"].get("outputs") or []
    ratios = [o["max_abs_err"] / o["peak"] for o in outputs if o.get("peak")]
    return {
        "status": manifest["status"], "seconds": round(time.perf_counter() - start, 1),
        "err_over_peak": max(ratios) if ratios else None,
        "verification": manifest["parity"].get("verification"),
        "sites": manifest["passes"]["sites_total"],
        "rolled_back": [f"{r['name']}: {r['reason']}" for r in manifest["passes"]["applied"]
                        if r["status"] == "rolled back"],
        "versions": manifest["versions"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all")
    parser.add_argument("--targets", default="all")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    corpus = _corpus()
    from edgevit.export.targets import TARGETS

    models = list(corpus.CORPUS) if args.models == "all" else args.models.split(",")
    targets = list(TARGETS) if args.targets == "all" else args.targets.split(",")
    unknown = [m for m in models if m not in corpus.CORPUS] + [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"error: unknown model or target: {', '.join(unknown)}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for target in targets:
                cell = {"model": model, "target": target}
                for passes in ("auto", "none"):
                    cell[passes] = _attempt(corpus, model, target, Path(tmp) / model / target / passes, passes)
                    print(f"{model} -> {target} ({passes}): {cell[passes]['status']}", file=sys.stderr, flush=True)
                cell["auto_never_worse"] = cell["none"]["status"] == "error" or cell["auto"]["status"] != "error"
                rows.append(cell)
    _print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    ok = all(r["auto"]["status"] == "passed" and r["auto_never_worse"] for r in rows)
    return 0 if ok else 1


def _print_table(rows: list[dict[str, Any]]) -> None:
    versions: dict[str, Any] = {}
    for r in rows:  # each target's converter and runtime versions
        versions |= r["auto"].get("versions", {})
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if isinstance(v, str)))
    print("| model | target | auto: status | err/peak | sites | rolled back | none: status | auto never worse |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, n = r["auto"], r["none"]
        err = f"{a['err_over_peak']:.1e}" if a.get("err_over_peak") is not None else "-"
        status = a["status"] if a["status"] != "error" else f"error: {a['error'][:80]}"
        print(f"| {r['model']} | {r['target']} | {status} | {err} | {a.get('sites', '-')} | "
              f"{'; '.join(a.get('rolled_back', [])) or 'none'} | {n['status']} | {'yes' if r['auto_never_worse'] else 'NO'} |")


if __name__ == "__main__":
    sys.exit(main())
