"""How far can a runtime beat PyTorch eager on a model? Its matrix multiplies say (benchmarks/floor.py).

    python benchmarks/speedup_ceiling.py [--model deit_tiny] [--runs 60] [--rounds 12] [--repeat 1] [--goal 2.0]
                                         [--out DIR] [--json PATH]

One interleaved harness run (each configuration in its own process) of, for PyTorch eager and every
available CPU runtime: the whole model, the model's *linear floor* (its Linear layers alone, same shapes,
same order, exported through the same pipeline) and its *matmul floor* (the same plus its matrix
multiplies of two activations, attention's q k^T and softmax(.) v). Per runtime it reports:

- achieved: eager(model) / runtime(model), the bench's speed-up;
- ceilings: eager(model) / runtime(floor), the speed-up that runtime would reach if every op but those
  matrix multiplies were free; a goal above the best matmul ceiling cannot be met by any runtime here;
- shares: runtime(floor) / runtime(model), from the medians.

All ratios are interleaved median ratios with the smallest and largest per-round ratio. With
``--repeat N`` the whole interleaved run is made N times back to back (the exports once) and a last table
gives, per runtime, the spread of its median time and of each ratio over the N runs, and in how many runs
it reached ``--goal``: on a shared machine the load moves eager and the runtimes differently, and one run
cannot show it. The JSON file carries every measurement and the tool versions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # floor.py, beside this script
from floor import builder_options  # noqa: E402


FLOORS = ("linear floor", "matmul floor")


def export_floor(model: str, kind: str, chain: Any, device: str, where: Path, timeout_s: float = 1800) -> str:
    """``chain`` (the ``kind`` floor of ``model``) exported for ``device`` in a child process (a converter
    that crashes or hangs costs a one-line error, as in ``edgevit bench``); the artifact path."""
    from edgevit.export.isolated import run_export_child

    where.mkdir(parents=True, exist_ok=True)
    calls = where / "calls.json"
    calls.write_text(json.dumps([c.to_list() for c in chain.calls]))
    cmd = [sys.executable, __file__, "--model", model, "--export-floor", device, "--calls", str(calls),
           "--out", str(where), "--floor-name", f"{model}_{kind.replace(' ', '_')}"]
    row = run_export_child(cmd, f"{model} {kind}", device, timeout_s)
    if row.get("status") != "passed":
        raise SystemExit(f"error: {kind} export for {device}: {row.get('error') or row.get('status')}")
    return row["artifact_path"]


def _export_floor_here(name: str, device_name: str, calls: Path, where: Path) -> None:
    """The child's side: export (fp32, parity-checked); its row as JSON on stdout, converters' prints on stderr."""
    from floor import LinearChain, call_from_list
    from edgevit.devices.table import get_device

    from edgevit.api import export_model
    from edgevit.export.isolated import StdoutToStderr

    device = get_device(device_name)
    chain = LinearChain([call_from_list(c) for c in json.loads(calls.read_text())]).eval()
    with StdoutToStderr():
        result = export_model(chain, (chain.example_input(),), target=device.target, out=where,
                              precision=device.export_precision("fp32"), accelerator=device.accelerator,
                              name=name, latency_runs=0)
    print(json.dumps([{"status": result.parity.status, "artifact_path": str(result.artifact)}]))


def model_floors(model: str) -> dict[str, Any]:
    """The zoo model's linear and matmul floors (LinearChains), at its default input size and seed 0;
    one capture: the linear floor is the matmul floor's Linear calls."""
    from floor import LinearCall, LinearChain, exported_linear_calls

    from edgevit.export.subject import prepare_subject

    subject = prepare_subject(model, None, None, None, 0)
    calls = exported_linear_calls(subject.model, subject.example_inputs, matmuls=True)
    return {"linear floor": LinearChain([c for c in calls if isinstance(c, LinearCall)]).eval(),
            "matmul floor": LinearChain(calls).eval()}


