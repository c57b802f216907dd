"""Accelerator coverage: how much of an artifact each accelerator would run, judged by vendor checkers.

``edgevit inspect`` prints these; pass tests use them to show the partition a pass removes.

Each checker uses the vendor's own tool where one runs on Linux and edgevit's rules (from the vendors'
documented op lists and limits) for what that tool does not check:

* ONNX NNAPI / Core ML EPs: onnxruntime's mobile usability checker (its op tables and partitioner).
* ONNX XNNPACK EP: the EP's node-support rules (onnxruntime's ``xnnpack/detail/node_support_checker.cc``).
* TFLite XNNPACK: the LiteRT interpreter itself (which ops its XNNPACK delegate took).
* TFLite GPU: TensorFlow's TFLite analyzer (``gpu_compatibility=True``) plus the delegate's op table
  and rules (``gpu_compatibility.cc``), rank <= 4 and batch 1, which the analyzer does not check.
* TFLite NNAPI: the NNAPI delegate's op list and rules.
* Core ML ANE: documented Neural Engine rules over the MIL program (MLComputePlan needs macOS).
* OpenVINO: ``Core.query_model`` on the devices present, static-shape rules for the NPU.

Every verdict names an op type (``unsupported``) or a problem whose text starts with a key such as
``rank>4:``; :func:`fixes_for` maps both to the passes whose ``fixes`` list them.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import os
import pathlib
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

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

    key = _fix_key(op_or_problem)
    whole = op_or_problem.strip().lower()
    names = [name for name, cls in PASSES.items()
             if any(f.lower() in (key, whole) for f in getattr(cls, "fixes", ()))]
    ordered = list(resolve_passes(names, target or "onnx", accelerator or "cpu")) if names else []
    if target and accelerator:
        wanted = default_pipeline(target, accelerator)
        ordered.sort(key=lambda n: n not in wanted)  # stable: ORDER within each group
    return ordered


def _with_fixes(cov: Coverage) -> Coverage:
    """Fill ``cov.fixes`` for every unsupported op and problem that some pass removes."""
    target, _, accelerator = cov.accelerator.partition(":")
    for item in [*cov.unsupported, *cov.problems]:
        names = fixes_for(item, target, accelerator)
        if names:
            cov.fixes[item] = names
    return cov


# --- ONNX: onnxruntime execution providers --------------------------------------------------------

_ORT_EPS = {
    "nnapi": ("NNAPI", None),
    "coreml": ("CoreML MLProgram", "coreml_supported_mlprogram_ops.md"),
}


@contextlib.contextmanager
def _ort_model(path: str | pathlib.Path) -> Iterator[Any]:
    """The model as an ORT-format conversion sees it: BASIC-level optimised, shapes inferred."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import optimize_model

    path = pathlib.Path(path)
    if not path.is_file():
        raise EdgevitError(f"no ONNX model at {path}")
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        optimised = pathlib.Path(tmp) / path.name
        optimize_model(path, optimised, use_external_initializers=True)
        yield uc.ModelProtoWithShapeInfo(optimised).model_with_shape_info


def onnx_ep_coverage(path: str | pathlib.Path, accelerator: str) -> Coverage:
    """onnxruntime's mobile usability checker for the NNAPI or Core ML (MLProgram) execution provider,
    or the XNNPACK EP's node-support rules for ``"xnnpack"``.

    Like ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``, the model is first
    optimised to the BASIC level (what an ORT-format conversion does), then partitioned with fixed
    input shapes required and the accelerator's rank limit (targets table).
    """
    if accelerator == "xnnpack":
        return _onnx_xnnpack_coverage(path)
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    from edgevit.export.targets import get_target

    label, config = _ORT_EPS[accelerator]
    # NNAPI: rank <= 4 for most ops; Core ML rejects rank > 5 (the checker's own limit)
    max_rank = get_target("onnx").accelerator(accelerator).max_rank or 999
    table = pathlib.Path(uc.__file__).parent / (config or "nnapi_supported_ops.md")
    with _ort_model(path) as model:
        info = uc.check_partitioning(model.graph, uc._SupportedOpsChecker(table), True, max_rank)  # noqa: SLF001
        checker = uc._SupportedOpsChecker(table)  # noqa: SLF001 - the same op table the checker used
        counts = collections.Counter(n.op_type for n in model.graph.node if not checker.is_op_supported(n))
        on = {tuple(n.output) for group in info.supported_groups for n in group}
        macs = _onnx_macs(model.graph)
        total, supported_macs = _mac_shares(macs, [tuple(n.output) in on for n in model.graph.node])
    problems = [f"rank>{max_rank}: {op}" for op in sorted(info.ops_with_unsupported_rank)]
    if info.nodes_unsupported_due_to_dynamic_input:
        problems.append(f"dynamic shape: {info.nodes_unsupported_due_to_dynamic_input} nodes with dynamic input shapes")
    return _with_fixes(Coverage(
        accelerator=f"onnx:{accelerator}",
        checker=f"onnxruntime usability checker ({label})",
        nodes=info.num_nodes,
        supported=info.num_supported_nodes,
        partitions=info.num_partitions,
        unsupported=dict(sorted(counts.items())),
        problems=problems,
        macs_total=total,
        macs_supported=supported_macs,
    ))


def onnx_cpu_coverage(path: str | pathlib.Path) -> Coverage:
    """The CPU EP runs every ONNX op: the check is that an onnxruntime session loads the model."""
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    problems = []
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # the verdict, not a crash: the session is what the CPU EP would run
        problems.append(f"session: {str(exc).splitlines()[0][:300]}")
    n = len(model.graph.node)
    total, on = _mac_shares(_onnx_macs(model.graph), [not problems] * n)
    return _with_fixes(Coverage("onnx:cpu", "onnxruntime session (CPUExecutionProvider)", n,
                                0 if problems else n, 0 if problems else 1, problems=problems,
                                macs_total=total, macs_supported=on))


def _onnx_shapes(graph: Any) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    shapes.update({init.name: tuple(init.dims) for init in graph.initializer})
    return shapes


