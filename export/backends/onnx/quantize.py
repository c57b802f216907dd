"""ONNX quantization with onnxruntime's own tools (``onnxruntime.quantization``), from the fp32 .onnx.

What the tool does per precision:

- ``int8`` (``quantize_static``, QDQ format, calibrated): QuantizeLinear -> DequantizeLinear pairs on the
  inputs and outputs of the quantized ops; weights int8 per output channel, symmetric (``per_channel=True``,
  QInt8); activations int8 per tensor, asymmetric (QInt8, ``ActivationSymmetric=False``: softmax and GELU
  outputs are one-sided, a symmetric range would waste half the levels). onnxruntime's CPU provider runs each
  QDQ node unit (every float operand dequantized) as an integer kernel: QLinearConv, QLinearMatMul,
  MatMulIntegerToFloat, QGemm, QLinearSoftmax, ...

  * scheme ``safe``: ``op_types_to_quantize = MatMul, Conv, Gemm`` (MatMul includes attention's activation x
    activation products). Their outputs are quantized as the tool does by default, because that is what lets
    onnxruntime fuse a MatMul followed by its float bias Add into QLinearMatMul (excluding them,
    ``OpTypesToExcludeOutputQuantization``, leaves MatMul + Add to onnxruntime's MatMulAddFusion: a float Gemm
    on dequantized values, no faster than fp32). Bias and residual Adds, LayerNormalization and the GELU ops
    read those dequantized outputs next to a float operand, so they compute in float. Two edits by edgevit
    finish the preset: an op outside the allow-list whose operands are *all* dequantized (the Softmax between
    Q.K^T and A.V, a residual Add between two Convs) would be an int8 unit, so one operand is pointed back at
    its float tensor (:func:`keep_float_ops_float`; Relu, Clip and max-pooling, exact on int8 values, stay
    units so that Conv -> Relu -> Conv keeps its int8 kernels), and the QDQ pair the tool puts on a graph output is dropped
    (:func:`unquantize_graph_outputs`): the logits stay float32 as computed.
  * scheme ``full``: the tool's default op list (its QDQ and QLinear registries: Add, Mul, LayerNormalization,
    Softmax, ReduceMean, MatMul, Gemm, Conv, the data-movement ops, ...), what integer-only NPUs need. Ops it
    has no quantizer for (Erf, Div, Sqrt, ...) compute in float on dequantized values.
  * calibration: onnxruntime's calibrator (``create_calibrator``, ranges saved with ``save_tensors_data`` and
    read by ``quantize_static`` through ``calibration_cache_path``). percentile -> CalibrationMethod.Percentile
    (99.999th percentile of |x|, 2048 bins; the tool's defaults), entropy -> CalibrationMethod.Entropy
    (KL-divergence threshold, 2048 bins against 128 quantized bins), minmax -> CalibrationMethod.MinMax. The
    calibrator is called directly because quantize_static cannot set the histogram size: its entropy
    calibrator has 128 bins for 128 quantized bins, i.e. a single candidate threshold, plain min/max.
    ``quant_pre_process`` is not run: it rewrites the converter's graph (MatMul + Add -> Reshape/Gemm) for no
    gain in accuracy or in the kernels onnxruntime picks.

- ``w8`` (data-free): Linear weights -> ``MatMulNBitsQuantizer`` (``DefaultWeightOnlyQuantConfig``, bits=8,
  symmetric, blocks along the input channels; MatMulNBits has no per-channel mode, so each weight gets the
  block of 128/64/32/16 that stores it smallest, one tool run per block size: :func:`matmul_blocks`) ->
  com.microsoft MatMulNBits, which dequantizes inside its fp32 GEMM (smaller, not faster, on the CPU).
  No onnxruntime tool compresses Conv weights without quantizing activations, so Conv/ConvTranspose weights
  get the smallest graph edit instead: the float initializer becomes DequantizeLinear(int8 initializer,
  per-output-channel scale, axis) with the scales and values computed by onnxruntime's own
  ``quant_utils.compute_data_quant_params`` / ``quantize_onnx_initializer``. Activations stay float.
- ``w4`` (data-free): Linear weights -> MatMulNBits bits=4, blocks of 32 input channels, asymmetric (uint4 with
  a 4-bit zero point per block: 16 levels instead of 15). Conv weights stay float (no 4-bit Conv in
  onnxruntime): reported in ``float_ops`` and the notes.

Linear layers that torch's exporter wrote as Gemm (2-D inputs: attention's out-projection, the head) are first
rewritten as MatMul (+ bias Add) so the weight-only tool covers them (:func:`gemms_as_matmuls`). MatMulNBits is
left at ``accuracy_level`` unset: onnxruntime computes in fp32 (level 4 would quantize the activations to
int8 on the fly). Inputs and outputs stay float32 in every case, so the same onnxruntime session runs the
fp32 and the quantized artifact. The quantized / float op counts are read back from the written graph
(:func:`count_ops`).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgevit.errors import EdgevitError
from edgevit.export.backends.onnx.qdq_passes import rewrite_artifact
from edgevit.export.backends.onnx.session import FOLD_WEIGHTS_CONFIG
from edgevit.export.quantization import QuantSpec

if TYPE_CHECKING:
    import onnx

#: the packages whose versions decide a quantized artifact's bytes (the bench's export cache key)
PACKAGES = ("onnxruntime", "onnx")

PRECISIONS: dict[str, str] = {
    "int8": "onnxruntime quantize_static QDQ s8s8: int8 per-channel weights, int8 per-tensor calibrated "
            "activations (safe: MatMul/Conv/Gemm only; full: every op the tool can quantize)",
    "w8": "onnxruntime MatMulNBitsQuantizer bits=8 (Linear -> MatMulNBits) + int8 per-channel DequantizeLinear "
          "Conv weights; activations float",
    "w4": "onnxruntime MatMulNBitsQuantizer bits=4, blocks of 32 (Linear -> MatMulNBits); Conv stays float",
}

#: the int8 calibration methods (onnxruntime CalibrationMethod Percentile, Entropy, MinMax); the first is the default
METHODS = ("percentile", "entropy", "minmax")
#: the matrix-multiplying ops the transformer-safe int8 scheme quantizes
SAFE_OP_TYPES = ("MatMul", "Conv", "Gemm")
W4_BLOCK = 32
W8_BLOCKS = (128, 64, 32, 16)  # MatMulNBits block sizes (powers of two >= 16), largest first: ties go big
PERCENTILE = 99.999
HISTOGRAM_BINS = 2048
#: ops that move, cut or relabel data: neither quantized nor float compute, and transparent when tracing a value
DATA_MOVEMENT = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split", "Concat", "Gather",
    "GatherElements", "GatherND", "Expand", "Tile", "Pad", "Identity", "Cast", "CastLike", "DepthToSpace",
    "SpaceToDepth", "ScatterND", "ScatterElements", "Dropout",
})
QUANTIZERS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: ops that describe shapes (their outputs are integer constants for our purpose)
SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "Range"})
NOT_COMPUTE = DATA_MOVEMENT | QUANTIZERS | SHAPE_OPS | {"Constant"}
#: ops whose trailing float inputs are parameters (bounds, scales), not operands: how many leading inputs count
DATA_INPUTS = {"Clip": 1, "Resize": 1, "Upsample": 1}
FLOAT_TYPES = frozenset({1, 10, 11, 16})  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
#: ops that only select or clamp values: exact on int8, so the safe scheme lets them run as int8 units (onnxruntime
#: folds a Relu into the QuantizeLinear after it), which keeps Conv -> Relu -> Conv chains in int8 kernels
EXACT_ON_INT8 = frozenset({"Relu", "Clip", "MaxPool", "GlobalMaxPool"})
#: ops that hold their own low-precision weights
NBIT_OPS = frozenset({"MatMulNBits", "GatherBlockQuantized"})
WEIGHTED = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"}) | NBIT_OPS


def quantize(fp32_artifact: Path, out: Path, spec: QuantSpec,
             calibration: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """Quantize the .onnx at ``fp32_artifact`` with onnxruntime as ``spec`` asks; write the .onnx at ``out``."""
    import onnx

    if spec.precision == "int8":
        info = quantize_int8(Path(fp32_artifact), Path(out), spec, calibration)
    else:
        info = compress_weights(Path(fp32_artifact), Path(out), spec.precision)
    onnx.checker.check_model(str(out))
    quantized, floating, notes = count_ops(onnx.load(str(out)))
    if not quantized:
        raise EdgevitError(f"onnxruntime quantized nothing in this model at {spec.precision} "
                           "(no MatMul/Gemm/Conv weights it can take)")
    return {
        "tool": info["tool"],
        "versions": {name: version(name) for name in ("onnxruntime", "onnx")},
        "weights": info["weights"],
        "activations": info["activations"],
        "quantized_ops": quantized,
        "float_ops": floating,
        "notes": info["notes"] + notes,
        # the quantized-graph passes of the accelerator (only when it has some: the keys stay INFO_KEYS otherwise)
        **({"passes": info["passes"]} if info.get("passes") else {}),
        **({"session_config": info["session_config"]} if info.get("session_config") else {}),
    }


# --- int8: quantize_static ------------------------------------------------------------------------------


def quantize_int8(src: Path, out: Path, spec: QuantSpec,
                  calibration: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """``quantize_static`` (QDQ, s8s8, per-channel) with the scheme's op list and the method's ranges."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if not calibration:
        raise EdgevitError("onnx int8 needs calibration samples (got none)")
    safe = spec.scheme == "safe"
    op_types = list(SAFE_OP_TYPES) if safe else None  # None: the tool's full registry
    # Asymmetric activations: softmax and GELU outputs are one-sided, a symmetric range would waste half the
    # levels. Outputs of quantized ops are quantized too (the tool's default): that is what lets onnxruntime
    # fuse MatMul + its bias Add into QLinearMatMul instead of a float Gemm on dequantized values.
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    chosen = spec.with_method(METHODS).method  # "auto": this tool's default
    method, described = calibration_method(chosen)
    with tempfile.TemporaryDirectory(prefix="edgevit-ort-quant-") as tmp:
        cache = calibrate(src, op_types, chosen, calibration, Path(tmp))

        def run(types: list[str] | None) -> None:
            quantize_static(str(src), str(out), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=types,
                            per_channel=True, reduce_range=False, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method, extra_options=extra,
                            calibration_cache_path=str(cache))

        left_float = None
        if safe:
            run(op_types)
        else:
            left_float = _run_full_registry(run)
    notes = [f"calibrated on {len(calibration)} samples ({described})"]
    if left_float:
        notes.append(left_float)
    if safe:
        model = onnx.load(str(out))
        rewired, freed = keep_float_ops_float(model, SAFE_OP_TYPES), unquantize_graph_outputs(model)
        drop_dead_quantizers(model)
        onnx.save_model(model, str(out))
        notes.append("safe: op_types_to_quantize=MatMul/Conv/Gemm; the float ops read their dequantized outputs "
                     "and compute in float")
        if rewired or freed:
            notes.append(f"edgevit rewired {rewired} input(s) of float-kept ops that would have formed an int8 "
                         f"unit (e.g. Softmax between two MatMuls) to the float tensors, and left {freed} graph "
                         "output(s) unrounded")
    else:
        notes.append("full: quantize_static's default op list (its QDQ + QLinear registries); ops it has no "
                     "quantizer for (Erf, Div, ...) compute in float on dequantized values")
    # the accelerator's QDQ passes (export/backends/onnx/qdq_passes.py): what its EP needs of the graph
    rewritten = rewrite_artifact(out, getattr(spec, "accelerator", None), "int8", calibration, src)
    notes += rewritten["notes"]
    return {
        "passes": rewritten["passes"],
        "tool": f"onnxruntime.quantization.create_calibrator + quantize_static (QDQ, QInt8/QInt8, per_channel, "
                f"op_types_to_quantize={'MatMul,Conv,Gemm' if safe else 'default'})",
        "weights": "int8 per-channel symmetric (DequantizeLinear of int8 initializers, axis = output channel)",
        "activations": f"int8 per-tensor asymmetric (QuantizeLinear/DequantizeLinear), {described}",
        "notes": notes,
    }