def configs(model: str, floors: dict[str, Any], out: Path, threads: int | None) -> list[Any]:
    from edgevit.devices.bench import BenchOptions, _save_inputs, export_cached
    from edgevit.devices.harness import Config
    from edgevit.devices.table import resolve_devices

    from edgevit.registry import model_info

    opts = BenchOptions(models=[model], out=out, threads=threads)
    size = model_info(model).input_size
    model_inputs, _ = _save_inputs(model, size, out / "inputs")
    inputs = {"model": model_inputs}
    for kind, chain in floors.items():
        inputs[kind] = out / "inputs" / f"{model}-{kind.replace(' ', '-')}.npz"
        np.savez(inputs[kind], chain.example_input().numpy())
    result = []
    for device in resolve_devices("cpu"):
        for kind, kind_inputs in inputs.items():
            options = device.worker_options("fp32")
            if device.target is None:
                artifact = None
                options |= {"model": model, "input_size": size, "seed": 0}
                options |= builder_options(floors[kind]) if kind in floors else {}
            elif kind == "model":
                print(f"  export {model} -> {device.name} (cached after the first run)", file=sys.stderr)
                exported = export_cached(model, size, device, device.export_precision("fp32"), opts)
                if "artifact_path" not in exported:
                    raise SystemExit(f"error: export {model} -> {device.name}: {exported.get('error')}")
                artifact = exported["artifact_path"]
            else:  # a chain of matrix multiplies: converts in seconds, so not cached
                print(f"  export {model} {kind} -> {device.name}", file=sys.stderr)
                where = out / kind.replace(" ", "-") / device.name.replace(":", "-")
                artifact = export_floor(model, kind, floors[kind], device.name, where)
            worker = {"runtime": device.runtime, "artifact": artifact, "inputs": str(kind_inputs),
                      "threads": threads, "options": options}
            result.append(Config(f"{device.name} {kind}", worker, {"device": device.name, "kind": kind}))
    return result


def summarise(measured: list[Any]) -> list[dict[str, Any]]:
    from edgevit.devices import stats

    by = {(m.meta["device"], m.meta["kind"]): m for m in measured if m.ok}
    eager = by.get(("torch:eager", "model"))
    if eager is None:
        raise SystemExit("PyTorch eager did not run; no ratios")
    rows = []
    for device in dict.fromkeys(m.meta["device"] for m in measured):
        full = by.get((device, "model"))
        row: dict[str, Any] = {"device": device}
        if full:
            row["model_ms"] = full.summary().median_ms
            row["achieved"] = stats.interleaved_ratio(eager.rounds, full.rounds).to_dict()
        for kind in FLOORS:  # keys linear_floor_ms, linear_ceiling, linear_share; matmul_...
            floor, key = by.get((device, kind)), kind.split()[0]
            if floor:
                row[f"{key}_floor_ms"] = floor.summary().median_ms
                row[f"{key}_ceiling"] = stats.interleaved_ratio(eager.rounds, floor.rounds).to_dict()
            if full and floor:
                row[f"{key}_share"] = row[f"{key}_floor_ms"] / row["model_ms"]
        rows.append(row)
    return rows


def _ratio(r: dict[str, float] | None) -> str:
    return f"{r['median']:.2f}x [{r['low']:.2f}-{r['high']:.2f}]" if r else "-"


SPREAD_KEYS = ("model_ms", "achieved", "linear_ceiling", "matmul_ceiling")


def spread(repeats: list[list[dict[str, Any]]], goal: float) -> list[dict[str, Any]]:
    """Per runtime, over repeated runs (each a list of :func:`summarise` rows): min, median and max of its
    median time and of the median of each ratio, and how many runs had ``achieved`` >= ``goal``."""
    devices = dict.fromkeys(r["device"] for rows in repeats for r in rows)
    out = []
    for device in devices:
        rows = [r for run in repeats for r in run if r["device"] == device]
        entry: dict[str, Any] = {"device": device, "runs": len(rows)}
        for key in SPREAD_KEYS:
            values = [r[key] if key == "model_ms" else r[key]["median"] for r in rows if r.get(key)]
            if values:
                entry[key] = {"min": min(values), "median": float(np.median(values)), "max": max(values)}
        achieved = [r["achieved"]["median"] for r in rows if r.get("achieved")]
        entry["at_goal"] = sum(a >= goal for a in achieved)
        out.append(entry)
    return out


