"""The baseline of ``edgevit check``: ``edgevit.lock.json`` and what counts as a regression against it.

``--update-baseline`` writes, per cell, the record :func:`edgevit.check.run.cell_record` reads back (parity
errors, coverage, op counts per type, size, tool versions). A later check compares each cell with it:

- a cell that passed and now does not;
- a parity error more than :data:`PARITY_FACTOR` times the baseline's (the baseline's error floored at one
  float32 rounding step of the output's peak, so an exact baseline does not make any rounding a regression);
- more partitions, or fewer nodes on the accelerator;
- an artifact more than :data:`SIZE_GROWTH` larger;
- an op type on the accelerator that the baseline did not have there.

Improvements (fewer partitions, smaller, lower error, a failing cell that passes) are reported, never failed.
The tool versions that changed since the baseline are named next to each regression: a new converter or
runtime is the usual cause.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from edgevit.check.project import ProjectError
from edgevit.check.run import CellResult
from edgevit.export.manifest import write_atomic

SCHEMA = 1
PARITY_FACTOR = 10.0
SIZE_GROWTH = 0.05
FLOAT32_STEP = 2.0 ** -23  # relative rounding step of float32


def write_lock(results: list[CellResult], path: Path, keep: dict[str, Any] | None = None) -> Path:
    """The lock file at ``path`` from ``results`` (cells that errored keep their old entry from ``keep``,
    the lock previously there, if any: a crash is not a new baseline). Written atomically."""
    cells = dict((keep or {}).get("cells", {}))
    for r in results:
        if r.status != "error":
            cells[r.cell.id] = {"status": r.status, **r.record}
    document = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "cells": dict(sorted(cells.items()))}
    return write_atomic(path, json.dumps(document, indent=1, default=str) + "\n")


def read_lock(path: Path) -> dict[str, Any]:
    """The lock file's document; a malformed one is a one-line error (exit 2)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProjectError(f"cannot read the baseline {path}: {exc}") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA or not isinstance(document.get("cells"), dict):
        raise ProjectError(f"{path} is not an edgevit baseline (schema {SCHEMA}); rewrite it with --update-baseline")
    return document


def compare(results: list[CellResult], lock: dict[str, Any]) -> None:
    """Fill each result's ``regressions`` and ``improvements`` against the lock's entry for its cell."""
    for r in results:
        base = lock["cells"].get(r.cell.id)
        if base is None or r.status == "error" and base.get("status") == "error":
            continue
        regressions, improvements = differences(base, r)
        changed = changed_versions(base.get("versions", {}), r.record.get("versions", {}))
        suffix = f" [changed: {changed}]" if changed else ""
        r.regressions = [line + suffix for line in regressions]
        r.improvements = improvements


def differences(base: dict[str, Any], r: CellResult) -> tuple[list[str], list[str]]:
    """(regressions, improvements) of ``r`` against its baseline entry ``base``, one line each."""
    worse: list[str] = []
    better: list[str] = []
    if base.get("status") == "passed" and r.status != "passed":
        worse.append(f"passed in the baseline, now {r.status}")
    elif base.get("status") != "passed" and r.status == "passed":
        better.append(f"{base.get('status')} in the baseline, now passed")
    if r.status == "error":
        return worse, better
    _parity(base, r.record, worse, better)
    _size(base, r.record, worse, better)
    _coverage(base.get("coverage"), r.record.get("coverage"), worse, better)
    return worse, better


def _parity(base: dict[str, Any], now: dict[str, Any], worse: list[str], better: list[str]) -> None:
    old, new = base.get("parity", {}).get("max_abs_err"), now.get("parity", {}).get("max_abs_err")
    if old is None or new is None:
        return
    peak = max(base["parity"].get("peak") or 0.0, now["parity"].get("peak") or 0.0)
    floor = max(old, peak * FLOAT32_STEP)
    if new > PARITY_FACTOR * floor:
        worse.append(f"parity max abs error {new:.3g} > {PARITY_FACTOR:g}x the baseline's {old:.3g}")
    elif new * PARITY_FACTOR < old:
        better.append(f"parity max abs error {new:.3g} (baseline {old:.3g})")


def _size(base: dict[str, Any], now: dict[str, Any], worse: list[str], better: list[str]) -> None:
    old, new = base.get("size_bytes"), now.get("size_bytes")
    if not old or not new:
        return
    if new > old * (1 + SIZE_GROWTH):
        worse.append(f"artifact {new / 1e6:.2f} MB, +{new / old - 1:.0%} over the baseline's {old / 1e6:.2f} MB "
                     f"(limit +{SIZE_GROWTH:.0%})")
    elif new < old * (1 - SIZE_GROWTH):
        better.append(f"artifact {new / 1e6:.2f} MB (baseline {old / 1e6:.2f} MB)")


def _coverage(old: dict[str, Any] | None, new: dict[str, Any] | None, worse: list[str], better: list[str]) -> None:
    if not old or not new:
        return
    if new["partitions"] > old["partitions"]:
        worse.append(f"{new['partitions']} partitions on the accelerator (baseline {old['partitions']})")
    elif new["partitions"] < old["partitions"]:
        better.append(f"{new['partitions']} partitions on the accelerator (baseline {old['partitions']})")
    if new["supported"] < old["supported"]:
        worse.append(f"{new['supported']} nodes on the accelerator (baseline {old['supported']})")
    elif new["supported"] > old["supported"]:
        better.append(f"{new['supported']} nodes on the accelerator (baseline {old['supported']})")
    added = sorted(set(new.get("ops_on_accelerator", {})) - set(old.get("ops_on_accelerator", {})))
    if added:
        worse.append(f"new op type(s) on the accelerator: {', '.join(added)}")


def changed_versions(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``'onnxruntime 1.30.0 -> 1.31.1, torch ...'`` for the tools whose versions differ ('' when none)."""
    skip = ("platform", "machine")  # the host, not a tool
    keys = sorted(k for k in set(old) | set(new) if k not in skip and old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in keys)
