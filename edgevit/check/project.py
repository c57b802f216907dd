"""The project file of ``edgevit check``: which cells to check and their budgets (docs/ci.md).

A project file is ``edgevit.toml`` (keys at the top level or under ``[tool.edgevit]``) or a
``pyproject.toml`` with a ``[tool.edgevit]`` table. Every mistake in it is a :class:`ProjectError`: one line
naming the file, the line and the key, e.g. ``edgevit.toml:7: models[1].targets: unknown target 'onx'``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevit.errors import EdgevitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

PROJECT_FILES = ("edgevit.toml", "pyproject.toml")
LOCK_NAME = "edgevit.lock.json"
#: keys a model entry takes; the budget keys may also sit at the top level (global budgets)
BUDGET_KEYS = ("max_abs_error", "max_size_mb", "coverage", "latency")
MODEL_KEYS = ("model", "id", "input_shape", "input_size", "weights", "targets", "precisions", "accelerators", "passes",
              "calibration", *BUDGET_KEYS)
TOP_KEYS = ("jobs", "targets", "precisions", "passes", "models", "devices", *BUDGET_KEYS)  # devices: the bench's
COVERAGE_KEYS = ("max_partitions", "min_nodes_percent")
LATENCY_KEYS = ("device", "max_ms")


class ProjectError(EdgevitError):
    """A bad project file (exit 2)."""


@dataclass(frozen=True)
class CoverageBudget:
    max_partitions: int | None = None
    min_nodes_percent: float | None = None


@dataclass(frozen=True)
class LatencyBudget:
    device: str
    max_ms: float


@dataclass(frozen=True)
class Budgets:
    """What a cell must meet besides its own parity verdict (None: not checked)."""

    max_abs_error: float | None = None  # parity: worst max abs error of any output (default: the precision's bounds)
    max_size_mb: float | None = None
    coverage: CoverageBudget | None = None  # for the cell's accelerator
    latency: LatencyBudget | None = None


def cell_id(name: str, target: str, accelerator: str | None, precision: str) -> str:
    """``name/target[:accelerator]/precision``: how check, sweep and their reports name a cell."""
    return f"{name}/{target}:{accelerator}/{precision}" if accelerator else f"{name}/{target}/{precision}"


def cell_slug(cell: str) -> str:
    """A cell id as a folder name (no '/' or ':', which CI artifact uploads and Windows refuse)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", cell)


@dataclass(frozen=True)
class Cell:
    """One export to check: a model entry's target x precision x accelerator."""

    name: str  # the entry's id (default: its model)
    model: str  # zoo name, folder or package.module:factory
    target: str
    precision: str
    accelerator: str | None  # None: the target's default pipeline, coverage not judged
    passes: str = "auto"
    input_shape: tuple[int, ...] | None = None
    input_size: int | None = None
    weights: str | None = None
    calibration: str | None = None
    budgets: Budgets = field(default_factory=Budgets)
    source: str = ""  # "edgevit.toml:12: models[1]": where errors found later (unknown model...) point

    @property
    def id(self) -> str:
        return cell_id(self.name, self.target, self.accelerator, self.precision)

    @property
    def slug(self) -> str:
        return cell_slug(self.id)


@dataclass(frozen=True)
class Project:
    path: Path
    cells: tuple[Cell, ...]
    jobs: int = 1

    @property
    def lock_path(self) -> Path:
        return self.path.parent / LOCK_NAME


def find_project(path: Path | None = None, here: Path | None = None) -> Path:
    """``path``, else ``edgevit.toml`` here, else a ``pyproject.toml`` here with ``[tool.edgevit]``."""
    if path is not None:
        if not path.is_file():
            raise ProjectError(f"project file not found: {path}")
        return path
    here = here or Path.cwd()
    if (here / "edgevit.toml").is_file():
        return here / "edgevit.toml"
    pyproject = here / "pyproject.toml"
    if pyproject.is_file() and "models" in _read_toml(pyproject).get("tool", {}).get("edgevit", {}):
        return pyproject  # a [tool.edgevit] with only the bench's devices table is not a check project
    raise ProjectError(f"no project file in {here}: write edgevit.toml, or a [tool.edgevit] table in pyproject.toml "
                       "(see docs/ci.md), or pass --project")