#: onnxruntime 1.31's QDQ quantizer message when an op would share a weight's quantization parameters
_SHARED_WEIGHT = "shared mode is not supported for weight"


def _run_full_registry(run: Callable[[list[str] | None], None]) -> str | None:
    """``run`` with the tool's whole op list; if the tool refuses the graph because of InstanceNormalization,
    again without it, and say so (``None`` when nothing was left out).

    Why: on MobileViT v2 (GroupNorm(1) exported as InstanceNormalization with 1-element scale and bias
    initializers) ``quantize_static`` raises "Quantization parameter shared mode is not supported for weight
    yet" from its InstanceNormalization quantizer. Leaving those nodes float (DequantizeLinear before, the
    next QuantizeLinear after) is what `full` does for any op the tool cannot quantize.
    """
    try:
        run(None)
        return None
    except ValueError as exc:
        if _SHARED_WEIGHT not in str(exc):
            raise
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    run(sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - {"InstanceNormalization"}))
    return ("full: InstanceNormalization left float (onnxruntime's quantizer refused it: 'Quantization "
            "parameter shared mode is not supported for weight yet')")


def calibration_method(method: str) -> tuple[Any, str]:
    """The onnxruntime CalibrationMethod for ``method`` and how the manifest says it."""
    from onnxruntime.quantization import CalibrationMethod

    return {
        "percentile": (CalibrationMethod.Percentile,
                       f"range = +-{PERCENTILE}th percentile of |x| ({HISTOGRAM_BINS}-bin histogram)"),
        "entropy": (CalibrationMethod.Entropy,
                    f"range = KL-divergence optimum ({HISTOGRAM_BINS}-bin histogram, 128 quantized bins)"),
        "minmax": (CalibrationMethod.MinMax, "range = global min/max over the calibration samples"),
    }[method]


