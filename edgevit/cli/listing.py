"""``edgevit models``, ``targets``, ``passes`` and ``devices``: the tables of what edgevit knows, and their renderers."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from edgevit.cli import REMOTE_HELP, err_console, fail, out_console
from edgevit.errors import EdgevitError
from edgevit.export.manifest import to_json


def models_cmd(
    family: Optional[str] = typer.Option(None, help="Only this family (e.g. vit, mobilevit_v2)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the model zoo with parameters and MACs at each model's native input size."""
    from edgevit.registry import list_models, model_info

    infos = [model_info(n) for n in list_models(family)]
    if as_json:
        out_console.print_json(json.dumps([i.to_dict() for i in infos]))
        return
    table = Table(title="edgevit model zoo")
    for col in ("model", "family", "input", "params (M)", "GMACs", "aliases"):
        table.add_column(col, justify="right" if col in ("input", "params (M)", "GMACs") else "left")
    for i in infos:
        table.add_row(i.name, i.family, str(i.input_size), f"{i.params / 1e6:.3f}", f"{i.macs / 1e9:.3f}",
                      ", ".join(i.aliases))
    out_console.print(table)


def targets_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List export targets: suffix, runtime, precisions, passes, install extra."""
    from edgevit.export.targets import TARGETS

    if as_json:
        rows = [asdict(t) | {"pipelines": {a.name: list(t.pipeline(a.name)) for a in t.accelerators}}
                for t in TARGETS.values()]
        out_console.print_json(json.dumps(rows))
        return
    table = Table(title="edgevit targets")
    for col in ("target", "suffix", "converter", "parity runtime", "precisions", "accelerators", "extra"):
        table.add_column(col)
    for t in TARGETS.values():
        precisions = ", ".join(f"{p}*" if p == t.default_precision else p for p in t.precisions)
        accs = ", ".join(f"{a.name}*" if a.name == t.default_accelerator else a.name for a in t.accelerators)
        table.add_row(t.name, t.suffix, t.converter, t.runtime, precisions, accs, t.extra)
    out_console.print(table)
    out_console.print("* default precision / accelerator; pass pipelines: 'edgevit passes --target T'")


def passes_cmd(
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Only the pipeline of this target."),
    accelerator: Optional[str] = typer.Option(None, "--accelerator", "-a", help="Accelerator of --target."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the op-substitution passes, or one target's pipeline (``--passes auto``) in order."""
    from edgevit.export.passes import ORDER, PASSES, default_pipeline, resolve_passes
    from edgevit.export.quantization.passes import listing_rows, quantized_pipeline
    from edgevit.export.targets import TARGETS, get_target

    try:
        if accelerator is not None and target is None:
            raise EdgevitError("--accelerator needs --target")
        if target is not None:
            tgt = get_target(target)
            acc = tgt.accelerator(accelerator).name
            names = tgt.pipeline(acc)
        else:
            first = next(iter(TARGETS.values()))  # any target: explicit names resolve to every pass, in ORDER
            names = resolve_passes(list(PASSES), first.name, first.default_accelerator)
    except EdgevitError as exc:
        fail(str(exc), exc.exit_code)
    pairs = [(t.name, a.name) for t in TARGETS.values() for a in t.accelerators]
    rows = [
        {"name": n, "order": ORDER.index(n) if n in ORDER else len(ORDER), "kind": PASSES[n].kind,
         "exact": PASSES[n].exact, "summary": PASSES[n].summary(), "fixes": list(PASSES[n].fixes),
         "pipelines": [f"{t}:{a}" for t, a in pairs if n in default_pipeline(t, a)]}
        for n in names
    ]
    quantized = listing_rows()  # the quantized-graph passes (docs/placement.md), after the graph passes
    if target is not None:  # in the order that accelerator's int8 artifacts run them
        order = quantized_pipeline(tgt.name, acc)
        quantized = sorted((r for r in quantized if r["name"] in order), key=lambda r: order.index(r["name"]))
    rows += quantized
    if as_json:
        out_console.print_json(json.dumps(rows))
        return
    title = f"pipeline for {target}:{acc}" if target else "edgevit passes"
    table = Table(title=title)
    for col in ("#", "pass", "exact", "what it rewrites", "in pipelines"):
        table.add_column(col, overflow="fold")
    for i, r in enumerate(rows, 1):
        where = "all" if len(r["pipelines"]) == len(pairs) else ", ".join(r["pipelines"]) or "none (on request)"
        table.add_row(str(i), r["name"], "yes" if r["exact"] else "[yellow]approx[/]", r["summary"], where)
    out_console.print(table)