def _onnx_macs(graph: Any) -> list[int | None]:
    """Per node: MACs of MatMul/Gemm/Conv/ConvTranspose from inferred shapes (None: unknown), else 0."""
    shapes = _onnx_shapes(graph)
    out: list[int | None] = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
            out.append(0)
            continue
        a, w, y = (shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0]))
        if a is None or w is None or y is None:
            out.append(None)
        elif node.op_type == "MatMul":
            out.append(_prod(y) * a[-1])
        elif node.op_type == "Gemm":
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            out.append(_prod(y) * (a[0] if trans_a else a[1]))
        elif node.op_type == "Conv":
            out.append(_prod(y) * _prod(w[1:]))
        else:  # ConvTranspose: every input element meets (Cout/groups * kernel) weights
            out.append(_prod(a) * _prod(w[1:]))
    return out


class _XnnpackEpRules:
    """The XNNPACK EP's node-support rules (onnxruntime ``xnnpack/detail/node_support_checker.cc``
    and each kernel's ``IsOnnxNodeSupported``): fp32 Conv/ConvTranspose (2-D, constant weights),
    MaxPool/AveragePool (2-D), Resize (4-D), Softmax (last axis, static last dim), Gemm and MatMul
    (A of rank <= 2, constant B of rank <= 2; Gemm alpha == beta == 1, constant C), plus Relu/Clip
    fused into a supported Conv/pool. Transformer MatMuls on (B, N, C) therefore stay on the CPU EP.
    """

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.shapes = _onnx_shapes(graph)
        self.ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
                      for vi in [*graph.input, *graph.output, *graph.value_info]
                      if vi.type.tensor_type.HasField("shape")}
        self.ranks.update({init.name: len(init.dims) for init in graph.initializer})
        self.types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.output, *graph.value_info]}
        self.consts = {init.name for init in graph.initializer}
        self.consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        self.made_by = {o: n for n in graph.node for o in n.output}

    def reasons(self, node: Any) -> list[tuple[str, str]]:
        """Why the EP would not take ``node`` (empty: it would)."""
        rule = getattr(self, f"_{node.op_type.lower()}", None)
        if node.domain not in ("", "ai.onnx") or rule is None:
            return [("op", "no XNNPACK EP kernel")]
        return rule(node)

    def _float(self, name: str) -> bool:
        return self.types.get(name) == 1  # TensorProto.FLOAT

    def _attr(self, node: Any, name: str, default: Any) -> Any:
        import onnx

        for at in node.attribute:
            if at.name == name:
                return onnx.helper.get_attribute_value(at)
        return default

    def _conv(self, node: Any) -> list[tuple[str, str]]:
        if self.ranks.get(node.input[0]) != 4 or node.input[1] not in self.consts:
            return [("xnnpack ep conv", "only 2-D convolutions with constant weights")]
        return []

    _convtranspose = _conv

    def _maxpool(self, node: Any) -> list[tuple[str, str]]:
        return [] if self.ranks.get(node.input[0]) == 4 else [("xnnpack ep pool", "only 2-D pooling")]

    _averagepool = _maxpool

    def _resize(self, node: Any) -> list[tuple[str, str]]:
        return [] if self.ranks.get(node.input[0]) == 4 else [("xnnpack ep resize", "only 4-D resize")]

    def _softmax(self, node: Any) -> list[tuple[str, str]]:
        rank = self.ranks.get(node.input[0])
        axis = self._attr(node, "axis", -1)
        shape = self.shapes.get(node.input[0])
        if rank is None or axis not in (-1, rank - 1) or not self._float(node.input[0]) or shape is None:
            return [("softmax axis", f"the XNNPACK EP needs the last axis of a static fp32 tensor, got axis {axis}")]
        return []

    def _matmul(self, node: Any) -> list[tuple[str, str]]:
        a, b = node.input[0], node.input[1]
        if not self._float(a) or self.ranks.get(a, 99) > 2 or self.ranks.get(b, 99) > 2 or b not in self.consts:
            return [("xnnpack ep matmul", "MatMul needs A of rank <= 2 and a constant B of rank <= 2")]
        return []

    def _gemm(self, node: Any) -> list[tuple[str, str]]:
        ok = (self._attr(node, "alpha", 1.0) == 1.0 and self._attr(node, "beta", 1.0) == 1.0
              and self._float(node.input[0]) and all(i in self.consts for i in node.input[1:] if i))
        return [] if ok else [("xnnpack ep gemm", "Gemm needs alpha == beta == 1 and constant B, C")]

    def fused(self, node: Any, supported: set[str]) -> bool:
        """Relu/Clip right after a supported Conv/MaxPool/AveragePool is fused into it."""
        src = self.made_by.get(node.input[0])
        consts = all(i in self.consts for i in node.input[1:] if i)
        return bool(src is not None and src.op_type in ("Conv", "MaxPool", "AveragePool")
                    and src.output[0] in supported and consts)


def _onnx_xnnpack_coverage(path: str | pathlib.Path) -> Coverage:
    with _ort_model(path) as model:
        graph = model.graph
        rules = _XnnpackEpRules(graph)
        reasons: list[list[tuple[str, str]]] = []
        supported_names: set[str] = set()
        for node in graph.node:  # nodes are in topological order, so fusion sees its producer first
            fused = node.op_type in ("Relu", "Clip") and rules.fused(node, supported_names)
            r = [] if fused else rules.reasons(node)
            if not r:
                supported_names.add(node.output[0])
            reasons.append(r)
        verdicts = _Verdicts(
            ops=[n.op_type for n in graph.node],
            producers=_producers([list(n.input) for n in graph.node], [list(n.output) for n in graph.node]),
            reasons=reasons,
            macs=_onnx_macs(graph),
        )
    return verdicts.coverage("onnx:xnnpack", "XNNPACK EP node-support rules (onnxruntime xnnpack EP)")


# --- TFLite / LiteRT ------------------------------------------------------------------------------

@dataclass
class _TflTensor:
    name: str
    shape: tuple[int, ...]
    signature: tuple[int, ...]
    dtype: str
    runtime: bool  # a graph input or an op's output (not a constant)


