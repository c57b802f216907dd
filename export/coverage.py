"""Accelerator coverage: how much of an artifact each accelerator would run, judged by vendor checkers.

``edgevit inspect`` prints these; pass tests use them to show the partition a pass removes.

This module holds what every backend's checker shares: the :class:`Coverage` verdict, the partition
count (onnxruntime's algorithm), per-node verdicts of a rule-based checker (:class:`_Verdicts`), the
op/problem -> pass map (:func:`fixes_for`), the plain-text report (:func:`render`) and the dispatcher
:func:`coverage`, which validates the target and accelerator and hands the artifact to the backend's
``coverage.py`` (``export/backends/<name>/coverage.py``). Each checker lives with its backend and uses
the vendor's own tool where one runs on Linux and edgevit's rules (from the vendors' documented op
lists and limits) for what that tool does not check:

* ONNX NNAPI / Core ML EPs: onnxruntime's mobile usability checker (its op tables and partitioner).
* ONNX XNNPACK EP: the EP's node-support rules (onnxruntime's ``xnnpack/detail/node_support_checker.cc``).
* TFLite XNNPACK: the LiteRT interpreter itself (which ops its XNNPACK delegate took).
* TFLite GPU: TensorFlow's TFLite analyzer (``gpu_compatibility=True``) plus the delegate's op table
  and rules (``gpu_compatibility.cc``), rank <= 4 and batch 1, which the analyzer does not check.
* TFLite NNAPI: the NNAPI delegate's op list and rules.
* Core ML ANE: documented Neural Engine rules over the MIL program (MLComputePlan needs macOS).
* OpenVINO: ``Core.query_model`` on the devices present, static-shape rules for the NPU.

Every verdict names an op type (``unsupported``) or a problem whose text starts with a key such as
``rank>4:``; :func:`fixes_for` maps both to the passes whose ``fixes`` list them. ``supported_ops`` counts
by type the nodes the accelerator takes, under the type names of :func:`op_counts`.
"""

from __future__ import annotations

import collections
import math
import pathlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from edgevit.errors import EdgevitError


@dataclass
class Coverage:
    """One accelerator's verdict on one artifact."""

    accelerator: str
    checker: str
    nodes: int
    supported: int
    partitions: int
    unsupported: dict[str, int] = field(default_factory=dict)  # op -> count of unsupported nodes
    # op -> count of the nodes the accelerator takes; a node refused by a rule (``problems``) is in neither
    supported_ops: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # rule violations that are not an op type
    fixes: dict[str, list[str]] = field(default_factory=dict)  # op or problem -> passes that remove it
    macs_total: int | None = None  # multiply-accumulates of MatMul/Gemm/Conv nodes, where shapes are known
    macs_supported: int | None = None  # ... of those on the accelerator
    notes: list[str] = field(default_factory=list)  # what the checker could not do here (not a verdict)

    @property
    def percent(self) -> float:
        return 100.0 * self.supported / self.nodes if self.nodes else 100.0

    @property
    def macs_percent(self) -> float | None:
        if self.macs_total is None or self.macs_supported is None:
            return None  # not computable (unknown shapes); 0 MACs gives None below too
        return 100.0 * self.macs_supported / self.macs_total if self.macs_total else None

    @property
    def whole(self) -> bool:
        return self.partitions == 1 and self.supported == self.nodes and not self.problems

    def to_dict(self) -> dict[str, Any]:
        macs = self.macs_percent
        return asdict(self) | {"percent": round(self.percent, 2), "whole": self.whole,
                               "macs_percent": None if macs is None else round(macs, 2)}


# --- shared machinery ----------------------------------------------------------------------------

def count_by_type(op_types: Iterable[str]) -> dict[str, int]:
    """Op type -> number of occurrences, sorted by type (the form of ``op_counts`` and ``supported_ops``)."""
    return dict(sorted(collections.Counter(op_types).items()))