def calibrate(src: Path, op_types: list[str] | None, method: str,
              calibration: Sequence[Sequence[np.ndarray]], tmp: Path) -> Path:
    """Run onnxruntime's calibrator over the samples; the ranges as the calibration cache quantize_static reads.

    Called directly rather than through quantize_static because only here can the histogram size be set
    (quantize_static's entropy calibrator has as many bins as quantized bins: one candidate = min/max)."""
    from onnxruntime.quantization import create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    options = {"minmax": {}, "percentile": {"num_bins": HISTOGRAM_BINS, "percentile": PERCENTILE},
               "entropy": {"num_bins": HISTOGRAM_BINS, "num_quantized_bins": 128}}[method]
    calibrator = create_calibrator(src, op_types, augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=calibration_method(method)[0], extra_options=options)
    calibrator.collect_data(SampleReader(src, calibration))
    cache = tmp / "calibration.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


class SampleReader:
    """onnxruntime's CalibrationDataReader protocol over edgevit's samples (one list of input arrays each)."""

    def __init__(self, model_path: Path, samples: Sequence[Sequence[np.ndarray]]) -> None:
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
        weights = {i.name for i in graph.initializer}
        names = [i.name for i in graph.input if i.name not in weights]
        for sample in samples:
            if len(sample) != len(names):
                raise EdgevitError(f"a calibration sample has {len(sample)} inputs; the model takes {len(names)}")
        self.feeds = iter([{n: np.asarray(a, dtype=np.float32) for n, a in zip(names, s)} for s in samples])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def keep_float_ops_float(model: "onnx.ModelProto", quantized_types: Sequence[str]) -> int:
    """Give every op outside ``quantized_types`` that reads nothing but dequantized values one float operand back;
    the number of inputs rewired.

    quantize_static quantizes the outputs of the ops it quantizes and hands the QDQ pair to *every* reader, so
    a Softmax between Q.K^T and A.V, or a residual Add between two Convs, reads int8 and writes int8: a QDQ node
    unit that onnxruntime runs as an integer kernel (QLinearSoftmax, QLinearAdd), as an NPU would. One float
    operand is enough to make it compute in float (a bias Add, or a LayerNorm with its float gamma, never was a
    unit). The operand rewired is the one whose QDQ pair other readers keep, so the op that produced it keeps
    its quantized output and its integer kernel where possible (onnxruntime's int8 Conv needs one)."""
    graph = QdqGraph(model)
    kept = set(quantized_types) | NOT_COMPUTE | EXACT_ON_INT8
    rewired = 0
    for node in model.graph.node:
        if node.op_type not in kept and graph.reads_only_quantized(node):
            rewired += graph.read_float(node)
    return rewired