def _range(d: dict[str, float] | None, unit: str) -> str:
    return f"{d['median']:.2f}{unit} [{d['min']:.2f}-{d['max']:.2f}]" if d else "-"


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| runtime | model ms | linear floor ms (share) | matmul floor ms (share) | achieved vs eager "
          "| linear ceiling | matmul ceiling |")
    print("|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        print(f"| {r['device']} | {r.get('model_ms', nan):.2f} "
              f"| {r.get('linear_floor_ms', nan):.2f} ({r.get('linear_share', nan):.0%}) "
              f"| {r.get('matmul_floor_ms', nan):.2f} ({r.get('matmul_share', nan):.0%}) "
              f"| {_ratio(r.get('achieved'))} | {_ratio(r.get('linear_ceiling'))} | {_ratio(r.get('matmul_ceiling'))} |")


def print_spread(entries: list[dict[str, Any]], goal: float) -> None:
    print("over the repeated runs, median [min-max] of each run's median:")
    print(f"| runtime | runs | model ms | achieved vs eager | runs >= {goal:g}x | linear ceiling | matmul ceiling |")
    print("|---|---|---|---|---|---|---|")
    for e in entries:
        print(f"| {e['device']} | {e['runs']} | {_range(e.get('model_ms'), '')} | {_range(e.get('achieved'), 'x')} "
              f"| {e['at_goal']} | {_range(e.get('linear_ceiling'), 'x')} | {_range(e.get('matmul_ceiling'), 'x')} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_tiny")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-ceiling"))
    parser.add_argument("--repeat", type=int, default=1,
                        help="Make the interleaved run N times back to back and report the spread over the runs.")
    parser.add_argument("--goal", type=float, default=2.0,
                        help="The speed-up over eager whose attainment --repeat counts (2x).")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--export-floor", metavar="DEVICE", help=argparse.SUPPRESS)  # the child of export_floor
    parser.add_argument("--calls", type=Path, help=argparse.SUPPRESS)  # its recorded calls (JSON)
    parser.add_argument("--floor-name", help=argparse.SUPPRESS)  # its artifact's name
    args = parser.parse_args()
    if args.repeat < 1:
        sys.exit(f"error: --repeat must be at least 1, not {args.repeat}")
    if args.goal <= 0:
        sys.exit(f"error: --goal must be a positive speed-up, not {args.goal:g}")
    if args.export_floor:
        _export_floor_here(args.floor_name, args.export_floor, args.calls, args.out)
        return 0

    from edgevit.devices.bench import _ALL_PACKAGES, _machine, _versions
    from floor import adapters
    from edgevit.devices.harness import Protocol, measure

    floors = model_floors(args.model)
    described = {kind: {"calls": len(chain.calls), "gmacs": sum(c.macs for c in chain.calls) / 1e9,
                        "adapters": adapters(chain.calls)} for kind, chain in floors.items()}
    for kind, d in described.items():
        print(f"{args.model} {kind}: {d['calls']} calls, {d['gmacs']:.3f} GMACs, {d['adapters']} slice/tile steps")
    configured = configs(args.model, floors, args.out, args.threads)  # exports once for every repeat
    repeats, measurements = [], []
    for i in range(args.repeat):
        prefix = f"run {i + 1}/{args.repeat}: " if args.repeat > 1 else ""
        measured = measure(configured, Protocol(runs=args.runs, rounds=args.rounds),
                           lambda msg, p=prefix: print(f"  {p}{msg}", file=sys.stderr))
        repeats.append(summarise(measured))
        measurements += [m.to_dict() | {"repeat": i + 1} for m in measured]
        if prefix:
            print(prefix.rstrip(": "))
        print_table(repeats[-1])
        for m in measured:
            if not m.ok:
                print(f"{m.label}: {m.status}: {m.detail}")
    spread_rows = spread(repeats, args.goal) if args.repeat > 1 else None
    if spread_rows:
        print_spread(spread_rows, args.goal)
    if args.json:
        doc = {"model": args.model, "floors": described, "machine": _machine(),
               "versions": _versions(_ALL_PACKAGES), "rows": repeats[0], "measurements": measurements}
        if spread_rows:
            doc |= {"goal": args.goal, "repeats": repeats, "spread": spread_rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    from edgevit.errors import EdgevitError

    try:
        sys.exit(main())
    except EdgevitError as exc:  # e.g. an unknown model: one line, no traceback
        sys.exit(f"error: {exc}")