def count_partitions(producers: Sequence[Iterable[int]], supported: Sequence[bool]) -> int:
    """How many partitions an EP would make of the supported nodes (nodes indexed topologically).

    The algorithm of onnxruntime's ``CreateSupportedPartitionNodeGroups`` (and of its usability
    checker): walk the graph in topological order, growing the current group with supported nodes;
    an unsupported node that consumes the current group is deferred until the group closes, so a
    group never depends on itself through an unsupported node.
    """
    n = len(supported)
    consumers: list[set[int]] = [set() for _ in range(n)]
    in_degree = [0] * n
    for node, prods in enumerate(producers):
        prods = set(prods)
        in_degree[node] = len(prods)
        for p in prods:
            consumers[p].add(node)
    ready = collections.deque(i for i in range(n) if in_degree[i] == 0)
    deferred: collections.deque[int] = collections.deque()
    group: list[int] = []
    border: set[int] = set()
    groups = 0
    while ready or deferred:
        if not ready:
            groups += bool(group)
            group.clear()
            border.clear()
            ready, deferred = deferred, collections.deque()
            continue
        node = ready.popleft()
        if supported[node]:
            group.append(node)
            border.discard(node)
            border |= consumers[node]
        elif node in border:  # it needs the open group's outputs: handle it after the group closes
            deferred.append(node)
            continue
        for c in consumers[node]:
            in_degree[c] -= 1
            if in_degree[c] == 0:
                ready.append(c)
    return groups + bool(group)


@dataclass
class _Verdicts:
    """Per-node verdicts of a rule-based checker: a reason list per node (empty: supported).

    A reason is ``("op", detail)`` when the op type itself is unsupported, else ``(key, detail)`` for a
    rule it breaks (key such as ``rank>4``; the problem text starts with it). A key starting with
    ``_`` marks the node unsupported without a problem line (a whole-model problem already says why).
    """

    ops: list[str]
    producers: list[set[int]]
    reasons: list[list[tuple[str, str]]]
    macs: list[int | None] | None = None  # per node: MACs (0 for non-MAC ops); None entries: unknown

    def coverage(self, accelerator: str, checker: str, extra_problems: Sequence[str] = (),
                 notes: Sequence[str] = (), partitions: int | None = None) -> Coverage:
        supported = [not r for r in self.reasons]
        unsupported: collections.Counter[str] = collections.Counter()
        broken: dict[tuple[str, str], list[Any]] = {}
        for op, reasons in zip(self.ops, self.reasons):
            for key, detail in dict(reasons).items():  # one count per node and key
                if key == "op":
                    unsupported[op] += 1
                elif not key.startswith("_"):
                    broken.setdefault((key, op), [0, detail])[0] += 1
        problems = [f"{key}: {op} x{count} ({detail})" for (key, op), (count, detail) in sorted(broken.items())]
        total, on = _mac_shares(self.macs, supported)
        cov = Coverage(
            accelerator=accelerator,
            checker=checker,
            nodes=len(self.ops),
            supported=sum(supported),
            partitions=count_partitions(self.producers, supported) if partitions is None else partitions,
            unsupported=dict(sorted(unsupported.items())),
            supported_ops=count_by_type(op for op, ok in zip(self.ops, supported) if ok),
            problems=[*extra_problems, *problems],
            macs_total=total,
            macs_supported=on,
            notes=list(notes),
        )
        return _with_fixes(cov)


def _mac_shares(macs: Sequence[int | None] | None, supported: Sequence[bool]) -> tuple[int | None, int | None]:
    if macs is None or any(m is None for m in macs):
        return None, None
    return sum(macs), sum(m for m, s in zip(macs, supported) if s)  # type: ignore[misc]


def _prod(dims: Iterable[int]) -> int:
    return math.prod(int(d) for d in dims)


def _producers(inputs: Sequence[Sequence[Any]], outputs: Sequence[Sequence[Any]]) -> list[set[int]]:
    """Producer sets from each node's input and output value names (graph inputs/constants: none)."""
    made_by = {v: i for i, outs in enumerate(outputs) for v in outs}
    return [{made_by[v] for v in ins if v in made_by and made_by[v] != i} for i, ins in enumerate(inputs)]


# --- which pass fixes what ------------------------------------------------------------------------

_DOMAIN = re.compile(r"^(?:ai\.onnx(?:\.ml)?|com\.microsoft|[a-z][\w.]*\.[\w.]+):(?=\S)")


def _fix_key(op_or_problem: str) -> str:
    """``ai.onnx:Erf`` -> ``erf``; ``rank>4: SOFTMAX x1 (...)`` -> ``rank>4``."""
    key = op_or_problem.split(": ", 1)[0].strip()
    return _DOMAIN.sub("", key).lower()