def unquantize_graph_outputs(model: "onnx.ModelProto") -> int:
    """Drop the QuantizeLinear -> DequantizeLinear pair the tool puts on a graph output (the last Linear's
    output): the logits stay float32 as computed, not rounded to 256 levels. The number of outputs freed (the
    QuantizeLinear left unread goes with :func:`drop_dead_quantizers`)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    freed = 0
    for output in graph.output:
        dq = producer.get(output.name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        maker = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if maker is None:
            continue
        # The tool renamed the maker's output to the QuantizeLinear's input: give it the graph output's name back.
        renamed = q.input[0]
        graph.node.remove(dq)
        for node in graph.node:
            node.input[:] = [output.name if n == renamed else n for n in node.input]
        maker.output[:] = [output.name if n == renamed else n for n in maker.output]
        freed += 1
    return freed


def drop_dead_quantizers(model: "onnx.ModelProto") -> None:
    """Remove the QuantizeLinear/DequantizeLinear nodes nobody reads any more, and their scales and zero points."""
    graph = model.graph
    released: set[str] = set()
    while True:
        read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if node.op_type in QUANTIZERS and not any(o in read for o in node.output)]
        if not dead:
            break
        for node in dead:
            released.update(node.input)
            graph.node.remove(node)
    _drop_unused_initializers(graph, released)


# --- w8 / w4: MatMulNBits (+ DequantizeLinear Conv weights for w8) -----------------------------------------


def compress_weights(src: Path, out: Path, precision: str) -> dict[str, Any]:
    """Weight-only: Linear weights through MatMulNBitsQuantizer; w8 also stores Conv weights as int8."""
    import onnx

    model = onnx.load(str(src))
    rewritten = gemms_as_matmuls(model)
    bits = 8 if precision == "w8" else 4
    blocks = matmul_blocks(model, bits)
    model = matmul_nbits(model, bits, blocks)
    used = "/".join(str(b) for b in sorted(set(blocks.values()))) or str(W4_BLOCK)
    notes = [f"{rewritten} Gemm(s) rewritten as MatMul (+ bias Add) so MatMulNBits covers every Linear"] \
        if rewritten else []
    tool = (f"onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer(DefaultWeightOnlyQuantConfig("
            f"bits={bits}, block_size={used}, is_symmetric={bits == 8}, quant_format=QOperator))")
    if bits == 8:
        convs = conv_weights_as_int8(model)
        onnx.save_model(model, str(out))
        notes.append(f"{convs} Conv weight(s) stored as int8 DequantizeLinear(per output channel, symmetric) by a "
                     "graph edit with onnxruntime's quant_utils (no onnxruntime weight-only tool takes Conv)")
        notes.append("load with session config session.disable_quant_qdq=1 (edgevit's sessions do): onnxruntime then "
                     "folds the Conv weights' DequantizeLinear to float at load and pre-packs them as for fp32 "
                     "(without it those Convs lose their NCHWc kernels: 0.83x fp32 on MobileViT-v2)")
        notes.append(f"MatMulNBits accuracy_level {W8_ACCURACY_LEVEL}: onnxruntime's CPU kernel quantizes the activations "
                     "per block at run time and multiplies in int8 (level 0, an fp32 GEMM on dequantized blocks, was "
                     "1.3x slower than fp32)")
        return {
            "tool": tool + " + quant_utils.compute_data_quant_params/quantize_onnx_initializer (Conv)",
            "weights": f"int8 symmetric: MatMul weights in blocks of {used} input channels (MatMulNBits, fp32 "
                       "scales; per weight the block that stores it smallest), Conv weights per output channel "
                       "(DequantizeLinear)",
            "activations": f"float in the graph; int8 per block inside MatMulNBits (accuracy_level {W8_ACCURACY_LEVEL})",
            "session_config": dict(FOLD_WEIGHTS_CONFIG),
            "notes": notes,
        }
    onnx.save_model(model, str(out))
    notes.append("Conv weights stay float: onnxruntime has no 4-bit Conv (MatMulNBits takes MatMul only)")
    return {
        "tool": tool,
        "weights": f"uint4 asymmetric, one fp32 scale and 4-bit zero point per block of {W4_BLOCK} input channels "
                   "(MatMulNBits); Conv weights float",
        "activations": "float",
        "notes": notes,
    }


def matmul_blocks(model: "onnx.ModelProto", bits: int) -> dict[str, int]:
    """Each MatMul with a constant weight -> its MatMulNBits block size along the input channels.

    w4: 32. w8: MatMulNBits has no per-channel mode, so the block (128, 64, 32 or 16) that stores the weight in
    the fewest bytes: int8 values padded to whole blocks plus one fp32 scale per block (K=768 -> 128, K=192 ->
    64, K=80 -> 16). Unnamed MatMuls get a name, the tool's exclusion list works by name."""
    weights = {i.name: i for i in model.graph.initializer}
    blocks = {}
    for index, node in enumerate(model.graph.node):
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) < 2:
            continue
        node.name = node.name or f"MatMul_{index}"
        rows = weight.dims[-2]
        blocks[node.name] = W4_BLOCK if bits == 4 else min(W8_BLOCKS, key=lambda b: -(-rows // b) * (b + 4))
    return blocks


#: MatMulNBits 8-bit at accuracy_level 0 dequantizes each block into an fp32 GEMM and measured 1.3x *slower*
#: than the fp32 graph on onnxruntime's CPU provider (deit_tiny, 224); at level 4 the kernel quantizes the
#: activations per block at run time and multiplies in int8 (0.86x the fp32 time). Level 4 is also what
#: onnxruntime itself picks when it fuses DequantizeLinear weights into MatMulNBits (its default
#: ``session.qdq_matmulnbits_accuracy_level``), so a w8 graph written either way runs the same kernel. The
#: quantization gate judges the result in onnxruntime, activation rounding included.
W8_ACCURACY_LEVEL = 4


def matmul_nbits(model: "onnx.ModelProto", bits: int, blocks: dict[str, int]) -> "onnx.ModelProto":
    """MatMulNBitsQuantizer over the MatMuls in ``blocks``: one run per block size, the others excluded."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    for block in sorted(set(blocks.values()), reverse=True):
        # w8 symmetric (int8, no zero points: the conventional int8 weight); w4 asymmetric (uint4 and a 4-bit
        # zero point per block: 16 levels instead of 15, the tool's default). w8 at accuracy_level 4 (W8_ACCURACY_LEVEL);
        # w4 unset: fp32 compute.
        config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=bits == 8, bits=bits,
                                              accuracy_level=W8_ACCURACY_LEVEL if bits == 8 else None,
                                              quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
        others = [name for name, b in blocks.items() if b != block]
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=config)
        quantizer.process()
        model = quantizer.model.model
    return model


def gemms_as_matmuls(model: "onnx.ModelProto") -> int:
    """Rewrite each Gemm with a constant 2-D B (alpha 1, beta 1, no transA) as MatMul (+ Add of C); the count.

    torch's exporter writes a Linear on 2-D inputs as Gemm, which MatMulNBitsQuantizer does not take."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    nodes, rewritten, transposed = [], 0, set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b = weights.get(node.input[1]) if node.op_type == "Gemm" else None
        has_c = len(node.input) > 2 and node.input[2] != ""
        if (b is None or len(b.dims) != 2 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or (has_c and attrs.get("beta", 1.0) != 1.0)):
            nodes.append(node)
            continue
        b_name = b.name
        if attrs.get("transB", 0):
            b_name = f"{b.name}_transposed"
            transposed.add(b.name)
            if b_name not in weights:
                weights[b_name] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(b).T), b_name)
                graph.initializer.append(weights[b_name])
        product = f"{node.output[0]}_matmul" if has_c else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [product], name=f"{node.name}_matmul"))
        if has_c:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph, transposed)
    return rewritten


