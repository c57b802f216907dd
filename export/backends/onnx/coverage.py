"""ONNX coverage: what onnxruntime's mobile execution providers would take of an ONNX model.

* NNAPI / Core ML (MLProgram) EPs: onnxruntime's mobile usability checker (its op tables and
  partitioner), run on the model optimised as an ORT-format conversion would see it;
* XNNPACK EP: the EP's node-support rules (onnxruntime's ``xnnpack/detail/node_support_checker.cc``);
* CPU EP: every ONNX op runs, so the check is that an onnxruntime session loads the model.

:func:`coverage` is the backend's entry point (``export/backends/__init__.py``); the shared verdict
machinery is in :mod:`edgevit.export.coverage`.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import tempfile
from typing import Any, Iterator

from edgevit.errors import EdgevitError
from edgevit.export.coverage import Coverage, _mac_shares, _prod, _producers, _Verdicts, _with_fixes, count_by_type


def coverage(path: str | pathlib.Path, accelerator: str) -> Coverage:
    """The coverage of the ONNX model at ``path`` on ``accelerator`` (cpu, nnapi, coreml, xnnpack)."""
    return onnx_cpu_coverage(path) if accelerator == "cpu" else onnx_ep_coverage(path, accelerator)


def op_counts(artifact: pathlib.Path, accelerator: str | None = None) -> dict[str, int]:
    """Op type -> node count of the ONNX model at ``artifact``, over exactly the nodes the checker of
    ``accelerator`` (default: the target's first) counts in ``Coverage.nodes``: the model as loaded for
    the CPU EP, as optimised for an ORT-format conversion for the others (see :func:`_counted_nodes`)."""
    from edgevit.export.targets import get_target

    acc = get_target("onnx").accelerator(accelerator).name
    if acc == "cpu":
        nodes = list(_load_onnx(artifact).graph.node)
    else:
        with _ort_model(artifact) as model:
            nodes = _counted_nodes(model.graph, acc)
    return count_by_type(n.op_type for n in nodes)


def _counted_nodes(graph: Any, accelerator: str) -> list[Any]:
    """The nodes an EP checker counts: the graph's own, plus, for the usability checker's plain verdict,
    the nodes of single-graph attributes (If/Loop/Scan bodies, recursively), as its ``check_partitioning``
    adds them to ``num_nodes``. The XNNPACK rules and NNAPI's QDQ verdicts count the main graph only."""
    if accelerator == "xnnpack" or (accelerator == "nnapi" and _has_quantizers(graph)):
        return list(graph.node)
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.HasField("g"):
                nodes += _counted_nodes(attr.g, accelerator)
    return nodes


def _has_quantizers(graph: Any) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def _load_onnx(path: str | pathlib.Path) -> Any:
    """The model as the CPU check reads it: loaded, shapes inferred."""
    import onnx

    path = pathlib.Path(path)
    if not path.is_file():
        raise EdgevitError(f"no ONNX model at {path}")
    return onnx.shape_inference.infer_shapes(onnx.load(str(path)))


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
        unsupported = count_by_type(n.op_type for n in model.graph.node if not checker.is_op_supported(n))
        on = {tuple(n.output) for group in info.supported_groups for n in group}
        # every node the checker takes, subgraph bodies included, is in one of its groups
        supported_ops = count_by_type(n.op_type for group in info.supported_groups for n in group)
        macs = _onnx_macs(model.graph)
        total, supported_macs = _mac_shares(macs, [tuple(n.output) in on for n in model.graph.node])
        qdq = _nnapi_qdq_reasons(model) if accelerator == "nnapi" else None
    problems = [f"rank>{max_rank}: {op}" for op in sorted(info.ops_with_unsupported_rank)]
    if info.nodes_unsupported_due_to_dynamic_input:
        problems.append(f"dynamic shape: {info.nodes_unsupported_due_to_dynamic_input} nodes with dynamic input shapes")
    if qdq is not None:  # a quantized graph: the usability checker's verdicts plus the EP's QDQ rules
        in_groups = [tuple(n.output) in on for n in model.graph.node]
        reasons = [r + ([] if ok else [("op", "not in the op table")] if not checker.is_op_supported(n)
                        else [("_usability", "")]) for r, ok, n in zip(qdq, in_groups, model.graph.node)]
        verdicts = _Verdicts([n.op_type for n in model.graph.node],
                             _producers([list(n.input) for n in model.graph.node],
                                        [list(n.output) for n in model.graph.node]), reasons, macs)
        return verdicts.coverage("onnx:nnapi", f"onnxruntime usability checker ({label}) + NNAPI EP QDQ rules",
                                 extra_problems=problems)
    return _with_fixes(Coverage(
        accelerator=f"onnx:{accelerator}",
        checker=f"onnxruntime usability checker ({label})",
        nodes=info.num_nodes,
        supported=info.num_supported_nodes,
        partitions=info.num_partitions,
        unsupported=unsupported,
        supported_ops=supported_ops,
        problems=problems,
        macs_total=total,
        macs_supported=supported_macs,
    ))


def _nnapi_qdq_reasons(model: Any) -> list[list[tuple[str, str]]] | None:
    """Per node: why the NNAPI EP refuses it in a QDQ graph (None for a graph without quantizers).

    The rules of the EP's builders (``nnapi_builtin/builders``: ``GetQuantizedOpType``,
    ``IsQuantizedIOSupported``, the Softmax builder's fixed output scale), applied to the QDQ node units
    onnxruntime forms (:func:`~edgevit.export.backends.onnx.qdq_passes.qdq_units`); a unit's verdict is that of
    all its nodes (the op, its DequantizeLinear and QuantizeLinear nodes). A quantizer outside every unit is
    the EP's DequantizeLinear/QuantizeLinear op: uint8, per tensor.
    """
    from edgevit.export.backends.onnx import qdq_passes as qp

    if not _has_quantizers(model.graph):
        return None
    g = qp.Graph(model)
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    reasons: list[list[tuple[str, str]]] = [[] for _ in model.graph.node]
    grouped: set[int] = set()
    for unit in g.units():
        found = _unit_reasons(g, unit)
        for node in unit.nodes:  # the unit's op carries the problems; its quantizers go with it, unnamed
            reasons[index[id(node)]] += found if node is unit.node else [("_" + key, "") for key, _ in found]
            grouped.add(id(node))
    for i, node in enumerate(model.graph.node):
        if id(node) in grouped or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        reasons[i] += _encoding_reasons(g, node, weight=False)
    return [list(dict.fromkeys(r)) for r in reasons]


_NNAPI_UINT8 = "the NNAPI EP takes uint8 (TENSOR_QUANT8_ASYMM) everywhere but a Conv/MatMul/Gemm weight"
_NNAPI_PER_TENSOR = "the NNAPI EP takes per-channel scales for Conv weights only"


def _unit_reasons(g: Any, unit: Any) -> list[tuple[str, str]]:
    from edgevit.export.backends.onnx import qdq_passes as qp

    op = unit.node.op_type
    found: list[tuple[str, str]] = []
    if op not in qp.NNAPI_QDQ_OPS:
        found.append(("qdq unit", "no quantized NNAPI kernel: the unit runs on the CPU EP"))
    for i, dq in unit.dequantized.items():
        if op in qp.WEIGHTED_OPS and i == 2:
            continue  # int32 bias
        found += _encoding_reasons(g, dq, weight=op in qp.WEIGHTED_OPS and i == 1, conv=op == "Conv")
    for q in unit.quantized:
        found += _encoding_reasons(g, q, weight=False)
        if op == "Softmax" and not qp._is_nnapi_softmax_output(g, q):  # noqa: SLF001 - the pass's own test
            found.append(("softmax output scale", "NNAPI's quantized SOFTMAX writes scale 1/256, zero point 0"))
    return found


def _encoding_reasons(g: Any, node: Any, weight: bool, conv: bool = False) -> list[tuple[str, str]]:
    """A quantizer's encoding against the EP's: uint8 per tensor (a weight: int8 with zero points 0 too, per
    channel for a Conv)."""
    import numpy as np

    from edgevit.export.backends.onnx import qdq_passes as qp

    zero = g.initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    scale = g.array(node.input[1])
    found = []
    zero_type = zero.data_type if zero is not None else qp.UINT8
    int8_weight = weight and zero_type == qp.INT8 and not np.any(g.array(node.input[2]))
    if zero_type != qp.UINT8 and not int8_weight:
        found.append(("int8 qdq", _NNAPI_UINT8))
    if scale is None or (scale.size > 1 and not (weight and conv)):
        found.append(("per-channel", _NNAPI_PER_TENSOR))
    return found


def onnx_cpu_coverage(path: str | pathlib.Path) -> Coverage:
    """The CPU EP runs every ONNX op: the check is that an onnxruntime session loads the model."""
    import onnxruntime as ort

    model = _load_onnx(path)
    problems = []
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # the verdict, not a crash: the session is what the CPU EP would run
        problems.append(f"session: {str(exc).splitlines()[0][:300]}")
    n = len(model.graph.node)
    total, on = _mac_shares(_onnx_macs(model.graph), [not problems] * n)
    return _with_fixes(Coverage("onnx:cpu", "onnxruntime session (CPUExecutionProvider)", n,
                                0 if problems else n, 0 if problems else 1, problems=problems,
                                supported_ops={} if problems else count_by_type(n.op_type for n in model.graph.node),
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