def fixes_for(op_or_problem: str, target: str | None = None, accelerator: str | None = None) -> list[str]:
    """Names of the registered passes whose ``fixes`` list this op type or problem key.

    Matching is case-insensitive and ignores ONNX domain prefixes (``ai.onnx:``); a problem string
    is matched by its key, the text before the first ``": "``. With ``target``/``accelerator`` the
    passes in that pipeline come first.
    """
    from edgevit.export.passes import PASSES, default_pipeline, resolve_passes

    from edgevit.export.quantization.passes import fixing_passes, quantized_pipeline

    key = _fix_key(op_or_problem)
    whole = op_or_problem.strip().lower()
    names = [name for name, cls in PASSES.items()
             if any(f.lower() in (key, whole) for f in getattr(cls, "fixes", ()))]
    ordered = list(resolve_passes(names, target or "onnx", accelerator or "cpu")) if names else []
    if target and accelerator:
        wanted = default_pipeline(target, accelerator)
        ordered.sort(key=lambda n: n not in wanted)  # stable: ORDER within each group
    # passes on quantized artifacts (export/quantization/passes.py): this accelerator's first, in its order
    pipeline = quantized_pipeline(target, accelerator) if target else ()
    quantized = sorted(dict.fromkeys(fixing_passes(key) + fixing_passes(whole)),
                       key=lambda n: pipeline.index(n) if n in pipeline else len(pipeline))
    return ordered + quantized


def _with_fixes(cov: Coverage) -> Coverage:
    """Fill ``cov.fixes`` for every unsupported op and problem that some pass removes."""
    target, _, accelerator = cov.accelerator.partition(":")
    for item in [*cov.unsupported, *cov.problems]:
        names = fixes_for(item, target, accelerator)
        if names:
            cov.fixes[item] = names
    return cov



# --- dispatch -------------------------------------------------------------------------------------

def coverage(artifact_path: str | pathlib.Path, target: str, accelerator: str | None = None) -> Coverage:
    """The coverage of ``artifact_path`` (an artifact of ``target``) on ``accelerator`` (default: the
    target's default accelerator), by the target's backend (``export/backends/<name>/coverage.py``).
    Raises :class:`EdgevitError` for unknown targets/accelerators, missing backend packages, or
    unreadable artifacts."""
    return _run_backend("coverage", artifact_path, target, accelerator)


def op_counts(artifact_path: str | pathlib.Path, target: str, accelerator: str | None = None) -> dict[str, int]:
    """Op type -> count of ``artifact_path`` (an artifact of ``target``), sorted by type, over exactly the
    nodes that :func:`coverage` on ``accelerator`` (default: the target's default accelerator) counts in
    ``Coverage.nodes``, with the type names its ``unsupported`` and ``supported_ops`` use (the ops on the
    accelerator by type are ``supported_ops``, not these counts less ``unsupported``: a node refused by a
    rule is only in ``problems``). Same errors as :func:`coverage`."""
    return _run_backend("op_counts", artifact_path, target, accelerator)


def _run_backend(function: str, artifact_path: str | pathlib.Path, target: str, accelerator: str | None) -> Any:
    """Validate the target and accelerator, then call the backend's ``coverage.py`` ``function(path, acc)``;
    any failure on the artifact becomes a one-line :class:`EdgevitError`."""
    from edgevit.export.backends import get_backend
    from edgevit.export.targets import get_target

    tgt = get_target(target)
    acc = tgt.accelerator(accelerator).name
    tgt.check_installed()
    path = pathlib.Path(artifact_path)
    what = "coverage" if function == "coverage" else "op counts"
    try:
        return getattr(get_backend(tgt.name).module("coverage"), function)(path, acc)
    except EdgevitError:
        raise
    except Exception as exc:  # a checker failing on a bad artifact is a one-line user error
        raise EdgevitError(f"{tgt.name}:{acc} {what} of {path} failed: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc


def render(cov: Coverage) -> str:
    """Plain-text report: partitions, % of nodes and MACs, unsupported ops and problems with fixes."""
    macs = cov.macs_percent
    lines = [
        f"{cov.accelerator} [{cov.checker}]",
        f"  partitions {cov.partitions}; nodes {cov.supported}/{cov.nodes} ({cov.percent:.1f}%)"
        + (f"; MACs {macs:.1f}%" if macs is not None else "") + ("; whole" if cov.whole else ""),
    ]
    for op, n in cov.unsupported.items():
        lines.append(f"  unsupported {op} x{n} -> {', '.join(cov.fixes.get(op, [])) or 'no pass yet'}")
    for p in cov.problems:
        lines.append(f"  {p} -> {', '.join(cov.fixes.get(p, [])) or 'no pass yet'}")
    lines += [f"  note: {n}" for n in cov.notes]
    return "\n".join(lines)