@dataclass
class _TflOp:
    index: int
    name: str
    inputs: list[int]  # -1: an absent optional input
    outputs: list[int]
    options: Any


@dataclass
class _TflGraph:
    ops: list[_TflOp]
    tensors: list[_TflTensor]
    subgraphs: int
    boundary: frozenset[int] = frozenset()  # the subgraph's input and output tensor indices

    def t(self, i: int) -> _TflTensor | None:
        return self.tensors[i] if i >= 0 else None

    def runtime_inputs(self, op: _TflOp) -> list[_TflTensor]:
        return [t for t in map(self.t, op.inputs) if t is not None and t.runtime]

    def producers(self) -> list[set[int]]:
        return _producers([op.inputs for op in self.ops], [op.outputs for op in self.ops])


def _read_tflite(path: pathlib.Path) -> _TflGraph:
    """The main subgraph of a .tflite flatbuffer (LiteRT's own schema reader), with op options."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    if not path.is_file():
        raise EdgevitError(f"no TFLite model at {path}")
    model = flatbuffer_utils.read_model(str(path))
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    sg = model.subgraphs[0]
    ops = []
    for i, op in enumerate(sg.operators or []):
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        name = op_names.get(builtin, str(builtin))
        if name == "CUSTOM":
            name = f"CUSTOM:{(code.customCode or b'').decode(errors='replace')}"
        ops.append(_TflOp(i, name, [int(x) for x in _as_list(op.inputs)], [int(x) for x in _as_list(op.outputs)],
                          op.builtinOptions))
    produced = {o for op in ops for o in op.outputs} | {int(x) for x in _as_list(sg.inputs)}
    tensors = []
    for i, t in enumerate(sg.tensors or []):
        shape = tuple(int(d) for d in _as_list(t.shape))
        sig = tuple(int(d) for d in _as_list(t.shapeSignature)) or shape
        name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name)
        tensors.append(_TflTensor(name, shape, sig, type_names.get(t.type, str(t.type)),
                                  i in produced or bool(t.isVariable)))
    boundary = frozenset(int(x) for x in [*_as_list(sg.inputs), *_as_list(sg.outputs)])
    return _TflGraph(ops, tensors, len(model.subgraphs), boundary)


def _as_list(x: Any) -> list[Any]:
    return [] if x is None else list(x)


def _tfl_macs(g: _TflGraph) -> list[int | None]:
    """Per op: MACs of FULLY_CONNECTED/CONV_2D/DEPTHWISE_CONV_2D/TRANSPOSE_CONV/BATCH_MATMUL, else 0."""
    out: list[int | None] = []
    for op in g.ops:
        ins = [g.t(i) for i in op.inputs]
        y = g.t(op.outputs[0]) if op.outputs else None
        if op.name not in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "BATCH_MATMUL"):
            out.append(0)
        elif y is None or len(ins) < 2 or ins[0] is None or ins[1] is None:
            out.append(None)
        elif op.name == "FULLY_CONNECTED":  # weights (out, in)
            out.append(_prod(y.shape) * ins[1].shape[-1])
        elif op.name == "CONV_2D":  # filter (O, kh, kw, I/groups)
            out.append(_prod(y.shape) * _prod(ins[1].shape[1:]))
        elif op.name == "DEPTHWISE_CONV_2D":  # filter (1, kh, kw, C*m)
            out.append(_prod(y.shape) * _prod(ins[1].shape[1:3]))
        elif op.name == "TRANSPOSE_CONV":  # inputs: output_shape, filter (O, kh, kw, I), input
            x = g.t(op.inputs[2]) if len(op.inputs) > 2 else None
            out.append(None if x is None else _prod(x.shape) * _prod(ins[1].shape[:3]))
        else:  # BATCH_MATMUL: K is the contracted axis of the first operand
            adj_x = bool(getattr(op.options, "adjX", False))
            a = ins[0].shape
            out.append(_prod(y.shape) * (a[-2] if adj_x else a[-1]) if len(a) >= 2 else None)
    return out


# Ops the open-source GPU delegate parses (tflite/tools/versioning/gpu_compatibility.cc, the switch in
# CheckGpuDelegateCompatibility); everything else is "Not supported op". BROADCAST_TO is not among
# them (LiteRT#9191), nor any STABLEHLO_* op.
_GPU_OPS = frozenset("""
ABS ADD ADD_N AVERAGE_POOL_2D BATCH_MATMUL CAST CONCATENATION CONV_2D COS CUMSUM DENSIFY DEPTHWISE_CONV_2D
DEPTH_TO_SPACE DEQUANTIZE DIV ELU EQUAL EXP FLOOR FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GELU GREATER
GREATER_EQUAL HARD_SWISH LEAKY_RELU LESS LESS_EQUAL LOG LOGICAL_AND LOGISTIC LSTM MAXIMUM MAX_POOL_2D MEAN
MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL ONE_HOT PACK PAD PADV2 POW PRELU QUANTIZE REDUCE_MAX REDUCE_MIN
REDUCE_PROD RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR RSQRT SELECT SELECT_V2
SIGN SIN SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE STRIDED_SLICE SUB SUM
TANH TILE TRANSPOSE TRANSPOSE_CONV
""".split())
_GPU_CUSTOM = frozenset({"Convolution2DTransposeBias", "MaxPoolingWithArgmax2D", "MaxUnpooling2D", "Resampler"})

# Ops the TFLite NNAPI delegate validates (tflite/delegates/nnapi/nnapi_delegate.cc, up to feature level
# 7). No GELU, CUMSUM, BROADCAST_TO or STABLEHLO_* case: those nodes stay on the CPU.
_NNAPI_OPS = frozenset("""
ABS ADD ARG_MAX ARG_MIN AVERAGE_POOL_2D BATCH_MATMUL BATCH_TO_SPACE_ND BIDIRECTIONAL_SEQUENCE_LSTM CAST
CONCATENATION CONV_2D DENSIFY DEPTH_TO_SPACE DEPTHWISE_CONV_2D DEQUANTIZE DIV ELU EMBEDDING_LOOKUP EQUAL EXP
EXPAND_DIMS FILL FLOOR FULLY_CONNECTED GATHER GREATER GREATER_EQUAL HARD_SWISH HASHTABLE_LOOKUP
L2_NORMALIZATION L2_POOL_2D LEAKY_RELU LESS LESS_EQUAL LOCAL_RESPONSE_NORMALIZATION LOG LOGICAL_AND
LOGICAL_NOT LOGICAL_OR LOGISTIC LSH_PROJECTION LSTM MAXIMUM MAX_POOL_2D MEAN MINIMUM MIRROR_PAD MUL NEG
NOT_EQUAL PACK PAD PADV2 POW PRELU QUANTIZE REDUCE_MAX REDUCE_MIN REDUCE_PROD RELU RELU6 RELU_N1_TO_1 RESHAPE
RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR REVERSE_V2 RNN RSQRT SELECT SELECT_V2 SIN SLICE SOFTMAX
SPACE_TO_BATCH_ND SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARED_DIFFERENCE SQUEEZE STRIDED_SLICE SUB SUM SVDF
TANH TILE TOPK_V2 TRANSPOSE TRANSPOSE_CONV UNIDIRECTIONAL_SEQUENCE_LSTM UNIDIRECTIONAL_SEQUENCE_RNN UNPACK
""".split())

_UNARY = frozenset("ABS COS ELU EXP FLOOR GELU LOG LOGISTIC NEG RSQRT SIGN SIN SQRT SQUARE TANH".split())
_REDUCE = frozenset({"MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD"})


def _shape_str(t: _TflTensor) -> str:
    return "[" + ", ".join(str(d) for d in t.signature) + "]"


def _rank_reasons(g: _TflGraph, op: _TflOp, max_rank: int) -> list[tuple[str, str]]:
    for t in map(g.t, [*op.inputs, *op.outputs]):
        if t is not None and len(t.shape) > max_rank:
            return [(f"rank>{max_rank}", f"tensor {_shape_str(t)}")]
    return []


def _gpu_reasons(g: _TflGraph, op: _TflOp) -> list[tuple[str, str]]:
    """Why the GPU delegate would not take ``op``: its op table and rules, rank <= 4 and batch 1."""
    if op.name.startswith("CUSTOM:"):
        return [] if op.name[7:] in _GPU_CUSTOM else [("op", "custom op")]
    if op.name not in _GPU_OPS:
        return [("op", "not in the GPU delegate's op table")]
    reasons = _rank_reasons(g, op, 4)  # "has bad input dims size" beyond BHWC
    for i in [*op.inputs, *op.outputs]:
        # R10: dim 0 is the batch at every rank (B, BC, BWC, BHWC: ExtractTensorShape in the delegate's
        # model_builder_helper.cc) and "Batch size != 1 is not supported" (tensorflow#92798) is raised
        # when the delegate's input/output tensors are converted, i.e. at the delegated graph's
        # boundary. For a model delegated whole that is the model's inputs and outputs; interior
        # tensors such as (heads, N, D) attention maps are not converted and do not trip it.
        t = g.t(i)
        if t is not None and i in g.boundary and t.runtime and t.shape and t.shape[0] != 1:
            reasons.append(("batch>1", f"tensor {_shape_str(t)}"))
            break
    return reasons + _gpu_op_rules(g, op)


def _gpu_op_rules(g: _TflGraph, op: _TflOp) -> list[tuple[str, str]]:
    """The per-op rules of ``gpu_compatibility.cc`` that can be read off the flatbuffer."""
    ins = [g.t(i) for i in op.inputs]
    runtime = g.runtime_inputs(op)
    opts = op.options
    if op.name in ("SLICE", "STRIDED_SLICE") and ins[0] is not None and len(ins[0].shape) not in (3, 4):
        return [("slice rank", f"{op.name} needs a 3-D or 4-D input, got {_shape_str(ins[0])}")]
    masks = op.name == "STRIDED_SLICE" and opts is not None and (opts.ellipsisMask or opts.newAxisMask
                                                                  or opts.shrinkAxisMask)
    if masks:
        return [("strided slice mask", "ellipsis/new_axis/shrink_axis masks are not supported")]
    if op.name in ("PAD", "PADV2", "MIRROR_PAD") and ins[0] is not None and len(ins[0].shape) not in (3, 4):
        return [("pad rank", f"paddings must be 3x2 or 4x2, input {_shape_str(ins[0])}")]
    if op.name in _REDUCE and (len(ins) < 2 or ins[1] is None or ins[1].runtime or ins[1].dtype != "INT32"):
        return [("reduce axes", f"{op.name} needs constant int32 axes")]
    if op.name in ("RESHAPE", "TRANSPOSE", "TILE") and len(runtime) != 1:
        return [("dynamic shape", f"{op.name} needs exactly one runtime input (constant shape/perm)")]
    if op.name in _UNARY and len(runtime) != 1:
        return [("const input", f"{op.name} needs a runtime input")]
    if op.name == "SOFTMAX" and opts is not None and opts.beta != 1:
        return [("softmax beta", f"beta {opts.beta} != 1")]
    if op.name == "FULLY_CONNECTED" and ins[0] is not None and not ins[0].runtime:
        return [("const input", "FULLY_CONNECTED does not take a constant input")]
    if op.name == "GATHER" and (ins[0] is None or ins[0].dtype == "INT32" or ins[1] is None
                                or len(ins[1].shape) != 1 or ins[1].dtype != "INT32"):
        return [("gather indices", "GATHER needs 1-D int32 indices and non-int32 data")]
    if op.name == "MUL" and len(ins) == 2 and None not in ins and len(ins[0].shape) == len(ins[1].shape):
        a, b = ins[0].shape, ins[1].shape
        if any(x < y for x, y in zip(a, b)) and any(y < x for x, y in zip(a, b)):
            return [("mul broadcast", f"MUL {list(a)} x {list(b)}: neither input covers the other")]
    if op.name == "BATCH_MATMUL":
        return _gpu_batch_matmul(ins, runtime, opts)
    return []


def _gpu_batch_matmul(ins: list[_TflTensor | None], runtime: list[_TflTensor], opts: Any) -> list[tuple[str, str]]:
    # The parser takes two runtime operands, or runtime x constant 2-D (lowered to a convolution);
    # adj_x/adj_y are ignored by the GPU parser: wrong results (LiteRT#8913).
    if opts is not None and (opts.adjX or opts.adjY):
        return [("batch_matmul adj", "adj_x/adj_y are ignored by the GPU delegate (LiteRT#8913)")]
    const_2d = ins[1] is not None and not ins[1].runtime and len(ins[1].shape) == 2
    if len(runtime) == 2 or (len(runtime) == 1 and const_2d):
        return []
    return [("batch_matmul const", "only runtime x runtime or runtime x constant 2-D operands")]


def _nnapi_reasons(g: _TflGraph, op: _TflOp) -> list[tuple[str, str]]:
    """The TFLite NNAPI delegate's op list and validation rules."""
    if op.name not in _NNAPI_OPS:
        return [("op", "no NNAPI delegate case")]
    reasons = _rank_reasons(g, op, 4)
    ins = [g.t(i) for i in op.inputs]
    if any(t is not None and t.runtime and -1 in t.signature for t in ins):
        reasons.append(("dynamic shape", "NNAPI needs static shapes"))
    if op.name in ("RESHAPE", "TRANSPOSE") and len(ins) > 1 and ins[1] is not None and ins[1].runtime:
        reasons.append(("dynamic shape", f"{op.name} needs a constant shape/perm"))
    if op.name == "MEAN" and op.outputs and not g.tensors[op.outputs[0]].shape:
        reasons.append(("mean scalar", "MEAN must not produce a scalar"))
    if op.name == "BATCH_MATMUL" and len(ins) == 2 and None not in ins:
        a, b = ins[0], ins[1]
        if a.dtype != b.dtype:
            reasons.append(("hybrid batch_matmul", "NNAPI does not support hybrid batch matmul"))
        elif not (2 <= len(a.shape) <= 4 and 2 <= len(b.shape) <= 4) or a.shape[:-2] != b.shape[:-2]:
            reasons.append(("broadcast batch_matmul",
                            f"ranks 2-4 with equal batch dims, got {list(a.shape)} x {list(b.shape)}"))
    return reasons