def devices_cmd(
    remote: Optional[str] = typer.Option(None, "--remote", "-r", help=REMOTE_HELP),
    every: bool = typer.Option(False, "--all", help="This machine and every device named in the devices file."),
    remote_python: Optional[str] = typer.Option(None, "--remote-python", help="Python on the remote [default: python3, or the devices file's]."),
    devices_file: Optional[Path] = typer.Option(None, "--devices-file", help="Devices file [default: edgevit-devices.toml or pyproject.toml here]."),
    cluster: bool = typer.Option(False, "--cluster", help="The Ray cluster's nodes and the devices they advertise "
                                 "(custom resources) instead."),
    address: Optional[str] = typer.Option(None, "--address", help="With --cluster: the cluster [default: 'auto', "
                                          "the one this machine belongs to]."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The devices table: every runtime edgevit can measure on, and whether it is available (and why not),
    here or on remote machines (probed over ssh or adb); with --cluster, what a Ray cluster's nodes offer."""
    from edgevit.devices.inventory import resolve_remotes
    from edgevit.devices.remote import RemoteError, RemoteHost
    from edgevit.devices.table import device_rows, local_facts

    if cluster:
        _cluster_devices(address or "auto", as_json)
    try:
        specs = resolve_remotes(remote, devices_file, remote_python, every_named=every)
    except EdgevitError as exc:
        fail(str(exc), exc.exit_code)
    machines: list[dict[str, Any]] = []
    if remote is None or every:
        machines.append({"name": "local", "address": "local", "status": "ok", "reason": "", "facts": local_facts()})
    for spec in specs:
        with RemoteHost(spec) as host:
            try:
                machines.append({"name": spec.name, "address": spec.address, "status": "ok", "reason": "",
                                 "facts": host.open()})
            except RemoteError as exc:
                machines.append({"name": spec.name, "address": spec.address, "status": exc.kind, "reason": str(exc),
                                 "facts": None})
    rows = [r for m in machines if m["facts"] for r in device_rows(m["facts"], m["name"])]
    if as_json:
        out_console.file.write(to_json({"machines": machines, "devices": rows}) + "\n")
    else:
        _print_devices(machines, rows)
    failed = [m for m in machines if m["status"] != "ok"]
    for m in failed:
        err_console.print(f"error: {m['reason']}", highlight=False, markup=False)
    raise typer.Exit(1 if failed else 0)


def _cluster_devices(address: str, as_json: bool) -> None:
    """``edgevit devices --cluster``: each live node, its CPUs and custom resources (the devices a bench cell of
    ``edgevit sweep --executor ray`` may be scheduled on). Exits."""
    from edgevit.sweep.executors import _connect, _ray, describe_cluster

    try:
        ray = _ray()
        if address == "auto" and not _cluster_running():
            raise EdgevitError("no Ray cluster on this machine: start one (ray start --head) or give --address")
        _connect(ray, address)
        nodes = describe_cluster(ray)["nodes"]
        ray.shutdown()
    except EdgevitError as exc:
        fail(str(exc), exc.exit_code)
    if as_json:
        out_console.file.write(to_json({"nodes": nodes}) + "\n")
        raise typer.Exit(0)
    table = Table(title=f"Ray cluster at {address}")
    for name in ("node", "address", "CPUs", "devices (custom resources)"):
        table.add_column(name)
    for n in nodes:
        table.add_row(n["id"][:12], n["address"] or "-", f"{n['cpus']:g}",
                      ", ".join(f"{k} x{v:g}" for k, v in n["resources"].items()) or "-")
    out_console.print(table)
    raise typer.Exit(0)


def _cluster_running() -> bool:
    """Whether this machine belongs to a Ray cluster (``ray start`` leaves its address in the session dir)."""
    import os
    import tempfile

    return bool(os.environ.get("RAY_ADDRESS")) or os.path.exists(
        os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster"))


def _print_devices(machines: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    from edgevit.devices.table import machine_summary

    for m in machines:
        if not m["facts"]:
            continue
        where = ("this machine" if m["address"] == "local"
                 else m["name"] if m["name"] == m["address"] else f"{m['name']} ({m['address']})")
        table = Table(title=f"devices on {where} ('edgevit bench --device cpu' measures the available ones marked cpu)",
                      caption=escape(machine_summary(m["facts"])), caption_justify="left")
        for col in ("device", "runtime", "precisions", "cpu", "available"):
            table.add_column(col)
        for r in (r for r in rows if r["host"] == m["name"]):
            here = "[green]yes[/]" if r["available"] else f"[yellow]no[/]: {escape(r['reason'])}"
            table.add_row(r["device"], r["description"], ", ".join(r["precisions"]), "cpu" if r["in_cpu_set"] else "", here)
        out_console.print(table)
