"""Exports in a child process: a converter that crashes or hangs costs one row, not the whole run.

The child is ``edgevit export MODEL --target T --out DIR --in-process FLAGS``, which prints its
manifest as JSON on stdout (converters' own prints go to stderr). Used by ``edgevit export``,
``edgevit inspect`` and ``edgevit bench``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

TARGET_TIMEOUT_S = 1800


def export_command(model: str, target: str, out: Path, flags: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "edgevit.cli", "export", model, "--target", target, "--out", str(out),
            "--in-process", *flags]


def export_in_child(model: str, target: str, out: Path, flags: Sequence[str],
                    timeout_s: float = TARGET_TIMEOUT_S) -> dict[str, Any]:
    """The child's manifest (plus ``artifact_path``), or an error row ``{"status": "error", ...}``."""
    return run_export_child(export_command(model, target, out, flags), model, target, timeout_s)


def run_export_child(cmd: list[str], model: str, target: str, timeout_s: float = TARGET_TIMEOUT_S) -> dict[str, Any]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return error_row(model, target, f"timed out after {timeout_s:.0f} s")
    try:
        return json.loads(proc.stdout)[0]
    except (json.JSONDecodeError, IndexError, KeyError):
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        reason = (errors or lines or [f"exited with code {proc.returncode}"])[-1]
        if proc.returncode < 0:
            reason = f"converter process killed by signal {-proc.returncode}"
        return error_row(model, target, reason.removeprefix("error: "))


def error_row(model: str, target: str, reason: str) -> dict[str, Any]:
    return {"status": "error", "model": {"name": model}, "target": target, "error": reason}