def _run_tflite_analyzer(path: pathlib.Path) -> tuple[str | None, str]:
    """TensorFlow's TFLite analyzer report with ``gpu_compatibility=True`` (None if TF is missing).

    ``Analyzer.analyze`` prints; the report is captured from Python's stdout and from file
    descriptor 1 (in case a build prints from C++).
    """
    try:
        import tensorflow as tf  # heavy: only the GPU check imports it
    except ImportError:
        return None, "TensorFlow not installed"
    buf = io.StringIO()
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            with contextlib.redirect_stdout(buf):
                tf.lite.experimental.Analyzer.analyze(model_path=str(path), gpu_compatibility=True)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        native = sink.read().decode(errors="replace")
    return buf.getvalue() + native, f"TF {tf.__version__}"


def _parse_gpu_warnings(report: str) -> dict[int, list[str]]:
    """``GPU COMPATIBILITY WARNING`` lines of an analyzer report, by the op (``Op#N``) they follow."""
    warnings: dict[int, list[str]] = collections.defaultdict(list)
    current: int | None = None
    in_main = False
    for line in report.splitlines():
        if m := re.match(r"\s*Subgraph#(\d+)", line):
            in_main = m.group(1) == "0"
            current = None
        elif m := re.match(r"\s*Op#(\d+)\s", line):
            current = int(m.group(1)) if in_main else None
        elif "GPU COMPATIBILITY WARNING" in line and current is not None:
            warnings[current].append(line.split("GPU COMPATIBILITY WARNING", 1)[1].lstrip(": ").strip())
    return dict(warnings)


