"""Passes on the QDQ graph ``quantize_static`` writes, for the execution providers that run it on an NPU.

onnxruntime's EPs take a quantized op as a *QDQ node unit*: the op, a DequantizeLinear on each of its float
inputs and a QuantizeLinear on each output (:func:`qdq_units`, the grouping of onnxruntime's QDQ selectors:
every operand dequantized, every output read only by QuantizeLinear). The NNAPI EP then maps a unit to one
quantized NNAPI operation, under the rules of its builders (``nnapi_builtin/builders``, ``helper.cc``
``IsQuantizedIOSupported`` and ``GetQuantizedOpType``):

- only the units of Conv, MatMul, Gemm, Add, Mul, Softmax, Concat, Reshape, Transpose, Resize and
  AveragePool have a quantized builder (:data:`NNAPI_QDQ_OPS`); any other unit goes to the CPU EP whole;
- every quantized input and output is uint8 (``TENSOR_QUANT8_ASYMM``), per tensor, except the weight of a
  Conv, MatMul or Gemm, which may be int8 with zero points 0, per channel only for Conv;
- a Softmax's output has scale 1/256 and zero point 0;
- a Conv's or Gemm's bias is an int32 initializer (a float bias leaves the op outside its unit).

``quantize_static`` (s8s8, per channel, ``full``: its whole op list) writes int8 everywhere, per-channel
MatMul weights, ReduceMean/Tanh/Split/Slice units and calibrated Softmax scales, and can leave a Conv's bias
float. The passes below rewrite exactly that, each checked by the runner of
:mod:`edgevit.export.quantization.passes` (rolled back if the artifact stops loading or moves beyond int8
arithmetic). :data:`PIPELINES` lists them per accelerator; the coverage checker
(``export/backends/onnx/coverage.py``) applies the same rules and names these passes as the fixes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edgevit.export.quantization.passes import ArtifactPass, register_quantized_pass

if TYPE_CHECKING:
    import onnx

#: ops whose QDQ node unit the NNAPI EP maps to a quantized NNAPI operation (helper.h ``QuantizedOpType``)
NNAPI_QDQ_OPS = frozenset({"Conv", "MatMul", "Gemm", "Add", "Mul", "Softmax", "Concat", "Reshape", "Transpose",
                           "Resize", "AveragePool"})
#: ops whose input 1 is a weight (may stay int8) and input 2 a bias (int32)
WEIGHTED_OPS = frozenset({"Conv", "MatMul", "Gemm"})
#: the uint8 Softmax output NNAPI requires (softmax_op_builder: ``HasRequiredScaleAndZeroPoint``)
SOFTMAX_SCALE, SOFTMAX_ZERO_POINT = 1.0 / 256, 0
INT8, UINT8, INT32 = 3, 2, 6  # onnx.TensorProto data types

PIPELINES: dict[str, tuple[str, ...]] = {
    # the order matters: units are decided first (what stays quantized), weights and biases become what
    # NNAPI takes, then every remaining int8 encoding becomes uint8, then Softmax gets its fixed scale
    "nnapi": ("squeeze_as_reshape", "nnapi_float_units", "quantize_bias", "dequantize_float_constants",
              "per_tensor_weights", "uint8_activations", "softmax_output_scale", "nnapi_float_softmax"),
}


# --- the graph, as the EPs group it ------------------------------------------------------------------------


@dataclass
class QdqUnit:
    """An op with a DequantizeLinear on each float operand and only QuantizeLinear readers of its outputs."""

    node: "onnx.NodeProto"
    dequantized: dict[int, "onnx.NodeProto"]  # input index -> its DequantizeLinear
    quantized: list["onnx.NodeProto"] = field(default_factory=list)  # the QuantizeLinear nodes of its outputs

    @property
    def nodes(self) -> list["onnx.NodeProto"]:
        return [self.node, *self.dequantized.values(), *self.quantized]


class Graph:
    """Producers, readers and initializers of an ONNX graph (rebuilt by each pass, never cached across edits)."""

    def __init__(self, model: "onnx.ModelProto") -> None:
        from edgevit.export.backends.onnx.quantize import QdqGraph

        self.model, self.graph = model, model.graph
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.readers: dict[str, list[Any]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.readers[name].append(node)
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self.qdq = QdqGraph(model)

    def array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        init = self.initializers.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def set_array(self, name: str, value: np.ndarray) -> str:
        """Store ``value`` as initializer ``name`` (replacing one of that name)."""
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(value, name)
        old = self.initializers.get(name)
        if old is not None:
            self.graph.initializer.remove(old)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        return name

    def unique(self, base: str) -> str:
        names = set(self.initializers) | set(self.producer) | {i.name for i in self.graph.input}
        name, k = base, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        return name

    def units(self) -> list[QdqUnit]:
        return qdq_units(self.model, self)


def qdq_units(model: "onnx.ModelProto", graph: Graph | None = None) -> list[QdqUnit]:
    """The QDQ node units of ``model``: an op (not itself a quantizer) whose every float operand is a
    DequantizeLinear output and whose every output is read, and only by QuantizeLinear nodes (not a graph
    output). Integer operands (shapes, axes, indices) do not count; a float initializer does, so an op with
    an unquantized float bias is not a unit, as in onnxruntime's selectors."""
    g = graph or Graph(model)
    units = []
    for node in g.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        operands = [(i, name) for i, name in enumerate(node.input) if name and name not in g.qdq.integer_constants]
        dqs = {i: g.producer.get(name) for i, name in operands}
        if not operands or any(d is None or d.op_type != "DequantizeLinear" for d in dqs.values()):
            continue
        readers = [r for out in node.output for r in g.readers.get(out, [])]
        if (not readers or any(r.op_type != "QuantizeLinear" for r in readers)
                or any(out in g.outputs for out in node.output)):
            continue
        units.append(QdqUnit(node, dqs, readers))
    return units


