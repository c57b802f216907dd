"""Manifests and atomic file placement.

:func:`build_manifest` writes down what one export made (the last step of the pipeline,
:mod:`edgevit.export.pipeline`); :func:`passes_record` is its account of the pass pipeline.

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
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edgevit.errors import EdgevitError

if TYPE_CHECKING:
    from edgevit.export.parity import ParityReport
    from edgevit.export.passes import PipelineResult
    from edgevit.export.subject import Subject
    from edgevit.export.targets import Target

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


def write_atomic(path: Path, data: str | bytes) -> Path:
    """``data`` at ``path`` through a temporary file in the same folder and ``os.replace``: a reader (or an
    interrupted writer) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


# --- the manifest's content -----------------------------------------------------------------------

def build_manifest(
    tgt: "Target",
    subject: "Subject",
    precision: str,
    accelerator: str,
    artifact: Path,
    files: list[Path],
    parity: "ParityReport",
    outputs: list[Any],
    names: list[str],
    passes: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of one export: model, inputs, outputs (``outputs``: the model's flattened outputs on
    the example inputs, named ``names``), target, pipeline (``passes``: :func:`passes_record`), artifact
    files with their hashes, parity, and the versions of everything involved."""
    import edgevit

    info, ref = subject.info, subject.reference
    return {
        "schema": SCHEMA_VERSION,
        "status": parity.status,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": subject.name,
            "source": "zoo" if info else (ref.kind if ref else "user"),
            **({"reference": ref.source} if ref else {}),  # the folder or module:factory it was built from
            "family": info.family if info else None,
            "variant": info.extra if info else None,
            "paper": info.paper if info else None,
            "params": info.params if info else sum(p.numel() for p in subject.model.parameters()),
            "macs": info.macs if info else None,
            "weights": ref.weights_record(subject.seed) if ref
            else {"path": str(subject.weights), "sha256": sha256_of(subject.weights)} if subject.weights
            else (f"random, seed {subject.seed}, every parameter exercised" if info else "user module"),
        },
        "inputs": [
            {"name": f"input_{i}", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for i, t in enumerate(subject.example_inputs)
        ],
        "normalisation": {"mean": info.mean, "std": info.std} if info
        else ({"mean": list(ref.mean), "std": list(ref.std)} if ref and ref.mean else None),
        "outputs": [{"name": n, "shape": list(t.shape)} for n, t in zip(names, outputs)],
        "target": tgt.name,
        "precision": precision,
        "converter": tgt.converter,
        "runtime": tgt.runtime,
        "accelerator": accelerator,
        "passes": passes,
        "artifact": {
            "file": artifact.name,
            "sha256": sha256_of(artifact),
            "files": {f.name: sha256_of(f) for f in files},
            "bytes": sum(_size(f) for f in files),
        },
        "parity": parity.to_dict(),
        **({"quantization": parity.quantization} if parity.quantization is not None else {}),
        "versions": {"edgevit": edgevit.__version__} | tgt.converter_module().versions() | host_info(),
    }


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def passes_record(
    requested: str | Sequence[str] | None,
    names: tuple[str, ...],
    pipeline: "PipelineResult",
    parity: "ParityReport",
    without: dict[str, Any] | None,
    rollback: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest's account of the pipeline: what ran, where it rewrote, and what it cost."""
    spec = requested if isinstance(requested, str) or requested is None else ",".join(requested)
    with_passes = parity.worst("max_abs_err")
    approximate = approximations(pipeline)
    return {
        "requested": spec or "auto",
        "pipeline": list(names),
        "applied": [r.to_dict() for r in pipeline.reports],
        "sites_total": sum(r.sites for r in pipeline.reports),
        "approximations": approximate,  # non-exact passes that rewrote something
        "parity_reference": "rewritten graph (approximate passes applied)" if approximate else "model",
        "parity_cost": {
            "graph_max_abs_change": pipeline.max_abs_change,  # rewritten graph vs the model, in PyTorch
            "artifact_max_abs_with_passes": with_passes,
            "without_passes": without,  # only with compare_without_passes
        },
        "rollback": rollback,  # the pipeline rolled back as a whole (see pipeline.Build.with_fallback)
    }


def approximations(pipeline: "PipelineResult") -> list[str]:
    """The non-exact passes that rewrote something: parity is then measured against the rewritten graph."""
    return [r.name for r in pipeline.reports if r.sites and not r.exact]