def _xnnpack_delegated(path: pathlib.Path, n_ops: int) -> tuple[set[int], int] | str:
    """Which ops the LiteRT interpreter's XNNPACK delegate took, and how many delegate partitions.

    After ``allocate_tensors`` the node list holds the original ops and one DELEGATE node per
    partition; a partition's ops are those between its input and output tensors.
    """
    from ai_edge_litert.interpreter import Interpreter

    try:
        interp = Interpreter(model_path=str(path))
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        return " ".join(str(exc).split())[:300]
    details = interp._get_ops_details()  # noqa: SLF001 - the only view of the execution plan
    made_by = {int(o): d["index"] for d in details[:n_ops] for o in d["outputs"]}
    taken: set[int] = set()
    delegates = [d for d in details[n_ops:] if d["op_name"] == "DELEGATE"]
    for d in delegates:
        boundary = {int(i) for i in d["inputs"]}
        todo = [int(o) for o in d["outputs"]]
        while todo:
            t = todo.pop()
            if t in boundary or t not in made_by or made_by[t] in taken:
                continue
            taken.add(made_by[t])
            todo.extend(int(i) for i in details[made_by[t]]["inputs"] if i >= 0)
    return taken, len(delegates)


# XNNPACK delegate ops (xnnpack_delegate.cc): the fallback when the interpreter
# cannot load the model.
_XNNPACK_OPS = frozenset("""
ABS ADD AVERAGE_POOL_2D BATCH_MATMUL CEIL CONCATENATION CONV_2D COS DENSIFY DEPTH_TO_SPACE DEPTHWISE_CONV_2D
DEQUANTIZE DIV ELU EXP EXPAND_DIMS FLOOR FULLY_CONNECTED GELU HARD_SWISH LEAKY_RELU LOG LOGISTIC MAX_POOL_2D
MAXIMUM MEAN MINIMUM MUL NEG PAD PRELU QUANTIZE REDUCE_MAX REDUCE_MIN RELU RELU6 RELU_N1_TO_1 RESHAPE
RESIZE_BILINEAR ROUND RSQRT SIN SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SQRT SQUARE SQUARED_DIFFERENCE
STABLEHLO_COMPOSITE STRIDED_SLICE SUB SUM TANH TRANSPOSE TRANSPOSE_CONV
""".split())


