"""TFLite / LiteRT coverage: what LiteRT's XNNPACK, GPU and NNAPI delegates would take of a .tflite model.

* XNNPACK: the LiteRT interpreter itself (which ops its XNNPACK delegate took), or the delegate's op
  list when the interpreter cannot load the model;
* GPU: TensorFlow's TFLite analyzer (``gpu_compatibility=True``) plus the delegate's op table and
  rules (``gpu_compatibility.cc``), rank <= 4 and batch 1, which the analyzer does not check;
* NNAPI: the NNAPI delegate's op list and rules (``nnapi_delegate.cc``); for a quantized model also the
  full-integer rules: no op computing in float but the QUANTIZE/DEQUANTIZE of the model's float inputs and
  outputs, no int8 op the delegate takes in float only (DIV, SQRT, ...), MEAN without a rescale.

The model is read with LiteRT's own flatbuffer schema reader. :func:`coverage` is the backend's entry
point (``export/backends/__init__.py``); the shared verdict machinery is in :mod:`edgevit.export.coverage`.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pathlib
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from edgevit.errors import EdgevitError
from edgevit.export.coverage import Coverage, _prod, _producers, _Verdicts, count_by_type


def coverage(path: str | pathlib.Path, accelerator: str) -> Coverage:
    """The coverage of the .tflite model at ``path`` on ``accelerator`` (xnnpack, gpu, nnapi)."""
    return tflite_coverage(path, accelerator)


def op_counts(artifact: pathlib.Path, accelerator: str | None = None) -> dict[str, int]:
    """Op name -> count of the .tflite model at ``artifact``: the ops of its main subgraph, which every
    delegate's checker counts in ``Coverage.nodes`` (``accelerator``, default the target's first, only
    validated). Names as the checkers report them: ``FULLY_CONNECTED``, ``CUSTOM:<code>``."""
    from edgevit.export.targets import get_target

    get_target("tflite").accelerator(accelerator)
    ops = _read_tflite(pathlib.Path(artifact)).ops
    return count_by_type(op.name for op in ops)


@dataclass
class _TflTensor:
    name: str
    shape: tuple[int, ...]
    signature: tuple[int, ...]
    dtype: str
    runtime: bool  # a graph input or an op's output (not a constant)
    scale: tuple[float, ...] = ()  # quantization parameters (empty: not quantized)
    zero_point: tuple[int, ...] = ()


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
        q = t.quantization
        tensors.append(_TflTensor(name, shape, sig, type_names.get(t.type, str(t.type)),
                                  i in produced or bool(t.isVariable),
                                  tuple(float(x) for x in _as_list(q.scale if q else None)),
                                  tuple(int(x) for x in _as_list(q.zeroPoint if q else None))))
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


# Ops the NNAPI delegate validates with float inputs only (nnapi_delegate.cc ``Validate``: "NNAPI only support
# float div.", ``ExpectIsFloatOperator`` for SQRT/RSQRT/EXP/LOG/POW/ABS/SIN/L2_POOL_2D, float-only SUM,
# REDUCE_PROD, LOG_SOFTMAX, ELU): NNAPI has no integer form of them, so an int8 one stays on the CPU.
_NNAPI_FLOAT_ONLY = frozenset("""
ABS DIV ELU EXP L2_POOL_2D LOG LOG_SOFTMAX POW REDUCE_PROD RSQRT SIN SQRT SUM
""".split())
_INT_TYPES = frozenset({"INT8", "UINT8"})


def _is_integer_model(g: _TflGraph) -> bool:
    """A model whose activations are quantized (an int8/uint8 tensor an op computes, not only weights)."""
    return any(t is not None and t.runtime and t.dtype in _INT_TYPES for op in g.ops for t in map(g.t, op.outputs))


def _is_boundary_conversion(g: _TflGraph, op: _TflOp) -> bool:
    """The QUANTIZE of a model input or the DEQUANTIZE of a model output: the float interface a full-integer
    model with float I/O legitimately has."""
    if op.name == "QUANTIZE":
        return bool(op.inputs) and op.inputs[0] in g.boundary
    return op.name == "DEQUANTIZE" and bool(op.outputs) and op.outputs[0] in g.boundary


def _nnapi_int8_reasons(g: _TflGraph, op: _TflOp) -> list[tuple[str, str]]:
    """Why NNAPI would not run ``op`` of a full-integer model as an integer op."""
    if _is_boundary_conversion(g, op):
        return []
    tensors = [*g.runtime_inputs(op), *(t for t in map(g.t, op.outputs) if t is not None)]
    if any(t.dtype in ("FLOAT32", "FLOAT16") for t in tensors):
        return [("float op", "computes in float in a full-integer model: an int8 NNAPI accelerator hands it "
                             "to the CPU")]
    ins = g.runtime_inputs(op)
    if op.name in _NNAPI_FLOAT_ONLY and ins and ins[0].dtype in _INT_TYPES:
        return [("float-only op", "the NNAPI delegate takes it with float inputs only (nnapi_delegate.cc)")]
    out = g.t(op.outputs[0]) if op.outputs else None
    if op.name == "MEAN" and ins and out is not None and (ins[0].scale, ins[0].zero_point) != (out.scale, out.zero_point):
        return [("mean rescale", "NNAPI's MEAN needs the same scale and zero point in and out")]
    return []


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
        checker = "edgevit NNAPI delegate rules (nnapi_delegate.cc op list, rank<=4, static shapes)"
        if _is_integer_model(g):  # a quantized model: NNAPI's integer rules too
            reasons = [r + _nnapi_int8_reasons(g, op) for r, op in zip(reasons, g.ops)]
            checker += " + full-integer rules (no float op; the delegate's int8 input types)"
        return _Verdicts(ops, producers, reasons, macs).coverage("tflite:nnapi", checker, notes=notes)
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