def load_project(path: Path) -> Project:
    """The cells of the project file at ``path``; a :class:`ProjectError` naming the line and key on a mistake."""
    text_lines = path.read_text().splitlines()
    data = _read_toml(path)
    table = data.get("tool", {}).get("edgevit") if path.name == "pyproject.toml" or "tool" in data else data
    if table is None:
        raise ProjectError(f"{path}: no [tool.edgevit] table")
    where = _Locator(path, text_lines)
    _unknown_keys(table, TOP_KEYS, "", where)
    models = table.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise where.error("models", "needs at least one [[models]] entry (model = \"deit_tiny\", targets = [...])")
    defaults = {k: table[k] for k in ("targets", "precisions", "passes", *BUDGET_KEYS) if k in table}
    cells: list[Cell] = []
    for index, entry in enumerate(models):
        cells += _entry_cells(entry, defaults, f"models[{index + 1}]", where, index)
    _unique_ids(cells, where)
    jobs = table.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise where.error("jobs", f"must be a whole number >= 1, got {jobs!r}")
    return Project(path=path, cells=tuple(cells), jobs=jobs)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:  # its message carries "(at line N, column M)"
        raise ProjectError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ProjectError(f"cannot read {path}: {exc.strerror}") from None


def _entry_cells(entry: dict[str, Any], defaults: dict[str, Any], key: str, where: "_Locator",
                 index: int) -> list[Cell]:
    """The cells of one ``[[models]]`` entry: targets x precisions x (its accelerators of each target, or none)."""
    from edgevit.export.quantization import CALIBRATED
    from edgevit.export.targets import get_target

    _unknown_keys(entry, MODEL_KEYS, key + ".", where, index)
    model = entry.get("model")
    if not isinstance(model, str) or not model:
        raise where.error(f"{key}.model", "needs a model: a zoo name, a folder or package.module:factory", index)
    merged = defaults | entry
    targets = _strings(merged.get("targets", []), f"{key}.targets", where, index)
    if not targets:
        raise where.error(f"{key}.targets", "needs at least one target (onnx, coreml, tflite, openvino)", index)
    precisions = _strings(merged.get("precisions", []), f"{key}.precisions", where, index) or [None]
    accelerators = _accelerators(_strings(entry.get("accelerators", []), f"{key}.accelerators", where, index),
                                 targets, f"{key}.accelerators", where, index)
    for target in targets:
        try:
            get_target(target)
        except EdgevitError as exc:
            raise where.error(f"{key}.targets", str(exc), index) from None
    line = where.line_of(f"{key}.model", index)
    passes = merged.get("passes", "auto")
    if isinstance(passes, list):
        passes = ",".join(_strings(passes, f"{key}.passes", where, index)) or "none"
    elif not isinstance(passes, str):
        raise where.error(f"{key}.passes", f"must be \"auto\", \"none\" or pass names, got {passes!r}", index)
    shared = dict(name=str(entry.get("id") or model), model=model, passes=passes,
                  source=f"{where.path.name}{f':{line}' if line else ''}: {key}",
                  input_shape=_shape(entry.get("input_shape"), f"{key}.input_shape", where, index),
                  input_size=entry.get("input_size"), weights=entry.get("weights"),
                  calibration=entry.get("calibration"))
    cells = []
    for target in targets:
        for precision in precisions:
            resolved = _precision(target, precision, f"{key}.precisions", where, index)
            own = shared | {"calibration": shared["calibration"] if resolved in CALIBRATED else None}
            for acc in accelerators.get(target) or [None]:
                budgets = _budgets(merged, target, acc and f"{target}:{acc}", key, where, index)
                cells.append(Cell(target=target, precision=resolved, accelerator=acc, budgets=budgets, **own))
    if shared["calibration"] is not None and not any(c.precision in CALIBRATED for c in cells):
        raise where.error(f"{key}.calibration", "applies to int8 cells; this entry has none", index)
    return cells


def _strings(value: Any, key: str, where: "_Locator", index: int | None) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise where.error(key, f"must be a list of names, got {value!r}", index)
    return list(dict.fromkeys(value))


def _accelerators(names: list[str], targets: list[str], key: str, where: "_Locator",
                  index: int) -> dict[str, list[str]]:
    """``["onnx:nnapi", ...]`` -> {target: [accelerator, ...]}, each known to its target and one of ``targets``."""
    from edgevit.export.targets import get_target

    out: dict[str, list[str]] = {}
    for name in names:
        target, sep, acc = name.partition(":")
        if not sep or not acc:
            raise where.error(key, f"'{name}': write target:accelerator, e.g. onnx:nnapi", index)
        if target not in targets:
            raise where.error(key, f"'{name}': {target} is not among this entry's targets ({', '.join(targets)})",
                              index)
        try:
            out.setdefault(target, []).append(get_target(target).accelerator(acc).name)
        except EdgevitError as exc:
            raise where.error(key, str(exc), index) from None
    return out


def _precision(target: str, precision: str | None, key: str, where: "_Locator", index: int) -> str:
    from edgevit.export.targets import get_target, resolve_precision

    try:
        return resolve_precision(get_target(target), precision)
    except EdgevitError as exc:
        raise where.error(key if precision else key.replace("precisions", "targets"), str(exc), index) from None