def tflite_coverage(path: str | pathlib.Path, accelerator: str, analyzer: bool = True) -> Coverage:
    """Coverage of a .tflite model on LiteRT's ``xnnpack``, ``gpu`` or ``nnapi`` delegate.

    ``analyzer=False`` skips TensorFlow's analyzer (GPU only; importing TensorFlow takes seconds).
    """
    path = pathlib.Path(path)
    g = _read_tflite(path)
    notes = [f"{g.subgraphs - 1} further subgraph(s) not checked"] if g.subgraphs > 1 else []
    ops = [op.name for op in g.ops]
    producers, macs = g.producers(), _tfl_macs(g)
    if accelerator == "gpu":
        reasons = [_gpu_reasons(g, op) for op in g.ops]
        checker = "edgevit GPU delegate rules (gpu_compatibility.cc op table, rank<=4, batch 1)"
        if analyzer:
            report, version = _run_tflite_analyzer(path)
            if report is None:
                notes.append(f"TFLite analyzer not run: {version}")
            else:
                checker = f"TFLite analyzer ({version}, gpu_compatibility) + " + checker
                for i, msgs in _parse_gpu_warnings(report).items():
                    if i < len(reasons):
                        reasons[i].extend(("gpu analyzer", m) for m in msgs)
                if "looks compatible" in report and any(reasons):
                    # Seen with TF 2.21: the analyzer passes BROADCAST_TO and STABLEHLO_* ops, so its
                    # per-op GPU check is not in this build.
                    notes.append("the TFLite analyzer reported the model GPU-compatible; edgevit's rules did not")
        return _Verdicts(ops, producers, reasons, macs).coverage("tflite:gpu", checker, notes=notes)
    if accelerator == "nnapi":
        reasons = [_nnapi_reasons(g, op) for op in g.ops]
        return _Verdicts(ops, producers, reasons, macs).coverage(
            "tflite:nnapi", "edgevit NNAPI delegate rules (nnapi_delegate.cc op list, rank<=4, static shapes)",
            notes=notes)
    if accelerator == "xnnpack":
        return _tflite_xnnpack(path, g, ops, producers, macs, notes)
    raise EdgevitError(f"target 'tflite' has no accelerator '{accelerator}'; choose one of: xnnpack, gpu, nnapi")


def _tflite_xnnpack(path: pathlib.Path, g: _TflGraph, ops: list[str], producers: list[set[int]],
                    macs: list[int | None], notes: list[str]) -> Coverage:
    result = _xnnpack_delegated(path, len(g.ops))
    rank = [_rank_reasons(g, op, 6) for op in g.ops]  # XNN_MAX_TENSOR_DIMS
    if isinstance(result, str):  # the interpreter cannot load it: judge by the delegate's op list
        reasons = [r or ([] if op.name in _XNNPACK_OPS else [("op", "no XNNPACK case")]) for op, r in zip(g.ops, rank)]
        return _Verdicts(ops, producers, reasons, macs).coverage(
            "tflite:xnnpack", "XNNPACK delegate op list (the LiteRT interpreter could not load the model)",
            extra_problems=[f"interpreter: {result}"], notes=notes)
    taken, partitions = result
    reasons = [[] if i in taken else (rank[i] or [("op", "not taken by the XNNPACK delegate")])
               for i in range(len(g.ops))]
    return _Verdicts(ops, producers, reasons, macs).coverage(
        "tflite:xnnpack", "LiteRT interpreter (XNNPACK delegate partitions)", notes=notes, partitions=partitions)


# --- Core ML / Apple Neural Engine ----------------------------------------------------------------

# Known non-ANE MIL ops (the community's list of layers the Neural Engine does not run: gather, RNNs,
# custom layers; scatter is gather's inverse and lowers the same way).
_NOT_ON_ANE = frozenset({
    "gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis",
    "lstm", "gru", "rnn", "custom_layer",
})
_POOLS = frozenset({"max_pool", "avg_pool", "l2_pool"})
_MIL_FP16, _MIL_FP32 = 10, 11  # coremltools.proto.MIL_pb2.DataType.FLOAT16 / FLOAT32


@dataclass
class _MilOp:
    type: str
    inputs: dict[str, list[str]]  # parameter -> argument value names
    outputs: list[tuple[str, int, tuple[int | None, ...] | None]]  # (name, dtype, dims; None dim: not static)


def _mil_ops(block: Any, out: list[_MilOp], consts: dict[str, Any]) -> None:
    """Flatten a MIL block (and nested blocks) into ops; record const values by output name."""
    for op in block.operations:
        outputs = [(o.name, o.type.tensorType.dataType, _mil_dims(o.type)) for o in op.outputs]
        if op.type == "const":
            consts[op.outputs[0].name] = _mil_value(op.attributes["val"])
            continue
        inputs = {k: [a.name for a in v.arguments if a.name] for k, v in op.inputs.items()}
        for k, v in op.inputs.items():  # inline (unnamed) values
            for j, a in enumerate(v.arguments):
                if not a.name and a.HasField("value"):
                    consts[f"{id(op)}:{k}:{j}"] = _mil_value(a.value)
                    inputs[k].append(f"{id(op)}:{k}:{j}")
        out.append(_MilOp(op.type, inputs, outputs))
        for nested in op.blocks:
            _mil_ops(nested, out, consts)


def _mil_dims(value_type: Any) -> tuple[int | None, ...] | None:
    if not value_type.HasField("tensorType"):
        return None
    return tuple(d.constant.size if d.HasField("constant") else None for d in value_type.tensorType.dimensions)


def _mil_value(value: Any) -> Any:
    """A small immediate value (ints, floats, bools, strings) of a MIL ``Value``; None for blobs."""
    if not value.HasField("immediateValue") or not value.immediateValue.HasField("tensor"):
        return None
    t = value.immediateValue.tensor
    for kind in ("ints", "floats", "bools", "strings", "longInts", "doubles"):
        if t.HasField(kind):
            return list(getattr(t, kind).values)
    return None


def _mil_const(consts: dict[str, Any], op: _MilOp, param: str) -> list[Any] | None:
    names = op.inputs.get(param) or []
    return consts.get(names[0]) if names else None


