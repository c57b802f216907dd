"""A row of the devices table, and the probes every backend's rows share.

A device is named ``target:accelerator-or-unit``; it says which targets-table row it runs (so the bench
exports with that accelerator's pass pipeline), which worker runtime and options measure it, which
precisions it can measure and how each is obtained (an export precision plus runtime options), and a
probe that says, from a machine's facts (``devices/worker.py probe``), why it is unavailable there.
Each backend contributes its rows (``export/backends/<name>/devices.py``); ``devices/table.py`` gathers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Facts = dict[str, Any]  # what a machine can run: devices/worker.py probe(), read here or on a remote


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    runtime: str  # the worker's session kind (devices/worker.py SESSIONS)
    target: str | None  # the targets-table row whose artifacts it runs (None: PyTorch eager)
    accelerator: str | None  # the accelerator row whose pass pipeline the export uses
    probe: Callable[[Facts], str | None]  # None when usable on the machine the facts describe, else why not
    #: precision -> (export precision, worker options for it)
    precisions: dict[str, tuple[str | None, dict[str, Any]]] = field(hash=False)
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    on_cpu: bool = False  # part of `--device cpu`: runs on this machine's CPU cores
    packages: tuple[str, ...] = ()  # the runtime's packages (any one of them will do)
    systems: tuple[str, ...] = ()  # the operating systems it exists on (platform.system(); empty: any)
    #: worker options read from the measuring machine's facts (a delegate library's path there)
    facts_options: Callable[[Facts], dict[str, Any]] | None = field(default=None, hash=False, compare=False)

    def unavailable_reason(self, facts: Facts | None = None) -> str | None:
        """Why this device cannot be measured on the machine ``facts`` describe (default: this one)."""
        if facts is None:
            from edgevit.devices.table import local_facts

            facts = local_facts()
        try:
            return self.probe(facts)
        except Exception as exc:  # a probe that breaks means the device is not usable; say why
            return f"probe failed: {type(exc).__name__}: {exc}".splitlines()[0]

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    def worker_options(self, precision: str, facts: Facts | None = None) -> dict[str, Any]:
        options = {**self.options, **self.precisions[precision][1]}
        if self.facts_options is not None:  # options that come from the measuring machine
            from edgevit.devices.table import local_facts

            options |= self.facts_options(facts or local_facts())
        return options

    def export_precision(self, precision: str) -> str | None:
        return self.precisions[precision][0]


# --- probes: each reads the facts of the machine that will measure ---------------------------------

def _install_hint(facts: Facts, package: str, extra: str) -> str:
    if facts.get("remote"):
        return f"pip install {package} for {facts['platform']['executable']} there"
    return f'pip install -c constraints.txt -e ".[{extra}]"'


def package_reason(facts: Facts, package: str, extra: str) -> str | None:
    """None when ``package`` imports on that machine, else why not (not installed / broken)."""
    state = facts["packages"].get(package, {"missing": True})
    if "version" in state:
        return None
    if state.get("missing"):
        return f"{package} is not installed ({_install_hint(facts, package, extra)})"
    return f"{package} is installed but does not import: {state['error']}"