def _shape(value: Any, key: str, where: "_Locator", index: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise where.error(key, f"must be a list of positive whole numbers, e.g. [1, 3, 224, 224]; got {value!r}", index)
    return tuple(value)


def _budgets(merged: dict[str, Any], target: str, accelerator: str | None, key: str, where: "_Locator",
             index: int) -> Budgets:
    """The budgets of a cell: the entry's keys over the project's (``merged``), coverage for its accelerator,
    latency for the cells of the latency device's target."""
    max_abs = _number(merged.get("max_abs_error"), f"{key}.max_abs_error", where, index)
    size = _number(merged.get("max_size_mb"), f"{key}.max_size_mb", where, index)
    coverage = _coverage_budgets(merged.get("coverage", {}), key, where, index).get(accelerator or "")
    latency = merged.get("latency")
    if latency is not None:
        lkey = f"{key}.latency"
        if not isinstance(latency, dict) or set(latency) != set(LATENCY_KEYS):
            raise where.error(lkey, f"must be {{ device = \"onnx:cpu\", max_ms = 25 }}, got {latency!r}", index)
        latency = LatencyBudget(str(latency["device"]), _number(latency["max_ms"], f"{lkey}.max_ms", where, index))
        if latency.device.partition(":")[0] != target:  # e.g. onnx:cpu times the onnx cells, not the tflite ones
            latency = None
    return Budgets(max_abs, size, coverage, latency)


def _coverage_budgets(table: Any, key: str, where: "_Locator", index: int) -> dict[str, CoverageBudget]:
    """``{ "onnx:nnapi" = { max_partitions = 1, min_nodes_percent = 100 } }`` checked whole (every entry,
    whichever cells use it), keyed by target:accelerator."""
    from edgevit.export.targets import get_target

    if not isinstance(table, dict):
        raise where.error(f"{key}.coverage", "must be a table of \"target:accelerator\" = { max_partitions, "
                          "min_nodes_percent }", index)
    budgets = {}
    for name, spec in table.items():
        ckey = f"{key}.coverage.\"{name}\""
        target, _, acc = name.partition(":")
        try:
            get_target(target).accelerator(acc or None)
        except EdgevitError as exc:
            raise where.error(ckey, str(exc), index) from None
        if not acc or not isinstance(spec, dict):
            raise where.error(ckey, "write \"target:accelerator\" = { max_partitions = 1, min_nodes_percent = 100 }",
                              index)
        _unknown_keys(spec, COVERAGE_KEYS, ckey + ".", where, index)
        partitions = spec.get("max_partitions")
        if partitions is not None and (isinstance(partitions, bool) or not isinstance(partitions, int)
                                       or partitions < 1):
            raise where.error(f"{ckey}.max_partitions", f"must be a whole number >= 1, got {partitions!r}", index)
        percent = _number(spec.get("min_nodes_percent"), f"{ckey}.min_nodes_percent", where, index)
        if percent is not None and percent > 100:
            raise where.error(f"{ckey}.min_nodes_percent", f"is a percentage (<= 100), got {percent}", index)
        budgets[name] = CoverageBudget(partitions, percent)
    return budgets


def _number(value: Any, key: str, where: "_Locator", index: int | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise where.error(key, f"must be a positive number, got {value!r}", index)
    return float(value)


def _unknown_keys(table: dict[str, Any], known: tuple[str, ...], prefix: str, where: "_Locator",
                  index: int | None = None) -> None:
    for name in table:
        if name not in known:
            raise where.error(f"{prefix}{name}", f"unknown key (known: {', '.join(known)})", index)


def _unique_ids(cells: list[Cell], where: "_Locator") -> None:
    seen: set[str] = set()
    for cell in cells:
        if cell.id in seen:
            raise where.error("models", f"two entries make the cell {cell.id}: give one an id = \"...\"")
        seen.add(cell.id)


class _Locator:
    """Finds the line of a key in the file's text for the error message (tomllib gives values, not lines)."""

    def __init__(self, path: Path, lines: list[str]) -> None:
        self.path, self.lines = path, lines

    def error(self, key: str, message: str, index: int | None = None) -> ProjectError:
        line = self.line_of(key, index)
        return ProjectError(f"{self.path.name}{f':{line}' if line else ''}: {key}: {message}")

    def line_of(self, key: str, index: int | None) -> int | None:
        """The line of ``key``'s last name, searched from the ``index``-th ``[[...models]]`` header when given."""
        start = 0
        if index is not None:
            headers = [i for i, text in enumerate(self.lines) if re.match(r"\s*\[\[\s*(tool\.edgevit\.)?models\s*\]\]",
                                                                          text)]
            if index < len(headers):
                start = headers[index]
        leaf = key.rsplit(".", 1)[-1].strip('"')
        leaf = re.sub(r"\[\d+\]$", "", leaf)
        pattern = re.compile(rf"(^|[\s{{,])\"?{re.escape(leaf)}\"?\s*=")
        for number in range(start, len(self.lines)):
            if pattern.search(self.lines[number]):
                return number + 1
        return start + 1 if index is not None else None