def _ane_reasons(op: _MilOp, consts: dict[str, Any], shapes: dict[str, tuple[int | None, ...] | None],
                 fp16: bool) -> list[tuple[str, str]]:
    """Why the Neural Engine would not run ``op``."""
    reasons: list[tuple[str, str]] = []
    if op.type in _NOT_ON_ANE:
        reasons.append(("op", "not on the Neural Engine"))
    for name, dtype, dims in op.outputs:
        if dims is not None and len(dims) > 5:  # Core ML itself rejects rank > 5
            reasons.append(("rank>5", f"output {list(dims)}"))
        if dims is not None and None in dims:
            reasons.append(("dynamic shape", f"output {name} has a non-static shape"))
        if fp16 and op.type != "cast" and dtype == _MIL_FP32:  # an fp32 op in an fp16 program: CPU/GPU
            reasons.append(("fp32 op", "kept in fp32; the Neural Engine computes fp16 only"))
    if op.type in ("conv", "conv_transpose") and any(d != 1 for d in (_mil_const(consts, op, "dilations") or [1])):
        reasons.append(("dilated conv", f"dilations {_mil_const(consts, op, 'dilations')}"))
    if op.type in _POOLS:
        kernel = _mil_const(consts, op, "kernel_sizes") or []
        strides = _mil_const(consts, op, "strides") or []
        if any(k > 13 for k in kernel) or any(s > 2 for s in strides):
            reasons.append(("pool kernel>13 or stride>2", f"kernel {kernel}, strides {strides}"))
    if op.type.startswith(("upsample", "resize", "resample")):
        scale = _upsample_scale(op, consts, shapes)
        if scale is not None and scale > 2:
            reasons.append(("upsample scale>2", f"scale {scale:g}"))
    return reasons


def _upsample_scale(op: _MilOp, consts: dict[str, Any], shapes: dict[str, Any]) -> float | None:
    factors = [v for p in ("scale_factor_height", "scale_factor_width")
               for v in (_mil_const(consts, op, p) or [])]
    if factors:
        return float(max(factors))
    src = (op.inputs.get("x") or [None])[0]
    x, y = shapes.get(src), op.outputs[0][2] if op.outputs else None
    if not x or not y or len(x) != len(y) or None in x or None in y:
        return None
    return max((b / a for a, b in zip(x[-2:], y[-2:]) if a), default=None)


def _mil_macs(op: _MilOp, consts: dict[str, Any], shapes: dict[str, Any]) -> int | None:
    """MACs of linear/matmul/conv from static shapes (0 for other ops, None when unknown)."""
    if op.type not in ("linear", "matmul", "conv", "conv_transpose"):
        return 0
    y = op.outputs[0][2] if op.outputs else None
    w = shapes.get((op.inputs.get("weight") or op.inputs.get("y") or [None])[0])
    x = shapes.get((op.inputs.get("x") or [None])[0])
    if not y or None in y or not w or None in w or not x or None in x:
        return None
    if op.type == "linear":  # weight (out, in)
        return _prod(y) * w[-1]
    if op.type == "matmul":
        transpose_x = bool((_mil_const(consts, op, "transpose_x") or [False])[0])
        return _prod(y) * (x[-2] if transpose_x else x[-1])
    if op.type == "conv":  # weight (Cout, Cin/groups, *kernel)
        return _prod(y) * _prod(w[1:])
    return _prod(x) * _prod(w[1:])  # conv_transpose: weight (Cin, Cout/groups, *kernel)


def coreml_coverage(path: str | pathlib.Path) -> Coverage:
    """Neural Engine coverage of an ML Program (.mlpackage) by the documented ANE rules.

    Rules: rank <= 5, no gather/scatter/RNN ops, no dilated convolution, pooling kernel <= 13 and
    stride <= 2, upsampling scale <= 2, static shapes, fp16 typing (an fp32-typed program never runs
    on the ANE). Where each op really runs is MLComputePlan's answer, which needs macOS 14.4.
    """
    import coremltools as ct

    path = pathlib.Path(path)
    if not path.exists():
        raise EdgevitError(f"no Core ML package at {path}")
    spec = ct.utils.load_spec(str(path))
    if spec.WhichOneof("Type") != "mlProgram":
        raise EdgevitError(f"{path} is a {spec.WhichOneof('Type')} model; the ANE rules read ML Programs")
    main = spec.mlProgram.functions["main"]
    ops: list[_MilOp] = []
    consts: dict[str, Any] = {}
    _mil_ops(main.block_specializations[main.opset], ops, consts)
    shapes = {name: dims for op in ops for name, _, dims in op.outputs}
    shapes |= {i.name: _mil_dims(i.type) for i in main.inputs}
    _const_shapes(main.block_specializations[main.opset], shapes)
    float_types = {dtype for op in ops for _, dtype, _ in op.outputs
                   if op.type != "cast" and dtype in (_MIL_FP16, _MIL_FP32)}
    fp16 = _MIL_FP16 in float_types  # fp16 somewhere: an fp16-typed program (boundary casts aside)
    reasons = [_ane_reasons(op, consts, shapes, fp16) for op in ops]
    extra = []
    if not fp16 and float_types:
        extra.append("fp32 program: typed float32, so the Neural Engine is barred; export at fp16")
        reasons = [r + [("_fp32", "")] for r in reasons]
    notes = ["compute plan: needs macOS (MLComputePlan, macOS >= 14.4); these are the documented ANE rules"]
    notes += _ane_layout_hints(ops, consts)
    verdicts = _Verdicts(
        ops=[op.type for op in ops],
        producers=_producers([[n for names in op.inputs.values() for n in names] for op in ops],
                             [[name for name, _, _ in op.outputs] for op in ops]),
        reasons=reasons,
        macs=[_mil_macs(op, consts, shapes) for op in ops],
    )
    return verdicts.coverage("coreml:ane", "edgevit ANE rules over the MIL program", extra_problems=extra, notes=notes)