def _readers_of(g: Graph, q: "onnx.NodeProto") -> list["onnx.NodeProto"]:
    return g.readers.get(q.output[0], [])


def _requantize(g: Graph, nodes: Sequence["onnx.NodeProto"], scale: np.ndarray, zero_point: np.ndarray,
                hint: str) -> None:
    """Give the quantizers ``nodes`` (a QuantizeLinear and the DequantizeLinear nodes reading it) the new
    ``scale``/``zero_point`` initializers (fresh names: others may share the old ones)."""
    scale_name = g.set_array(g.unique(f"{hint}_scale"), scale)
    zp_name = g.set_array(g.unique(f"{hint}_zero_point"), zero_point)
    for node in nodes:
        node.input[1] = scale_name
        if len(node.input) > 2:
            node.input[2] = zp_name
        else:
            node.input.append(zp_name)


def _drop_value_info(g: Graph, names: set[str]) -> None:
    """Forget the recorded types of tensors whose element type a pass changed (shape inference redoes them)."""
    kept = [vi for vi in g.graph.value_info if vi.name not in names]
    g.graph.ClearField("value_info")
    g.graph.value_info.extend(kept)


def _drop_unused(g: Graph) -> None:
    from edgevit.export.backends.onnx.quantize import _drop_unused_initializers

    _drop_unused_initializers(g.graph, set(g.initializers))


# --- the passes ----------------------------------------------------------------------------------------------


@register_quantized_pass
class SqueezeAsReshape(ArtifactPass["onnx.ModelProto"]):
    """A Squeeze/Unsqueeze of a static shape → Reshape to that shape.

    Before: ``DQ -> Squeeze(axes) -> Q``: NNAPI has no quantized Squeeze, and onnxruntime's QDQ propagation
    wraps every Squeeze between a dequantize and a quantize, so the unit goes to the CPU EP. After: ``DQ ->
    Reshape(static shape) -> Q``, a unit NNAPI takes. Exact (the same elements in the same order).
    """

    name = "squeeze_as_reshape"
    backend = "onnx"
    exact = True
    fixes = ("qdq unit",)

    def run(self, model: "onnx.ModelProto") -> int:
        import onnx

        shapes = _static_shapes(onnx.shape_inference.infer_shapes(model))
        g = Graph(model)
        sites = 0
        for node in list(g.graph.node):
            shape = shapes.get(node.output[0]) if node.op_type in ("Squeeze", "Unsqueeze") else None
            if shape is None or node.domain not in ("", "ai.onnx"):
                continue
            target = g.set_array(g.unique(f"{node.output[0]}_shape"), np.array(shape, np.int64))
            node.op_type, node.input[:] = "Reshape", [node.input[0], target]
            node.ClearField("attribute")
            sites += 1
        _drop_unused(g)
        return sites