def conv_weights_as_int8(model: "onnx.ModelProto") -> int:
    """Replace each Conv/ConvTranspose float weight initializer by DequantizeLinear(int8, per-channel scale,
    axis = output channel); the count. The maths is onnxruntime's (quant_utils), as its QDQ quantizer does it."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_onnx_initializer

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    dequantized: dict[str, str] = {}
    unpackers = []
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type in ("Conv", "ConvTranspose") else None
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if weight is None or weight.data_type != TensorProto.FLOAT or (node.op_type == "ConvTranspose" and group != 1):
            continue
        if weight.name not in dequantized:
            axis = 0 if node.op_type == "Conv" else 1  # the output channel of the weight's layout
            values = numpy_helper.to_array(weight)
            params = [compute_data_quant_params(values.take(c, axis).ravel(), TensorProto.INT8, symmetric=True)
                      for c in range(values.shape[axis])]
            zero_points = np.array([zp for zp, _ in params], dtype=np.int8)
            scales = np.array([scale for _, scale in params], dtype=np.float32)
            stored = quantize_onnx_initializer(weight, TensorProto.INT8, zero_points, scales, axis=axis,
                                               quant_weight_name=f"{weight.name}_int8")
            graph.initializer.extend([stored, numpy_helper.from_array(scales, f"{weight.name}_scale"),
                                      numpy_helper.from_array(zero_points, f"{weight.name}_zero_point")])
            dequantized[weight.name] = f"{weight.name}_dequantized"
            unpackers.append(helper.make_node(
                "DequantizeLinear", [stored.name, f"{weight.name}_scale", f"{weight.name}_zero_point"],
                [dequantized[weight.name]], name=f"{weight.name}_DequantizeLinear", axis=axis))
        node.input[1] = dequantized[weight.name]
    # Only initializers feed them, so at the front of the graph they are in topological order.
    for unpacker in reversed(unpackers):
        graph.node.insert(0, unpacker)
    _drop_unused_initializers(graph, set(dequantized))
    return len(dequantized)


def _drop_unused_initializers(graph: "onnx.GraphProto", candidates: set[str]) -> None:
    """Remove the ``candidates`` (initializers an edit stopped using) that no node or graph output reads."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name not in candidates or i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


