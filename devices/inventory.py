"""The devices file: remote machines named once, used by name (``--remote pi5``).

Looked up in this order: ``--devices-file PATH``, the ``EDGEVIT_DEVICES_FILE`` environment variable,
``edgevit-devices.toml`` in the current directory (a ``[devices]`` table), then ``pyproject.toml`` in the
current directory (a ``[tool.edgevit.devices]`` table). Each entry is an address, or a table::

    [tool.edgevit.devices]
    pi5 = "ssh:pi@10.0.0.7"

    [tool.edgevit.devices.jetson]
    remote = "ssh://ubuntu@10.0.0.9:2222"
    python = "/home/ubuntu/venv/bin/python"   # default: python3 on the remote PATH
    threads = 4                               # default: every core there
    devices = "onnx:cpu,tflite:xnnpack"       # default: the bench's --device (cpu)
    workdir = "/tmp"                          # where each run's directory is made
    ssh_config = "~/.ssh/lab_config"          # ssh -F (default: ~/.ssh/config)

``EDGEVIT_SSH_CONFIG`` names an ssh_config file for every ssh remote without its own.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgevit.devices.remote import RemoteSpec, parse_remote
from edgevit.errors import EdgevitError

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib  # type: ignore[no-redef]

KEYS = {"remote": str, "python": str, "threads": int, "devices": str, "workdir": str, "ssh_config": str}


def find_devices_file(explicit: Path | None = None) -> tuple[Path, tuple[str, ...]] | None:
    """The devices file in use and the table path inside it; None when there is none."""
    if explicit is not None:
        if not explicit.is_file():
            raise EdgevitError(f"--devices-file '{explicit}' does not exist")
        return explicit, _table_path(explicit)
    env = os.environ.get("EDGEVIT_DEVICES_FILE")
    if env:
        if not Path(env).is_file():
            raise EdgevitError(f"EDGEVIT_DEVICES_FILE={env} does not exist")
        return Path(env), _table_path(Path(env))
    for name in ("edgevit-devices.toml", "pyproject.toml"):
        path = Path.cwd() / name
        if path.is_file() and _lookup(_read(path), _table_path(path)) is not None:
            return path, _table_path(path)
    return None


def _table_path(path: Path) -> tuple[str, ...]:
    return ("tool", "edgevit", "devices") if path.name == "pyproject.toml" else ("devices",)


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EdgevitError(f"devices file {path}: {' '.join(str(exc).split())}") from None


def _lookup(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def load_devices(explicit: Path | None = None) -> dict[str, RemoteSpec]:
    """Named remotes from the devices file (empty when there is none); one-line errors for bad entries."""
    found = find_devices_file(explicit)
    if found is None:
        return {}
    path, keys = found
    table = _lookup(_read(path), keys)
    where = f"devices file {path} [{'.'.join(keys)}]"
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise EdgevitError(f"{where}: expected a table of named devices")
    return {name: _entry(name, value, f"{where} '{name}'", path.parent) for name, value in table.items()}


def _entry(name: str, value: Any, where: str, base: Path) -> RemoteSpec:
    if isinstance(value, str):
        value = {"remote": value}
    if not isinstance(value, dict) or "remote" not in value:
        raise EdgevitError(f"{where}: give an address (\"ssh:user@host\") or a table with remote = \"...\"")
    for key, kind in value.items():
        if key not in KEYS:
            raise EdgevitError(f"{where}: unknown key '{key}'; known: {', '.join(KEYS)}")
        if not isinstance(kind, KEYS[key]) or isinstance(kind, bool):
            raise EdgevitError(f"{where}: '{key}' must be a {KEYS[key].__name__}")
    if value.get("threads") is not None and value["threads"] < 1:
        raise EdgevitError(f"{where}: threads must be >= 1")
    try:
        spec = parse_remote(value["remote"])
    except EdgevitError as exc:
        raise EdgevitError(f"{where}: {str(exc).replace('--remote ', '')}") from None
    config = value.get("ssh_config")
    if config:
        config = str((base / Path(config).expanduser()).resolve())
    return replace(spec, name=name, python=value.get("python", spec.python), threads=value.get("threads"),
                   devices=value.get("devices"), workdir=value.get("workdir"), ssh_config=config)


def with_ssh_config(spec: RemoteSpec) -> RemoteSpec:
    """``EDGEVIT_SSH_CONFIG`` for an ssh remote that names no ssh_config of its own."""
    env = os.environ.get("EDGEVIT_SSH_CONFIG")
    if spec.kind == "ssh" and not spec.ssh_config and env:
        if not Path(env).is_file():
            raise EdgevitError(f"EDGEVIT_SSH_CONFIG={env} does not exist")
        return replace(spec, ssh_config=env)
    return spec


def resolve_remotes(text: str | None, devices_file: Path | None = None, python: str | None = None,
                    every_named: bool = False) -> list[RemoteSpec]:
    """``--remote A,B`` (addresses or devices-file names) and, with ``every_named``, every named device;
    ``--remote-python`` applies to each. One-line errors (exit 2) for bad syntax or unknown names."""
    from edgevit.devices.remote import resolve_remote, transport_tools

    named = load_devices(devices_file)
    specs = list(named.values()) if every_named else []
    for part in (text.split(",") if text is not None else []):
        specs.append(resolve_remote(part, named, python))
    if python and every_named:
        specs = [replace(s, python=python) for s in specs]
    specs = [with_ssh_config(s) for s in dict.fromkeys(specs)]
    for spec in specs:
        missing = transport_tools(spec.kind)
        if missing:
            raise EdgevitError(f"--remote {spec.address}: {missing}")
    return specs