def _static_shapes(model: "onnx.ModelProto") -> dict[str, tuple[int, ...]]:
    shapes = {}
    for vi in [*model.graph.value_info, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    return shapes


#: ops onnxruntime's QDQ propagation moves quantizers across (qdq_propagation.cc ``CanNodePropagate``): a
#: quantizer after one is copied before it at session creation, which re-forms a unit around it
PROPAGATED = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"})


@register_quantized_pass
class NnapiFloatUnits(ArtifactPass["onnx.ModelProto"]):
    """QDQ units of ops the NNAPI EP has no quantized kernel for → the op computes in float, from float.

    Before: ``Add -> Q -> DQ -> Split -> Q -> DQ -> Reshape`` (a Split unit: NNAPI's Split, Slice,
    ReduceMean, Tanh, Sqrt, ... have no quantized builder, so onnxruntime puts the whole unit on the CPU EP
    and the graph splits). After: ``Add -> Q -> DQ -> Clip -> Split -> Clip -> Reshape``: the op reads its
    input through a Clip to the quantizer's range (exact), and each Q -> DQ pair on its outputs becomes the
    clip to its range it also was (``quantize_static`` folds a Relu into the quantizer after it: the clip
    keeps it), without the rounding; the op computes in float, no quantizer surrounds it
    (onnxruntime's QDQ propagation copies a quantizer after a Reshape back before it, which makes it a
    quantizer after the float op, not a unit), and NNAPI runs it as a float op. An op that propagation moves
    quantizers across (Slice, ...) takes the ops it propagates through with it, up to the first op it does
    not (which then reads float). Removes roundings: the outputs move towards the fp32 model.
    """

    name = "nnapi_float_units"
    backend = "onnx"
    exact = False
    fixes = ("qdq unit",)

    def run(self, model: "onnx.ModelProto") -> int:
        g = Graph(model)
        sites = 0
        for unit in g.units():
            if not self.floats(g, unit):
                continue
            _read_float_inputs(g, unit.node)
            chain = [unit.node]
            while chain:
                node = chain.pop()
                _float_outputs(g, node)
                if node.op_type in PROPAGATED:  # its float readers would be re-quantized around it: float them too
                    chain += [r for out in node.output for r in _readers(g, out) if r.op_type in PROPAGATED]
            sites += 1
        _drop_unused(g)
        return sites

    def floats(self, g: Graph, unit: QdqUnit) -> bool:
        """Whether this unit's op is to compute in float."""
        return unit.node.op_type not in NNAPI_QDQ_OPS


def _readers(g: Graph, name: str) -> list["onnx.NodeProto"]:
    """The nodes reading ``name`` now (the graph's reader map goes stale as a pass edits)."""
    return [n for n in g.graph.node if name in n.input]


def _read_float_inputs(g: Graph, node: "onnx.NodeProto") -> None:
    """``node`` reads each dequantized activation through a Clip to the quantizer's range (exact: a
    dequantized value is in range), so no DequantizeLinear feeds it directly and onnxruntime forms no unit
    around it; the producer keeps its own unit."""
    for i, name in enumerate(node.input):
        dq = g.producer.get(name)
        q = g.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            node.input[i] = _clipped(g, q, dq.output[0])


def _float_outputs(g: Graph, node: "onnx.NodeProto") -> None:
    """Every Q -> DQ pair on ``node``'s outputs replaced by the clip it also is: their readers read the float
    output clipped to the pair's range."""
    for out in node.output:
        for q in [r for r in _readers(g, out) if r.op_type == "QuantizeLinear"]:
            for dq in [r for r in _readers(g, q.output[0]) if r.op_type == "DequantizeLinear"]:
                if dq.output[0] in g.outputs:
                    continue
                clipped = _clipped(g, q, q.input[0])
                for reader in _readers(g, dq.output[0]):
                    reader.input[:] = [clipped if n == dq.output[0] else n for n in reader.input]
                g.graph.node.remove(dq)
            if not _readers(g, q.output[0]) and q.output[0] not in g.outputs:
                g.graph.node.remove(q)


def _clipped(g: Graph, q: "onnx.NodeProto", value: str) -> str:
    """``Clip(value, lo, hi)``, [lo, hi] the representable range of the quantizer ``q``: a Q -> DQ pair is that
    clip plus a rounding, and the clip can carry the model's own function (``quantize_static`` folds a Relu or
    a Clip into the quantizer after it). Made once per value."""
    from onnx import helper

    name = f"{value}_clipped"
    if name in g.producer:
        return name
    scale, zero = float(g.array(q.input[1]).reshape(())), g.array(q.input[2])
    info = np.iinfo(zero.dtype)
    zp = int(zero.reshape(()))
    bounds = (g.set_array(g.unique(f"{name}_min"), np.array(scale * (info.min - zp), np.float32)),
              g.set_array(g.unique(f"{name}_max"), np.array(scale * (info.max - zp), np.float32)))
    clip = helper.make_node("Clip", [value, *bounds], [name], name=name)
    after = g.producer[value]  # right after the value's producer: topological order holds
    g.graph.node.insert(list(g.graph.node).index(after) + 1, clip)
    g.producer[name] = clip
    return name


@register_quantized_pass
class DequantizeFloatConstants(ArtifactPass["onnx.ModelProto"]):
    """A DequantizeLinear of an initializer that no QDQ unit reads → its real values as a float initializer.

    Before: ``Conv(Clip(...), DQ(w_int8, per-channel), DQ(b_int32))`` where the Conv is no unit (its input
    is float, e.g. after ``nnapi_float_units``): the standalone DequantizeLinear nodes read int8/int32 per
    channel, which NNAPI's DEQUANTIZE refuses. After: ``Conv(Clip(...), w_float, b_float)``, a float Conv
    NNAPI takes. Exact (the same real numbers; the file stores them in float).
    """

    name = "dequantize_float_constants"
    backend = "onnx"
    exact = True
    fixes = ("int8 qdq", "per-channel")

    def run(self, model: "onnx.ModelProto") -> int:
        g = Graph(model)
        in_units = {id(dq) for unit in g.units() for dq in unit.dequantized.values()}
        sites = 0
        for dq in list(g.graph.node):
            if dq.op_type != "DequantizeLinear" or id(dq) in in_units or dq.input[0] not in g.initializers:
                continue
            stored, scale = g.array(dq.input[0]), g.array(dq.input[1])
            real = _dequantized_weight(g, dq, stored, scale)
            g.set_array(g.unique(dq.output[0]) if dq.output[0] in g.initializers else dq.output[0], real)
            g.graph.node.remove(dq)
            sites += 1
        _drop_unused(g)
        return sites


@register_quantized_pass
class QuantizeBias(ArtifactPass["onnx.ModelProto"]):
    """A float bias of a Conv/Gemm whose input and weight are dequantized → DequantizeLinear(int32 bias).

    Before: ``Conv(DQ(x), DQ(w_int8), b_float)``: the float bias is an operand that is not dequantized, so
    the Conv is no QDQ unit; it runs in float and its weight's DequantizeLinear stands alone, reading int8,
    which NNAPI refuses. After: ``Conv(DQ(x), DQ(w_int8), DQ(b_int32, scale = s_x * s_w, zero point 0))``,
    the bias form every integer Conv kernel takes (QLinearConv, NNAPI CONV_2D). Rounds the bias to steps of
    s_x * s_w, far below one output step.
    """

    name = "quantize_bias"
    backend = "onnx"
    exact = False
    fixes = ("int8 qdq",)

    def run(self, model: "onnx.ModelProto") -> int:
        from onnx import helper

        g = Graph(model)
        sites = 0
        for node in list(g.graph.node):
            if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in g.initializers:
                continue
            x_dq, w_dq = g.producer.get(node.input[0]), g.producer.get(node.input[1])
            if any(d is None or d.op_type != "DequantizeLinear" for d in (x_dq, w_dq)):
                continue
            x_scale, w_scale, bias = g.array(x_dq.input[1]), g.array(w_dq.input[1]), g.array(node.input[2])
            if x_scale is None or w_scale is None or bias is None or x_scale.size != 1:
                continue
            scale = (x_scale.reshape(()) * w_scale.reshape(-1)).astype(np.float32)
            scale = np.broadcast_to(scale, bias.shape).astype(np.float32) if scale.size == 1 else scale
            q = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
            base = g.unique(f"{node.input[2]}_int32")
            names = (g.set_array(base, q), g.set_array(f"{base}_scale", scale),
                     g.set_array(f"{base}_zero_point", np.zeros(scale.shape, np.int32)))
            dq = helper.make_node("DequantizeLinear", list(names), [f"{base}_DequantizeLinear_Output"],
                                  name=f"{base}_DequantizeLinear", axis=0)
            g.graph.node.insert(list(g.graph.node).index(node), dq)
            node.input[2] = dq.output[0]
            sites += 1
        _drop_unused(g)
        return sites


@register_quantized_pass
class PerTensorWeights(ArtifactPass["onnx.ModelProto"]):
    """Per-channel int8 weights (but a Conv unit's) → one scale per tensor (zero point 0).

    Before: ``MatMul(DQ(x), DQ(w_int8, scale[K], axis))``: NNAPI's FULLY_CONNECTED has no per-channel
    weights (``IsQuantizationScaleSupported``: per-channel only for Conv), so the unit goes to the CPU EP.
    After: ``MatMul(DQ(x), DQ(w'_int8, scale S))`` with S = max|w| / 127 and w' = round(w / S): the same
    real weights re-rounded to one grid (a Gemm's int32 bias re-scaled to s_x * S with it). Costs the
    accuracy of per-tensor weights: within int8 arithmetic, checked by the runner.
    """

    name = "per_tensor_weights"
    backend = "onnx"
    exact = False
    fixes = ("per-channel",)

    def run(self, model: "onnx.ModelProto") -> int:
        g = Graph(model)
        units = g.units()
        conv_weights = {id(u.dequantized[1]) for u in units if u.node.op_type == "Conv" and 1 in u.dequantized}
        gemm_of = {id(u.dequantized[1]): u for u in units if u.node.op_type == "Gemm" and 1 in u.dequantized}
        sites = 0
        for w_dq in list(g.graph.node):
            if (w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in g.initializers
                    or id(w_dq) in conv_weights or g.initializers[w_dq.input[0]].data_type != INT8):
                continue
            weight, scale = g.array(w_dq.input[0]), g.array(w_dq.input[1])
            if scale is None or scale.size == 1:
                continue
            real = _dequantized_weight(g, w_dq, weight, scale)
            new_scale = np.float32(max(float(np.abs(real).max()), 1e-30) / 127)
            stored = np.clip(np.round(real / new_scale), -127, 127).astype(np.int8)
            base = g.unique(f"{w_dq.input[0]}_per_tensor")
            w_dq.input[0] = g.set_array(base, stored)
            _requantize(g, [w_dq], np.array(new_scale, np.float32), np.array(0, np.int8), base)
            for attribute in [a for a in w_dq.attribute if a.name == "axis"]:
                w_dq.attribute.remove(attribute)
            if id(w_dq) in gemm_of:
                self._rescale_bias(g, gemm_of[id(w_dq)], new_scale)
            sites += 1
        _drop_unused(g)
        return sites

    @staticmethod
    def _rescale_bias(g: Graph, unit: QdqUnit, weight_scale: np.float32) -> None:
        """A Gemm's int32 bias was stored in steps of s_x * s_w[c]: re-store it in steps of s_x * S."""
        b_dq, x_dq = unit.dequantized.get(2), unit.dequantized.get(0)
        if b_dq is None or x_dq is None or b_dq.input[0] not in g.initializers:
            return
        bias = _dequantized_weight(g, b_dq, g.array(b_dq.input[0]), g.array(b_dq.input[1]))
        step = np.float32(g.array(x_dq.input[1]).reshape(()) * weight_scale)
        stored = np.clip(np.round(bias / step), -(2**31), 2**31 - 1).astype(np.int32)
        base = g.unique(f"{b_dq.input[0]}_per_tensor")
        b_dq.input[0] = g.set_array(base, stored)
        _requantize(g, [b_dq], np.array(step, np.float32), np.array(0, np.int32), base)
        for attribute in [a for a in b_dq.attribute if a.name == "axis"]:
            b_dq.attribute.remove(attribute)


def _dequantized_weight(g: Graph, dq: "onnx.NodeProto", stored: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The real values a DequantizeLinear of an initializer produces (per-tensor or per-axis), computed as
    onnxruntime does: ``float(x - zero_point) * scale`` in float32."""
    zero = g.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale, dtype=stored.dtype)
    shape = [1] * stored.ndim
    if scale.size > 1:
        shape[next((a.i for a in dq.attribute if a.name == "axis"), 1) % stored.ndim] = -1
    centred = stored.astype(np.int64) - zero.astype(np.int64).reshape(shape if zero.size > 1 else ())
    return centred.astype(np.float32) * scale.astype(np.float32).reshape(shape if scale.size > 1 else ())


@register_quantized_pass
class Uint8Activations(ArtifactPass["onnx.ModelProto"]):
    """int8 activations and constants (QuantizeLinear/DequantizeLinear, zero point z) → uint8 (z + 128).

    Before: ``Q(x, s, z:int8) -> DQ(s, z)``, and ``DQ(c:int8, s, z)`` for a quantized constant (a LayerNorm
    gamma, an added 1.0): the NNAPI EP takes uint8 only (``TENSOR_QUANT8_ASYMM``). After: ``Q(x, s,
    z + 128:uint8) -> DQ(s, z + 128)`` and ``DQ(c + 128:uint8, s, z + 128)``. Exact: round(x/s) + z + 128
    clipped to [0, 255] is the int8 value plus 128, and DequantizeLinear subtracts the 128 back. The weight of
    a Conv/MatMul/Gemm (input 1; int8, zero point 0, the u8s8 form every integer kernel takes) and int32
    biases are left as they are.
    """

    name = "uint8_activations"
    backend = "onnx"
    exact = True
    fixes = ("int8 qdq",)

    def run(self, model: "onnx.ModelProto") -> int:
        g = Graph(model)
        # a unit's weight stays int8 (u8s8); a weight DequantizeLinear outside a unit is the EP's own op: uint8
        weights = {id(u.dequantized[1]) for u in g.units() if u.node.op_type in WEIGHTED_OPS and 1 in u.dequantized}
        sites, retyped = 0, set()
        for node in list(g.graph.node):
            if node.op_type == "QuantizeLinear" and self._is_int8(g, node):
                self._shift(g, [node, *_readers_of(g, node)])
                retyped.add(node.output[0])
                sites += 1
            elif (node.op_type == "DequantizeLinear" and id(node) not in weights and node.input[0] in g.initializers
                  and self._is_int8(g, node)):
                stored = g.array(node.input[0]).astype(np.int16) + 128
                node.input[0] = g.set_array(g.unique(f"{node.input[0]}_uint8"), stored.astype(np.uint8))
                self._shift(g, [node])
                sites += 1
        _drop_value_info(g, retyped)
        _drop_unused(g)
        return sites

    @staticmethod
    def _is_int8(g: Graph, node: "onnx.NodeProto") -> bool:
        zero = g.initializers.get(node.input[2]) if len(node.input) > 2 else None
        return zero is not None and zero.data_type == INT8

    @staticmethod
    def _shift(g: Graph, nodes: list["onnx.NodeProto"]) -> None:
        first = nodes[0]
        zero = g.array(first.input[2]).astype(np.int16) + 128
        _requantize(g, nodes, g.array(first.input[1]), zero.astype(np.uint8), f"{first.input[2]}_uint8")


@register_quantized_pass
class SoftmaxOutputScale(ArtifactPass["onnx.ModelProto"]):
    """A Softmax unit's output quantizer → scale 1/256, zero point 0 (uint8) or -128 (int8).

    Before: ``Softmax -> Q(s_calibrated, z)``: NNAPI's quantized SOFTMAX has a fixed output encoding
    (softmax_op_builder: ``HasRequiredScaleAndZeroPoint(1/256, 0)``), so the unit goes to the CPU EP. After:
    ``Softmax -> Q(1/256, 0)`` and its DequantizeLinear readers alike: probabilities in [0, 255/256] in steps
    of 1/256 (one-hot rows lose 1/256 at the top), within int8 arithmetic.
    """

    name = "softmax_output_scale"
    backend = "onnx"
    exact = False
    fixes = ("softmax output scale",)

    def run(self, model: "onnx.ModelProto") -> int:
        g = Graph(model)
        sites = 0
        for unit in g.units():
            if unit.node.op_type != "Softmax":
                continue
            for q in unit.quantized:
                zero = g.initializers.get(q.input[2]) if len(q.input) > 2 else None
                signed = zero is not None and zero.data_type == INT8
                wanted = np.array(-128 if signed else SOFTMAX_ZERO_POINT, np.int8 if signed else np.uint8)
                scale = g.array(q.input[1])
                if scale.size == 1 and float(scale) == SOFTMAX_SCALE and g.array(q.input[2]) == wanted:
                    continue
                _requantize(g, [q, *_readers_of(g, q)], np.array(SOFTMAX_SCALE, np.float32), wanted,
                            f"{q.output[0]}_softmax")
                sites += 1
        _drop_unused(g)
        return sites


@register_quantized_pass
class NnapiFloatSoftmax(NnapiFloatUnits):
    """A Softmax unit whose output is not NNAPI's fixed uint8 encoding (1/256, 0) → the Softmax computes in float.

    The fallback of ``softmax_output_scale`` when the fixed scale costs more than int8 arithmetic (attention
    maps, whose probabilities mostly sit below a few 1/256 steps). Before: ``DQ -> Softmax -> Q(s, z) -> DQ ->
    MatMul``. After: ``DQ -> Softmax -> MatMul``: NNAPI runs the Softmax and the A.V MatMul that reads it in
    float, next to the units before and after (the graph stays whole on NNAPI; A.V is no longer int8).
    """

    name = "nnapi_float_softmax"
    fixes = ("softmax output scale",)

    def floats(self, g: Graph, unit: QdqUnit) -> bool:
        return unit.node.op_type == "Softmax" and not all(_is_nnapi_softmax_output(g, q) for q in unit.quantized)


def _is_nnapi_softmax_output(g: Graph, q: "onnx.NodeProto") -> bool:
    scale = g.array(q.input[1])
    zero = g.array(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
    return (scale is not None and scale.size == 1 and float(scale.reshape(())) == SOFTMAX_SCALE
            and zero.dtype == np.uint8 and int(zero.reshape(())) == SOFTMAX_ZERO_POINT)


# --- running them on an artifact ------------------------------------------------------------------------------


class OnnxExecutor:
    """Copies and runs ONNX models with onnxruntime's CPU EP on a few samples (the runner's check), and the
    fp32 model they were quantized from."""

    def __init__(self, fp32_model: Path, samples: Sequence[Sequence[np.ndarray]], input_names: Sequence[str]) -> None:
        self.fp32_model = fp32_model
        self.feeds = [{n: np.asarray(a, dtype=np.float32) for n, a in zip(input_names, s)} for s in samples]

    def copy(self, model: "onnx.ModelProto") -> "onnx.ModelProto":
        import onnx

        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out

    def outputs(self, model: "onnx.ModelProto") -> list[np.ndarray]:
        import onnx

        onnx.checker.check_model(model)
        return self._run(model.SerializeToString())

    def reference(self) -> list[np.ndarray]:
        return self._run(str(self.fp32_model))

    def _run(self, model: "bytes | str") -> list[np.ndarray]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # the graph as written (every DequantizeLinear/QuantizeLinear executed): the rewrite's own effect, not
        # that of the integer kernels onnxruntime would fuse differently for uint8 and int8
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        runs = [session.run(None, feed) for feed in self.feeds]
        return [np.stack([r[i] for r in runs]) for i in range(len(runs[0]))]


#: calibration samples the runner checks each pass on (the first ones)
CHECK_SAMPLES = 4


def rewrite_artifact(path: Path, accelerator: str | None, precision: str,
                     calibration: Sequence[Sequence[np.ndarray]], fp32_model: Path) -> dict[str, Any]:
    """Run the accelerator's quantized passes on the .onnx at ``path`` (rewritten in place if any applied),
    checked against ``fp32_model`` on the first calibration samples. Returns ``{"passes": [report...],
    "notes": [...]}`` for the manifest's quantization record."""
    import onnx

    from edgevit.export.quantization.passes import apply_pipeline, quantized_pipeline

    names = quantized_pipeline("onnx", accelerator, precision)
    if not names or not calibration:
        return {"passes": [], "notes": []}
    model = onnx.load(str(path))
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    executor = OnnxExecutor(Path(fp32_model), list(calibration)[:CHECK_SAMPLES], inputs)
    result = apply_pipeline("onnx", accelerator, precision, model, executor)
    if result.applied:
        onnx.save_model(result.model, str(path))
    return {"passes": result.record(), "notes": result.notes(accelerator)}