# --- reading the written graph --------------------------------------------------------------------------------


class QdqGraph:
    """Which values of an ONNX graph are dequantized (int8/int4 behind a DequantizeLinear), which ops read
    only such values, and how to give an op its float input back."""

    def __init__(self, model: "onnx.ModelProto") -> None:
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.readers = Counter(name for node in model.graph.node for name in node.input)
        self.initializers = {i.name: i for i in model.graph.initializer}
        self.integer_constants = {i.name for i in model.graph.initializer if i.data_type not in FLOAT_TYPES}
        for node in model.graph.node:  # shape arithmetic on integer constants (topological order)
            if (node.op_type in SHAPE_OPS or _is_integer_constant(node)
                    or (node.input and node.op_type not in QUANTIZERS
                        and all(not n or n in self.integer_constants for n in node.input))):
                self.integer_constants.update(node.output)

    def source(self, name: str) -> "onnx.NodeProto | None":
        """The node that computed ``name``, looking through data-movement ops."""
        node = self.producer.get(name)
        while node is not None and node.op_type in DATA_MOVEMENT and node.input:
            node = self.producer.get(node.input[0])
        return node

    def is_dequantized(self, name: str) -> bool:
        node = self.source(name)
        return node is not None and node.op_type == "DequantizeLinear"

    def data_inputs(self, node: "onnx.NodeProto") -> list[str]:
        """The float operands of ``node`` (not axes, shapes or other integer constants)."""
        names = node.input[:DATA_INPUTS.get(node.op_type, len(node.input))]
        return [n for n in names if n and n not in self.integer_constants]

    def reads_only_quantized(self, node: "onnx.NodeProto") -> bool:
        """Every float operand is a dequantized value: a QDQ node unit, an integer kernel at run time."""
        operands = self.data_inputs(node)
        return bool(operands) and all(self.is_dequantized(n) for n in operands)

    def has_quantized_weight(self, node: "onnx.NodeProto") -> bool:
        """An operand is a constant stored in low precision (DequantizeLinear of an initializer)."""
        sources = [self.source(n) for n in self.data_inputs(node)]
        return any(s is not None and s.op_type == "DequantizeLinear" and s.input[0] in self.initializers
                   for s in sources)

    def is_quantized(self, node: "onnx.NodeProto") -> bool:
        return node.op_type in NBIT_OPS or self.has_quantized_weight(node) or self.reads_only_quantized(node)

    def is_bias_add(self, node: "onnx.NodeProto") -> bool:
        """A float constant added straight onto a MatMul/Gemm/Conv output: that layer's bias."""
        return (node.op_type == "Add" and any(n in self.initializers for n in node.input)
                and any(self.producer_before_quantizers(n) in WEIGHTED for n in node.input))

    def producer_before_quantizers(self, name: str) -> str:
        """The op type that computed ``name``, looking through a QuantizeLinear -> DequantizeLinear pair."""
        node = self.producer.get(name)
        while node is not None and node.op_type in QUANTIZERS:
            node = self.producer.get(node.input[0])
        return node.op_type if node is not None else ""

    def read_float(self, node: "onnx.NodeProto") -> int:
        """Point one operand of ``node`` (or the data-movement op between it and the DequantizeLinear) at the
        float tensor its QuantizeLinear took: the operand whose DequantizeLinear has the most readers. 1 if
        rewired (0: only weights, nothing float to go back to)."""
        pairs = [pair for name in self.data_inputs(node) if (pair := self._activation_pair(node, name))]
        if not pairs:
            return 0
        reader, dequantized, float_tensor = max(pairs, key=lambda pair: self.readers[pair[1]])
        reader.input[:] = [float_tensor if n == dequantized else n for n in reader.input]
        self.readers[dequantized] -= 1
        return 1

    def _activation_pair(self, reader: "onnx.NodeProto", name: str) -> tuple["onnx.NodeProto", str, str] | None:
        """(the node reading the DequantizeLinear output, that output, the float tensor before the QuantizeLinear)
        for an activation's QDQ pair behind ``name`` (through data-movement ops); None for anything else."""
        while (mover := self.producer.get(name)) is not None and mover.op_type in DATA_MOVEMENT:
            reader, name = mover, mover.input[0]
        dq = self.producer.get(name)
        q = self.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return (reader, name, q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None


def _is_integer_constant(node: "onnx.NodeProto") -> bool:
    if node.op_type != "Constant":
        return False
    value = next((a for a in node.attribute if a.name in ("value", "value_int", "value_ints")), None)
    return value is not None and (value.name != "value" or value.t.data_type not in FLOAT_TYPES)


def count_ops(model: "onnx.ModelProto") -> tuple[dict[str, int], dict[str, int], list[str]]:
    """{op type: count} of the compute ops that run quantized (every float operand dequantized, a weight stored
    in int8/int4, or a MatMulNBits), of those that compute in float, and notes."""
    graph = QdqGraph(model)
    quantized: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    bias_adds = 0
    for node in model.graph.node:
        if node.op_type in NOT_COMPUTE or all(o in graph.integer_constants for o in node.output):
            continue
        if graph.is_bias_add(node):
            bias_adds += 1
            continue
        (quantized if graph.is_quantized(node) else floating)[node.op_type] += 1
    notes = [f"{bias_adds} float bias Add(s) counted with their MatMul/Gemm/Conv"] if bias_adds else []
    return dict(sorted(quantized.items())), dict(sorted(floating.items())), notes
