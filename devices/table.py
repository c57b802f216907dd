"""The devices table: where an artifact can be measured, and with which runtime settings.

Like the targets table it is the single source of truth: ``edgevit devices``, ``edgevit bench``, the
harness and the tests read :data:`DEVICES`. Each backend contributes its rows
(``export/backends/<name>/devices.py``: :class:`~edgevit.devices.device.Device` rows with their probes);
this module adds ``torch:eager``, the baseline every comparison is made against, and answers the
questions asked of the whole table (which devices ``--device cpu`` means on a machine, which runtimes
are missing there, the machine's one-line summary).
"""

from __future__ import annotations

import functools
from typing import Any

from edgevit.devices.device import Device, Facts, package_reason
from edgevit.errors import EdgevitError


def _torch(facts: Facts) -> str | None:
    return package_reason(facts, "torch", "all")


EAGER = Device("torch:eager", "PyTorch eager on the CPU (inference_mode), the baseline", "torch", None, None,
               _torch, {"fp32": (None, {"precision": "fp32"}), "bf16": (None, {"precision": "bf16"})}, on_cpu=True,
               packages=("torch",))


def _device_rows() -> list[Device]:
    """The baseline, then each backend's rows in the registry's order, except that rows which exist on
    one operating system only (``Device.systems``) come after those any machine may have."""
    from edgevit.export.backends import BACKENDS

    rows = [row for backend in BACKENDS.values() for row in backend.device_rows()]
    return [EAGER, *sorted(rows, key=lambda d: bool(d.systems))]


DEVICES: dict[str, Device] = {d.name: d for d in _device_rows()}
BASELINE = "torch:eager"


@functools.lru_cache(maxsize=None)
def local_facts() -> Facts:
    """This machine's facts, read once per process (the worker's probe, run in-process)."""
    from edgevit.devices.worker import probe

    return probe()


def missing_runtimes(facts: Facts) -> list[Device]:
    """One CPU device per runtime whose packages are all missing or broken on that machine (among the
    runtimes of its operating system): what a remote bench lists as unavailable, so a device's gaps are
    visible in its report."""
    rows: dict[str, Device] = {}
    for device in DEVICES.values():
        if not device.on_cpu or device.runtime in rows:
            continue
        if device.systems and facts["platform"]["system"] not in device.systems:
            continue
        if not any("version" in facts["packages"].get(p, {}) for p in device.packages):
            rows[device.runtime] = device
    return list(rows.values())


def check_device_names(spec: str) -> list[str]:
    """The names of a ``--device`` value, each 'cpu' or a row of the table; a one-line error otherwise."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise EdgevitError("--device is empty; use 'cpu' or device names (edgevit devices lists them)")
    for name in names:
        if name != "cpu":
            get_device(name)
    return names


def get_device(name: str) -> Device:
    if name not in DEVICES:
        raise EdgevitError(f"unknown device '{name}'; choose 'cpu' or one of: {', '.join(DEVICES)}")
    return DEVICES[name]


def resolve_devices(spec: str, targets: list[str] | None = None, facts: Facts | None = None,
                    strict: bool = True) -> list[Device]:
    """``cpu`` (every available CPU runtime of the machine, the eager baseline first) or a comma list
    of device names; ``targets`` keeps the devices of those targets (the baseline always stays).
    ``facts`` describe the measuring machine (default: this one). A named device that is unavailable
    there is a one-line error saying why, unless ``strict`` is False (a remote bench reports it as a row)."""
    facts = facts or local_facts()
    names = check_device_names(spec)
    chosen: list[Device] = []
    for name in names:
        if name == "cpu":
            chosen += [d for d in DEVICES.values() if d.on_cpu and d.unavailable_reason(facts) is None]
            continue
        device = get_device(name)
        reason = device.unavailable_reason(facts)
        if reason and strict:
            where = f"on {facts['remote']}" if facts.get("remote") else "here"
            raise EdgevitError(f"device '{name}' is not available {where}: {reason}")
        chosen.append(device)
    if targets:
        from edgevit.export.targets import get_target

        wanted = {get_target(t).name for t in targets}
        chosen = [d for d in chosen if d.target is None or d.target in wanted]
    baseline = DEVICES[BASELINE]
    if baseline.unavailable_reason(facts) is None and baseline not in chosen:
        chosen.insert(0, baseline)
    unique = list(dict.fromkeys(chosen))
    return sorted(unique, key=lambda d: d.name != BASELINE)


def device_rows(facts: Facts, host: str = "local") -> list[dict[str, Any]]:
    """The devices table as seen on the machine ``facts`` describe (``edgevit devices``)."""
    rows = []
    for d in DEVICES.values():
        reason = d.unavailable_reason(facts)
        rows.append({"host": host, "device": d.name, "description": d.description, "target": d.target,
                     "accelerator": d.accelerator, "precisions": list(d.precisions), "in_cpu_set": d.on_cpu,
                     "available": reason is None, "reason": reason})
    return rows


def machine_summary(facts: Facts) -> str:
    """One line: CPU, cores, kernel-deciding flags, runtimes with versions, NPU/GPU device nodes."""
    cpu = facts["cpu"]
    flags = " ".join(cpu["flags"]) or ("none of those edgevit looks for" if cpu["flags_known"] else "unknown")
    runtimes = ", ".join(f"{p} {s['version']}" for p, s in facts["packages"].items() if "version" in s)
    nodes = "; ".join(f"{kind}: {' '.join(paths)}" for kind, paths in facts.get("accelerator_nodes", {}).items())
    return "; ".join([
        f"{cpu['model']}, {cpu['cores']} cores ({facts['platform']['system']} {facts['platform']['machine']}, "
        f"python {facts['platform']['python']})", f"CPU flags: {flags}", f"runtimes: {runtimes or 'none'}",
        *_runtime_fragments(facts), *([f"device nodes: {nodes}"] if nodes else [])])


def _runtime_fragments(facts: Facts) -> list[str]:
    """What each backend's runtime reaches there, as its session module describes it (providers, devices...)."""
    from edgevit.export.backends import BACKENDS

    fragments = []
    for backend in BACKENDS.values():
        describe = getattr(backend.module("session"), "describe", None)
        text = describe(facts) if describe else None
        if text:
            fragments.append(text)
    return fragments
