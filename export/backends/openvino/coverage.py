"""OpenVINO coverage: what an OpenVINO device plugin would take of an IR model.

``Core.query_model`` on the devices present (the CPU here), plus the NPU's static-shape rule and, for an
int8 IR, its placement rule (every MatMul/Convolution input quantized, else that layer runs in fp16); a
device whose plugin is absent gets only the rules checked. :func:`coverage` is the backend's entry
point (``export/backends/__init__.py``); the shared verdict machinery is in :mod:`edgevit.export.coverage`.
"""

from __future__ import annotations

import collections
import pathlib
from typing import Any

from edgevit.errors import EdgevitError
from edgevit.export.coverage import Coverage, _prod, _producers, _Verdicts, count_by_type


def coverage(path: str | pathlib.Path, accelerator: str) -> Coverage:
    """The coverage of the IR at ``path`` on the OpenVINO device ``accelerator`` (cpu, gpu, npu)."""
    return openvino_coverage(path, accelerator)


def op_counts(artifact: pathlib.Path, accelerator: str | None = None) -> dict[str, int]:
    """Op type -> count of the IR at ``artifact``: its ordered ops but Parameter, Result and Constant,
    which every device's checker counts in ``Coverage.nodes`` (``accelerator``, default the target's
    first, only validated)."""
    from edgevit.export.targets import get_target

    get_target("openvino").accelerator(accelerator)
    _, model = _read_ir(artifact)
    return count_by_type(op.get_type_name() for op in _counted_ops(model))


_OV_SKIP = frozenset({"Parameter", "Result", "Constant"})


def _read_ir(path: str | pathlib.Path) -> tuple[Any, Any]:
    """An OpenVINO ``Core`` and the IR at ``path`` read by it."""
    import openvino as ov

    path = pathlib.Path(path)
    if not path.is_file():
        raise EdgevitError(f"no OpenVINO IR at {path}")
    core = ov.Core()
    return core, core.read_model(str(path))


def _counted_ops(model: Any) -> list[Any]:
    """The ops a device checker judges: the model's, in order, but its inputs, outputs and constants."""
    return [op for op in model.get_ordered_ops() if op.get_type_name() not in _OV_SKIP]


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
    core, model = _read_ir(path)
    dev = device.upper()
    ops = _counted_ops(model)
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
    notes: list[str] = []
    if dev == "NPU" and any(op.get_type_name() == "FakeQuantize" for op in ops):  # an int8 IR
        placement, float_ops = _int8_placement(model)
        extra += placement
        checker += " + int8 placement rules"
        if float_ops:
            notes.append("compute ops left float (the NPU runs them in fp16): "
                         + ", ".join(f"{k} x{n}" for k, n in sorted(float_ops.items())))
    verdicts = _Verdicts([op.get_type_name() for op in ops], producers, reasons, [_ov_macs(op) for op in ops])
    return verdicts.coverage(f"openvino:{device}", checker, extra_problems=extra, notes=notes)


# Ops that keep a quantized value quantized (OpenVINO's low-precision transformations pass int8 through
# them): between a FakeQuantize and a MatMul/Convolution they leave its input int8.
_PRECISION_PRESERVING = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "StridedSlice", "Gather", "Concat", "Split",
    "VariadicSplit", "Broadcast", "Tile", "Pad", "DepthToSpace", "SpaceToDepth", "MaxPool", "ShuffleChannels",
    "Interpolate", "Convert",
})
_WEIGHTED = ("MatMul", "Convolution", "GroupConvolution")


def _int8_placement(model: Any) -> tuple[list[str], dict[str, int]]:
    """The NPU's int8 rules on a quantized IR: every MatMul/Convolution input quantized (a FakeQuantize
    reached through precision-preserving ops, or a weight stored in a low-precision type), else that layer
    computes in fp16. Returns the problems and the compute ops that stay float (from the quantizer's own
    reading, :class:`edgevit.export.backends.openvino.quantize.IRGraph`)."""
    from edgevit.export.backends.openvino.quantize import IRGraph

    graph = IRGraph(model)
    unquantized: collections.Counter[str] = collections.Counter()
    for node in graph.nodes:
        if node.get_type_name() in _WEIGHTED and not all(_is_int8_input(graph, graph.source(p)) for p in node.inputs()):
            unquantized[node.get_type_name()] += 1
    problems = [f"fq placement: {kind} x{n} (an input is not quantized: the NPU computes it in fp16, not int8)"
                for kind, n in sorted(unquantized.items())]
    float_ops = collections.Counter(node.get_type_name() for node, quantized in graph.op_precisions().items()
                                    if not quantized and node.get_type_name() not in _WEIGHTED)
    return problems, dict(float_ops)


def _is_int8_input(graph: Any, node: Any) -> bool:
    while node.get_type_name() in _PRECISION_PRESERVING and not graph.is_constant(node):
        node = graph.source(node.input(0))
    return node.get_type_name() == "FakeQuantize" or bool(graph.constant_type.get(node.get_name()))