def _ane_layout_hints(ops: list[_MilOp], consts: dict[str, Any]) -> list[str]:
    """Runs-but-slowly patterns (not unsupported ops): batched multi-head attention, whose softmax
    is over the last axis of a (B, H, Sq, Sk) map, where Apple's ANE form is one head at a time with
    the softmax over dim 1 of (B, Sk, 1, Sq)."""
    batched = 0
    for op in ops:
        dims = op.outputs[0][2] if op.outputs else None
        axis = _mil_const(consts, op, "axis")
        if op.type == "softmax" and dims is not None and len(dims) == 4 and (dims[1] or 0) > 1 \
                and axis and axis[0] in (-1, 3):
            batched += 1
    if not batched:
        return []
    fix = ", ".join(fixes_for("batched attention")) or "none registered"
    return [f"batched attention: {batched} softmax over the last axis of (B, H, Sq, Sk) maps; "
            f"per-head form on the ANE (fix: {fix})"]


def _const_shapes(block: Any, shapes: dict[str, Any]) -> None:
    """Shapes of const ops (weights), which ``_mil_ops`` does not list as ops."""
    for op in block.operations:
        if op.type == "const":
            shapes[op.outputs[0].name] = _mil_dims(op.outputs[0].type)
        for nested in op.blocks:
            _const_shapes(nested, shapes)


# --- OpenVINO -------------------------------------------------------------------------------------

_OV_SKIP = frozenset({"Parameter", "Result", "Constant"})


def _ov_macs(op: Any) -> int | None:
    kind = op.get_type_name()
    if kind not in ("MatMul", "Convolution", "GroupConvolution"):
        return 0
    shapes = [op.input(i).get_partial_shape() for i in range(2)] + [op.output(0).get_partial_shape()]
    if any(s.is_dynamic for s in shapes):
        return None
    x, w, y = ([d.get_length() for d in s] for s in shapes)
    if kind == "MatMul":
        transpose_a = bool(op.get_attributes().get("transpose_a", False))
        return _prod(y) * (x[-2] if transpose_a and len(x) > 1 else x[-1])
    if kind == "Convolution":  # weights (Cout, Cin, *kernel)
        return _prod(y) * _prod(w[1:])
    return _prod(y) * _prod(w[2:])  # GroupConvolution: (groups, Cout/g, Cin/g, *kernel)


def openvino_coverage(path: str | pathlib.Path, device: str) -> Coverage:
    """``Core.query_model`` on ``device`` where the plugin is present, plus the NPU's static-shape rule.

    A device whose plugin is absent (the GPU and NPU here) gets a problem saying so: only the rules
    are checked, not OpenVINO's op support.
    """
    import openvino as ov

    path = pathlib.Path(path)
    if not path.is_file():
        raise EdgevitError(f"no OpenVINO IR at {path}")
    core = ov.Core()
    model = core.read_model(str(path))
    dev = device.upper()
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() not in _OV_SKIP]
    names = [op.get_friendly_name() for op in ops]
    extra: list[str] = []
    checker = f"OpenVINO Core.query_model({dev})"
    if dev in core.available_devices:
        placed = core.query_model(model, dev)
        reasons = [[] if n in placed else [("op", f"not supported by the {dev} plugin")] for n in names]
    else:
        extra.append(f"device absent: no {dev} plugin/device on this machine "
                     f"(available: {', '.join(core.available_devices) or 'none'}); op support unchecked")
        checker = f"OpenVINO rules only ({dev} absent)"
        reasons = [[] for _ in names]
    if dev == "NPU":  # "only models with static shapes are supported on NPU" (npu-device.rst)
        for op, r in zip(ops, reasons):
            dyn = [str(o.get_partial_shape()) for o in op.outputs() if o.get_partial_shape().is_dynamic]
            if dyn:
                r.append(("dynamic shape", f"output {dyn[0]}"))
        dyn_inputs = [f"{p.get_friendly_name()} {p.get_partial_shape()}" for p in model.get_parameters()
                      if p.get_partial_shape().is_dynamic]
        if dyn_inputs:
            extra.append(f"dynamic shape: inputs {', '.join(dyn_inputs)} (the NPU needs static shapes; "
                         "reshape the model or convert with fixed input shapes)")
        checker += " + static-shape rule"
    # producers by the nodes' unique names (friendly names, which query_model reports, may repeat)
    producers = _producers([[i.get_source_output().get_node().get_name() for i in op.inputs()] for op in ops],
                           [[op.get_name()] for op in ops])
    verdicts = _Verdicts([op.get_type_name() for op in ops], producers, reasons, [_ov_macs(op) for op in ops])
    return verdicts.coverage(f"openvino:{device}", checker, extra_problems=extra)


# --- dispatch -------------------------------------------------------------------------------------

def coverage(artifact_path: str | pathlib.Path, target: str, accelerator: str | None = None) -> Coverage:
    """The coverage of ``artifact_path`` (an artifact of ``target``) on ``accelerator`` (default: the
    target's default accelerator). Raises :class:`EdgevitError` for unknown targets/accelerators,
    missing backend packages, or unreadable artifacts."""
    from edgevit.export.targets import get_target

    tgt = get_target(target)
    acc = tgt.accelerator(accelerator).name
    tgt.check_installed()
    path = pathlib.Path(artifact_path)
    dispatch: dict[str, Callable[[], Coverage]] = {
        "onnx": lambda: onnx_cpu_coverage(path) if acc == "cpu" else onnx_ep_coverage(path, acc),
        "tflite": lambda: tflite_coverage(path, acc),
        "coreml": lambda: coreml_coverage(path),
        "openvino": lambda: openvino_coverage(path, acc),
    }
    try:
        return dispatch[tgt.name]()
    except EdgevitError:
        raise
    except Exception as exc:  # a checker failing on a bad artifact is a one-line user error
        raise EdgevitError(f"{tgt.name}:{acc} coverage of {path} failed: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc


def coverages(artifact_path: str | pathlib.Path, target: str) -> list[Coverage]:
    """The coverage of one artifact on every accelerator of its target."""
    from edgevit.export.targets import get_target

    return [coverage(artifact_path, target, acc.name) for acc in get_target(target).accelerators]


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
