"""Manifests and atomic file placement.

An export is assembled in a hidden temporary directory beside its destination and moved in with
``os.replace``; ``manifest.json`` is written last (also via replace), so a directory holding a manifest
holds a finished export and a crash leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgevit.errors import EdgevitError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a directory's files (sorted relative paths and contents)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def place(src: Path, dst: Path) -> None:
    """Move ``src`` (file or directory) to ``dst``, replacing what was there."""
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    os.replace(src, dst)


def host_info() -> dict[str, str]:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine()}


def prepare_out_dir(out: Path) -> Path:
    """Create ``out`` and prove it writable, or raise a one-line error."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=out, prefix=".edgevit-probe-").close()
    except OSError as exc:
        raise EdgevitError(f"cannot write to output directory '{out}': {exc.strerror or exc}") from None
    return out
