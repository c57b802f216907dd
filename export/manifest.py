"""Manifests and atomic file placement.

An export is assembled in a hidden temporary directory beside its destination and moved in with
``os.replace``; ``manifest.json`` is written last (also via replace), so a directory holding a manifest
holds a finished export and a crash leaves nothing that looks finished.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

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


NONFINITE_KEY = "nonfinite"


def to_json(data: Any, *, indent: int | None = None, default: Any = None) -> str:
    """``data`` as strictly valid JSON (RFC 8259), for manifests and every ``--json`` print.

    ``json.dumps`` writes NaN/Infinity as bare ``NaN``/``Infinity``, which no other JSON parser accepts.
    Here a non-finite float becomes ``null`` and the dict holding it gets a ``"nonfinite"`` entry giving
    the reason per key, e.g. ``{"max_abs_err": null, "nonfinite": {"max_abs_err": "nan"}}`` (a list
    element is named ``key[i]``; a float with no enclosing dict is just null). numpy scalars and arrays
    become plain numbers and lists; other objects go through ``default`` (as in ``json.dumps``).
    """
    return json.dumps(_finite(data, default), indent=indent, allow_nan=False)


def _finite(value: Any, default: Any) -> Any:
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        reasons: dict[str, str] = {}
        for key, item in value.items():
            out[key] = _finite_item(item, str(key), reasons, default)
        if reasons:
            known = out.get(NONFINITE_KEY)
            out[NONFINITE_KEY] = {**known, **reasons} if isinstance(known, dict) else reasons
        return out
    return _finite_item(value, "", {}, default)


def _finite_item(value: Any, where: str, reasons: dict[str, str], default: Any) -> Any:
    """``value`` made JSON-safe; non-finite floats (also inside lists) are recorded in ``reasons``."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        reasons[where] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, dict):
        return _finite(value, default)
    if isinstance(value, (list, tuple)):
        return [_finite_item(v, f"{where}[{i}]", reasons, default) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if default is None:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    return _finite_item(default(value), where, reasons, default)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(to_json(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: no half-written temporary left beside the manifest
        tmp.unlink(missing_ok=True)
        raise


def place(src: Path, dst: Path) -> None:
    """Move ``src`` (file or directory) to ``dst``, replacing what was there."""
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    os.replace(src, dst)


def host_info() -> dict[str, str]:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine()}


def prepare_out_dir(out: Path) -> Path:
    """Create ``out`` and prove it writable, or raise a one-line error."""
    created = missing_dirs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=out, prefix=".edgevit-probe-").close()
    except OSError as exc:
        remove_empty_dirs(created)
        if exc.errno == errno.ENOSPC:
            raise EdgevitError(no_space_message(out, 0)) from None
        raise EdgevitError(f"cannot write to output directory '{out}': {exc.strerror or exc}") from None
    return out


# --- staging, disk full, and what an export created -------------------------------------------------

STAGING_PREFIX = ".edgevit-tmp-"
OWNER_FILE = ".owner"  # the PID of the process assembling a staging directory


def missing_dirs(path: Path) -> list[Path]:
    """The directories that creating ``path`` would create, deepest first (none if it exists)."""
    missing = []
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove those of ``dirs`` (deepest first) that are empty: folders an export created and filled with nothing."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break  # not empty (or gone): its parents are not empty either


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def make_staging(out_dir: Path) -> Path:
    """A fresh hidden staging directory in ``out_dir``, holding this process's PID in ``.owner``."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    try:
        (staging / OWNER_FILE).write_text(f"{os.getpid()}\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def sweep_stale_staging(out_dir: Path, unowned_age_s: float = 60.0) -> list[Path]:
    """Remove staging directories (and manifest temporaries) in ``out_dir`` whose owner process is gone:
    left behind by an export that was killed. Directories without an owner count after ``unowned_age_s``."""
    import time

    removed = []
    for d in out_dir.glob(f"{STAGING_PREFIX}*"):
        try:
            pid = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            try:
                if time.time() - d.stat().st_mtime < unowned_age_s:
                    continue  # being created right now, or unreadable: leave it
            except OSError:
                continue
            pid = 0
        if not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    for tmp in out_dir.glob(f".{MANIFEST_NAME}.tmp-*"):
        pid_text = tmp.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def tree_bytes(path: Path) -> int:
    """Bytes in a file or a directory tree (0 if it is gone)."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


def is_no_space(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from is ENOSPC (disk full) or EDQUOT (quota)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def no_space_message(where: Path, need_bytes: int) -> str:
    need_mb = max(1, math.ceil(need_bytes / 2**20))
    return f"no space left on {where}: need about {need_mb} MB"
